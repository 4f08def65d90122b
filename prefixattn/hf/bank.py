"""Several named prefixes on one frozen base model, mixed in one batch.

:class:`TaskBank` stacks the prefixes of T tasks once per layer into a bank
[T, Hkv, P, D] (P the longest task's; shorter tasks are zero-padded and the kernel reads
only their first ``prefix_lengths[t]`` keys: a ragged bank); a forward or generate call
takes one task name per row, builds ``prefix_index`` [B] and runs the whole mixed batch in
one pass through the kernel's bank path (no per-row copy of any prefix). Tasks whose
position offsets differ get per-row position ids.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import PreTrainedModel

from .patching import StaticPrefix, get_prefix, is_patched, patch, set_prefix
from .prefix_tuning import ModelGeometry, PrefixTuning
from .prompt_tuning import PromptTuning, PromptTuningConfig
from .task_store import PREFIX, TaskArtifact, read_task
from .tuner import check_model_type, generate_with, model_device, offset_positions

__all__ = ["TaskBank"]


class _BankState(NamedTuple):
    """One consistent snapshot of the bank (swapped whole by add/remove, so a call that
    started with it keeps its tensors while tasks change)."""

    names: tuple[str, ...]
    bank: torch.Tensor | None  # [L, 2, T, Hkv, P, D], P = max length
    lengths: tuple[int, ...]  # per task
    offsets: tuple[int, ...]  # per task
    lengths_t: torch.Tensor | None  # int64 [T] on the bank's device; None when all equal P


def _check_prefix_window(name: str, prefix_window: str) -> None:
    """A bank runs every task with ``prefix_window="all"``: refuse another one (it would be
    silently ignored)."""
    if prefix_window != "all":
        raise ValueError(
            f"task {name!r} was tuned with prefix_window={prefix_window!r}; a TaskBank runs "
            "every task with prefix_window='all' (the prefix always visible on "
            "sliding-window layers)"
        )


class TaskBank(nn.Module):
    """Named prefixes sharing one base model; every row of a batch picks its task.

    Tasks may have different prefix lengths P: the bank stores them zero-padded to the
    longest and the kernel's ragged bank (``prefix_lengths``) lets each row see only its
    task's own keys, so every row gets exactly what its task alone would give. Tasks may
    also have different position offsets (a converted soft prompt has ``P``, a prefix
    usually 0): the rows then get per-row position ids. Tasks can be added and removed
    while the bank is in use: a call that already started keeps the tasks it started with.

    The bank holds frozen copies of the prefixes (MLPs folded): it is for inference and
    evaluation; train with :class:`PrefixTuning` / :class:`PromptTuning`.

    Arguments:
        model: the transformers decoder the prefixes were trained on (patched here).
        prefixes: optional ``{name: PrefixTuning | PromptTuning | TaskArtifact |
            directory}``; a directory is anything :func:`prefixattn.hf.task_store.read_task`
            reads (a prefixattn prefix or soft prompt, a PEFT prefix- or prompt-tuning
            adapter); a :class:`~prefixattn.hf.task_store.TaskArtifact` is one already read. Soft prompts
            are turned into prefixes (:meth:`PromptTuning.to_prefix_tuning`).
        backend: kernel backend ("auto", "triton", "sdpa", "reference").

    Example::

        bank = TaskBank(model, {"sst2": pt_sst2, "ner": "prefixes/ner"})
        out = bank(tasks=["sst2", "ner"], input_ids=ids, attention_mask=mask)
        gen = bank.generate(tasks=["ner", "ner"], input_ids=ids, max_new_tokens=20)
        bank.add("topic", "prompts/topic")   # a soft prompt with another P: fine
        bank.remove("sst2")
    """

    def __init__(
        self,
        model: PreTrainedModel,
        prefixes: Mapping[str, PrefixTuning | PromptTuning | TaskArtifact | str | os.PathLike]
        | None = None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(model, PreTrainedModel):
            raise TypeError(
                f"model must be a transformers PreTrainedModel, got {type(model).__name__}"
            )
        self.geometry = ModelGeometry.of(model)
        patch(model, backend)
        self.model = model
        self.backend = backend
        self._lock = threading.Lock()  # serialises add / remove (calls read snapshots)
        self._state = _BankState((), None, (), (), None)
        if prefixes is not None:
            if not isinstance(prefixes, Mapping):
                raise TypeError(
                    f"prefixes must be a mapping name -> PrefixTuning | PromptTuning | path, "
                    f"got {type(prefixes).__name__}"
                )
            for name, prefix in prefixes.items():
                self.add(name, prefix)

    @property
    def bank(self) -> torch.Tensor | None:
        """The stacked prefixes [L, 2, T, Hkv, P, D] (None while empty)."""
        return self._state.bank

    @property
    def tasks(self) -> list[str]:
        """Task names, in bank order."""
        return list(self._state.names)

    def __len__(self) -> int:
        return len(self._state.names)

    def __contains__(self, name: object) -> bool:
        return name in self._state.names

    def __iter__(self) -> Iterator[str]:
        return iter(self._state.names)

    @property
    def num_virtual_tokens(self) -> int | None:
        """The bank's P: the longest task's prefix length (None while empty)."""
        return None if self.bank is None else int(self.bank.shape[4])

    @property
    def lengths(self) -> dict[str, int]:
        """Each task's own prefix length."""
        return dict(zip(self._state.names, self._state.lengths))

    @property
    def offsets(self) -> dict[str, int]:
        """Each task's position offset."""
        return dict(zip(self._state.names, self._state.offsets))

    @property
    def position_offset(self) -> int | None:
        """The tasks' common position offset (0 while empty; None when they differ)."""
        offs = set(self._state.offsets)
        return 0 if not offs else (offs.pop() if len(offs) == 1 else None)

    def task_prefix(self, name: str) -> tuple[torch.Tensor | None, int] | None:
        """``(prefix [L, 2, Hkv, P, D] or None when P = 0, position offset)`` of task
        ``name`` from one snapshot of the bank (a view, not a copy); None when the bank has
        no such task. Used by the serving engine to write a row's prefix into its KV slot.
        """
        st = self._state
        if name not in st.names:
            return None
        t = st.names.index(name)
        P = st.lengths[t]
        pre = None if P == 0 else st.bank[:, :, t, :, :P]  # [L, 2, Hkv, P, D]
        return pre, st.offsets[t]

    def snapshot(self) -> _BankState:
        """The bank as it is now: ``names``, ``bank`` [L, 2, T, Hkv, P, D], ``lengths``,
        ``offsets``, ``lengths_t`` (a NamedTuple, replaced whole and never changed by
        :meth:`add` / :meth:`remove`: a caller that holds it keeps consistent tensors).
        Used by the serving engine, which resolves its rows' task names every step."""
        return self._state

    @staticmethod
    def snapshot_provider(st: _BankState, index: torch.Tensor) -> StaticPrefix | None:
        """The prefix provider of rows ``index`` (int64 [B], bank entries of ``st``): the
        kernel's bank path (``prefix_index`` / ``prefix_lengths``), no copy of any prefix.
        None when ``st`` has no prefix keys at all (every task P = 0)."""
        if st.bank is None or st.bank.shape[4] == 0:
            return None
        return TaskBank._provider(st, index)

    def _read(self, name: str, prefix: object) -> tuple[torch.Tensor, int]:
        """(prefix [L, 2, Hkv, P, D], position offset) of one task."""
        if isinstance(prefix, PromptTuning):
            prefix = prefix.to_prefix_tuning(backend=self.backend)
        if isinstance(prefix, PrefixTuning):
            _check_prefix_window(name, prefix.config.prefix_window)
            with torch.no_grad():
                pre = prefix.prefix_tensor().detach()  # [L, 2, Hkv, P, D]
            return pre, prefix.position_offset
        if isinstance(prefix, (str, os.PathLike)):
            prefix = read_task(prefix)  # the task store reads the files
        if not isinstance(prefix, TaskArtifact):
            raise TypeError(
                f"prefix for task {name!r} must be a PrefixTuning, a PromptTuning, a "
                f"TaskArtifact or a saved tuner directory, got {type(prefix).__name__}"
            )
        art, where = prefix, f"the task {name!r} in {str(prefix.path)!r}"
        if art.source == "prefixattn":
            check_model_type(art.meta, self.model, where)
        if art.method == PREFIX:  # no model work: the K/V are on disk
            _check_prefix_window(name, art.prefix_window)
            g = self.geometry
            return art.prefix_kv(g.num_layers, g.num_kv_heads, g.head_dim), art.position_offset
        # a soft prompt (prefixattn or PEFT): onto the model, then run once into a prefix
        if art.source == "prefixattn":
            config = PromptTuning._load_config(art.meta)
        else:
            config = PromptTuningConfig(num_virtual_tokens=art.num_virtual_tokens)
        PromptTuning._check_loaded_shape(art.tensor, self.model, config, where)
        previous = get_prefix(self.model)
        try:
            tuner = PromptTuning._uninitialized(self.model, config)
            with torch.no_grad():
                tuner._set_loaded(art.tensor)
            return self._read(name, tuner)
        finally:
            set_prefix(self.model, previous)

    def add(
        self, name: str, prefix: PrefixTuning | PromptTuning | TaskArtifact | str | os.PathLike
    ) -> None:
        """Add (or replace) task ``name``: a tuner object, a saved tuner directory or a
        :class:`~prefixattn.hf.task_store.TaskArtifact` read from one (a server reads it
        off its step loop, then adds it here: a prefix costs one rebuild of the stacked
        bank, a soft prompt also one forward of its P virtual tokens).

        Any prefix length and position offset is accepted. Safe while the bank serves
        calls (they keep the snapshot they started with).

        Raises:
            TypeError: wrong ``name`` or ``prefix`` type.
            ValueError: the prefix does not fit the model, or is not a saved tuner.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str, got {name!r}")
        with self._lock:
            pre, offset = self._read(name, prefix)
            self._put(name, pre, offset)

    def add_base(self, name: str) -> None:
        """Add task ``name`` with no prefix (P = 0): its rows get the base model's own
        outputs, in the same mixed batches as the other tasks.

        Raises:
            TypeError: wrong ``name`` type.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str, got {name!r}")
        g = self.geometry
        with self._lock:
            self._put(name, torch.zeros(g.num_layers, 2, g.num_kv_heads, 0, g.head_dim), 0)

    def _put(self, name: str, pre: torch.Tensor, offset: int) -> None:
        """Insert or replace one task's prefix [L, 2, Hkv, P, D] (under ``self._lock``)."""
        self.geometry.check_prefix(pre, f"prefix of task {name!r}")
        pre = pre.to(device=model_device(self.model), dtype=torch.float32)
        st = self._state
        entries = {} if st.bank is None else self._entries(st)
        lengths = dict(zip(st.names, st.lengths))
        offsets = dict(zip(st.names, st.offsets))
        entries[name], lengths[name], offsets[name] = pre, int(pre.shape[3]), int(offset)
        names = list(st.names) + ([] if name in st.names else [name])
        self._state = self._build(names, entries, lengths, offsets)

    def remove(self, name: str) -> None:
        """Remove task ``name`` (safe while the bank serves calls).

        Raises:
            ValueError: unknown task.
        """
        with self._lock:
            st = self._state
            if name not in st.names:
                raise ValueError(
                    f"name must be one of the bank's tasks {list(st.names)}, got {name!r}"
                )
            entries = self._entries(st)
            names = [n for n in st.names if n != name]
            self._state = self._build(
                names,
                entries,
                dict(zip(st.names, st.lengths)),
                dict(zip(st.names, st.offsets)),
            )

    @staticmethod
    def _entries(st: _BankState) -> dict[str, torch.Tensor]:
        """name -> its own prefix [L, 2, Hkv, P_t, D] (views of the bank)."""
        return {
            n: st.bank[:, :, t, :, : st.lengths[t]] for t, n in enumerate(st.names)
        }  # [L, 2, Hkv, P_t, D]

    @staticmethod
    def _build(
        names: list[str],
        entries: dict[str, torch.Tensor],
        lengths: dict[str, int],
        offsets: dict[str, int],
    ) -> _BankState:
        if not names:
            return _BankState((), None, (), (), None)
        P = max(lengths[n] for n in names)
        padded = [
            torch.nn.functional.pad(entries[n], (0, 0, 0, P - lengths[n])) for n in names
        ]  # T x [L, 2, Hkv, P, D], zero keys/values past each task's length
        bank = torch.stack(padded, dim=2).contiguous()  # [L, 2, T, Hkv, P, D]
        lens = tuple(lengths[n] for n in names)
        lengths_t = None
        if any(n != P for n in lens):
            lengths_t = torch.tensor(lens, dtype=torch.int64, device=bank.device)  # [T]
        return _BankState(tuple(names), bank, lens, tuple(offsets[n] for n in names), lengths_t)

    def _index(
        self, st: _BankState, tasks: str | Sequence[str], batch_size: int | None
    ) -> torch.Tensor:
        """int64 [B] bank index for the rows' task names."""
        if st.bank is None:
            raise ValueError("the bank is empty: add tasks first")
        if isinstance(tasks, str):
            if batch_size is None:
                raise ValueError("tasks as a single name needs input_ids or inputs_embeds")
            tasks = [tasks] * batch_size
        if not isinstance(tasks, Sequence) or not all(isinstance(t, str) for t in tasks):
            raise TypeError("tasks must be a task name or a sequence of task names (one per row)")
        if batch_size is not None and len(tasks) != batch_size:
            raise ValueError(
                f"tasks must name one task per row: got {len(tasks)} names for a batch of "
                f"{batch_size} rows"
            )
        unknown = sorted({t for t in tasks if t not in st.names})
        if unknown:
            raise ValueError(f"tasks contains unknown task(s) {unknown}; known: {list(st.names)}")
        pos = {n: i for i, n in enumerate(st.names)}
        return torch.tensor([pos[t] for t in tasks], dtype=torch.int64, device=st.bank.device)

    @staticmethod
    def _provider(st: _BankState, index: torch.Tensor, expand_batch: bool = False) -> StaticPrefix:
        L = st.bank.shape[0]
        return StaticPrefix(
            [st.bank[i, 0] for i in range(L)],  # [T, Hkv, P, D]
            [st.bank[i, 1] for i in range(L)],
            index,
            expand_batch=expand_batch,
            prefix_lengths=st.lengths_t,
        )

    @staticmethod
    def _row_offsets(st: _BankState, index: torch.Tensor) -> int | torch.Tensor:
        """The common offset (int), or int64 [B] per-row offsets when the rows differ."""
        offs = {st.offsets[i] for i in index.tolist()}
        if len(offs) <= 1:
            return offs.pop() if offs else 0
        return torch.tensor(st.offsets, dtype=torch.int64)[index.cpu()]  # [B]

    def _check_patched(self) -> None:
        if not is_patched(self.model):
            raise ValueError(
                "the model was unpatched (prefixattn.unpatch); TaskBank needs it patched"
            )

    @staticmethod
    def _batch_size(input_ids: torch.Tensor | None, kwargs: dict[str, Any]) -> int | None:
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        return None if ref is None else int(ref.shape[0])

    def forward(
        self, tasks: str | Sequence[str], input_ids: torch.Tensor | None = None, **kwargs: Any
    ) -> Any:
        """Run the model on a mixed batch: row b uses the prefix of ``tasks[b]``.

        Arguments:
            tasks: one task name per row (or one name for all rows).
            input_ids, **kwargs: what the model takes (``attention_mask``, ``labels``,
                ``past_key_values``, ...).

        Returns:
            What the model returns.
        """
        self._check_patched()
        st = self._state
        index = self._index(st, tasks, self._batch_size(input_ids, kwargs))
        set_prefix(self.model, self._provider(st, index))
        kwargs = offset_positions(kwargs, input_ids, self._row_offsets(st, index))
        return self.model(input_ids=input_ids, **kwargs)

    @torch.no_grad()
    def generate(
        self, tasks: str | Sequence[str], input_ids: torch.Tensor | None = None, **kwargs: Any
    ) -> Any:
        """``model.generate`` on a mixed batch: row b uses the prefix of ``tasks[b]``.

        Beam search and ``num_return_sequences`` work (each row's copies keep its task).
        """
        self._check_patched()
        st = self._state
        index = self._index(st, tasks, self._batch_size(input_ids, kwargs))
        if input_ids is not None:
            kwargs["input_ids"] = input_ids
        provider = self._provider(st, index, expand_batch=True)
        offsets = self._row_offsets(st, index)
        return generate_with(self.model, provider, offsets, kwargs, restore=None)
