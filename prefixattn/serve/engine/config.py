"""The serving engine's options: one frozen :class:`EngineConfig` carried from the command
line (``prefixattn serve``) through :func:`~prefixattn.serve.create_app` to
:class:`~prefixattn.serve.engine.core.Engine`.

An option is a field here, with its default and its help (``field(metadata={"help": ...})``,
as PEFT's configs; the ``prefixattn serve`` flags take their help from it); adding an option
adds a field, not a keyword to every signature on the way down. A value out of range raises
``ValueError`` naming the field when the config is built; a keyword that is not a field
raises ``TypeError`` naming it (:func:`merge_overrides`), never silently dropped.

Pure Python (no torch): the command line reads it to build its parser.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CPU_LINEAR",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_MAX_MODEL_LEN",
    "FIELDS",
    "EngineConfig",
    "buckets_up_to",
    "field_help",
    "merge_overrides",
    "with_cuda_graphs",
]

DEFAULT_MAX_MODEL_LEN = 1024
DEFAULT_BLOCK_SIZE = 16
CPU_LINEAR = ("auto", "onednn", "torch")


@dataclass(frozen=True)
class EngineConfig:
    """Every option of the serving engine (see each field's ``metadata["help"]``).

    ``EngineConfig()`` is the default engine; ``dataclasses.replace(config, name=value)``
    changes one option (validated again). ``Engine(bank, tokenizer, config, **overrides)``
    and ``create_app(model, tokenizer, engine=config, **overrides)`` take one; their
    keyword overrides are field names and win over the config's values.

    Raises:
        ValueError: a value out of range, naming the field (:meth:`validate`).
    """

    max_num_seqs: int = field(
        default=16,
        metadata={
            "help": "rows running at once, each with its own KV blocks (continuous batching)"
        },
    )
    max_num_batched_tokens: int = field(
        default=512,
        metadata={
            "help": "tokens per step: one per decoding row plus prefill chunks (at least "
            "``max_num_seqs``)"
        },
    )
    max_queue: int = field(
        default=256,
        metadata={
            "help": "requests waiting beyond which a new one is refused (QueueFullError; the "
            "HTTP server answers 429)"
        },
    )
    kv_slots: int | None = field(
        default=None,
        metadata={
            "help": "size the paged KV cache for this many rows of ``max_model_len`` tokens "
            "(default ``max_num_seqs``; ``num_blocks`` or ``kv_cache_memory`` override it)"
        },
    )
    max_model_len: int | None = field(
        default=None,
        metadata={
            "help": "prompt + max_tokens of one request, at least 2 (the task prefix is not "
            "counted: it is read from the bank; default the model's context, at most "
            f"{DEFAULT_MAX_MODEL_LEN}); a request that needs more is refused (HTTP 400)"
        },
    )
    block_size: int = field(
        default=DEFAULT_BLOCK_SIZE,
        metadata={"help": "tokens per KV block (a power of two >= 16)"},
    )
    num_blocks: int | None = field(
        default=None,
        metadata={"help": "KV blocks preallocated (instead of ``kv_cache_memory``)"},
    )
    kv_cache_memory: int | None = field(
        default=None,
        metadata={"help": "bytes of KV blocks preallocated (instead of ``num_blocks``)"},
    )
    enable_prefix_caching: bool = field(
        default=True,
        metadata={
            "help": "reuse the KV blocks of earlier requests' prompts (same task, same leading "
            "tokens; vLLM's automatic prefix caching)"
        },
    )
    seed: int | None = field(
        default=None,
        metadata={"help": "seeds the generators of sampled requests that give no seed"},
    )
    decode_buckets: tuple[int, ...] | None = field(
        default=None,
        metadata={
            "help": "run decode-only steps padded to these batch sizes (ascending distinct "
            "ints >= 1) over static buffers, captured as CUDA graphs at start on a CUDA model "
            "(eager elsewhere); a step with a prefill chunk runs the packed forward; None: "
            "dynamic shapes"
        },
    )
    compile: bool = field(
        default=False,
        metadata={
            "help": "compile the decode step with torch.compile (Inductor) for shape buckets "
            "(``decode_buckets``, default powers of two up to ``max_num_seqs``) at start (CPU; "
            "CUDA graphs on a CUDA model); the compile time is logged and in the metrics "
            "(cuda_graphs.compile_s); a step without a compiled bucket runs eagerly, counted"
        },
    )
    compile_budget_s: float | None = field(
        default=None,
        metadata={
            "help": "with ``compile``: stop compiling further buckets after this many seconds "
            "(> 0; their steps run eagerly, counted); unset: no bound"
        },
    )
    cpu_linear: str = field(
        default="auto",
        metadata={
            "help": "the model's linear layers on a CPU model while the engine runs: 'onednn': "
            "over weights prepacked once for oneDNN (2-3x faster at a decode step's few rows; "
            "an error where oneDNN cannot pack the model's dtype); 'torch': as they are; "
            "'auto': 'onednn' where it packs, else 'torch' (the path taken is logged, and in "
            "the metrics 'linear'); packed at start, reverted at stop",
            "choices": CPU_LINEAR,
        },
    )
    keep_linear_weights: bool = field(
        default=False,
        metadata={
            "help": "with packed linears (``cpu_linear``): keep the original weights beside the "
            "packed copies (their bytes twice) so code outside the engine can read them while "
            "it runs; by default the originals of frozen, untied weights are released at start "
            "(their values live in the packed copies) and restored exactly at stop"
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.decode_buckets, list):  # a list from JSON / argparse: hashable
            object.__setattr__(self, "decode_buckets", tuple(self.decode_buckets))
        self.validate()

    def validate(self) -> None:
        """Check every field (run when the config is built).

        Raises:
            ValueError: the first value out of range, naming its field.
        """
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_queue"):
            _check_int(name, getattr(self, name), 1)
        for name in ("kv_slots", "num_blocks", "kv_cache_memory"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        if self.max_model_len is not None:
            _check_int("max_model_len", self.max_model_len, 2)
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens must be >= max_num_seqs ({self.max_num_seqs}), got "
                f"{self.max_num_batched_tokens}"
            )
        bs = self.block_size
        if not isinstance(bs, int) or isinstance(bs, bool) or bs < 16 or bs & (bs - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size!r}")
        if self.num_blocks is not None and self.kv_cache_memory is not None:
            raise ValueError(
                f"give num_blocks or kv_cache_memory, not both (got num_blocks={self.num_blocks}, "
                f"kv_cache_memory={self.kv_cache_memory})"
            )
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool)
        ):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        for name in ("enable_prefix_caching", "compile", "keep_linear_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        b = self.decode_buckets
        if b is not None and (
            not isinstance(b, tuple)
            or not b
            or any(not isinstance(x, int) or isinstance(x, bool) for x in b)
            or list(b) != sorted(set(b))
            or b[0] < 1
        ):
            raise ValueError(f"decode_buckets must be ascending distinct ints >= 1, got {b!r}")
        budget = self.compile_budget_s
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0
        ):
            raise ValueError(f"compile_budget_s must be > 0 or None, got {budget!r}")
        if self.cpu_linear not in CPU_LINEAR:
            raise ValueError(f"cpu_linear must be one of {CPU_LINEAR}, got {self.cpu_linear!r}")


def buckets_up_to(n: int) -> tuple[int, ...]:
    """Powers of two below ``n``, and ``n`` itself: the buckets for ``max_num_seqs = n``."""
    out = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < n]
    return (*out, n)


def with_cuda_graphs(config: EngineConfig) -> EngineConfig:
    """``config`` with ``decode_buckets`` = :func:`buckets_up_to` ``max_num_seqs``: what
    ``create_app(cuda_graphs=True)`` and ``prefixattn serve --cuda-graphs`` ask for.

    Raises:
        ValueError: ``config.decode_buckets`` is already given.
    """
    if config.decode_buckets is not None:
        raise ValueError(
            "cuda_graphs sets decode_buckets (powers of two up to max_num_seqs); give one of "
            f"them, not both (decode_buckets={config.decode_buckets})"
        )
    return dataclasses.replace(config, decode_buckets=buckets_up_to(config.max_num_seqs))


def _check_int(name: str, value: Any, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(EngineConfig))


def field_help(name: str) -> str:
    """The help text of field ``name`` (``metadata["help"]``).

    Raises:
        KeyError: ``name`` is not a field of :class:`EngineConfig`.
    """
    for f in dataclasses.fields(EngineConfig):
        if f.name == name:
            return f.metadata["help"]
    raise KeyError(f"EngineConfig has no field {name!r}")


def merge_overrides(
    config: EngineConfig | None, overrides: Mapping[str, Any], *, caller: str
) -> EngineConfig:
    """``config`` (None: the defaults) with the fields named in ``overrides`` replaced.

    Arguments:
        config: the base config.
        overrides: ``{field name: value}``; these win over ``config``'s values.
        caller: the function whose keywords ``overrides`` are (named in the errors).

    Raises:
        TypeError: ``config`` is not an EngineConfig, or a key of ``overrides`` is not a
            field (named: an option is never silently dropped).
        ValueError: a value out of range (naming the field).
    """
    if config is None:
        config = EngineConfig()
    elif not isinstance(config, EngineConfig):
        raise TypeError(f"{caller}: config must be an EngineConfig, got {type(config).__name__}")
    unknown = [k for k in overrides if k not in FIELDS]
    if unknown:
        raise TypeError(
            f"{caller}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}: "
            f"not EngineConfig fields (those are: {', '.join(FIELDS)})"
        )
    return dataclasses.replace(config, **overrides) if overrides else config
