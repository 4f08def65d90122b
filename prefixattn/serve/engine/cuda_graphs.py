"""Decode steps over static buffers, captured in CUDA graphs for a few batch sizes.

A decode step's inputs change every step (each row's token, position, block table,
length and task) but, padded to a *bucket* of rows (1, 2, 4, 8, 16, ...) with a block
table of every row's largest size (``max_blocks``), its shapes do not. :class:`DecodeGraphs`
keeps one set of static input buffers; each step copies the rows' values in (padding rows
write into the pool's scratch block, which no request ever holds), and then either
replays the bucket's captured CUDA graph (CUDA) or runs the same forward eagerly (CPU,
or a bucket not captured). Inside the step nothing leaves the device.

A graph also holds the bank's tensors it was captured with (the task prefixes, read by
the kernel's bank path through the static ``prefix_index`` buffer): its key is the
bucket and the bank snapshot. When tasks are added or removed the snapshot changes; the
steps run eagerly (counted in :attr:`DecodeGraphs.eager_steps`) until :meth:`capture`
runs again (the engine does so between steps).

    rows ──copy──> ids/pos/block_table/starts/prefix_index [Bmax] ──replay graph[B]──>
        logits [B, V] ──> rows
"""

from __future__ import annotations

from typing import Any

import torch

from .kv_cache import StepLayout
from .runner import ModelRunner
from .scheduler import Row

__all__ = ["DEFAULT_BUCKETS", "DecodeGraphs", "buckets_up_to", "pick_bucket"]

DEFAULT_BUCKETS = (1, 2, 4, 8, 16)


def buckets_up_to(n: int) -> tuple[int, ...]:
    """Powers of two below ``n``, and ``n`` itself: the buckets for ``max_num_seqs = n``."""
    out = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < n]
    return (*out, n)


def pick_bucket(n: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket that holds ``n`` rows (None when ``n`` exceeds them all)."""
    return next((b for b in buckets if b >= n), None)


class DecodeGraphs:
    """Static-shape decode steps for ``runner`` (CUDA graphs on CUDA, eager elsewhere).

    Arguments:
        runner: the engine's model runner; its pool must have a scratch block
            (``PagedKVPool(..., scratch=True)``).
        buckets: batch sizes to pad to, ascending; a step with more rows runs eagerly.
        max_blocks: block table entries per row (``cdiv(max_model_len, block_size)``).
    """

    def __init__(
        self, runner: ModelRunner, buckets: tuple[int, ...] = DEFAULT_BUCKETS, max_blocks: int = 1
    ) -> None:
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
            raise ValueError(f"buckets must be ascending distinct ints >= 1, got {buckets!r}")
        if runner.pool.scratch_block is None:
            raise ValueError("DecodeGraphs needs a KV pool with a scratch block (scratch=True)")
        if not isinstance(max_blocks, int) or max_blocks < 1:
            raise ValueError(f"max_blocks must be an int >= 1, got {max_blocks!r}")
        self.runner, self.buckets, self.max_blocks = runner, tuple(buckets), max_blocks
        dev, n = runner.device, buckets[-1]
        self.ids = torch.zeros(n, 1, dtype=torch.long, device=dev)  # [Bmax, 1]
        self.positions = torch.zeros(n, 1, dtype=torch.long, device=dev)  # [Bmax, 1]
        scratch = runner.pool.scratch_block
        # [Bmax, max_blocks]: padding rows (and entries past a row's blocks) -> scratch
        self.block_table = torch.full((n, max_blocks), scratch, dtype=torch.int32, device=dev)
        self.starts = torch.zeros(n, dtype=torch.long, device=dev)  # [Bmax]
        self.prefix_index = torch.zeros(n, dtype=torch.long, device=dev)  # [Bmax]
        # (bucket) -> (graph, logits); captured for the bank snapshot in self.snapshot
        self.graphs: dict[int, tuple[Any, torch.Tensor]] = {}
        self.snapshot: Any = None
        self.steps = 0  # decode steps run on the static buffers
        self.replays = 0  # of them, replayed graphs
        self.eager_steps = 0  # of them, run eagerly (off CUDA, or the bank changed)
        self.captures = 0  # capture() runs that captured graphs

    def _fill(self, rows: list[Row], B: int, snapshot: Any) -> None:
        """Copy the rows' inputs into the buffers (one host-to-device copy); rows
        ``len(rows) .. B-1`` are padding on the scratch block."""
        n, M = len(rows), self.max_blocks
        pad = B - n
        scratch = self.runner.pool.scratch_block
        pos = {name: i for i, name in enumerate(snapshot.names)}
        cols = torch.tensor(
            [[r.last_token for r in rows] + [0] * pad,
             [r.next_position for r in rows] + [0] * pad,
             [r.num_computed for r in rows] + [0] * pad,
             [pos[r.task] for r in rows] + [0] * pad],
            dtype=torch.long,
        )  # fmt: skip  # [4, B]
        table = torch.tensor(
            [r.blocks + [scratch] * (M - len(r.blocks)) for r in rows] + [[scratch] * M] * pad,
            dtype=torch.int32,
        )  # [B, M]
        if self.ids.device.type == "cuda":
            cols, table = cols.pin_memory(), table.pin_memory()
        cols = cols.to(self.ids.device, non_blocking=True)
        self.ids[:B, 0].copy_(cols[0])
        self.positions[:B, 0].copy_(cols[1])
        self.starts[:B].copy_(cols[2])
        self.prefix_index[:B].copy_(cols[3])
        self.block_table[:B].copy_(table.to(self.ids.device, non_blocking=True))

    def _forward(self, B: int, snapshot: Any) -> torch.Tensor:
        """The static decode forward of bucket ``B`` (what a graph captures): logits [B, V]."""
        from ...hf.bank import TaskBank

        bs = self.runner.pool.block_size
        layout = StepLayout(self.block_table[:B], self.starts[:B], 1, self.max_blocks * bs)
        provider = TaskBank.snapshot_provider(snapshot, self.prefix_index[:B])
        return self.runner.forward(self.ids[:B], self.positions[:B], layout, provider, 1)[:, -1]

    def _reset(self) -> None:
        """Every buffer row is padding (a capture's warm-up writes only the scratch block)."""
        self.ids.zero_()
        self.positions.zero_()
        self.starts.zero_()
        self.prefix_index.zero_()
        self.block_table.fill_(self.runner.pool.scratch_block)

    def stale(self, snapshot: Any) -> bool:
        """The graphs were captured with another bank snapshot (CUDA only)."""
        return self.ids.device.type == "cuda" and snapshot is not self.snapshot

    def capture(self, snapshot: Any) -> None:
        """Capture one CUDA graph per bucket for ``snapshot`` (CUDA only; a no-op
        elsewhere). Call between steps (it runs the model on padding rows only)."""
        if self.ids.device.type != "cuda":
            return
        self.graphs.clear()
        self.snapshot = snapshot
        self._reset()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for B in self.buckets:
                for _ in range(2):  # warm-up: allocator and lazy initialisation
                    self._forward(B, snapshot)
        torch.cuda.current_stream().wait_stream(stream)
        pool = None
        for B in reversed(self.buckets):  # largest first: the others reuse its memory
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool), torch.no_grad():
                out = self._forward(B, snapshot)
            pool = graph.pool()
            self.graphs[B] = (graph, out)
        self.captures += 1

    def decode(self, rows: list[Row], snapshot: Any) -> torch.Tensor | None:
        """Logits float32 [len(rows), V] of one decode step, or None when the rows exceed
        the largest bucket (the caller runs the dynamic path)."""
        B = pick_bucket(len(rows), self.buckets)
        if B is None:
            return None
        self._fill(rows, B, snapshot)
        self.steps += 1
        if B in self.graphs and snapshot is self.snapshot:
            graph, out = self.graphs[B]
            graph.replay()
            self.replays += 1
        else:
            out = self._forward(B, snapshot)
            self.eager_steps += 1
        for r in rows:
            r.num_computed += 1
        return out[: len(rows)]
