"""Several named prefixes on one frozen base model, mixed in one batch.

:class:`TaskBank` stacks the prefixes of T tasks once per layer into a bank
[T, Hkv, P, D]; a forward or generate call takes one task name per row, builds
``prefix_index`` [B] and runs the whole mixed batch in one pass through the kernel's bank
path (no per-row copy of any prefix).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .patching import StaticPrefix, is_patched, patch, set_prefix
from .prefix_tuning import (
    ModelGeometry,
    PrefixTuning,
    _device,
    _generate_with,
    _offset_positions,
    check_model_type,
    read_prefix,
)

try:
    from transformers import PreTrainedModel
except ImportError as err:  # pragma: no cover
    raise ImportError("prefixattn.hf needs transformers: pip install 'prefixattn[hf]'") from err

__all__ = ["TaskBank"]


class TaskBank(nn.Module):
    """Named prefixes sharing one base model; every row of a batch picks its task.

    All tasks must have the same prefix length P and position offset (one kernel call
    serves the whole batch). The bank holds frozen copies of the prefixes (MLPs folded):
    it is for inference and evaluation; train with :class:`PrefixTuning`.

    Arguments:
        model: the transformers decoder the prefixes were trained on (patched here).
        prefixes: optional ``{name: PrefixTuning or directory written by PrefixTuning.save}``.
        backend: kernel backend ("auto", "triton", "sdpa", "reference").

    Example::

        bank = TaskBank(model, {"sst2": pt_sst2, "ner": "prefixes/ner"})
        out = bank(tasks=["sst2", "ner"], input_ids=ids, attention_mask=mask)
        gen = bank.generate(tasks=["ner", "ner"], input_ids=ids, max_new_tokens=20)
    """

    def __init__(
        self,
        model: PreTrainedModel,
        prefixes: Mapping[str, PrefixTuning | str | os.PathLike] | None = None,
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
        self._names: list[str] = []
        self._offset: int | None = None
        # bank[l, 0] = keys [T, Hkv, P, D] of layer l, bank[l, 1] = values
        self.register_buffer("bank", None)
        if prefixes is not None:
            if not isinstance(prefixes, Mapping):
                raise TypeError(
                    f"prefixes must be a mapping name -> PrefixTuning | path, got "
                    f"{type(prefixes).__name__}"
                )
            for name, prefix in prefixes.items():
                self.add(name, prefix)

    @property
    def tasks(self) -> list[str]:
        """Task names, in bank order."""
        return list(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._names))

    @property
    def num_virtual_tokens(self) -> int | None:
        """The common prefix length P (None while empty)."""
        return None if self.bank is None else int(self.bank.shape[4])

    @property
    def position_offset(self) -> int:
        """The common position offset of the tasks (0 while empty)."""
        return self._offset or 0

    def add(self, name: str, prefix: PrefixTuning | str | os.PathLike) -> None:
        """Add (or replace) task ``name`` with a :class:`PrefixTuning` or a saved prefix.

        Raises:
            TypeError: wrong ``name`` or ``prefix`` type.
            ValueError: the prefix does not fit the model, or its P / position offset differs
                from the bank's.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str, got {name!r}")
        if isinstance(prefix, PrefixTuning):
            with torch.no_grad():
                pre = prefix.prefix_tensor().detach()  # [L, 2, Hkv, P, D]
            offset = prefix.position_offset
        elif isinstance(prefix, (str, os.PathLike)):
            pre, meta = read_prefix(prefix)
            check_model_type(meta, self.model, f"prefix of task {name!r}")
            offset = int(meta["config"].get("position_offset", 0))
        else:
            raise TypeError(
                f"prefix for task {name!r} must be a PrefixTuning or a directory written by "
                f"PrefixTuning.save, got {type(prefix).__name__}"
            )
        self.geometry.check_prefix(pre, f"prefix of task {name!r}")
        P = int(pre.shape[3])
        others = [n for n in self._names if n != name]
        if others and self.num_virtual_tokens != P:
            raise ValueError(
                f"all tasks need the same num_virtual_tokens: task {name!r} has P={P}, the bank "
                f"has P={self.num_virtual_tokens}"
            )
        if others and self._offset != offset:
            raise ValueError(
                f"all tasks need the same position_offset: task {name!r} has {offset}, the "
                f"bank has {self._offset}"
            )
        pre = pre.to(device=_device(self.model), dtype=torch.float32)
        entries = [] if self.bank is None else list(self.bank.unbind(2))  # T x [L, 2, Hkv, P, D]
        if name in self._names:
            entries[self._names.index(name)] = pre
        else:
            self._names.append(name)
            entries.append(pre)
        self.bank = torch.stack(entries, dim=2).contiguous()  # [L, 2, T, Hkv, P, D]
        self._offset = offset

    def remove(self, name: str) -> None:
        """Remove task ``name``.

        Raises:
            ValueError: unknown task.
        """
        if name not in self._names:
            raise ValueError(f"name must be one of the bank's tasks {self._names}, got {name!r}")
        i = self._names.index(name)
        del self._names[i]
        if not self._names:
            self.bank, self._offset = None, None
            return
        keep = [j for j in range(self.bank.shape[2]) if j != i]
        self.bank = self.bank[:, :, keep].contiguous()

    def _index(self, tasks: str | Sequence[str], batch_size: int | None) -> torch.Tensor:
        """int64 [B] bank index for the rows' task names."""
        if self.bank is None:
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
        unknown = sorted({t for t in tasks if t not in self._names})
        if unknown:
            raise ValueError(f"tasks contains unknown task(s) {unknown}; known: {self._names}")
        pos = {n: i for i, n in enumerate(self._names)}
        return torch.tensor([pos[t] for t in tasks], dtype=torch.int64, device=self.bank.device)

    def _provider(self, index: torch.Tensor, expand_batch: bool = False) -> StaticPrefix:
        L = self.bank.shape[0]
        return StaticPrefix(
            [self.bank[i, 0] for i in range(L)],  # [T, Hkv, P, D]
            [self.bank[i, 1] for i in range(L)],
            index,
            expand_batch=expand_batch,
        )

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
        index = self._index(tasks, self._batch_size(input_ids, kwargs))
        set_prefix(self.model, self._provider(index))
        kwargs = _offset_positions(kwargs, input_ids, self.position_offset)
        return self.model(input_ids=input_ids, **kwargs)

    @torch.no_grad()
    def generate(
        self, tasks: str | Sequence[str], input_ids: torch.Tensor | None = None, **kwargs: Any
    ) -> Any:
        """``model.generate`` on a mixed batch: row b uses the prefix of ``tasks[b]``.

        Beam search and ``num_return_sequences`` work (each row's copies keep its task).
        """
        self._check_patched()
        index = self._index(tasks, self._batch_size(input_ids, kwargs))
        if input_ids is not None:
            kwargs["input_ids"] = input_ids
        return _generate_with(
            self.model,
            self._provider(index, expand_batch=True),
            self.position_offset,
            kwargs,
            restore=None,
        )
