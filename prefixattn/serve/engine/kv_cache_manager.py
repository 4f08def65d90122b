"""Which blocks each row holds (vLLM's ``KVCacheManager``): the scheduler asks it for
blocks before it schedules a row's tokens, and gives them back when a row finishes or is
preempted.

    get_computed_blocks(row)   the longest run of the row's full blocks already cached
                               (prefix caching; never its last token: it must be fed)
    allocate_slots(row, n)     blocks for n more tokens (False: not enough free blocks)
    cache_full_blocks(row)     register the row's newly filled blocks in the prefix cache
    free(row)                  drop the row's references (cached blocks stay reusable)

A row object here only needs ``blocks``, ``block_hashes``, ``num_computed``,
``num_cached_blocks``, ``task_key``, ``token_ids`` and ``cacheable`` (see
:class:`.scheduler.Row`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable
from typing import Any

import torch

from .block_pool import BlockPool, hash_blocks

__all__ = ["KVCacheManager", "TaskKeys"]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class TaskKeys:
    """The prefix-cache key of a task in a bank snapshot: its name, position offset and
    a digest of its prefix keys/values (the same tokens under another task, or under a
    task replaced by another prefix of the same name, are other KV). Computed once per
    snapshot and task (one device-to-host copy of the prefix)."""

    def __init__(self) -> None:
        self._snapshot: Any = None
        self._keys: dict[str, Hashable] = {}

    def key(self, snapshot: Any, name: str) -> Hashable | None:
        """None when ``name`` is not in ``snapshot``."""
        if snapshot is not self._snapshot:
            self._snapshot, self._keys = snapshot, {}
        got = self._keys.get(name)
        if got is None:
            if name not in snapshot.names:
                return None
            t = snapshot.names.index(name)
            P = snapshot.lengths[t]
            digest = ""
            if P:
                pre = snapshot.bank[:, :, t, :, :P].detach().to("cpu", torch.float32)
                digest = hashlib.blake2b(pre.contiguous().numpy().tobytes(), digest_size=16)
                digest = digest.hexdigest()
            got = self._keys[name] = (name, snapshot.offsets[t], P, digest)
        return got


class KVCacheManager:
    """The rows' blocks over one :class:`BlockPool`.

    Arguments:
        num_blocks: blocks in the pool.
        block_size: tokens per block.
        enable_caching: automatic prefix caching.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self.block_size = block_size
        self.enable_caching = enable_caching

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free

    def get_computed_blocks(self, row: Any) -> list[int]:
        """The cached blocks that hold the first tokens of ``row`` (not yet referenced):
        full blocks only, and never the block of the last token to prefill (that token is
        fed to get the next token's logits)."""
        if not self.enable_caching or not row.cacheable:
            return []
        n = row.prefill_len
        ids = row.token_ids[:n]
        row.block_hashes = hash_blocks(row.task_key, ids, self.block_size, row.block_hashes)
        usable = row.block_hashes[: (n - 1) // self.block_size]
        hit = self.block_pool.lookup(usable)
        self.block_pool.queries += len(usable)
        self.block_pool.hits += len(hit)
        return hit

    def can_take(self, computed: list[int], num_tokens: int) -> bool:
        """Whether a waiting row can take ``computed`` and blocks for ``num_tokens`` keys
        in all (the computed blocks in the free queue count against the free ones)."""
        pool = self.block_pool
        parked = sum(1 for b in computed if pool.ref_cnt[b] == 0)
        need = cdiv(num_tokens, self.block_size) - len(computed)
        return need <= pool.num_free - parked

    def take(self, row: Any, computed: list[int], num_tokens: int) -> None:
        """Give a waiting row its computed blocks and blocks for ``num_tokens`` keys."""
        self.block_pool.touch(computed)
        row.blocks = list(computed)
        row.num_computed = len(computed) * self.block_size
        row.num_cached_blocks = len(computed)
        need = cdiv(num_tokens, self.block_size) - len(computed)
        row.blocks += self.block_pool.allocate(need)

    def allocate_slots(self, row: Any, num_new: int) -> bool:
        """Blocks for ``num_new`` more keys of a running row; False (nothing taken) when
        the pool has too few free blocks."""
        need = cdiv(row.num_computed + num_new, self.block_size) - len(row.blocks)
        if need <= 0:
            return True
        if need > self.block_pool.num_free:
            return False
        row.blocks += self.block_pool.allocate(need)
        return True

    def cache_full_blocks(self, row: Any) -> None:
        """Register the row's blocks filled since the last call in the prefix cache."""
        if not self.enable_caching or not row.cacheable:
            return
        full = row.num_computed // self.block_size
        if full <= row.num_cached_blocks:
            return
        ids = row.token_ids[: full * self.block_size]
        row.block_hashes = hash_blocks(row.task_key, ids, self.block_size, row.block_hashes)
        for i in range(row.num_cached_blocks, full):
            self.block_pool.cache(row.blocks[i], row.block_hashes[i])
        row.num_cached_blocks = full

    def free(self, row: Any) -> None:
        """The row finished or was preempted: its references go (cached blocks stay in
        the prefix cache until evicted)."""
        self.block_pool.free(row.blocks)
        row.blocks = []
        row.num_cached_blocks = 0

    def stats(self) -> dict[str, Any]:
        p = self.block_pool
        return {
            "enabled": self.enable_caching,
            "queries": p.queries,
            "hits": p.hits,
            "hit_rate": p.hits / p.queries if p.queries else 0.0,
            "cached_blocks": p.num_cached,
            "evictions": p.evictions,
        }
