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

    rows ──copy──> ids/pos/block_table/starts/prefix_index [Bmax] ──replay graph[key]──>
        logits [B, V] ──> rows

**The graph key.** A graph bakes in every shape and buffer address of the step it
captured; replaying it for another shape reads or writes the wrong memory with no error
(transformers once replayed a decode graph captured for another key length: wrong tokens,
no crash). So a graph is looked up by a :class:`GraphKey` of everything that could differ
between capture and replay: the bucket, the keys each row may read (``max_blocks *
block_size``), the pool's dtype and storage, the attention backend the model is patched
with, and the bank snapshot (a version number: :class:`DecodeGraphs` numbers each new
snapshot it sees). A step whose key has no graph runs the same static forward eagerly.

**Counters** (:meth:`DecodeGraphs.stats`, in the engine's metrics: ``/metrics.json``
``cuda_graphs``, Prometheus ``prefixattn:cuda_graph_*`` / ``prefixattn:decode_steps``):
captures per key label, replays (total and per bucket), eager static steps (no graph:
CPU, or a key missed), key misses (eager steps although graphs were captured: the bank
changed since, until the engine captures again), overflow steps (more rows than the
largest bucket: the engine's dynamic path), recaptures (:meth:`capture` runs after the
first).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, NamedTuple

import torch

from ...hf.patching import get_backend
from ...ops.validation import auto_backend
from .config import buckets_up_to
from .kv_cache import StepLayout
from .runner import ModelRunner
from .scheduler import Row

__all__ = ["DEFAULT_BUCKETS", "DecodeGraphs", "GraphKey", "buckets_up_to", "pick_bucket"]

DEFAULT_BUCKETS = (1, 2, 4, 8, 16)


def pick_bucket(n: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket that holds ``n`` rows (None when ``n`` exceeds them all)."""
    return next((b for b in buckets if b >= n), None)


class GraphKey(NamedTuple):
    """Everything a captured decode graph baked in that could change between capture and
    replay: a graph is replayed only for its own key."""

    batch: int  # rows: the bucket
    kv_len: int  # keys each row's attention may read: max_blocks * block_size
    dtype: str  # of the KV pool (and the model)
    backend: str  # the attention backend the model runs ("triton", "sdpa", ...: "auto" resolved)
    pool: int  # the pool's storage (layer 0's keys' data_ptr): a new pool, new graphs
    bank: int  # the bank snapshot's version (DecodeGraphs.bank_version_of)

    def label(self) -> str:
        """``B4/L1024/bfloat16/triton``: the key without the storage address and bank."""
        return f"B{self.batch}/L{self.kv_len}/{self.dtype.replace('torch.', '')}/{self.backend}"


class DecodeGraphs:
    """Static-shape decode steps for ``runner`` (CUDA graphs on CUDA, eager elsewhere).

    Arguments:
        runner: the engine's model runner; its pool must have a scratch block
            (``PagedKVPool(..., scratch=True)``).
        buckets: batch sizes to pad to, ascending; a step with more rows runs eagerly.
        max_blocks: block table entries per row (``cdiv(max_model_len, block_size)``).
        capacity: rows of the static buffers (default the largest bucket; a compiled
            mixed step, :mod:`.compiled`, feeds one row per token).
    """

    def __init__(
        self,
        runner: ModelRunner,
        buckets: tuple[int, ...] = DEFAULT_BUCKETS,
        max_blocks: int = 1,
        capacity: int | None = None,
    ) -> None:
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
            raise ValueError(f"buckets must be ascending distinct ints >= 1, got {buckets!r}")
        if runner.pool.scratch_block is None:
            raise ValueError("DecodeGraphs needs a KV pool with a scratch block (scratch=True)")
        if not isinstance(max_blocks, int) or max_blocks < 1:
            raise ValueError(f"max_blocks must be an int >= 1, got {max_blocks!r}")
        self.runner, self.buckets, self.max_blocks = runner, tuple(buckets), max_blocks
        dev, n = runner.device, max(buckets[-1], capacity or 0)
        self.ids = torch.zeros(n, 1, dtype=torch.long, device=dev)  # [Bmax, 1]
        self.positions = torch.zeros(n, 1, dtype=torch.long, device=dev)  # [Bmax, 1]
        scratch = runner.pool.scratch_block
        # [Bmax, max_blocks]: padding rows (and entries past a row's blocks) -> scratch
        self.block_table = torch.full((n, max_blocks), scratch, dtype=torch.int32, device=dev)
        self.starts = torch.zeros(n, dtype=torch.long, device=dev)  # [Bmax]
        self.prefix_index = torch.zeros(n, dtype=torch.long, device=dev)  # [Bmax]
        # key -> (graph, logits); captured for the bank snapshot in self.snapshot
        self.graphs: dict[GraphKey, tuple[Any, torch.Tensor]] = {}
        self.snapshot: Any = None  # the snapshot the graphs hold
        # bank snapshots are numbered as they are seen (held, so compared by identity)
        self._seen: Any = None
        self._seen_version = -1
        # counters (stats()); every key is present from the start: a reader in another
        # thread never sees a dict change size
        self.steps = 0  # decode steps run on the static buffers
        self.replays = 0  # of them, replayed graphs
        self.replays_by_bucket: Counter[int] = Counter({b: 0 for b in self.buckets})
        self.eager_steps = 0  # of them, run eagerly (off CUDA, or no graph for the key)
        self.key_misses = 0  # of those, with graphs captured (the bank changed since)
        self.overflow_steps = 0  # steps with more rows than the largest bucket
        self.capture_runs = 0  # capture() runs that captured graphs
        self.captures: Counter[str] = Counter()  # GraphKey.label() -> graphs captured

    @property
    def recaptures(self) -> int:
        """capture() runs after the first (the bank changed)."""
        return max(self.capture_runs - 1, 0)

    def bank_version_of(self, snapshot: Any) -> int:
        """The version number of ``snapshot``: the same as the last one seen when it is
        that snapshot, else the next number (the bank swaps its snapshot whole on every
        add/remove, so identity tells a change)."""
        if snapshot is not self._seen:
            self._seen, self._seen_version = snapshot, self._seen_version + 1
        return self._seen_version

    def key(self, B: int, snapshot: Any) -> GraphKey:
        """The graph key of a step of bucket ``B`` over ``snapshot`` now."""
        pool = self.runner.pool
        keys = pool.keys[0]
        backend = str(get_backend(self.runner.model))
        if backend == "auto":  # what "auto" runs on the pool's device and dtype
            backend = auto_backend(keys.device, keys.dtype)
        return GraphKey(
            B, self.max_blocks * pool.block_size, str(keys.dtype), backend, keys.data_ptr(),
            self.bank_version_of(snapshot),
        )  # fmt: skip

    def stats(self) -> dict[str, Any]:
        """The counters, for the engine's metrics."""
        return {
            "buckets": list(self.buckets),
            "captured_graphs": len(self.graphs),
            "captures": dict(self.captures),
            "capture_runs": self.capture_runs,
            "recaptures": self.recaptures,
            "static_steps": self.steps,
            "replays": self.replays,
            "replays_by_bucket": {str(b): n for b, n in sorted(self.replays_by_bucket.items())},
            "eager_steps": self.eager_steps,
            "key_misses": self.key_misses,
            "overflow_steps": self.overflow_steps,
        }

    def _fill(self, rows: list[Row], B: int, snapshot: Any) -> None:
        """Copy the rows' inputs into the buffers (one host-to-device copy); rows
        ``len(rows) .. B-1`` are padding on the scratch block."""
        pos = {name: i for i, name in enumerate(snapshot.names)}
        self._fill_columns(
            [r.last_token for r in rows], [r.next_position for r in rows],
            [r.num_computed for r in rows], [pos[r.task] for r in rows],
            [r.blocks for r in rows], B,
        )  # fmt: skip

    def _fill_columns(
        self,
        tokens: list[int],
        positions: list[int],
        starts: list[int],
        tasks: list[int],
        tables: list[list[int]],
        B: int,
    ) -> None:
        """Copy one token per row into the buffers: its id, position, keys before it
        (``starts``), task (bank index) and block table; rows ``len(tokens) .. B-1`` are
        padding on the scratch block."""
        n, M = len(tokens), self.max_blocks
        pad = B - n
        scratch = self.runner.pool.scratch_block
        cols = torch.tensor(
            [tokens + [0] * pad, positions + [0] * pad, starts + [0] * pad, tasks + [0] * pad],
            dtype=torch.long,
        )  # [4, B]
        table = torch.tensor(
            [t + [scratch] * (M - len(t)) for t in tables] + [[scratch] * M] * pad,
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
            key = self.key(B, snapshot)
            self.graphs[key] = (graph, out)
            self.captures[key.label()] += 1
        self.capture_runs += 1

    def decode(self, rows: list[Row], snapshot: Any) -> torch.Tensor | None:
        """Logits float32 [len(rows), V] of one decode step, or None when the rows exceed
        the largest bucket (the caller runs the dynamic path)."""
        B = pick_bucket(len(rows), self.buckets)
        if B is None:
            self.overflow_steps += 1
            return None
        self._fill(rows, B, snapshot)
        self.steps += 1
        hit = self.graphs.get(self.key(B, snapshot))
        if hit is not None:
            graph, out = hit
            graph.replay()
            self.replays += 1
            self.replays_by_bucket[B] += 1
        else:
            out = self._forward(B, snapshot)
            self.eager_steps += 1
            self.key_misses += bool(self.graphs)
        for r in rows:
            r.num_computed += 1
        return out[: len(rows)]

    def mixed(
        self, decode: list[Row], chunks: list[tuple[Row, int, bool]], snapshot: Any
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        """A step with prefill chunks over the static buffers: not done by CUDA graphs
        (None: the engine's packed forward runs it; see :meth:`.compiled.CompiledDecode.mixed`)."""
        return None
