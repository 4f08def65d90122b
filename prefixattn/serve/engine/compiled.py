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

**Steps with prefill chunks** (:meth:`CompiledDecode.mixed`) run through the same graph:
every new token becomes a row of its own, one query over its row's pages (its keys
before it, the chunk's earlier tokens included: every row's key is written to the pool
before any row's attention reads it), and the LM head reads only the rows whose logits
are wanted (each decode row, each chunk's last token: ``StepLayout.logit_rows``, a
pre-hook on the model's output embeddings)::

    rows         decode r0 | decode r1 | chunk r2, 3 tokens
    graph rows   t0 @17    | t1 @40    | p0 @0  p1 @1  p2 @2      (token @ keys before it)
    LM head      row 0     | row 1     |               row 4     -> logits [3, V]

A mixed step is padded to a multiple of 8 rows (the decode buckets below); it runs
eagerly (the engine's packed forward, counted by reason in ``mixed_eager``) when it asks
prompt logprobs, has more rows than ``max_tokens``, or its attention would read more
(rows x keys) than the largest decode bucket at the longest table (at least 4096):
per-token queries over the pages cost what a long prompt's matrix-product attention
does not.

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

import contextlib
import logging
import time
from collections import Counter
from typing import Any

import torch
from torch import nn

from .cpu_linear import GroupSiblingLinears, native_linear_ops, native_linear_stats
from .cuda_graphs import DecodeGraphs, pick_bucket
from .kv_cache import StepLayout
from .runner import ModelRunner
from .scheduler import Row

__all__ = ["KEPT_GUARDS", "CompiledDecode", "block_buckets", "compile_batch_buckets", "keep_guard"]

logger = logging.getLogger("prefixattn.serve")

MIN_BUCKET = 2  # Dynamo specialises sizes 0 and 1: the dynamic graph starts at 2
MIXED_ROUND = 8  # a compiled mixed step's rows are padded to a multiple of this
MIXED_MIN_ATTENTION = 4096  # rows x keys: a 64-token chunk over 4 blocks of 16
# why a step with prefill chunks ran the engine's packed (eager) forward instead
MIXED_REASONS = ("prompt_logprobs", "tokens", "attention", "not_compiled", "recompile", "head")


def block_buckets(max_blocks: int) -> tuple[int, ...]:
    """Block-table widths a step is padded to: 2, 4, 8, ... below ``max_blocks``, and
    ``max(max_blocks, 2)``."""
    top = max(max_blocks, MIN_BUCKET)
    out, b = [], MIN_BUCKET
    while b < top:
        out.append(b)
        b *= 2
    return (*out, top)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


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


# The Dynamo guards a compiled step keeps: its inputs' shapes (the buckets' symbolic
# sizes), dtypes and devices (tensor guards), the values it traced as constants (rows'
# query length, the table's key count, logits kept, each layer's head_dim / layer_idx)
# and the global torch state (grad mode, default device, ...). Dropped: the guards on
# the model's Python structure (module types, empty hook dicts, closures, module-level
# constants of transformers and prefixattn: most of the 954 guards of a 2-layer tiny
# Llama's step, more per layer), which cost ~2.4 ms
# of a ~80 ms SmolLM2 decode step to evaluate on every call (torch.profiler's
# "TorchDynamo Cache Lookup"; 0.04 ms with this filter). A module, hook or attention
# function swapped while serving is therefore not seen by the graph (as vLLM's compiled
# models, which drop every guard); the bank's shape is checked before each call
# (:meth:`CompiledDecode.stale`), and the engine compiles again when it changes.
KEPT_GUARDS = frozenset({
    "SHAPE_ENV", "TENSOR_MATCH", "DUPLICATE_INPUT", "SEQUENCE_LENGTH", "CONSTANT_MATCH",
    "EQUALS_MATCH", "GRAD_MODE", "GLOBAL_STATE", "DEFAULT_DEVICE", "TORCH_FUNCTION_STATE",
    "DETERMINISTIC_ALGORITHMS", "AUTOGRAD_SAVED_TENSORS_HOOKS",
})  # fmt: skip


def keep_guard(entries: Any) -> list[bool]:
    """Dynamo's ``guard_filter_fn`` for the compiled step: which of ``entries``
    (``GuardFilterEntry``) to keep (:data:`KEPT_GUARDS`; a constant of a module's
    globals is dropped: prefixattn's and transformers' constants do not change)."""
    return [
        e.guard_type in KEPT_GUARDS
        and not (e.is_global and e.guard_type in ("CONSTANT_MATCH", "EQUALS_MATCH"))
        for e in entries
    ]


def _compile_options() -> dict[str, Any]:
    """``torch.compile`` options of the step: the sibling-linear pass, the guard filter
    (where this torch has it), Inductor's C++ wrapper and the threshold above.

    The C++ wrapper runs the whole graph as one C++ call that releases the GIL (the
    Python wrapper holds it through every fused kernel, ~9 ms of a decode step): in the
    server, the HTTP and tokenizer threads run beside the step instead of between its
    kernels. Measured with ``prefixattn serve --compile`` on the vs-vLLM workload
    (``benchmarks/vs_vllm.py --only prefixattn_task_compiled``, alternating, load 1.3-1.6):
    79.5 / 81.8 tokens/s against 75.8 / 76.1 with the Python wrapper, decode step p50
    94 / 91 ms against 99 / 97 ms, the same generated text."""
    import torch._inductor.config as inductor_config

    opts: dict[str, Any] = {"post_grad_custom_post_pass": GroupSiblingLinears()}
    if hasattr(torch.compiler, "skip_all_guards_unsafe"):  # torch >= 2.10: guard filters
        opts["guard_filter_fn"] = keep_guard
    if hasattr(inductor_config, "cpp_wrapper"):
        opts["cpp_wrapper"] = True
    return {**opts, **_realize_options()}


def _mark_dynamic(t: torch.Tensor | None, *dims: int) -> None:
    if t is not None:
        for d in dims:
            torch._dynamo.maybe_mark_dynamic(t, d)


def _no_duck_shapes() -> Any:
    """Dynamo's "duck shaping" gives dynamic sizes that are equal when traced one symbol
    (and a guard that they stay equal): a step traced with as many rows as blocks would
    fail its guards on every other shape. Off while capturing: one graph for all."""
    from torch.fx.experimental import _config as fx_config

    if hasattr(fx_config, "use_duck_shape"):
        return fx_config.patch(use_duck_shape=False)
    return contextlib.nullcontext()  # pragma: no cover - torch without the knob


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
        max_tokens: rows (new tokens) a compiled step with prefill chunks may have (the
            engine's ``max_num_batched_tokens``; default: the largest bucket).
    """

    def __init__(
        self,
        runner: ModelRunner,
        buckets: tuple[int, ...],
        max_blocks: int,
        budget_s: float | None = None,
        max_tokens: int | None = None,
    ) -> None:
        if budget_s is not None and not budget_s > 0:
            raise ValueError(f"budget_s must be > 0 or None, got {budget_s!r}")
        buckets = compile_batch_buckets(buckets)
        cap = max(buckets[-1], _round_up(max_tokens or 0, MIXED_ROUND))
        # the static table is at least MIN_BUCKET wide (entries past a row's blocks are
        # scratch); the mask functions are always told max_blocks * block_size keys
        super().__init__(runner, buckets, max(max_blocks, MIN_BUCKET), capacity=cap)
        self.max_tokens = cap
        self.kv_len = max_blocks * runner.pool.block_size
        # rows x keys a mixed step's attention may read: the largest decode step's (at
        # least MIXED_MIN_ATTENTION)
        self.attention_budget = max(
            self.buckets[-1] * max(max_blocks, MIN_BUCKET) * runner.pool.block_size,
            MIXED_MIN_ATTENTION,
        )
        self._all_rows = torch.arange(cap, device=runner.device)  # logit_rows of a decode step
        head = runner.model.get_output_embeddings()
        self._head_hook = (
            head.register_forward_pre_hook(self._head_rows) if isinstance(head, nn.Module) else None
        )
        self.head_reads_rows: bool | None = None  # the hook is honoured (checked at capture)
        self.block_buckets = block_buckets(max_blocks)
        self.budget_s = budget_s
        # the packed linears' ops in C++ (no Python, no GIL between the graph's kernels),
        # or why the Python kernels serve them (built once per source: ~15 s)
        self.linear_ops_why = native_linear_ops() if runner.device.type == "cpu" else "not CPU"
        # sibling linears (q/k/v, gate/up) packed as one weight run as one GEMM in the graph
        self.fn = torch.compile(
            runner.model_call,
            fullgraph=True,
            dynamic=None,
            options=_compile_options(),
        )
        self.compiled: set[tuple[int, int]] = set()  # (batch, blocks) buckets compiled
        self.bank_shape: tuple | None = None  # the bank's shape they were compiled for
        self.compile_s = 0.0
        self.compile_s_by_bucket: dict[str, float] = {}
        self.refused_recompiles = 0  # steps whose guards failed: run eagerly, not compiled
        self.skipped_buckets = 0  # buckets left eager by the budget (last capture)
        self.replays_by_bucket = Counter({b: 0 for b in self.buckets})
        self.steps_by_blocks: Counter[int] = Counter({m: 0 for m in self.block_buckets})
        self.mixed_steps = 0  # steps with prefill chunks run compiled
        self.mixed_tokens = 0  # their new tokens
        self.mixed_eager: Counter[str] = Counter({r: 0 for r in MIXED_REASONS})

    def close(self) -> None:
        """Remove the pre-hook on the model's output embeddings (the model as it was)."""
        if self._head_hook is not None:
            self._head_hook.remove()
            self._head_hook = None

    def _head_rows(self, module: nn.Module, args: tuple) -> tuple | None:
        """The LM head's pre-hook: during this runner's step with ``logit_rows``, only
        those rows of the hidden states [B, 1, H] go in (a no-op otherwise)."""
        step = self.runner.cache.step
        rows = None if step is None else step.logit_rows
        if rows is None:
            return None
        return (args[0].index_select(0, rows), *args[1:])

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
            mixed_max_tokens=self.max_tokens,
            mixed_steps=self.mixed_steps,
            mixed_tokens=self.mixed_tokens,
            mixed_eager=dict(self.mixed_eager),
            linear_ops="c++" if self.linear_ops_why is None else f"python ({self.linear_ops_why})",
            linear_ops_calls=native_linear_stats(),
        )
        return out

    # ------------------------------------------------------------------ the step

    def _mark(self, ids: torch.Tensor, positions: torch.Tensor) -> None:
        """Mark the step's tensors' batch (and block) dimensions dynamic: one graph for
        every bucket (the runner has set the step up)."""
        step, where = self.runner.cache.step, self.runner.cache._where
        for t in (ids, positions, step.starts, *(where or ()), *self.runner.step_tensors()):
            _mark_dynamic(t, 0)
        _mark_dynamic(step.logit_rows, 0)
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
        self,
        B: int,
        M: int,
        snapshot: Any,
        compiled: bool,
        warm: bool = False,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The padded forward of B rows of one token over M blocks: logits [K, V] of
        ``rows`` (int64 [K]; default all B) (``warm``: the compiled call that may
        compile)."""
        rows = self._all_rows[:B] if rows is None else rows  # [K]
        call = (self._warm_call if warm else self._call) if compiled else None
        out = self._rows_forward(B, M, snapshot, rows, call)
        if out.shape[0] != rows.shape[0]:  # the head was not the output embeddings module
            out = out.index_select(0, rows)
        return out[:, -1]

    def _rows_forward(
        self, B: int, M: int, snapshot: Any, rows: torch.Tensor, call: Any
    ) -> torch.Tensor:
        """The runner's forward over the first B buffer rows and M table entries, the LM
        head asked for ``rows``: logits [K or B, 1, V] as the model returns them."""
        from ...hf.bank import TaskBank

        table = self.block_table[:B, :M].contiguous()  # [B, M] (one stride for every M)
        layout = StepLayout(table, self.starts[:B], 1, self.kv_len, logit_rows=rows)
        provider = TaskBank.snapshot_provider(snapshot, self.prefix_index[:B])
        return self.runner.forward(self.ids[:B], self.positions[:B], layout, provider, 1, call=call)

    def _try_compiled(
        self, B: int, M: int, snapshot: Any, rows: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The compiled static forward, or None when its guards ask for a recompile
        (refused while serving: counted in ``refused_recompiles``)."""
        try:
            return self._static_forward(B, M, snapshot, compiled=True, rows=rows)
        except RuntimeError as err:
            if "fail_on_recompile" not in str(err) and "recompile" not in str(err):
                raise
            self.refused_recompiles += 1
            return None

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
        with torch.no_grad(), inductor_config.patch(compile_threads=1), _no_duck_shapes():
            self.head_reads_rows = self._check_head(snapshot)
            for B, M, K in self._warm_shapes():
                if self.budget_s is not None and spent > self.budget_s:
                    self.skipped_buckets += 1
                    continue
                t0 = time.perf_counter()
                rows = None if K is None else self._all_rows[:K].flip(0)
                self._static_forward(B, M, snapshot, compiled=True, warm=True, rows=rows)
                dt = time.perf_counter() - t0
                spent += dt
                if K is None:
                    self.compiled.add((B, M))
                    self.compile_s_by_bucket[f"B{B}/M{M}"] = round(dt, 3)
                else:
                    self.compile_s_by_bucket[f"mixed T{B}/K{K}/M{M}"] = round(dt, 3)
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

    def _check_head(self, snapshot: Any) -> bool:
        """Whether the model's LM head honours ``logit_rows`` (its output embeddings
        module is what the forward calls): one eager forward of 2 padding rows."""
        if self._head_hook is None:
            return False
        out = self._rows_forward(
            MIN_BUCKET, self.block_buckets[0], snapshot, self._all_rows[:1], None
        )
        return out.shape[0] == 1

    def _mixed_sizes(self) -> list[int]:
        """Row counts of a mixed step past the decode buckets that :meth:`capture` runs
        (one graph serves every count; these check it does without a compile)."""
        lo = _round_up(self.buckets[-1] + 1, MIXED_ROUND)
        return sorted({lo, self.max_tokens}) if self.max_tokens >= lo else []

    def _warm_shapes(self) -> list[tuple[int, int, int | None]]:
        """(rows, blocks, logit rows or None: a decode step) that :meth:`capture` runs."""
        shapes: list[tuple[int, int, int | None]] = [
            (B, M, None) for B in self.buckets for M in self.block_buckets
        ]
        if not self.head_reads_rows:
            return shapes
        bs = self.runner.pool.block_size
        for M in self.block_buckets:
            fits = [T for T in self._mixed_sizes() if T * M * bs <= self.attention_budget]
            for T, K in zip(fits, (MIN_BUCKET, self.buckets[-1] + 1)):
                shapes.append((T, M, K))
        return shapes

    def mixed(
        self, decode: list[Row], chunks: list[tuple[Row, int, bool]], snapshot: Any
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        """A step with prefill chunks ``(row, n, all_logits)`` through the compiled graph,
        one row per new token (the module doc): ``(logits [len(decode), V], [[1, V] per
        chunk])``, every row's ``num_computed`` advanced; or None (counted by reason in
        ``mixed_eager``): the engine's packed forward runs the step."""
        reason = None
        T = len(decode) + sum(n for _, n, _ in chunks)
        B = pick_bucket(T, self.buckets) or _round_up(T, MIXED_ROUND)
        longest = max(len(r.blocks) for r in [*decode, *(r for r, _, _ in chunks)])
        M = pick_bucket(max(longest, 1), self.block_buckets)
        if not self.head_reads_rows:
            reason = "head"
        elif any(want for _, _, want in chunks):
            reason = "prompt_logprobs"
        elif self.max_tokens < B or M is None:
            reason = "tokens"
        elif B * M * self.runner.pool.block_size > self.attention_budget:
            reason = "attention"
        elif not self.compiled or self._bank_shape(snapshot) != self.bank_shape:
            reason = "not_compiled"
        if reason is not None:
            self.mixed_eager[reason] += 1
            return None
        pos = {name: i for i, name in enumerate(snapshot.names)}
        tokens = [r.last_token for r in decode]
        positions = [r.next_position for r in decode]
        starts = [r.num_computed for r in decode]
        tasks = [pos[r.task] for r in decode]
        tables = [r.blocks for r in decode]
        keep = list(range(len(decode)))  # the rows whose logits are wanted
        for r, n, _ in chunks:
            a, p0, ids, t = r.num_computed, r.next_position, r.token_ids, pos[r.task]
            tokens += ids[a : a + n]
            positions += range(p0, p0 + n)
            starts += range(a, a + n)
            tasks += [t] * n
            tables += [r.blocks] * n
            keep.append(len(tokens) - 1)
        K = len(keep)
        keep += [0] * (MIN_BUCKET - K)  # Dynamo specialises 1: at least 2 (extra dropped)
        self._fill_columns(tokens, positions, starts, tasks, tables, B)
        rows = torch.tensor(keep, dtype=torch.int64, device=self.ids.device)  # [K]
        out = self._try_compiled(B, M, snapshot, rows)
        if out is None:
            self.mixed_eager["recompile"] += 1
            return None
        self.mixed_steps += 1
        self.mixed_tokens += T
        for r in decode:
            r.num_computed += 1
        for r, n, _ in chunks:
            r.num_computed += n
        d = len(decode)
        return out[:d], [out[d + i : d + i + 1] for i in range(len(chunks))]

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
        out = self._try_compiled(B, M, snapshot) if ready else None
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
