"""Decode steps over static buffers, captured in CUDA graphs for a few batch sizes.

A decode step's inputs change every step (each row's token, position, slot and length)
but, padded to a *bucket* of rows (1, 2, 4, 8, 16, ...) and reading every slot up to the
pool's ``max_len`` under a key mask, its shapes do not. :class:`DecodeGraphs` keeps one set
of static input buffers; each step copies the rows' values in (padding rows point at the
pool's scratch slot, which no request ever holds), and then either replays the bucket's
captured CUDA graph (CUDA) or runs the same forward eagerly (CPU, or a bucket not
captured). Inside the step nothing leaves the device: the key mask and the slot positions
are computed from the buffers by tensor ops, so the step can be captured.

    rows ──copy──> ids/pos/slots/starts [Bmax]  ──replay graph[key]──> logits [B, V] ──> rows

**The graph key.** A graph bakes in every shape and buffer address of the step it
captured; replaying it for another shape reads or writes the wrong memory with no error
(transformers once replayed a decode graph captured for another key length: wrong tokens,
no crash). So a graph is looked up by a :class:`GraphKey` of everything that could differ
between capture and replay: the bucket, the keys each row reads (the pool's ``max_len``),
the pool's dtype and storage, and the attention path (pool read in place, or gathered
and masked). The task bank does not enter the step (a row's prefix is in its slot). A
step whose key has no graph runs the same static forward eagerly and is counted.

**Counters** (:meth:`DecodeGraphs.stats`, in the engine's metrics: ``/metrics.json``
``cuda_graphs``, Prometheus ``prefixattn:cuda_graph_*`` / ``prefixattn:decode_steps``):
captures per key, replays per bucket, eager static steps (no graph: CPU, or a key
missed), key misses (eager steps although graphs were captured), overflow steps (more
rows than the largest bucket: the engine's dynamic path).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, NamedTuple

import torch

from .kv_cache import StepLayout
from .runner import ModelRunner
from .scheduler import Row

__all__ = ["DEFAULT_BUCKETS", "DecodeGraphs", "GraphKey", "buckets_up_to", "pick_bucket"]

DEFAULT_BUCKETS = (1, 2, 4, 8, 16)


def buckets_up_to(n: int) -> tuple[int, ...]:
    """Powers of two below ``n``, and ``n`` itself: the buckets for ``max_num_seqs = n``."""
    out = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < n]
    return (*out, n)


def pick_bucket(n: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket that holds ``n`` rows (None when ``n`` exceeds them all)."""
    return next((b for b in buckets if b >= n), None)


class GraphKey(NamedTuple):
    """Everything a captured decode graph baked in that could change between capture and
    replay: a graph is replayed only for its own key."""

    batch: int  # rows: the bucket
    kv_len: int  # keys each row's attention reads: the pool's max_len
    dtype: str  # of the KV pool (and the model)
    in_place: bool  # the kernel reads the pool in place (else: gathered, masked)
    pool: int  # the pool's storage (layer 0's keys' data_ptr): a new pool, new graphs

    def label(self) -> str:
        """``B4/L1024/bfloat16/in_place``: the key without the storage address."""
        path = "in_place" if self.in_place else "gather"
        return f"B{self.batch}/L{self.kv_len}/{self.dtype.replace('torch.', '')}/{path}"


class DecodeGraphs:
    """Static-shape decode steps for ``runner`` (CUDA graphs on CUDA, eager elsewhere).

    Arguments:
        runner: the engine's model runner; its pool must have a scratch slot
            (``KVPool(..., scratch=True)``).
        buckets: batch sizes to pad to, ascending; a step with more rows runs eagerly.
    """

    def __init__(self, runner: ModelRunner, buckets: tuple[int, ...] = DEFAULT_BUCKETS) -> None:
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
            raise ValueError(f"buckets must be ascending distinct ints >= 1, got {buckets!r}")
        if runner.pool.scratch_slot is None:
            raise ValueError("DecodeGraphs needs a KV pool with a scratch slot (scratch=True)")
        self.runner, self.buckets = runner, tuple(buckets)
        dev, n = runner.device, buckets[-1]
        self.ids = torch.zeros(n, 1, dtype=torch.long, device=dev)  # [Bmax, 1]
        self.positions = torch.zeros(n, 1, dtype=torch.long, device=dev)  # [Bmax, 1]
        self.slots = torch.full((n,), runner.pool.scratch_slot, dtype=torch.long, device=dev)
        self.starts = torch.zeros(n, dtype=torch.long, device=dev)  # [Bmax]
        self.graphs: dict[GraphKey, tuple[Any, torch.Tensor]] = {}  # key -> (graph, logits)
        # counters (stats()); every key is present from the start: a reader in another
        # thread never sees a dict change size
        self.steps = 0  # decode steps run on the static buffers
        self.replays = 0  # of them, replayed graphs
        self.replays_by_bucket: Counter[int] = Counter({b: 0 for b in self.buckets})
        self.eager_steps = 0  # of them, run eagerly (no graph for their key)
        self.key_misses = 0  # of those, with graphs captured (a key changed since)
        self.overflow_steps = 0  # steps with more rows than the largest bucket
        self.captures: Counter[str] = Counter()  # GraphKey.label() -> graphs captured

    def key(self, B: int) -> GraphKey:
        """The graph key of a step of bucket ``B`` now."""
        pool = self.runner.pool
        return GraphKey(B, pool.max_len, str(pool.keys[0].dtype), bool(self.runner.in_place),
                        pool.keys[0].data_ptr())  # fmt: skip

    def stats(self) -> dict[str, Any]:
        """The counters, for the engine's metrics."""
        return {
            "buckets": list(self.buckets),
            "captured_graphs": len(self.graphs),
            "captures": dict(self.captures),
            "static_steps": self.steps,
            "replays": self.replays,
            "replays_by_bucket": {str(b): n for b, n in sorted(self.replays_by_bucket.items())},
            "eager_steps": self.eager_steps,
            "key_misses": self.key_misses,
            "overflow_steps": self.overflow_steps,
        }

    def _fill(self, rows: list[Row], B: int) -> None:
        """Copy the rows' inputs into the buffers (one host-to-device copy each); rows
        ``len(rows) .. B-1`` are padding on the scratch slot."""
        n = len(rows)
        pad = B - n
        scratch = self.runner.pool.scratch_slot
        host = torch.tensor(
            [[r.last_token for r in rows] + [0] * pad,
             [r.next_position for r in rows] + [0] * pad,
             [r.slot for r in rows] + [scratch] * pad,
             [r.kv_len for r in rows] + [0] * pad],
            dtype=torch.long,
        )  # fmt: skip  # [4, B]
        if self.ids.device.type == "cuda":
            host = host.pin_memory()
        dev = host.to(self.ids.device, non_blocking=True)
        self.ids[:B, 0].copy_(dev[0])
        self.positions[:B, 0].copy_(dev[1])
        self.slots[:B].copy_(dev[2])
        self.starts[:B].copy_(dev[3])

    def _forward(self, B: int) -> torch.Tensor:
        """The static decode forward of bucket ``B`` (what a graph captures): logits [B, V]."""
        starts = self.starts[:B]
        if self.runner.in_place:  # the kernel reads the pool: no mask, no gather
            return self.runner.decode_in_place(
                self.ids[:B], self.positions[:B], self.slots[:B], starts
            )
        L = self.runner.pool.max_len
        keys = torch.arange(L, device=starts.device)[None, :]  # [1, L]
        key_mask = keys <= starts[:, None]  # [B, L]: each row's keys and its new one
        layout = StepLayout(slots=self.slots[:B], starts=starts, n_new=1, kv_len=L, slot_list=None)
        return self.runner._forward(self.ids[:B], self.positions[:B], layout, key_mask, 1)[
            :, -1
        ]  # [B, V]

    def capture(self) -> None:
        """Capture one CUDA graph per bucket (CUDA only; a no-op elsewhere)."""
        if self.ids.device.type != "cuda":
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for B in self.buckets:
                for _ in range(2):  # warm-up: allocator and lazy initialisation
                    self._forward(B)
        torch.cuda.current_stream().wait_stream(stream)
        pool = None
        for B in reversed(self.buckets):  # largest first: the others reuse its memory
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool), torch.no_grad():
                out = self._forward(B)
            pool = graph.pool()
            key = self.key(B)
            self.graphs[key] = (graph, out)
            self.captures[key.label()] += 1

    def decode(self, rows: list[Row]) -> torch.Tensor | None:
        """Logits float32 [len(rows), V] of one decode step, or None when the rows exceed
        the largest bucket (the caller runs the eager path)."""
        B = pick_bucket(len(rows), self.buckets)
        if B is None:
            self.overflow_steps += 1
            return None
        self._fill(rows, B)
        self.steps += 1
        hit = self.graphs.get(self.key(B))
        if hit is not None:
            graph, out = hit
            graph.replay()
            self.replays += 1
            self.replays_by_bucket[B] += 1
        else:
            out = self._forward(B)
            self.eager_steps += 1
            self.key_misses += bool(self.graphs)
        for r in rows:
            r.kv_len += 1
        return out[: len(rows)]
