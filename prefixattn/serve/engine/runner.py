"""Runs the model over the engine's paged cache: prefill chunks and decode batches.

A step is at most one decode forward over every decoding row (one token each) plus one
forward per prefill chunk (one row, ``Nq = n`` new tokens over its cached pages: a
prefix-cache hit starts the row past its cached blocks). Splitting decode from prefill
keeps the padded ``[B, N]`` layout transformers' decoders take from computing padding.

Every forward hands the attention two things through the HF glue:

* the paged cache view: ``cache_seqlens`` [B] + ``block_table`` [B, M]
  (:func:`prefixattn.hf.patching.set_kv_pool`): the row's own tokens only;
* the rows' task prefixes from the bank, one shared copy per task: the kernel's bank
  path (``prefix_index`` [B] resolved from the rows' task names in this step's bank
  snapshot, ``prefix_lengths`` [T]), visible on every layer, windowed or not
  (``prefix_window="all"``, as ``PrefixTuning.generate``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from ...hf.bank import TaskBank
from ...hf.patching import PrefixProvider, set_kv_pool, set_prefix
from .kv_cache import PagedCache, PagedKVPool, StepLayout
from .scheduler import Row

__all__ = ["ModelRunner"]


class ModelRunner:
    """Owns the forward calls of one patched model over one :class:`PagedKVPool`.

    Arguments:
        model: the bank's (patched) transformers decoder.
        pool: the engine's KV block pool (the model's layers, KV heads, head size, dtype).
    """

    def __init__(self, model: Any, pool: PagedKVPool) -> None:
        self.model = model
        self.pool = pool
        self.cache = PagedCache(pool)
        self.device = pool.keys[0].device
        # transformers >= 5.24 names the cache argument ``cache`` (``past_key_values`` before)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        # the tensors forward() made for the step in flight (cache_seqlens, prefix_index)
        self._step_tensors: tuple[torch.Tensor, ...] = ()

    def provider(self, snapshot: Any, rows: list[Row]) -> PrefixProvider | None:
        """The bank provider of ``rows`` in ``snapshot`` (every row's task is in it: the
        engine checked)."""
        if snapshot.bank is None:
            return None
        pos = {n: i for i, n in enumerate(snapshot.names)}
        index = torch.tensor([pos[r.task] for r in rows], dtype=torch.int64, device=self.device)
        return TaskBank.snapshot_provider(snapshot, index)

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        layout: StepLayout,
        provider: PrefixProvider | None,
        logits_to_keep: int,
        call: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One forward: ``ids``/``positions`` int64 [B, N]; returns float32 logits [B, K, V].
        No host value is read (a CUDA graph may capture it). ``call``: what runs the model
        once the step is set up (default :meth:`model_call`; a compiled step passes its
        compiled call, see :mod:`.compiled`)."""
        self.cache.set_step(layout)
        set_prefix(self.model, provider)
        seqlens = layout.cache_seqlens  # [B]
        set_kv_pool(self.model, (seqlens, None), block_table=layout.block_table)
        index = getattr(provider, "prefix_index", None)
        self._step_tensors = (seqlens,) if index is None else (seqlens, index)
        try:
            logits = (call or self.model_call)(ids, positions, logits_to_keep)
        finally:
            set_kv_pool(self.model, None)
            set_prefix(self.model, None)
            self.cache.clear_step()
            self._step_tensors = ()
        return logits.float()

    def model_call(
        self, ids: torch.Tensor, positions: torch.Tensor, logits_to_keep: int
    ) -> torch.Tensor:
        """The model on the step :meth:`forward` set up: logits [B, K, V] (what a compiled
        step compiles)."""
        out = self.model(
            input_ids=ids,
            position_ids=positions,
            attention_mask=None,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **{self._cache_kw: self.cache},
        )
        return out.logits

    def step_tensors(self) -> tuple[torch.Tensor, ...]:
        """The [B] tensors :meth:`forward` made for the step in flight (``cache_seqlens``,
        and the provider's ``prefix_index`` when it has one): a compiled call marks their
        batch dimension dynamic."""
        return self._step_tensors

    def block_table(self, rows: list[Row]) -> torch.Tensor:
        """int32 [B, M] of the rows' blocks (M the longest table; the rest never read)."""
        M = max(len(r.blocks) for r in rows)
        return torch.tensor(
            [r.blocks + [0] * (M - len(r.blocks)) for r in rows], dtype=torch.int32
        ).to(self.device)

    def prefill(self, row: Row, n: int, all_logits: bool, snapshot: Any) -> torch.Tensor:
        """Feed the next ``n`` tokens of ``row`` (from ``row.num_computed``); logits float32
        [n, V] when ``all_logits`` (prompt logprobs) else [1, V] (the last token's)."""
        a = row.num_computed
        ids = torch.tensor([row.token_ids[a : a + n]], device=self.device)  # [1, n]
        p0 = row.next_position
        positions = torch.arange(p0, p0 + n, device=self.device)[None]  # [1, n]
        starts = torch.tensor([a], device=self.device)  # [1]
        layout = StepLayout(self.block_table([row]), starts, n, a + n)
        logits = self.forward(
            ids, positions, layout, self.provider(snapshot, [row]), 0 if all_logits else 1
        )
        row.num_computed += n
        return logits[0]

    def decode(self, rows: list[Row], snapshot: Any) -> torch.Tensor:
        """Feed each row's last token; logits float32 [B, V] in the order of ``rows``."""
        dev = self.device
        host = torch.tensor(
            [[r.last_token for r in rows], [r.next_position for r in rows],
             [r.num_computed for r in rows]]
        )  # fmt: skip  # [3, B]
        ids, positions, starts = host.to(dev).unbind(0)
        layout = StepLayout(self.block_table(rows), starts, 1, int(host[2].max()) + 1)
        logits = self.forward(
            ids[:, None], positions[:, None], layout, self.provider(snapshot, rows), 1
        )  # [B, 1, V]
        for r in rows:
            r.num_computed += 1
        return logits[:, -1]
