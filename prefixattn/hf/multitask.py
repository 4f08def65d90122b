"""Train the prefixes of several tasks at once, in mixed batches: :class:`MultiTaskPrefixTuning`.

Every task has its own prefix (its own length P_t and init). All of them live in ONE
trainable bank per model, ``bank`` [L, 2, T, Hkv, P, D] (P = the longest task's; task t
uses its first P_t positions, the rest stay zero). A batch names one task per row; each
attention layer hands the kernel the bank slice [T, Hkv, P, D] with ``prefix_index`` [B]
(the row's task) and ``prefix_lengths`` [T] (ragged P), so one forward and ONE backward
give every task exactly the gradient it would get trained alone on its rows: the kernel
writes each row's prefix gradient into its bank entry. There is no loop over tasks and no
copy of a prefix per row.

Saved per task in :class:`~prefixattn.PrefixTuning`'s format (``save(dir)`` writes
``dir/<task>/prefix.safetensors`` + ``prefixattn_prefix.json``), so
``prefixattn serve --task bbc=dir/bbc`` and :class:`~prefixattn.TaskBank` load them.

Prompt tuning is not mixed in: a soft prompt adds P_t input positions to its rows, so a
mixed batch would need per-row input lengths, position ids and masks that differ per task
(no shared kernel path, and the rows of the other tasks would be padded by the longest
prompt). Train soft prompts with :class:`~prefixattn.PromptTuning`, then serve them beside
these prefixes (``TaskBank`` converts them with ``PromptTuning.to_prefix_tuning``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from ..losses import chunked_loss_forward
from ..ops.validation import BACKENDS
from ._common import TuningConfigBase, is_int
from .patching import LayerPrefix, PrefixProvider, StaticPrefix, is_patched, patch, set_prefix
from .prefix_tuning import ModelGeometry, PrefixTuning, PrefixTuningConfig, read_prefix, token_kv
from .prompt_tuning import PromptTuning
from .tuner import (
    Tuner,
    check_model_type,
    generate_with,
    model_device,
    model_inputs,
    offset_positions,
    packed_inputs,
    prepare_init_text,
    repeat_to,
)

__all__ = ["MultiTaskPrefixTuning", "MultiTaskPrefixTuningConfig"]

CONFIG_NAME = "prefixattn_multitask.json"
FORMAT = "prefixattn.multitask_prefix"
FORMAT_VERSION = 1
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # also a directory name
_TASK_FIELDS = ("num_virtual_tokens", "init", "init_text", "init_std")


def _task_spec(name: str, spec: object) -> dict[str, Any]:
    """One task's settings as a dict of :data:`_TASK_FIELDS` (checked)."""
    if not isinstance(name, str) or not _TASK_NAME.match(name):
        raise ValueError(
            f"task names must be non-empty strings of letters, digits, '_', '.', '-' (they "
            f"name directories), got {name!r}"
        )
    if isinstance(spec, (PromptTuning, PrefixTuning)) or not (
        is_int(spec) or isinstance(spec, Mapping)
    ):
        raise TypeError(
            f"tasks[{name!r}] must be a prefix length P or a mapping with num_virtual_tokens "
            f"(and init, init_text, init_std), got {type(spec).__name__}; prompt tuning cannot "
            "share a mixed batch (see the module docstring)"
        )
    out: dict[str, Any] = {"num_virtual_tokens": spec} if is_int(spec) else dict(spec)
    unknown = sorted(set(out) - set(_TASK_FIELDS))
    if unknown:
        raise ValueError(f"tasks[{name!r}] has unknown settings {unknown}; known: {_TASK_FIELDS}")
    # reuse PrefixTuningConfig's checks (P >= 1, init strategy, init_text, init_std)
    try:
        PrefixTuningConfig(**out)
    except (TypeError, ValueError) as err:
        raise type(err)(f"tasks[{name!r}]: {err}") from None
    return {"init": "random", "init_text": None, "init_std": 1.0, **out}


@dataclass
class MultiTaskPrefixTuningConfig(TuningConfigBase):
    """Hyper-parameters of :class:`MultiTaskPrefixTuning` (saved next to the prefixes)."""

    tasks: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={
            "help": "Task name -> its settings: num_virtual_tokens (P_t), init ('random', "
            "'vocab', 'text'), init_text, init_std (as PrefixTuningConfig)."
        },
    )
    position_offset: int = field(
        default=0, metadata={"help": "Shift of the input positions, for every task."}
    )
    backend: str = field(default="auto", metadata={"help": "Kernel backend (as PrefixTuning)."})
    chunked_loss: bool = field(
        default=False, metadata={"help": "Chunked causal-LM loss (as PrefixTuningConfig)."}
    )

    def __post_init__(self) -> None:
        if not isinstance(self.tasks, Mapping) or not self.tasks:
            raise ValueError("tasks must be a non-empty mapping task name -> P or settings")
        self.tasks = {n: _task_spec(n, s) for n, s in self.tasks.items()}
        if not is_int(self.position_offset) or self.position_offset < 0:
            raise ValueError(f"position_offset must be an int >= 0, got {self.position_offset!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        self._check_chunked_loss()

    @property
    def num_virtual_tokens(self) -> int:  # type: ignore[override]
        """The bank's P: the longest task's."""
        return max(t["num_virtual_tokens"] for t in self.tasks.values())


class _RowsProvider(PrefixProvider):
    """The live bank with one call's row index (autograd-connected)."""

    def __init__(self, owner: MultiTaskPrefixTuning, index: torch.Tensor) -> None:
        self.owner, self.index = owner, index

    def layer_prefix(self, layer_idx: int, batch_size: int) -> LayerPrefix:
        bank = self.owner.bank
        if self.index.shape[0] != batch_size:
            raise ValueError(
                f"the tasks name {self.index.shape[0]} rows but the batch has {batch_size}"
            )
        # bank[l, 0] / bank[l, 1]: views [T, Hkv, P, D] of the parameter, no copy
        return LayerPrefix(bank[layer_idx, 0], bank[layer_idx, 1], self.index, self.owner.lengths)


class MultiTaskPrefixTuning(Tuner):
    """Prefix tuning of several tasks in mixed batches (see the module docstring).

    Arguments:
        model: a transformers causal LM (patched and frozen here, as by ``PrefixTuning``).
        tasks: ``{name: P}`` or ``{name: {"num_virtual_tokens": P, "init": ..., "init_text":
            ..., "init_std": ...}}``; every task its own length and init.
        tokenizer: for string ``init_text`` values.
        position_offset: input position shift (every task; 0: the model's own positions).
        backend: kernel backend ("auto", "triton", "sdpa", "reference").
        chunked_loss: as :class:`~prefixattn.PrefixTuning`.

    Calls take ``tasks`` (one name per row, or one name for all rows) or ``task_ids``
    (int64 [B], the task's position in :attr:`tasks`; what a ``Trainer`` dataset column
    carries) besides what the model takes.

    Example::

        mt = MultiTaskPrefixTuning(model, {"bbc": 16, "news": {"num_virtual_tokens": 32,
                                                               "init": "vocab"}})
        out = mt(input_ids=ids, attention_mask=mask, labels=labels, tasks=["bbc", "news"])
        out.loss.backward()          # each task's bank entry gets its own rows' gradient
        mt.save("prefixes")          # prefixes/bbc, prefixes/news: PrefixTuning artifacts
    """

    CONFIG_NAME = CONFIG_NAME
    WEIGHTS_NAME = ""  # per task: prefix_tuning.WEIGHTS_NAME in the task's directory
    FORMAT = FORMAT
    FORMAT_VERSION = FORMAT_VERSION
    PEFT_TYPE = ""
    config_class = MultiTaskPrefixTuningConfig
    artifact_noun = "multi-task prefixes"

    def __init__(
        self,
        model: PreTrainedModel,
        tasks: Mapping[str, int | Mapping[str, Any]],
        *,
        tokenizer: Any = None,
        position_offset: int = 0,
        backend: str = "auto",
        chunked_loss: bool = False,
    ) -> None:
        super().__init__()
        config = MultiTaskPrefixTuningConfig(
            tasks=dict(tasks) if isinstance(tasks, Mapping) else tasks,  # type: ignore[arg-type]
            position_offset=position_offset,
            backend=backend,
            chunked_loss=chunked_loss,
        )
        texts = {}
        for name, spec in config.tasks.items():
            ids, stored = prepare_init_text(
                spec["init"],
                spec["init_text"],
                tokenizer if isinstance(spec["init_text"], str) else None,
            )
            texts[name] = ids
            spec["init_text"] = stored
        self._attach(model, config)
        self._initialize(texts)

    @classmethod
    def check_model(cls, model: object) -> PreTrainedModel:
        """As :meth:`PrefixTuning.check_model`."""
        return PrefixTuning.check_model(model)

    @classmethod
    def from_config(
        cls, model: PreTrainedModel, config: Any, tokenizer: Any = None
    ) -> MultiTaskPrefixTuning:
        """Build from a :class:`MultiTaskPrefixTuningConfig` (initialised as it says)."""
        if not isinstance(config, MultiTaskPrefixTuningConfig):
            raise TypeError(
                f"config must be a MultiTaskPrefixTuningConfig, got {type(config).__name__}"
            )
        c = config
        return cls(model, c.tasks, tokenizer=tokenizer, position_offset=c.position_offset,
                   backend=c.backend, chunked_loss=c.chunked_loss)  # fmt: skip

    def _setup(self) -> None:
        model, config = self.model, self.config
        geo = ModelGeometry.of(model)
        patch(model, config.backend)
        self.geometry = geo
        names = list(config.tasks)
        lens = [config.tasks[n]["num_virtual_tokens"] for n in names]
        P = max(lens)
        dev = model_device(model)
        # [L, 2, T, Hkv, P, D]: task t's layer-l K is bank[l, 0, t, :, :P_t], its V bank[l, 1, t]
        self.bank = nn.Parameter(
            torch.zeros(
                geo.num_layers, 2, len(names), geo.num_kv_heads, P, geo.head_dim, device=dev
            )
        )
        # int64 [T] (None when every task has the bank's P: the kernel's plain bank path)
        lengths = None if min(lens) == P else torch.tensor(lens, dtype=torch.int64, device=dev)
        self.register_buffer("lengths", lengths, persistent=False)
        self._index = {n: t for t, n in enumerate(names)}

    @torch.no_grad()
    def _initialize(self, texts: Mapping[str, torch.Tensor | None]) -> None:
        vocab = self.model.get_input_embeddings().num_embeddings
        for t, (name, spec) in enumerate(self.config.tasks.items()):
            P = spec["num_virtual_tokens"]
            entry = self.bank[:, :, t, :, :P]  # [L, 2, Hkv, P_t, D]
            if spec["init"] == "random":
                entry.normal_(0.0, spec["init_std"])
                continue
            ids = (
                torch.randint(0, vocab, (P,))
                if spec["init"] == "vocab"
                else repeat_to(texts[name], P)
            )
            entry.copy_(token_kv(self.model, self.geometry, ids, restore=None))

    # ------------------------------------------------------------------ tasks

    @property
    def tasks(self) -> list[str]:
        """Task names, in bank order (``task_ids`` index this list)."""
        return list(self.config.tasks)

    @property
    def position_offset(self) -> int:
        """Shift added to every input position."""
        return self.config.position_offset

    def task_lengths(self) -> dict[str, int]:
        """Each task's own prefix length P_t."""
        return {n: s["num_virtual_tokens"] for n, s in self.config.tasks.items()}

    def task_prefix(self, name: str) -> torch.Tensor:
        """Task ``name``'s prefix [L, 2, Hkv, P_t, D] (a differentiable view of the bank)."""
        if name not in self._index:
            raise ValueError(f"name must be one of the tasks {self.tasks}, got {name!r}")
        return self.bank[:, :, self._index[name], :, : self.task_lengths()[name]]

    def row_index(
        self,
        tasks: str | Sequence[str] | None,
        task_ids: torch.Tensor | None,
        batch_size: int | None,
    ) -> torch.Tensor:
        """int64 [B] bank entry per row from ``tasks`` (names) or ``task_ids`` (ints)."""
        if (tasks is None) == (task_ids is None):
            raise ValueError("pass the rows' tasks as tasks=[names] or task_ids=[B] (one of them)")
        T = len(self._index)
        if task_ids is not None:
            if (
                not isinstance(task_ids, torch.Tensor)
                or task_ids.dim() != 1
                or (task_ids.dtype.is_floating_point or task_ids.dtype == torch.bool)
            ):
                raise TypeError("task_ids must be a 1-D integer tensor [B]")
            index = task_ids.to(torch.int64)
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= T):
                raise ValueError(f"task_ids must be in [0, {T}), got {index.tolist()}")
        else:
            if isinstance(tasks, str):
                if batch_size is None:
                    raise ValueError("tasks as a single name needs input_ids or inputs_embeds")
                tasks = [tasks] * batch_size
            if not isinstance(tasks, Sequence) or not all(isinstance(t, str) for t in tasks):
                raise TypeError("tasks must be a task name or a sequence of task names")
            unknown = sorted({t for t in tasks if t not in self._index})
            if unknown:
                raise ValueError(f"tasks contains unknown task(s) {unknown}; known: {self.tasks}")
            index = torch.tensor([self._index[t] for t in tasks], dtype=torch.int64)
        if batch_size is not None and index.shape[0] != batch_size:
            raise ValueError(
                f"tasks must name one task per row: got {index.shape[0]} for {batch_size} rows"
            )
        return index.to(self.bank.device)

    # ------------------------------------------------------------------ running

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
        tasks: str | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the model on a mixed batch: row b uses task ``tasks[b]`` (or ``task_ids[b]``).

        A packed (padding-free) batch (``position_ids`` restarting per sequence with no
        ``attention_mask``, or ``cu_seq_lens_q/k``) names one task per packed SEQUENCE, in
        order (row-major), e.g. ``input_ids`` [1, 3 + 5 + 2] holding three sequences with
        ``tasks=["a", "b", "a"]``; one task per row is also taken (every sequence of a
        row gets it). Each sequence attends to its own prefix and tokens only.

        Takes and returns what the model does (``attention_mask``, ``labels``, a cache...).
        """
        kwargs = model_inputs(kwargs, attention_mask=attention_mask, labels=labels,
                              position_ids=position_ids, inputs_embeds=inputs_embeds)  # fmt: skip
        kwargs, counts = packed_inputs(kwargs, input_ids)
        self._activate(input_ids, kwargs, tasks, task_ids, counts)
        kwargs = offset_positions(kwargs, input_ids, self.position_offset)
        if self.config.chunked_loss and self.training and kwargs.get("labels") is not None:
            return chunked_loss_forward(self.model, input_ids, kwargs)
        return self.model(input_ids=input_ids, **kwargs)

    def _activate(
        self,
        input_ids: torch.Tensor | None,
        kwargs: dict[str, Any],
        tasks: str | Sequence[str] | None,
        task_ids: torch.Tensor | None,
        counts: torch.Tensor | None = None,
    ) -> None:
        """Attach the rows' tasks; ``counts`` int64 [B]: the sequences per row of a packed
        batch (see :func:`~prefixattn.hf.tuner.packed_inputs`), whose tasks are named
        per packed sequence (or per row: every sequence of a row gets the row's task)."""
        if not is_patched(self.model):
            raise ValueError(
                "the model was unpatched (prefixattn.unpatch); MultiTaskPrefixTuning needs it "
                "patched: call prefixattn.patch(model) again"
            )
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        B = None if ref is None else int(ref.shape[0])
        if counts is not None:  # packed: one task per sequence (S of them)
            S = int(counts.sum())
            index = self.row_index(tasks, task_ids, None)
            if index.shape[0] == B and B != S:  # per row: each sequence its row's task
                index = index.repeat_interleave(counts.to(index.device))
            elif index.shape[0] != S:
                raise ValueError(
                    f"tasks must name one task per packed sequence ({S} in this packed batch, "
                    f"in order) or one per row ({B}), got {index.shape[0]}"
                )
            set_prefix(self.model, _RowsProvider(self, index))
            return
        set_prefix(self.model, _RowsProvider(self, self.row_index(tasks, task_ids, B)))

    def _backbone(self, input_ids: torch.Tensor | None, kwargs: dict[str, Any]) -> Any:
        kwargs = dict(kwargs)
        tasks, task_ids = kwargs.pop("tasks", None), kwargs.pop("task_ids", None)
        kwargs, counts = packed_inputs(kwargs, input_ids)
        self._activate(input_ids, kwargs, tasks, task_ids, counts)
        kwargs = offset_positions(kwargs, input_ids, self.position_offset)
        return self.model.base_model(input_ids=input_ids, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        tasks: str | Sequence[str] | None = None,
        task_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """``model.generate`` on a mixed batch (each row its task's prefix, folded once)."""
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        index = self.row_index(tasks, task_ids, None if ref is None else int(ref.shape[0]))
        if input_ids is not None:
            kwargs["input_ids"] = input_ids
        bank = self.bank.detach()
        L = bank.shape[0]
        provider = StaticPrefix([bank[i, 0] for i in range(L)], [bank[i, 1] for i in range(L)],
                                index, expand_batch=True, prefix_lengths=self.lengths)  # fmt: skip
        return generate_with(self.model, provider, self.position_offset, kwargs, restore=None)

    # ------------------------------------------------------------------ per-task tuners

    def task_tuner(self, name: str) -> PrefixTuning:
        """A :class:`~prefixattn.PrefixTuning` on the same model holding a copy of task
        ``name``'s prefix (to save, serve, or train further alone)."""
        prefix = self.task_prefix(name).detach()  # [L, 2, Hkv, P_t, D]
        config = PrefixTuningConfig(
            num_virtual_tokens=int(prefix.shape[3]),
            position_offset=self.position_offset,
            backend=self.config.backend,
        )
        pt = PrefixTuning._uninitialized(self.model, config)
        with torch.no_grad():
            pt.prefix.copy_(prefix)
        return pt

    def to_bank(self) -> Any:
        """A :class:`~prefixattn.TaskBank` (inference) with every task's current prefix."""
        from .bank import TaskBank

        return TaskBank(self.model, {n: self.task_tuner(n) for n in self.tasks},
                        backend=self.config.backend)  # fmt: skip

    # ------------------------------------------------------------------ files

    @classmethod
    def read(cls, path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, Any]]:
        """Not one tensor: see :meth:`load`."""
        raise ValueError(
            f"path must be a directory written by MultiTaskPrefixTuning.save ({CONFIG_NAME}) "
            f"or a Trainer checkpoint of one, got {str(path)!r}"
        )

    def _artifact_meta(self) -> dict[str, Any]:
        g = self.geometry
        return {"num_layers": g.num_layers, "num_key_value_heads": g.num_kv_heads,
                "head_dim": g.head_dim, "tasks": self.tasks}  # fmt: skip

    @classmethod
    def _trained_config(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        tasks = {n: {**s, "init": "random", "init_text": None} for n, s in cfg["tasks"].items()}
        return {**cfg, "tasks": tasks}

    def save(self, path: str | os.PathLike) -> Path:
        """Write every task's prefix as a :class:`~prefixattn.PrefixTuning` artifact in
        ``path/<task>`` and the index ``path/prefixattn_multitask.json``.

        Returns:
            ``path`` as a ``Path``.
        """
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for name in self.tasks:
            self.task_tuner(name).save(path / name)
        (path / CONFIG_NAME).write_text(json.dumps(self._meta(), indent=2) + "\n")
        return path

    @classmethod
    def load(
        cls, path: str | os.PathLike, model: PreTrainedModel, *, backend: str | None = None
    ) -> MultiTaskPrefixTuning:
        """Restore what :meth:`save` wrote (or a ``Trainer`` checkpoint of this tuner).

        Raises:
            ValueError: ``path`` is neither, or it does not fit ``model``.
        """
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        index = Path(path) / CONFIG_NAME
        if not index.is_file():
            return cls._load(path, model, backend=backend)  # a Trainer checkpoint
        meta = json.loads(index.read_text())
        if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{CONFIG_NAME} in {str(path)!r} is not a {FORMAT} v1 file")
        model = cls.check_model(model)
        check_model_type(meta, model, f"the {cls.artifact_noun} in {str(path)!r}")
        cfg = cls._trained_config(dict(meta["config"]))
        if backend is not None:
            cfg["backend"] = backend
        self = cls._uninitialized(model, MultiTaskPrefixTuningConfig.from_dict(cfg))
        with torch.no_grad():
            for name in self.tasks:
                prefix, _ = read_prefix(Path(path) / name)
                self.geometry.check_prefix(prefix, f"the prefix of task {name!r}")
                want = self.task_lengths()[name]
                if prefix.shape[3] != want:
                    raise ValueError(f"task {name!r}: {CONFIG_NAME} says P={want}, the prefix has "
                                     f"{prefix.shape[3]}")  # fmt: skip
                self.task_prefix(name).copy_(prefix)
        return self

    def extra_repr(self) -> str:
        return f"tasks={self.task_lengths()}, position_offset={self.position_offset}"
