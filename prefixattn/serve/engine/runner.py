"""Runs the model over the engine's slot cache: prefill chunks and decode batches.

A step is at most one decode forward over every decoding row (one token each, the rows'
keys gathered from their slots up to the longest, shorter rows masked) plus one forward
per prefill chunk (one row, its slot read in place). Splitting decode from prefill keeps
the padded ``[B, N]`` layout transformers' decoders take from computing padding: a decode
row padded to a 256-token chunk would cost 256 tokens of MLP. The prefix is in the slot
(written at admission), so the model runs with no prefix provider: plain causal attention
over each row's keys.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ...hf.patching import set_kv_pool, set_prefix
from .kv_cache import KVPool, SlotCache, StepLayout
from .scheduler import Row

__all__ = ["ModelRunner"]


class ModelRunner:
    """Owns the forward calls of one patched model over one :class:`KVPool`.

    Arguments:
        model: the bank's (patched) transformers decoder.
        pool: the engine's KV pool (the model's layers, KV heads, head size and dtype).
        in_place: decode steps hand the attention the pool itself with per-row lengths
            and slots (the kernel's ``cache_seqlens`` / ``cache_batch_idx``): no gather,
            no mask. Else the rows' slots are gathered up to the longest row.
    """

    def __init__(self, model: Any, pool: KVPool, in_place: bool = False) -> None:
        self.model = model
        self.pool = pool
        self.in_place = in_place
        self.cache = SlotCache(pool)
        self.device = pool.keys[0].device
        # transformers >= 5.24 names the cache argument ``cache`` (``past_key_values`` before)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def _forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        layout: StepLayout,
        key_mask: torch.Tensor | None,
        logits_to_keep: int,
    ) -> torch.Tensor:
        """One forward: ``ids``/``positions`` int64 [B, N]; returns float32 logits [B, K, V]."""
        self.cache.set_step(layout)
        set_prefix(self.model, None)  # the prefix is in the slots
        out = self.model(
            input_ids=ids,
            position_ids=positions,
            attention_mask=key_mask,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **{self._cache_kw: self.cache},
        )
        self.cache.step = None
        return out.logits.float()

    def prefill(self, row: Row, n: int, all_logits: bool) -> torch.Tensor:
        """Feed the next ``n`` prompt tokens of ``row``; logits float32 [n, V] when
        ``all_logits`` (prompt logprobs) else [1, V] (the last token's)."""
        a = row.prefilled
        ids = torch.tensor([row.req.prompt_ids[a : a + n]], device=self.device)  # [1, n]
        p0 = row.next_position
        positions = torch.arange(p0, p0 + n, device=self.device)[None]  # [1, n]
        layout = StepLayout(
            slots=torch.tensor([row.slot], device=self.device),
            starts=torch.tensor([row.kv_len], device=self.device),
            n_new=n,
            kv_len=row.kv_len + n,
            slot_list=[row.slot],
        )
        logits = self._forward(ids, positions, layout, None, 0 if all_logits else 1)
        row.kv_len += n
        row.prefilled += n
        return logits[0]

    def decode_in_place(
        self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, starts: torch.Tensor
    ) -> torch.Tensor:
        """A decode forward over the pool read in place: ``ids``/``positions`` [B, 1],
        ``slots``/``starts`` int64 [B] (device tensors; no host value is read, so the call
        can be captured in a CUDA graph). Returns logits float32 [B, V]."""
        layout = StepLayout(slots, starts, 1, self.pool.max_len, None, in_place=True)
        set_kv_pool(self.model, (starts + 1, slots))  # each row's keys: its cache + the new one
        try:
            return self._forward(ids, positions, layout, None, 1)[:, -1]
        finally:
            set_kv_pool(self.model, None)

    def decode(self, rows: list[Row]) -> torch.Tensor:
        """Feed each row's last token; logits float32 [B, V] in the order of ``rows``."""
        dev = self.device
        ids = torch.tensor([[r.last_token] for r in rows], device=dev)  # [B, 1]
        positions = torch.tensor([[r.next_position] for r in rows], device=dev)  # [B, 1]
        if self.in_place:
            slots = torch.tensor([r.slot for r in rows], device=dev)
            starts = torch.tensor([r.kv_len for r in rows], device=dev)
            logits = self.decode_in_place(ids, positions, slots, starts)
            for r in rows:
                r.kv_len += 1
            return logits
        lens = [r.kv_len + 1 for r in rows]
        kv_len = max(lens)
        key_mask = None
        if min(lens) != kv_len:
            key_mask = (
                torch.arange(kv_len, device=dev)[None, :] < torch.tensor(lens, device=dev)[:, None]
            )  # [B, kv_len] bool: each row's own keys
        layout = StepLayout(
            slots=torch.tensor([r.slot for r in rows], device=dev),
            starts=torch.tensor([r.kv_len for r in rows], device=dev),
            n_new=1,
            kv_len=kv_len,
            slot_list=[r.slot for r in rows],
        )
        logits = self._forward(ids, positions, layout, key_mask, 1)
        for r in rows:
            r.kv_len += 1
        return logits[:, -1]
