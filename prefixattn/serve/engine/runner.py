"""Runs the model over the engine's paged cache: one packed forward per step.

A step's rows, the decoding ones (one token each) then the prefill chunks (``n`` new
tokens over the row's cached pages: a prefix-cache hit starts the row past its cached
blocks), are packed into ONE forward of input ``[1, total_tokens]`` (varlen, as vLLM's
and FlashAttention's ``cu_seqlens_q``): no padding, and one pass through the model's
modules per step instead of one per prefill chunk plus one for the decode rows::

    rows        decode r0 | decode r1 | chunk r2 (3 tokens)
    input_ids   t0        | t1        | p p p              [1, 5]
    position    17        | 40        | 0 1 2              [1, 5]  (each row's own)
    cu_seqlens_q [0, 1, 2, 5]; cache_seqlens [18, 41, 3]; block_table [3, M]
    logits kept  token 0, token 1, token 4                 (all 3 of r2 for prompt logprobs)

Every forward hands the attention two things through the HF glue:

* the paged cache view: ``cache_seqlens`` [B] + ``block_table`` [B, M] (+ ``cu_seqlens_q``
  [B + 1] when packed; :func:`prefixattn.hf.patching.set_kv_pool`): the row's own tokens
  only;
* the rows' task prefixes from the bank, one shared copy per task: the kernel's bank
  path (``prefix_index`` [B] resolved from the rows' task names in this step's bank
  snapshot, ``prefix_lengths`` [T]), visible on every layer, windowed or not
  (``prefix_window="all"``, as ``PrefixTuning.generate``).

The logits are computed only where a token is chosen (each row's last token) or prompt
logprobs are asked (every token of that row's chunk): ``logits_to_keep`` as a tensor of
token indices, so the LM head never sees the other tokens. The CUDA-graph decode
(:mod:`.cuda_graphs`) runs decode-only steps over static buffers (unpacked ``[B, 1]``).
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
        logits_to_keep: int | torch.Tensor,
        call: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One forward: ``ids``/``positions`` int64 [B, N] (packed: [1, total], ``layout``
        says where each row's tokens are); ``logits_to_keep``: the last K tokens' logits
        (int; 0: all) or those of the token indices int64 [K] along N. Returns float32
        logits [B, K, V]. No host value is read (a CUDA graph may capture it). ``call``:
        what runs the model once the step is set up (default :meth:`model_call`; a
        compiled step passes its compiled call, see :mod:`.compiled`)."""
        self.cache.set_step(layout)
        set_prefix(self.model, provider)
        seqlens = layout.cache_seqlens  # [B]
        set_kv_pool(
            self.model, (seqlens, None), block_table=layout.block_table,
            cu_seqlens_q=layout.cu_seqlens_q,
        )  # fmt: skip
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

    def step(
        self, decode: list[Row], prefill: list[tuple[Row, int, bool]], snapshot: Any
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One packed forward over ``decode`` (each row's last token) and the ``prefill``
        chunks ``(row, n, all_logits)`` (the next ``n`` tokens of ``row`` from
        ``row.num_computed``). Returns float32 logits ``([len(decode), V], [one per chunk:
        [n, V] with all_logits (prompt logprobs), else [1, V] (its last token)])``; every
        row's ``num_computed`` advances by its tokens."""
        bs = self.pool.block_size
        rows = decode + [r for r, _, _ in prefill]
        ids: list[int] = []
        pos: list[int] = []
        blk: list[int] = []
        off: list[int] = []
        cu, starts, keep = [0], [], []
        feeds = [(r, 1, False) for r in decode] + prefill
        for i, (r, n, want) in enumerate(feeds):
            a = r.num_computed
            if i < len(decode):
                ids.append(r.last_token)
            else:
                ids.extend(r.token_ids[a : a + n])
            p0 = r.next_position
            pos.extend(range(p0, p0 + n))
            table = r.blocks
            for j in range(a, a + n):
                blk.append(table[j // bs])
                off.append(j % bs)
            c = cu[-1]
            cu.append(c + n)
            starts.append(a)
            keep.extend(range(c, c + n) if want else (c + n - 1,))
        total = cu[-1]
        host = torch.tensor([ids, pos, blk, off], dtype=torch.int64)  # [4, total]
        seqlens = [a + cu[b + 1] - cu[b] for b, a in enumerate(starts)]
        small = torch.tensor([cu, [*seqlens, 0], [*starts, 0]], dtype=torch.int32)  # [3, B + 1]
        if self.device.type != "cpu":
            host, small = host.to(self.device), small.to(self.device)
        layout = StepLayout(
            self.block_table(rows), small[2, :-1].to(torch.int64), total,
            max(total, max(seqlens)), cu_seqlens_q=small[0], seqlens=small[1, :-1],
            slots=(host[2:3], host[3:4]),
        )  # fmt: skip
        keep_t = torch.tensor(keep, dtype=torch.int64, device=self.device)  # [K]
        provider = self.provider(snapshot, rows)
        logits = self.forward(host[0:1], host[1:2], layout, provider, keep_t)[0]  # [K, V]
        for r, n, _ in feeds:
            r.num_computed += n
        out, i = [], len(decode)
        for _, n, want in prefill:
            k = n if want else 1
            out.append(logits[i : i + k])
            i += k
        return logits[: len(decode)], out
