"""The KV blocks' bookkeeping: free list, reference counts, prefix-cache hashes (vLLM's
``BlockPool``). No tensors here: :mod:`.kv_cache` owns the memory, this module decides
which block ids hold what.

A block is in one of three states::

    in use     ref_cnt > 0: in the block table of one or more rows (shared when a
               prefix-cache hit reuses it)
    cached     ref_cnt == 0 but its hash is known: its keys are still valid and a later
               request with the same tokens (same task) takes it back from the free queue
    free       ref_cnt == 0, no hash: nothing to keep

The free queue holds cached and free blocks, least recently freed first: allocation pops
the front and forgets the popped block's hash (LRU eviction of the prefix cache).

Block hashes are chained (vLLM's prefix caching): the hash of block i covers the task key
(task name, prefix contents, position offset: the same text under another task is other
KV), the hashes of blocks 0..i-1 and block i's tokens, so equal hashes mean equal keys.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

__all__ = ["BlockPool", "hash_block_tokens", "hash_blocks"]


def hash_block_tokens(parent: Hashable, tokens: Sequence[int]) -> int:
    """The hash of one full block: its parent's hash (or the task key for block 0) and
    its tokens."""
    return hash((parent, tuple(tokens)))


def hash_blocks(
    task_key: Hashable, token_ids: Sequence[int], block_size: int, known: list[int] | None = None
) -> list[int]:
    """Chained hashes of the full blocks of ``token_ids`` (a partial last block has none).

    ``known``: hashes already computed for the first blocks (extended in place and
    returned), so a growing row hashes each block once.
    """
    out = [] if known is None else known
    for i in range(len(out), len(token_ids) // block_size):
        parent = task_key if i == 0 else out[i - 1]
        out.append(hash_block_tokens(parent, token_ids[i * block_size : (i + 1) * block_size]))
    return out


class BlockPool:
    """``num_blocks`` block ids with reference counts, a free queue (LRU) and the prefix
    cache's ``hash -> block id`` map.

    Arguments:
        num_blocks: blocks in the pool.
        enable_caching: keep the hashes of full blocks and reuse them (prefix caching).
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # hash -> block id
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        # prefix-cache statistics (blocks of prompt looked up / found)
        self.queries = 0
        self.hits = 0
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks that an allocation can take (free or cached, ref_cnt 0)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks whose hash is known (in use or in the free queue)."""
        return len(self.cached)

    def usage(self) -> float:
        """The fraction of blocks in use by rows."""
        return 1.0 - self.num_free / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks from the front of the free queue (evicting their cached
        hashes); the caller checked :attr:`num_free`."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            h = self.block_hash[b]
            if h is not None:  # evict: its keys are overwritten from now on
                self.block_hash[b] = None
                if self.cached.get(h) == b:
                    del self.cached[h]
                self.evictions += 1
            self.ref_cnt[b] = 1
            out.append(b)
        return out

    def lookup(self, hashes: Sequence[int]) -> list[int]:
        """The cached blocks of the longest prefix of ``hashes`` (not yet taken)."""
        out = []
        for h in hashes:
            b = self.cached.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def touch(self, blocks: Sequence[int]) -> None:
        """Take a reference on cached blocks (a prefix-cache hit)."""
        for b in blocks:
            if self.ref_cnt[b] == 0:
                del self._free[b]
            self.ref_cnt[b] += 1

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each block; blocks no row holds go to the back of the
        free queue (the last blocks of a row first: they are evicted before its first)."""
        for b in reversed(blocks):
            if self.ref_cnt[b] <= 0:
                raise RuntimeError(f"KV block {b} freed more often than taken")
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] == 0:
                self._free[b] = None

    def cache(self, block: int, h: int) -> None:
        """Block ``block`` (full, in use) now holds the keys of hash ``h``."""
        if not self.enable_caching or self.block_hash[block] is not None:
            return
        self.block_hash[block] = h
        self.cached.setdefault(h, block)  # a duplicate computed meanwhile: keep the first

    def reset_cache(self) -> None:
        """Forget every hash (the tasks' prefixes changed)."""
        self.cached.clear()
        self.block_hash = [None] * self.num_blocks
