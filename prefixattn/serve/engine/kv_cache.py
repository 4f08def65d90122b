"""The engine's KV cache: a paged block pool preallocated at start-up, seen by the model
as a transformers :class:`~transformers.Cache`.

Every layer owns two tensors ``[num_blocks (+1 scratch), Hkv, block_size, D]``. A row's
tokens live in fixed-size blocks listed in its block table (vLLM's paged attention);
row b's token j is in block ``block_table[b, j // block_size]`` at offset
``j % block_size``. Only the row's own tokens are here: its task's prefix is read from
the bank (one shared copy per task) by the kernel's bank path in every step::

    block table of row b:  [ 7, 2, 9 ]          block pool (one layer)
    tokens 0..15 -> block 7                     ┌─────────┬─────────┬─────┐
    tokens 16..31 -> block 2                    │ block 0 │ block 1 │ ... │
    tokens 32..  -> block 9 (partly filled)     └─────────┴─────────┴─────┘

Blocks may be shared by several rows (prefix caching: the same prompt blocks under the
same task). Which block holds what is :mod:`.block_pool`'s business; this module holds
the memory and writes / hands it to the attention.

The model sees a :class:`PagedCache` whose :meth:`PagedCache.update` writes the step's
new keys into their blocks and returns the whole pool; the attention function reads it
through ``cache_seqlens`` + ``block_table`` (:func:`prefixattn.hf.patching.set_kv_pool`):
the Triton kernel in place, the torch backends gather the pages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

try:
    from transformers.cache_utils import Cache
except ImportError as err:  # pragma: no cover
    raise ImportError("prefixattn.serve needs transformers: pip install 'prefixattn[hf]'") from err

__all__ = ["PagedCache", "PagedKVPool", "StepLayout"]


class PagedKVPool:
    """Per-layer key/value block pools.

    Arguments:
        num_layers, num_kv_heads, head_dim: the model's geometry.
        num_blocks: blocks the rows share.
        block_size: positions per block (a power of two >= 16, the kernel's paged mode).
        dtype, device: of the pool (the model's).
        scratch: add one block no row ever holds (:attr:`scratch_block`): the padding rows
            of a static-shape decode step (:mod:`.cuda_graphs`) write there.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        scratch: bool = False,
    ) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
        if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.scratch_block = num_blocks if scratch else None
        shape = (num_blocks + int(scratch), num_kv_heads, block_size, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def bytes(self) -> int:
        """Memory held by the pool (fixed at start-up)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @property
    def bytes_per_block(self) -> int:
        """KV bytes of one block over all layers (keys and values)."""
        t = self.keys[0]
        return 2 * len(self.keys) * t[0].numel() * t.element_size()

    @staticmethod
    def block_bytes(
        num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype
    ) -> int:
        """Bytes of one block of a pool of that geometry (to size a pool from a budget)."""
        item = torch.empty(0, dtype=dtype).element_size()
        return 2 * num_layers * num_kv_heads * block_size * head_dim * item


@dataclass
class StepLayout:
    """Where one forward's new keys go and which keys its queries read.

    ``block_table`` int32 [B, M]: each row's blocks (entries past a row's last block are
    never read); ``starts`` int64 [B]: the logical position of each row's first new token
    (its keys so far); ``n_new``: the forward's tokens per input row (input ``[B,
    n_new]``); ``kv_len``: the keys the mask functions are told about (``max(starts) +
    n_new``, or ``M * block_size`` for a static step).

    A **packed** step (``cu_seqlens_q`` given: the engine's step, decode rows and prefill
    chunks in one forward) has input ``[1, n_new]`` with ``n_new`` = the step's tokens,
    row b's being ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]``; ``seqlens`` int32 [B] are the
    rows' keys after the step, ``slots`` the (block, offset) of every new token, int64
    [1, n_new] each (computed on the host by the runner, which knows the rows), and
    ``kv_len >= n_new``. Without ``cu_seqlens_q`` every row has ``n_new`` tokens and the
    slots are computed from ``starts`` by tensor ops (no host value read: a CUDA graph may
    capture the step).

    ``logit_rows`` int64 [K] (unpacked ``n_new == 1`` steps only): the LM head reads these
    rows' hidden states, not all B (a compiled mixed step feeds one row per token and
    wants the logits of a few; :mod:`.compiled`), so the logits are [K, 1, V].
    """

    block_table: torch.Tensor
    starts: torch.Tensor
    n_new: int
    kv_len: int
    cu_seqlens_q: torch.Tensor | None = None  # int32 [B + 1]: packed rows
    seqlens: torch.Tensor | None = None  # int32 [B]: keys after the step (packed)
    slots: tuple[torch.Tensor, torch.Tensor] | None = None  # (block, offset) [1, n_new]
    logit_rows: torch.Tensor | None = None  # int64 [K]: the rows the LM head reads

    @property
    def cache_seqlens(self) -> torch.Tensor:
        """int32 [B]: each row's keys after this step's tokens."""
        if self.seqlens is not None:
            return self.seqlens
        return (self.starts + self.n_new).to(torch.int32)


class PagedCache(Cache):
    """The engine's :class:`PagedKVPool` behind transformers' ``Cache`` interface, for one
    step.

    The model calls :meth:`update` once per attention layer; the mask functions call
    :meth:`get_mask_sizes` / :meth:`get_query_offset` / :meth:`get_seq_length`. The runner
    points it at the step's rows with :meth:`set_step` before each forward.
    """

    is_compileable = False

    def __init__(self, pool: PagedKVPool) -> None:
        super().__init__(layers=[])
        self.pool = pool
        self.step: StepLayout | None = None
        self._where: tuple[torch.Tensor, torch.Tensor] | None = None  # (block, offset) [B, n]

    def set_step(self, step: StepLayout) -> None:
        """Aim the next forward at ``step``'s rows (where each new token's key goes is
        computed here once, by tensor ops: no host value is read, a graph may capture it;
        a packed step brings them)."""
        if step.slots is not None:
            self.step, self._where = step, step.slots
            return
        bs = self.pool.block_size
        ar = torch.arange(step.n_new, device=step.starts.device)
        pos = step.starts[:, None] + ar[None, :]  # [B, n_new] logical positions
        blk = step.block_table.to(torch.int64).gather(1, pos // bs)  # [B, n_new]
        self.step = step
        self._where = (blk, pos % bs)

    # ------------------------------------------------------------------ Cache API

    def __len__(self) -> int:
        return len(self.pool.keys)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Write the step's keys/values [B, Hkv, n_new, D] (packed: [1, Hkv, n_new, D])
        into their blocks; return the whole pool [num_blocks, Hkv, block_size, D] (the attention reads it through the
        step's block table)."""
        if self._where is None:
            raise ValueError("PagedCache.update before set_step: the runner sets the step first")
        blk, off = self._where
        pk, pv = self.pool.keys[layer_idx], self.pool.values[layer_idx]
        # [NB, bs, Hkv, D] views: index (block, offset) of each new token
        pk.permute(0, 2, 1, 3).index_put_((blk, off), key_states.transpose(1, 2))
        pv.permute(0, 2, 1, 3).index_put_((blk, off), value_states.transpose(1, 2))
        return pk, pv

    def clear_step(self) -> None:
        self.step, self._where = None, None

    def get_seq_length(self, layer_idx: int = 0, *args: Any, **kwargs: Any) -> int:
        st = self.step
        return 0 if st is None else st.kv_len - st.n_new

    def get_query_offset(self, *args: Any, **kwargs: Any) -> int:
        return self.get_seq_length()

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        st = self.step
        return (0, 0) if st is None else (st.kv_len, 0)

    def get_max_cache_shape(self, *args: Any, **kwargs: Any) -> int:
        st = self.step
        return 0 if st is None else st.kv_len

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.pool.keys)

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.pool.keys)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self.pool.keys)
