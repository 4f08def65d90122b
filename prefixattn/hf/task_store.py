"""The task store: the on-disk formats of a task, read into tensors and configs.

A task is a directory in one of four formats::

                 prefix (K/V per layer)                soft prompt (embeddings)
    prefixattn   prefixattn_prefix.json                prefixattn_prompt.json
                 prefix.safetensors [Hkv, P, D] x L x2  prompt.safetensors [P, hidden]
    PEFT         adapter_config.json PREFIX_TUNING      adapter_config.json PROMPT_TUNING
                 adapter_model.* [P, L*2*Hkv*D]         adapter_model.* [P, hidden]

This module only reads files (no model, no tuner object): it sits below
:mod:`~prefixattn.hf.prefix_tuning`, :mod:`~prefixattn.hf.prompt_tuning`,
:class:`~prefixattn.hf.bank.TaskBank` and the server, which all import it downward.
:func:`read_task` gives a :class:`TaskArtifact` (a prefix [L, 2, Hkv, P, D] or a soft
prompt [P, hidden], float32 on the CPU); turning a soft prompt into a prefix runs the model
and is the bank's job.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._common import PEFT_WEIGHTS_KEY, read_artifact, read_peft_dir

__all__ = [
    "PEFT_CONFIG_NAME",
    "PREFIX",
    "PREFIX_CONFIG_NAME",
    "PROMPT",
    "PROMPT_CONFIG_NAME",
    "TRAIN_INFO",
    "TaskArtifact",
    "artifact_bytes",
    "artifact_kind",
    "read_prefix",
    "read_prompt",
    "read_task",
    "read_train_info",
]

PREFIX = "prefix"
PROMPT = "prompt"
TRAIN_INFO = "prefixattn_train.json"  # written next to the artifact by ``prefixattn train``

PREFIX_CONFIG_NAME = "prefixattn_prefix.json"
PREFIX_WEIGHTS_NAME = "prefix.safetensors"
PREFIX_FORMAT = "prefixattn.prefix_tuning"
PREFIX_FORMAT_VERSION = 1

PROMPT_CONFIG_NAME = "prefixattn_prompt.json"
PROMPT_WEIGHTS_NAME = "prompt.safetensors"
PROMPT_FORMAT = "prefixattn.prompt_tuning"
PROMPT_FORMAT_VERSION = 1

PEFT_CONFIG_NAME = "adapter_config.json"
_PEFT_TYPES = {"PREFIX_TUNING": PREFIX, "PROMPT_TUNING": PROMPT}


def _peft_type(pcfg: dict[str, Any]) -> str:
    return str(pcfg.get("peft_type", "")).split(".")[-1]


def artifact_kind(path: str | os.PathLike) -> tuple[str, str]:
    """``(method, source)`` of a saved tuner directory.

    ``method`` is ``"prefix"`` or ``"prompt"``; ``source`` is ``"prefixattn"`` (written by
    ``PrefixTuning.save`` / ``PromptTuning.save``) or ``"peft"`` (a PEFT ``PREFIX_TUNING``
    / ``PROMPT_TUNING`` adapter directory).

    Raises:
        ValueError: ``path`` is none of those.
    """
    p = Path(path)
    if (p / PREFIX_CONFIG_NAME).is_file():
        return PREFIX, "prefixattn"
    if (p / PROMPT_CONFIG_NAME).is_file():
        return PROMPT, "prefixattn"
    peft_cfg = p / PEFT_CONFIG_NAME
    if peft_cfg.is_file():
        kind = _peft_type(json.loads(peft_cfg.read_text()))
        if kind in _PEFT_TYPES:
            return _PEFT_TYPES[kind], "peft"
        raise ValueError(
            f"artifact: PEFT adapter type {kind!r} in {str(p)!r} is not supported "
            "(expected PREFIX_TUNING or PROMPT_TUNING)"
        )
    raise ValueError(
        f"artifact: expected a directory written by PrefixTuning.save / PromptTuning.save "
        f"or a PEFT prefix/prompt-tuning adapter, got {str(p)!r}"
    )


def read_prefix(path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, Any]]:
    """Read a prefix written by :meth:`PrefixTuning.save`.

    Returns:
        ``(prefix, meta)``: prefix [L, 2, Hkv, P, D] and the JSON metadata.

    Raises:
        ValueError: ``path`` is not a saved prefix.
    """
    meta, tensors = read_artifact(
        Path(path), PREFIX_CONFIG_NAME, PREFIX_WEIGHTS_NAME, PREFIX_FORMAT,
        PREFIX_FORMAT_VERSION, writer="PrefixTuning",
    )  # fmt: skip
    L = int(meta["num_layers"])
    try:
        layers = [
            torch.stack(
                [tensors[f"layers.{i}.key"], tensors[f"layers.{i}.value"]]
            )  # [2, Hkv, P, D]
            for i in range(L)
        ]
    except KeyError as err:
        raise ValueError(f"{PREFIX_WEIGHTS_NAME} in path misses tensor {err}") from None
    return torch.stack(layers), meta  # [L, 2, Hkv, P, D]


def read_prompt(path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, Any]]:
    """Read a soft prompt written by :meth:`PromptTuning.save`.

    Returns:
        ``(prompt, meta)``: prompt [P, hidden] float32 and the JSON metadata.

    Raises:
        ValueError: ``path`` is not a saved soft prompt.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    meta, tensors = read_artifact(
        Path(path), PROMPT_CONFIG_NAME, PROMPT_WEIGHTS_NAME, PROMPT_FORMAT,
        PROMPT_FORMAT_VERSION, writer="PromptTuning",
    )  # fmt: skip
    if PEFT_WEIGHTS_KEY not in tensors:
        raise ValueError(f"{PROMPT_WEIGHTS_NAME} in path misses tensor {PEFT_WEIGHTS_KEY!r}")
    weight = tensors[PEFT_WEIGHTS_KEY]
    if weight.dim() != 2 or not math.prod(weight.shape):
        raise ValueError(
            f"{PROMPT_WEIGHTS_NAME}: expected a [P, hidden] tensor, got {tuple(weight.shape)}"
        )
    return weight.float(), meta


def _check_peft(pcfg: dict[str, Any], method: str) -> None:
    """A decoder-only PEFT adapter of ``method``'s type, else ValueError."""
    want = "PREFIX_TUNING" if method == PREFIX else "PROMPT_TUNING"
    if _peft_type(pcfg) != want:
        raise ValueError(f"adapter must be a {want} adapter, got peft_type={_peft_type(pcfg)!r}")
    if pcfg.get("num_transformer_submodules") not in (None, 1):
        raise ValueError(
            "adapter must be for a decoder-only model (num_transformer_submodules=1), got "
            f"{pcfg.get('num_transformer_submodules')}"
        )


@dataclass(frozen=True, eq=False)
class TaskArtifact:
    """One task read from disk (what :func:`read_task` returns).

    Attributes:
        path: the directory.
        method: ``"prefix"`` or ``"prompt"``.
        source: ``"prefixattn"`` or ``"peft"``.
        tensor: a prefixattn prefix [L, 2, Hkv, P, D]; a PEFT prefix as PEFT stores it
            [P, L*2*Hkv*D] (see :meth:`prefix_kv`); a soft prompt [P, hidden]. float32, CPU.
        meta: the JSON (prefixattn metadata, or the PEFT adapter config).
        position_offset: the position of the first input token (PEFT's convention: P).
        prefix_window: ``"all"`` or ``"sliding"`` (a prefix's; ``"all"`` for prompts).
    """

    path: Path
    method: str
    source: str
    tensor: torch.Tensor
    meta: dict[str, Any] = field(repr=False)
    position_offset: int = 0
    prefix_window: str = "all"

    @property
    def num_virtual_tokens(self) -> int:
        """P."""
        return int(self.tensor.shape[3] if self.tensor.dim() == 5 else self.tensor.shape[0])

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def prefix_kv(self, num_layers: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
        """A prefix's K/V [L, 2, Hkv, P, D] for a model of this geometry.

        Raises:
            ValueError: a soft prompt (it has no K/V until run through the model), or a
                PEFT prefix whose width is not ``L * 2 * Hkv * D``.
        """
        if self.method != PREFIX:
            raise ValueError(f"{str(self.path)!r} is a soft prompt, not a prefix")
        if self.source == "prefixattn":
            return self.tensor
        expect = {"num_layers": num_layers, "num_attention_heads": num_kv_heads,
                  "token_dim": num_kv_heads * head_dim}  # fmt: skip
        for key, want in expect.items():
            if self.meta.get(key) is not None and int(self.meta[key]) != want:
                raise ValueError(
                    f"adapter {key}={self.meta[key]} does not fit the model ({key} should be "
                    f"{want})"
                )
        P, width = self.num_virtual_tokens, num_layers * 2 * num_kv_heads * head_dim
        if tuple(self.tensor.shape) != (P, width):
            raise ValueError(
                f"adapter {PEFT_WEIGHTS_KEY} must have shape [P, L*2*Hkv*D] = [{P}, {width}], "
                f"got {tuple(self.tensor.shape)}"
            )
        flat = self.tensor.view(P, num_layers, 2, num_kv_heads, head_dim)
        return flat.permute(1, 2, 3, 0, 4).contiguous()  # [L, 2, Hkv, P, D]


def read_task(path: str | os.PathLike) -> TaskArtifact:
    """Read the task saved in directory ``path`` (any of the four formats).

    Files only: no model is needed and none is touched, so a server can run this off its
    step loop.

    Raises:
        ValueError: ``path`` is not a saved tuner, or its files are malformed.
        TypeError: ``path`` is not a str or os.PathLike.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    p = Path(path)
    method, source = artifact_kind(p)
    if source == "prefixattn":
        tensor, meta = read_prefix(p) if method == PREFIX else read_prompt(p)
        cfg = meta.get("config", {})
        if method == PREFIX:
            P = int(tensor.shape[3])
            if cfg.get("num_virtual_tokens", P) != P:
                raise ValueError(f"{PREFIX_WEIGHTS_NAME} and the JSON config disagree on P")
            return TaskArtifact(
                p, method, source, tensor.float(), meta,
                position_offset=int(cfg.get("position_offset", 0)),
                prefix_window=str(cfg.get("prefix_window", "all")),
            )  # fmt: skip
        return TaskArtifact(p, method, source, tensor, meta, position_offset=0)
    pcfg, weights = read_peft_dir(p, lambda c: _check_peft(c, method))
    if weights.dim() != 2 or not math.prod(weights.shape):
        raise ValueError(f"adapter {PEFT_WEIGHTS_KEY}: expected [P, width], got {weights.shape}")
    P = int(pcfg.get("num_virtual_tokens", weights.shape[0]))
    if weights.shape[0] != P:
        raise ValueError(
            f"adapter num_virtual_tokens={P} but {PEFT_WEIGHTS_KEY} has {weights.shape[0]} rows"
        )
    # PEFT's prefix sits in the KV cache before the inputs: they start at position P
    offset = P if method == PREFIX else 0
    return TaskArtifact(p, method, source, weights.float(), pcfg, position_offset=offset)


def read_train_info(path: str | os.PathLike) -> dict[str, Any]:
    """The ``prefixattn_train.json`` that ``prefixattn train`` wrote (``{}`` if none)."""
    f = Path(path) / TRAIN_INFO
    if not f.is_file():
        return {}
    data = json.loads(f.read_text())
    return data if isinstance(data, dict) else {}


def artifact_bytes(path: str | os.PathLike) -> int:
    """Total size of the files in directory ``path``."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
