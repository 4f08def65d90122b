"""Decode steps compiled by ``torch.compile`` (Inductor) over padded shape buckets: the
CPU counterpart of :mod:`.cuda_graphs`.

A decode step is padded exactly as :class:`~.cuda_graphs.DecodeGraphs` pads it (rows to a
batch bucket, padding rows on the pool's scratch block), and its block table is cut to a
*block bucket*: ``M`` entries per row, the smallest of ``2, 4, 8, ..., max_blocks`` that
holds the longest row (the torch attention backends gather and attend to every block a
table names, so a table as wide as ``max_model_len`` costs what its longest row does not
need). The model call of that step (:meth:`ModelRunner.model_call`, everything the runner
does around it stays eager) runs through one ``torch.compile(fullgraph=True)`` function
whose batch and block dimensions are marked dynamic: Inductor compiles the HF model, the
paged cache writes and prefixattn's attention (the ``sdpa`` backend traced, see
:func:`prefixattn.ops.custom_op.traced_prefix_attention`) into one graph.

    rows ──copy──> static buffers [B, 1] / [B, M] ──compiled model call──> logits [B, V]

**Buckets and recompiles.** Dynamo specialises sizes 0 and 1, so the smallest batch and
block buckets are 2 (a lone row runs beside one padding row; a row of one block reads one
scratch block more). Every (batch, block) bucket pair is run once at :meth:`capture` (the
engine calls it at start-up and, when the task bank's shape changed, when idle): the first
compiles, the others normally reuse that graph (a guard of a family, e.g. a sliding
window the keys cross, may add a graph: compiled then too). While serving, steps run under
``torch.compiler.set_stance("fail_on_recompile")``: a step never waits for a compile; a
step whose shape would need one runs eagerly and is counted (``refused_recompiles``).

**The task bank.** Its prefixes are graph inputs; a snapshot of another shape (tasks added
or removed, another longest prefix) fails the graph's guards: those steps run eagerly
(counted) until :meth:`capture` compiles for the new shape (the engine does so between
steps, when no row runs).

**Compile time** is reported (log line, :meth:`stats` ``compile_s`` /
``compile_s_by_bucket``) and bounded: ``budget_s`` stops compiling further buckets once
spent (their steps run eagerly, counted in ``eager_steps``). Inductor compiles its C++
kernels one at a time here (``compile_threads=1`` while capturing), which keeps the
start-up peak memory at one compiler process.

**Exactness.** Inductor fuses the model's element-wise work and reorders float sums, so
logits differ from the eager forward in the last bits (measured: <= 5e-6 absolute on
float32 logits of the tiny models); greedy tokens are equal unless two logits tie within
that (the tests compare the engine's tokens compiled vs eager).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import torch

from .cpu_linear import GroupSiblingLinears
from .cuda_graphs import DecodeGraphs, pick_bucket
from .kv_cache import StepLayout
from .runner import ModelRunner
from .scheduler import Row

__all__ = ["CompiledDecode", "block_buckets", "compile_batch_buckets"]

logger = logging.getLogger("prefixattn.serve")

MIN_BUCKET = 2  # Dynamo specialises sizes 0 and 1: the dynamic graph starts at 2


def block_buckets(max_blocks: int) -> tuple[int, ...]:
    """Block-table widths a step is padded to: 2, 4, 8, ... below ``max_blocks``, and
    ``max(max_blocks, 2)``."""
    top = max(max_blocks, MIN_BUCKET)
    out, b = [], MIN_BUCKET
    while b < top:
        out.append(b)
        b *= 2
    return (*out, top)


def compile_batch_buckets(buckets: tuple[int, ...]) -> tuple[int, ...]:
    """The batch buckets of a compiled step: ``buckets`` with 1 raised to 2."""
    return tuple(sorted({max(b, MIN_BUCKET) for b in buckets}))


# Inductor computes a pointwise result inside each kernel that reads it unless it is
# "heavy" (on the CPU: exp / log / tanh / sigmoid, or more than 50 ops); cos and sin are
# not on that list. A rotary embedding's q is then recomputed (cos, sin and all) for every
# key a decode step's attention reads it against (see prefixattn/ops/paged_decode.py),
# and k's for every place a cache write or a gather reads it. At 10 ops a reused
# result is computed once into a buffer: SmolLM2's decode step 90 ms instead of 102 ms
# (docs/serving-engine.md).
REALIZE_OPCOUNT_THRESHOLD = 10


def _realize_options() -> dict[str, int]:
    """The Inductor option above, where this torch's Inductor has it."""
    import torch._inductor.config as inductor_config

    if hasattr(inductor_config, "realize_opcount_threshold"):
        return {"realize_opcount_threshold": REALIZE_OPCOUNT_THRESHOLD}
    return {}


def _mark_dynamic(t: torch.Tensor | None, *dims: int) -> None:
    if t is not None:
        for d in dims:
            torch._dynamo.maybe_mark_dynamic(t, d)


class CompiledDecode(DecodeGraphs):
    """Decode steps of ``runner`` padded to (batch, block) buckets and run through one
    ``torch.compile``'d model call (Inductor; CPU).

    Arguments:
        runner: the engine's model runner; its pool must have a scratch block.
        buckets: batch sizes to pad to, ascending (1 is raised to 2); a step with more rows
            runs the engine's dynamic path.
        max_blocks: block table entries per row (``cdiv(max_model_len, block_size)``).
        budget_s: stop compiling further buckets after this many seconds of compiling
            (None: no bound); their steps run eagerly (counted).
    """

    def __init__(
        self,
        runner: ModelRunner,
        buckets: tuple[int, ...],
        max_blocks: int,
        budget_s: float | None = None,
    ) -> None:
        if budget_s is not None and not budget_s > 0:
            raise ValueError(f"budget_s must be > 0 or None, got {budget_s!r}")
        # the static table is at least MIN_BUCKET wide (entries past a row's blocks are
        # scratch); the mask functions are always told max_blocks * block_size keys
        super().__init__(runner, compile_batch_buckets(buckets), max(max_blocks, MIN_BUCKET))
        self.kv_len = max_blocks * runner.pool.block_size
        self.block_buckets = block_buckets(max_blocks)
        self.budget_s = budget_s
        # sibling linears (q/k/v, gate/up) packed as one weight run as one GEMM in the graph
        self.fn = torch.compile(
            runner.model_call,
            fullgraph=True,
            dynamic=None,
            options={"post_grad_custom_post_pass": GroupSiblingLinears(), **_realize_options()},
        )
        self.compiled: set[tuple[int, int]] = set()  # (batch, blocks) buckets compiled
        self.bank_shape: tuple | None = None  # the bank's shape they were compiled for
        self.compile_s = 0.0
        self.compile_s_by_bucket: dict[str, float] = {}
        self.refused_recompiles = 0  # steps whose guards failed: run eagerly, not compiled
        self.skipped_buckets = 0  # buckets left eager by the budget (last capture)
        self.replays_by_bucket = Counter({b: 0 for b in self.buckets})
        self.steps_by_blocks: Counter[int] = Counter({m: 0 for m in self.block_buckets})

    @staticmethod
    def _bank_shape(snapshot: Any) -> tuple | None:
        bank = getattr(snapshot, "bank", None)
        lengths = getattr(snapshot, "lengths_t", None)
        return (
            None if bank is None else tuple(bank.shape),
            None if lengths is None else tuple(lengths.shape),
        )

    def stale(self, snapshot: Any) -> bool:
        """Nothing compiled yet, or compiled for a bank of another shape."""
        return not self.compiled or self._bank_shape(snapshot) != self.bank_shape

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out.update(
            mode="torch.compile",
            block_buckets=list(self.block_buckets),
            compiled_buckets=len(self.compiled),
            compile_s=round(self.compile_s, 3),
            compile_s_by_bucket=dict(self.compile_s_by_bucket),
            refused_recompiles=self.refused_recompiles,
            skipped_buckets=self.skipped_buckets,
            steps_by_blocks={str(m): n for m, n in sorted(self.steps_by_blocks.items())},
        )
        return out

    # ------------------------------------------------------------------ the step

    def _mark(self, ids: torch.Tensor, positions: torch.Tensor) -> None:
        """Mark the step's tensors' batch (and block) dimensions dynamic: one graph for
        every bucket (the runner has set the step up)."""
        step, where = self.runner.cache.step, self.runner.cache._where
        for t in (ids, positions, step.starts, *(where or ()), *self.runner.step_tensors()):
            _mark_dynamic(t, 0)
        _mark_dynamic(step.block_table, 0, 1)

    def _call(self, ids: torch.Tensor, positions: torch.Tensor, k: int) -> torch.Tensor:
        """The compiled model call while serving: no recompile allowed."""
        self._mark(ids, positions)
        with torch.compiler.set_stance("fail_on_recompile"):
            return self.fn(ids, positions, k)

    def _warm_call(self, ids: torch.Tensor, positions: torch.Tensor, k: int) -> torch.Tensor:
        """The compiled model call at :meth:`capture`: compiles when the guards ask."""
        self._mark(ids, positions)
        return self.fn(ids, positions, k)

    def _static_forward(
        self, B: int, M: int, snapshot: Any, compiled: bool, warm: bool = False
    ) -> torch.Tensor:
        """The padded decode forward of bucket (B, M): logits [B, V] (``warm``: the
        compiled call that may compile)."""
        from ...hf.bank import TaskBank

        table = self.block_table[:B, :M].contiguous()  # [B, M] (one stride for every M)
        layout = StepLayout(table, self.starts[:B], 1, self.kv_len)
        provider = TaskBank.snapshot_provider(snapshot, self.prefix_index[:B])
        call = (self._warm_call if warm else self._call) if compiled else None
        out = self.runner.forward(self.ids[:B], self.positions[:B], layout, provider, 1, call=call)
        return out[:, -1]

    def capture(self, snapshot: Any) -> None:
        """Compile the step for every (batch, block) bucket on padding rows (the scratch
        block only), within ``budget_s``; the time is logged and kept in :meth:`stats`."""
        self.compiled.clear()
        self.compile_s_by_bucket.clear()
        self.skipped_buckets = 0
        self.bank_shape = self._bank_shape(snapshot)
        self._reset()
        import torch._inductor.config as inductor_config

        spent = 0.0
        # one C++ compiler at a time: Inductor's default (a compiler process per core) adds
        # a compiler's memory per core to the start-up peak (SmolLM2: ~0.2 GB each)
        with torch.no_grad(), inductor_config.patch(compile_threads=1):
            for B in self.buckets:
                for M in self.block_buckets:
                    if self.budget_s is not None and spent > self.budget_s:
                        self.skipped_buckets += 1
                        continue
                    t0 = time.perf_counter()
                    self._static_forward(B, M, snapshot, compiled=True, warm=True)
                    dt = time.perf_counter() - t0
                    spent += dt
                    self.compiled.add((B, M))
                    self.compile_s_by_bucket[f"B{B}/M{M}"] = round(dt, 3)
        self.compile_s += spent
        self.capture_runs += 1
        for B in self.buckets:
            self.captures[f"B{B}/compiled"] += 1
        logger.info(
            "prefixattn serve: decode step compiled (torch.compile, inductor) for %d of %d "
            "buckets in %.1f s%s", len(self.compiled),
            len(self.buckets) * len(self.block_buckets), spent,
            f" ({self.skipped_buckets} left eager: --compile-budget)" if self.skipped_buckets
            else "",
        )  # fmt: skip

    def decode(self, rows: list[Row], snapshot: Any) -> torch.Tensor | None:
        """Logits float32 [len(rows), V] of one decode step, or None when the rows exceed
        the largest bucket (the caller runs the dynamic path)."""
        B = pick_bucket(len(rows), self.buckets)
        if B is None:
            self.overflow_steps += 1
            return None
        M = pick_bucket(max(max(len(r.blocks) for r in rows), 1), self.block_buckets)
        if M is None:  # pragma: no cover - rows never hold more than max_blocks
            raise ValueError(f"a row holds more than {self.block_buckets[-1]} blocks")
        self._fill(rows, B, snapshot)
        self.steps += 1
        self.steps_by_blocks[M] += 1
        ready = (B, M) in self.compiled and self._bank_shape(snapshot) == self.bank_shape
        out = None
        if ready:
            try:
                out = self._static_forward(B, M, snapshot, compiled=True)
            except RuntimeError as err:
                if "fail_on_recompile" not in str(err) and "recompile" not in str(err):
                    raise
                self.refused_recompiles += 1
        if out is not None:
            self.replays += 1
            self.replays_by_bucket[B] += 1
        else:
            out = self._static_forward(B, M, snapshot, compiled=False)
            self.eager_steps += 1
            self.key_misses += bool(self.compiled)
        for r in rows:
            r.num_computed += 1
        return out[: len(rows)]
