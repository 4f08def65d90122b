"""The engine's KV cache: a slot pool preallocated at start-up, seen by the model as a
transformers :class:`~transformers.Cache`.

Every layer owns two tensors ``[slots, Hkv, max_len, D]`` (keys, values). A running row
holds one slot for its whole life; its slot stores, in order, its task's prefix (written
once at admission: ``P`` keys that every later query sees) and then its tokens' keys::

    slot s:  | prefix (P_t keys) | prompt + generated tokens ...... | free ... |
             0                   P_t                               length     max_len

so every step is plain causal attention over ``length`` keys per row: no prefix provider,
no concatenation of prefix and cache, no dense mask for a ragged bank. A finished row's
slot goes back to the free list and the next row overwrites it (nothing is zeroed).

The model sees a :class:`SlotCache` whose :meth:`SlotCache.update` writes the step's new
keys into the slots and returns the keys the attention reads: for a prefill chunk of one
row a view of its slot (no copy); for a decode batch ``[B, Hkv, Kmax, D]`` gathered from
the rows' slots with a key padding mask for rows shorter than ``Kmax``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

try:
    from transformers.cache_utils import Cache
except ImportError as err:  # pragma: no cover
    raise ImportError("prefixattn.serve needs transformers: pip install 'prefixattn[hf]'") from err

__all__ = ["KVPool", "SlotCache", "StepLayout"]


class KVPool:
    """Per-layer key/value slot pools and the free-slot list.

    Arguments:
        num_layers, num_kv_heads, head_dim: the model's geometry.
        slots: rows the pool holds at once.
        max_len: keys per slot (prefix + prompt + generated tokens).
        dtype, device: of the pool (the model's).
        scratch: add one slot no row ever holds (:attr:`scratch_slot`): the padding rows of
            a static-shape decode step (:mod:`.cuda_graphs`) write there.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        slots: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
        scratch: bool = False,
    ) -> None:
        if slots < 1 or max_len < 2:
            raise ValueError(f"slots must be >= 1 and max_len >= 2, got {slots} and {max_len}")
        self.slots, self.max_len = slots, max_len
        self.scratch_slot = slots if scratch else None
        shape = (slots + int(scratch), num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._free = list(range(slots - 1, -1, -1))  # pop() gives the lowest slot first

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def bytes(self) -> int:
        """Memory held by the pool (fixed at start-up)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def allocate(self) -> int | None:
        """A free slot, or None when every slot is taken."""
        return self._free.pop() if self._free else None

    def release(self, slot: int) -> None:
        """Give ``slot`` back (its contents are overwritten by the next row)."""
        if slot in self._free or not 0 <= slot < self.slots:
            raise ValueError(f"slot must be a taken slot in [0, {self.slots}), got {slot}")
        self._free.append(slot)
        self._free.sort(reverse=True)

    def write_prefix(self, slot: int, prefix: torch.Tensor | None) -> None:
        """Copy a task's prefix [L, 2, Hkv, P, D] into the first P positions of ``slot``."""
        if prefix is None or prefix.shape[3] == 0:
            return
        P = prefix.shape[3]
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            k[slot, :, :P].copy_(prefix[layer, 0])  # [Hkv, P, D]
            v[slot, :, :P].copy_(prefix[layer, 1])


@dataclass
class StepLayout:
    """Where one forward's new keys go and which keys its queries read.

    ``slots`` int64 [B]: each row's slot; ``starts`` int64 [B]: the slot position of each
    row's first new token; ``n_new``: new tokens per row (the same for every row: a decode
    batch has 1, a prefill chunk is one row). ``kv_len``: keys the attention reads
    (``max(starts) + n_new``). ``slot_list``: the slots on the host (views instead of a
    gather where they allow); None for a static-shape step (no host values: always the
    gather, so a captured graph is right for any slots). ``in_place``: the attention reads
    the pool itself (the kernel's ``cache_seqlens`` / ``cache_batch_idx``, see
    :func:`prefixattn.hf.patching.set_kv_pool`): :meth:`SlotCache.update` returns the
    whole pool, and ``kv_len`` is the pool's ``max_len``.
    """

    slots: torch.Tensor
    starts: torch.Tensor
    n_new: int
    kv_len: int
    slot_list: list[int] | None
    in_place: bool = False


class SlotCache(Cache):
    """The engine's :class:`KVPool` behind transformers' ``Cache`` interface, for one step.

    The model calls :meth:`update` once per attention layer; the mask functions call
    :meth:`get_mask_sizes` / :meth:`get_query_offset` / :meth:`get_seq_length`. The engine
    points it at the step's rows with :meth:`set_step` before each forward.
    """

    is_compileable = False

    def __init__(self, pool: KVPool) -> None:
        super().__init__(layers=[])
        self.pool = pool
        self.step: StepLayout | None = None
        self._pos: torch.Tensor | None = None  # [B, n_new] slot positions written

    def set_step(self, step: StepLayout) -> None:
        """Aim the next forward at ``step``'s rows."""
        if step.kv_len > self.pool.max_len:
            raise ValueError(f"a row needs {step.kv_len} keys; slots hold {self.pool.max_len}")
        self.step = step
        ar = torch.arange(step.n_new, device=step.starts.device)
        self._pos = step.starts[:, None] + ar[None, :]  # [B, n_new]

    # ------------------------------------------------------------------ Cache API

    def __len__(self) -> int:
        return len(self.pool.keys)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Write the step's keys/values [B, Hkv, n_new, D] into the slots; return the keys and
        values the attention reads, [B, Hkv, kv_len, D]."""
        st = self.step
        if st is None:
            raise ValueError("SlotCache.update before set_step: the engine sets the step first")
        pk, pv = self.pool.keys[layer_idx], self.pool.values[layer_idx]
        B = key_states.shape[0]
        if (
            B == 1 and st.slot_list is not None
        ):  # one row (a prefill chunk, or a lone decode row): views, no gather
            s, a = st.slot_list[0], int(st.starts[0])
            pk[s, :, a : a + st.n_new] = key_states[0]
            pv[s, :, a : a + st.n_new] = value_states[0]
            return pk[s : s + 1, :, : st.kv_len], pv[s : s + 1, :, : st.kv_len]
        rows = st.slots[:, None].expand(-1, st.n_new)  # [B, n_new]
        pk.permute(0, 2, 1, 3).index_put_((rows, self._pos), key_states.transpose(1, 2))
        pv.permute(0, 2, 1, 3).index_put_((rows, self._pos), value_states.transpose(1, 2))
        if st.in_place:  # the kernel reads each row's slot up to its length, in place
            return pk, pv  # [S, Hkv, max_len, D]
        n = st.kv_len
        if st.slot_list is not None and st.slot_list == list(
            range(st.slot_list[0], st.slot_list[0] + B)
        ):  # consecutive slots: a view, no copy
            s0 = st.slot_list[0]
            return pk[s0 : s0 + B, :, :n], pv[s0 : s0 + B, :, :n]
        # [B, Hkv, kv_len, D]: the rows' slots, read up to the longest row (padding masked)
        return pk.index_select(0, st.slots)[:, :, :n], pv.index_select(0, st.slots)[:, :, :n]

    def get_seq_length(self, layer_idx: int = 0, *args: Any, **kwargs: Any) -> int:
        st = self.step
        return 0 if st is None else st.kv_len - st.n_new

    def get_query_offset(self, *args: Any, **kwargs: Any) -> int:
        return self.get_seq_length()

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        st = self.step
        return (0, 0) if st is None else (st.kv_len, 0)

    def get_max_cache_shape(self, *args: Any, **kwargs: Any) -> int:
        return self.pool.max_len

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.pool.keys)

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.pool.keys)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self.pool.keys)
