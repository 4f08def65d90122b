"""The serving engine: continuous batching over a paged KV cache, every row its own task.

One worker thread runs the step loop (iteration-level scheduling, as vLLM and
transformers' continuous batching)::

    while running:
        take new requests; drop cancelled rows (their blocks are free at once)
        plan = scheduler.plan()     # decode rows + prefill chunks within the token budget,
                                    # new rows admitted while KV blocks are free (prefix-
                                    # cache hits skip their cached blocks), the newest row
                                    # preempted when a running row finds no free block
        logits = runner(plan)       # ONE packed forward: decode rows + prefill chunks (a
                                    # decode-only step: CUDA graph / compiled bucket if on;
                                    # compiled: chunks too, one graph row per token)
        tokens = sample(logits)     # batched for the step: greedy rows one argmax, sampled
                                    # rows their own temperature/top-p/generator
        emit each token to its sink; finished rows leave before the next step

The engine is token-level (see :mod:`.request`): the front end turns tokens into text
and decides stop strings through the request's :class:`~.request.OutputSink`.
Modules: :mod:`.scheduler` (what runs), :mod:`.kv_cache_manager` / :mod:`.block_pool`
(which blocks each row holds, the prefix cache), :mod:`.runner` (the forwards),
:mod:`.kv_cache` (the block pool as a transformers ``Cache``), :mod:`.sampling` (per-row
choice, logprobs). A row's KV memory holds only its own tokens: its task's prefix is read
from the bank (one copy per task) in every step, by task name (a bank rebuilt while
serving never misroutes a running row).
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import torch

from ...hf.bank import TaskBank
from .compiled import CompiledDecode
from .config import DEFAULT_MAX_MODEL_LEN, EngineConfig, buckets_up_to, merge_overrides
from .cpu_linear import PackedLinears, onednn_packing, pack_linears
from .cuda_graphs import DecodeGraphs
from .kv_cache import PagedKVPool
from .kv_cache_manager import KVCacheManager, TaskKeys, cdiv
from .request import (
    CANCELLED,
    ERROR,
    LENGTH,
    STOP,
    GenRequest,
    QueueFullError,
    SamplingParams,
    TokenOut,
)
from .runner import ModelRunner
from .sampling import RowSampler, choose_tokens, token_outs
from .scheduler import Row, Scheduler, StepPlan

__all__ = [
    "CANCELLED",
    "ERROR",
    "LENGTH",
    "STOP",
    "Engine",
    "EngineConfig",
    "GenRequest",
    "QueueFullError",
    "SamplingParams",
    "context_limit",
    "eos_token_ids",
]


def _percentiles(values: Any) -> dict[str, Any]:
    v = sorted(values)

    def pct(p: float) -> float | None:
        return None if not v else v[min(len(v) - 1, round(p / 100 * (len(v) - 1)))]

    return {"count": len(v), "p50": pct(50), "p90": pct(90), "p99": pct(99)}


class Engine:
    """Continuous batching of completion requests for a :class:`TaskBank`, in a worker thread.

    Arguments:
        bank: the bank (its model patched); tasks may be added / removed while serving.
        tokenizer: the model's tokenizer (only its EOS id is used; None: the model's
            generation config's).
        config: the engine's options (:class:`~.config.EngineConfig`: each field's help
            says what it does); None: the defaults.
        **overrides: :class:`~.config.EngineConfig` fields, winning over ``config``'s
            (``Engine(bank, tok, max_num_seqs=4)``). ``max_batch_size``: the former name of
            ``max_num_seqs`` (deprecated; used when ``max_num_seqs`` is not given).

    :attr:`config` holds the options the engine runs with: those given, with the defaults
    that depend on the model resolved (``max_num_seqs`` from ``max_batch_size``,
    ``max_model_len`` from the model's context, ``kv_slots``, and ``decode_buckets`` under
    ``compile``). ``max_queue`` may be changed while serving (assigning it replaces
    :attr:`config`).

    Every attention call reads the paged pool through ``cache_seqlens`` + ``block_table``
    (the Triton kernel in place; the torch backends gather the pages) and the rows' task
    prefixes from the bank (``prefix_index`` / ``prefix_lengths``).

    Raises:
        TypeError: an override that is not an EngineConfig field (named).
        ValueError: a value out of range (naming the field), or one this model cannot
            take (``kv_cache_memory`` below one block, ``cpu_linear='onednn'`` where oneDNN
            cannot pack the model).
    """

    def __init__(
        self,
        bank: TaskBank,
        tokenizer: Any = None,
        config: EngineConfig | None = None,
        **overrides: Any,
    ) -> None:
        if "max_batch_size" in overrides:  # the former name of max_num_seqs
            warnings.warn(
                "Engine(max_batch_size=...) is deprecated: use max_num_seqs",
                DeprecationWarning,
                stacklevel=2,
            )
            overrides.setdefault("max_num_seqs", overrides.pop("max_batch_size"))
        cfg = merge_overrides(config, overrides, caller="Engine")
        model = bank.model
        limit = context_limit(model)
        max_model_len = cfg.max_model_len
        if max_model_len is None:
            max_model_len = min(limit or DEFAULT_MAX_MODEL_LEN, DEFAULT_MAX_MODEL_LEN)
        decode_buckets = cfg.decode_buckets
        if cfg.compile and decode_buckets is None:
            decode_buckets = buckets_up_to(cfg.max_num_seqs)
        cfg = dataclasses.replace(
            cfg,
            max_model_len=max_model_len,
            kv_slots=cfg.max_num_seqs if cfg.kv_slots is None else cfg.kv_slots,
            decode_buckets=decode_buckets,
        )
        self.config = cfg
        self.bank, self.tokenizer = bank, tokenizer
        self.context_limit = limit
        g = bank.geometry
        param = next(model.parameters())
        self.max_blocks_per_row = cdiv(cfg.max_model_len, cfg.block_size)
        num_blocks = cfg.num_blocks
        if cfg.kv_cache_memory is not None:
            per = PagedKVPool.block_bytes(
                g.num_layers, g.num_kv_heads, g.head_dim, cfg.block_size, param.dtype
            )
            num_blocks = cfg.kv_cache_memory // per
            if num_blocks < 1:
                raise ValueError(
                    f"kv_cache_memory={cfg.kv_cache_memory} bytes holds no KV block ({per} bytes)"
                )
        if num_blocks is None:
            num_blocks = cfg.kv_slots * self.max_blocks_per_row
        self.pool = PagedKVPool(
            g.num_layers, g.num_kv_heads, g.head_dim, num_blocks=num_blocks,
            block_size=cfg.block_size, dtype=param.dtype, device=param.device,
            scratch=cfg.decode_buckets is not None,
        )  # fmt: skip
        self.kv = KVCacheManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.kv,
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
        )
        self.runner = ModelRunner(model, self.pool)
        if cfg.cpu_linear == "onednn":
            why = "the model is not on the CPU" if param.device.type != "cpu" else None
            why = why or onednn_packing(param.dtype)
            if why is not None:
                raise ValueError(f"cpu_linear='onednn': {why}")
        self.linears: PackedLinears | None = None  # packed while the worker runs
        self.graphs: DecodeGraphs | None = None
        if cfg.compile and param.device.type != "cuda":
            self.graphs = CompiledDecode(
                self.runner, cfg.decode_buckets, self.max_blocks_per_row, cfg.compile_budget_s,
                max_tokens=cfg.max_num_batched_tokens,
            )  # fmt: skip
        elif cfg.decode_buckets is not None:
            self.graphs = DecodeGraphs(self.runner, cfg.decode_buckets, self.max_blocks_per_row)
        self._task_keys = TaskKeys()
        self._rng = random.Random(cfg.seed)
        self._inbox: deque[GenRequest] = deque()
        self._lock = threading.Lock()  # guards _inbox and the counters submit touches
        self._wake = threading.Event()
        # held while the model runs: admin loads (which may run the model) wait for the step
        self.model_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._draining = False
        self._unfinished = 0  # submitted and not finished (waiting or running)
        self._task_rows: Counter[str] = Counter()  # task -> its unfinished requests
        self.eos_ids = set(eos_token_ids(model, tokenizer))
        # metrics
        # submitted, completed, cancelled, rejected, failed, client_gone (cancel asked)
        self.requests: Counter[str] = Counter()
        self.tokens_generated = 0
        self.prompt_tokens = 0
        self.batches = 0  # steps planned (kept under its former name)
        self.mixed_task_batches = 0
        self.max_tasks_in_batch = 0
        self.batch_sizes: Counter[int] = Counter()  # rows per step
        self.prefill_tokens = 0
        self.decode_tokens = 0
        self.cached_prompt_tokens = 0  # prompt tokens whose keys came from the prefix cache
        self.mixed_steps = 0  # steps whose one forward packed decode rows and prefill chunks
        self.decode_steps = 0  # decode-only steps (graph replays among them: graph_stats)
        self.latencies: deque[float] = deque(maxlen=4096)
        self.ttfts: deque[float] = deque(maxlen=4096)
        self.step_times: deque[float] = deque(maxlen=4096)
        # the same, by kind: decode-only steps and steps that carried a prefill chunk
        self.decode_step_times: deque[float] = deque(maxlen=4096)
        self.prefill_step_times: deque[float] = deque(maxlen=4096)

    # ------------------------------------------------------------------ lifecycle

    @property
    def max_num_seqs(self) -> int:
        return self.config.max_num_seqs

    @property
    def max_num_batched_tokens(self) -> int:
        return self.config.max_num_batched_tokens

    @property
    def max_model_len(self) -> int:
        """Prompt + ``max_tokens`` of one row (``config.max_model_len``, resolved)."""
        assert self.config.max_model_len is not None  # resolved in __init__
        return self.config.max_model_len

    @property
    def cpu_linear(self) -> str:
        return self.config.cpu_linear

    @property
    def max_queue(self) -> int:
        """Requests waiting beyond which :meth:`submit` refuses (``config.max_queue``)."""
        return self.config.max_queue

    @max_queue.setter
    def max_queue(self, value: int) -> None:
        self.config = dataclasses.replace(self.config, max_queue=value)  # validated

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        cpu = self.config.cpu_linear != "torch" and self.runner.device.type == "cpu"
        if cpu and (self.linears is None or not self.linears.active):
            self.linears = pack_linears(
                self.bank.model, release_weights=not self.config.keep_linear_weights
            )
        self._maybe_capture()
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._draining = False
            self._thread = threading.Thread(target=self._run, name="prefixattn-engine")
            self._thread.daemon = True
            self._thread.start()

    def _maybe_capture(self) -> None:
        """(Re)capture the decode graphs (CUDA) or compile the decode step (torch.compile)
        for the bank as it is."""
        if self.graphs is None:
            return
        with self.model_lock:  # start() and the worker may both ask: one captures
            snap = self.bank.snapshot()
            if self.graphs.stale(snap):
                self.graphs.capture(snap)  # CUDA graphs / compiled buckets (else a no-op)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker after the step in flight; requests not finished by then finish
        with ERROR ("the engine stopped")."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.linears is not None:
            self.linears.revert()  # its counts stay for metrics()

    def drain(self, timeout: float = 30.0) -> bool:
        """Refuse new requests (QueueFullError), finish those already taken, then stop
        (SIGTERM). Returns whether everything finished within ``timeout`` seconds."""
        self._draining = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._unfinished:
            if self._thread is None or not self._thread.is_alive():
                break
            time.sleep(0.01)
        done = not self._unfinished
        self.stop(max(deadline - time.monotonic(), 0.1))
        return done

    # ------------------------------------------------------------------ requests

    @property
    def running(self) -> int:
        """Rows running (each holding KV blocks)."""
        return len(self.scheduler.running)

    @property
    def queue_depth(self) -> int:
        """Requests submitted and not yet running."""
        return len(self._inbox) + len(self.scheduler.waiting)

    def submit(self, req: GenRequest) -> None:
        """Queue ``req``; its sink hears from the worker thread.

        Raises:
            QueueFullError: ``max_queue`` requests are already waiting (or draining).
            TypeError: ``req`` is not a GenRequest.
        """
        if not isinstance(req, GenRequest):
            raise TypeError(f"req must be a GenRequest, got {type(req).__name__}")
        with self._lock:
            if self._draining or self.queue_depth >= self.max_queue:
                self.requests["rejected"] += 1
                why = "the server is shutting down" if self._draining else (
                    f"the request queue is full ({self.max_queue} waiting)"
                )  # fmt: skip
                raise QueueFullError(f"{why}; retry later")
            self.requests["submitted"] += 1
            self._unfinished += 1
            self._task_rows[req.task] += 1
            self._inbox.append(req)
        self._wake.set()

    def tasks_in_use(self) -> set[str]:
        """Tasks of the requests submitted and not finished (queued, waiting or running):
        a task store must not evict them."""
        with self._lock:
            return set(self._task_rows)

    def cancel(self, req: GenRequest) -> None:
        """The client went away: the row leaves before the next step (its blocks freed),
        or never runs; its sink gets ``finish(CANCELLED)``."""
        if not req.done and not req.cancelled:
            self.requests["client_gone"] += 1
        req.cancelled = True
        self._wake.set()

    # ------------------------------------------------------------------ worker

    def _run(self) -> None:
        while not self._stop.is_set():
            self._intake()
            if self.graphs is not None and not self.scheduler.running:
                self._maybe_capture()  # idle and the bank changed: capture again
            plan = self.scheduler.plan(self._admit)
            if not plan:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            self.batches += 1
            try:
                self._step(plan)
            except Exception as err:  # a failing step must not kill the server
                msg = f"internal error: {type(err).__name__}: {err}"
                for row in {id(r): r for r in plan.decode + [r for r, _ in plan.prefill]}.values():
                    self._finish(row.req, ERROR, msg, row)
        # stopped: every request still here hears so (finish is called exactly once)
        self._intake()
        for row in list(self.scheduler.running):
            self._finish(row.req, ERROR, "the engine stopped", row)
        while self.scheduler.waiting:
            item = self.scheduler.waiting.popleft()
            self._finish(_req(item), ERROR, "the engine stopped")

    def _intake(self) -> None:
        """New requests join the waiting queue; cancelled ones (waiting or running) leave."""
        with self._lock:
            while self._inbox:
                self.scheduler.waiting.append(self._inbox.popleft())
        for item in [r for r in self.scheduler.waiting if _req(r).cancelled]:
            self.scheduler.waiting.remove(item)
            self._finish(_req(item), CANCELLED)
        for row in [r for r in self.scheduler.running if r.req.cancelled]:
            self._finish(row.req, CANCELLED, None, row)

    def _admit(self, req: GenRequest) -> Row | None:
        """A waiting request becomes a row (validated; the scheduler gives it blocks)."""
        if req.cancelled:
            self._finish(req, CANCELLED)
            return None
        key = self._task_keys.key(self.bank.snapshot(), req.task)
        if key is None:
            self.requests["failed"] += 1
            self._finish(req, ERROR, f"task {req.task!r} was removed while the request waited")
            return None
        _, offset, P, _ = key
        need = len(req.prompt_ids) + req.params.max_tokens
        problem = None
        if not req.prompt_ids:
            problem = "prompt_ids is empty"
        elif req.params.max_tokens < 0:
            problem = f"max_tokens must be >= 0, got {req.params.max_tokens}"
        elif req.params.max_tokens == 0 and req.params.prompt_logprobs is None:
            problem = "max_tokens 0 is only for scoring a prompt (prompt_logprobs)"
        elif need > self.max_model_len:
            problem = (
                f"the request needs {need} KV positions (prompt {len(req.prompt_ids)} + "
                f"max_tokens {req.params.max_tokens}); the engine holds {self.max_model_len} "
                "per row (--max-model-len)"
            )
        elif cdiv(need, self.kv.block_size) > self.kv.block_pool.num_blocks:
            problem = (
                f"the request needs {cdiv(need, self.kv.block_size)} KV blocks; the engine's "
                f"pool has {self.kv.block_pool.num_blocks} (--num-blocks / --kv-cache-memory)"
            )
        if problem is not None:
            self.requests["failed"] += 1
            self._finish(req, ERROR, problem)
            return None
        sampler = RowSampler(req.params, self._rng.getrandbits(63), self.runner.device)
        self.prompt_tokens += len(req.prompt_ids)
        return Row(req, key, P, offset, sampler)

    def _check_tasks(self, plan: StepPlan, snap: Any) -> None:
        """Rows whose task left the bank (or was replaced by another prefix) since they
        were admitted end with ERROR before the step: their keys belong to that prefix."""
        for row in plan.decode + [r for r, _ in plan.prefill]:
            if self._task_keys.key(snap, row.task) != row.task_key:
                self.requests["failed"] += 1
                self._finish(
                    row.req, ERROR,
                    f"task {row.task!r} was removed or replaced while the request ran", row,
                )  # fmt: skip
        plan.decode = [r for r in plan.decode if not r.req.done]
        plan.prefill = [(r, n) for r, n in plan.prefill if not r.req.done]

    def _step(self, plan: StepPlan) -> None:
        """Run one step: the forwards, then each row's token."""
        snap = self.bank.snapshot()  # one bank for the whole step
        self._check_tasks(plan, snap)
        rows = plan.decode + [r for r, _ in plan.prefill]
        if not rows:
            return
        tasks = {r.req.task for r in rows}
        self.batch_sizes[len(rows)] += 1
        self.max_tasks_in_batch = max(self.max_tasks_in_batch, len(tasks))
        self.mixed_task_batches += len(tasks) > 1
        self.cached_prompt_tokens += sum(r.num_hit_tokens for r in plan.admitted)
        t0 = time.perf_counter()
        ready: list[tuple[Row, torch.Tensor]] = []  # rows that get a token: (row, logits [V])
        scored: list[Row] = []  # max_tokens 0: the prompt scored, nothing to generate
        with self.model_lock, torch.no_grad():
            # (row, n, wants every token's logits: prompt logprobs), fed from where it was
            chunks = [
                (row, n, row.req.params.prompt_logprobs is not None and not row.prompt_sent)
                for row, n in plan.prefill
            ]
            starts = [row.num_computed for row, _ in plan.prefill]
            # a decode-only step: the CUDA-graph / compiled decode, if any; with chunks:
            # the compiled step, one row per token, if it takes them (None: it does not)
            got: tuple[torch.Tensor, list[torch.Tensor]] | None = None
            if self.graphs is not None and plan.decode and not chunks:
                logits = self.graphs.decode(plan.decode, snap)  # None: overflow
                got = None if logits is None else (logits, [])
            elif self.graphs is not None and chunks:
                got = self.graphs.mixed(plan.decode, chunks, snap)
            if got is None:  # one packed forward: decode rows + prefill chunks
                got = self.runner.step(plan.decode, chunks, snap)
            decode_logits, chunk_logits = got
            self.mixed_steps += bool(plan.decode and chunks)
            for (row, _, want), start, logits in zip(chunks, starts, chunk_logits):
                if want:  # logits [n, V]
                    self._gather_prompt_logprobs(row, logits, start)
                if row.decoding and row.req.params.max_tokens == 0:
                    scored.append(row)
                elif row.decoding:
                    ready.append((row, logits[-1]))
            self.prefill_tokens += sum(n for _, n in plan.prefill)
            if plan.decode:
                ready.extend(zip(plan.decode, decode_logits))
                self.decode_tokens += len(plan.decode)
                self.decode_steps += not chunks  # decode-only (a graph's kind of step)
            for row in rows:  # full blocks join the prefix cache
                self.kv.cache_full_blocks(row)
            outs = self._sample(ready)
        dt = time.perf_counter() - t0
        self.step_times.append(dt)
        (self.prefill_step_times if plan.prefill else self.decode_step_times).append(dt)
        for row in scored:
            self._finish(row.req, LENGTH, None, row)
        for (row, _), out in zip(ready, outs):
            self._emit(row, out)

    def _sample(self, ready: list[tuple[Row, torch.Tensor]]) -> list[TokenOut]:
        """Every ready row's token (and its logprobs when asked), in a few batched calls
        for the step (see :mod:`.sampling`): ``ready`` holds (row, logits [V])."""
        if not ready:
            return []
        stacked = torch.stack([lg for _, lg in ready])  # [R, V]
        tokens = choose_tokens(stacked, [r.sampler for r, _ in ready])
        ks = [r.req.params.logprobs for r, _ in ready]
        want_lp = any(k is not None for k in ks)
        logprobs = torch.log_softmax(stacked, dim=-1) if want_lp else None  # [R, V]
        return token_outs(logprobs, tokens, ks)

    def _gather_prompt_logprobs(self, row: Row, logits: torch.Tensor, start: int) -> None:
        """Prompt logprobs of a chunk fed from ``start``: logits [n, V] predict the prompt
        tokens ``start + 1 ..``; sent once the whole prompt is in."""
        ids, k = row.req.prompt_ids, row.req.params.prompt_logprobs
        if start == 0:
            row.prompt_outs = [None]
        m = min(logits.shape[0], len(ids) - start - 1)  # logits that predict a prompt token
        if m > 0:
            lp = torch.log_softmax(logits[:m], dim=-1)  # [m, V]
            row.prompt_outs.extend(token_outs(lp, ids[start + 1 : start + 1 + m], [k] * m))
        if row.decoding:
            row.prompt_sent = True
            self._call(row, lambda: row.req.sink.prompt_logprobs(row.prompt_outs))

    def _call(self, row: Row | None, fn: Callable[[], Any]) -> Any:
        """Call a sink method; a sink that raises ends its row (not the server)."""
        try:
            return fn()
        except Exception as err:
            if row is not None and not row.req.done:
                self.requests["failed"] += 1
                self._finish(
                    row.req, ERROR, f"output sink failed: {type(err).__name__}: {err}", row
                )
            return True

    def _emit(self, row: Row, out: TokenOut) -> None:
        """``row`` produced ``out.token_id``: report it, then end the row or feed it next
        step."""
        req, p, tok = row.req, row.req.params, out.token_id
        if req.done:
            return
        if req.t_first_token is None:
            req.t_first_token = time.perf_counter()
            self.ttfts.append(req.t_first_token - req.t_submit)
        if tok in p.stop_token_ids or (tok in self.eos_ids and not p.ignore_eos):
            self._finish(req, STOP, None, row)
            return
        req.out_ids.append(tok)
        self.tokens_generated += 1
        if self._call(row, lambda: req.sink.token(out)):
            self._finish(req, STOP, None, row)
        elif len(req.out_ids) >= p.max_tokens:
            self._finish(req, LENGTH, None, row)
        else:
            row.last_token = tok

    def _finish(
        self, req: GenRequest, reason: str, error: str | None = None, row: Row | None = None
    ) -> None:
        """End ``req`` once: counters, the sink's ``finish``, its blocks back to the pool."""
        if row is not None and row in self.scheduler.running:
            self.scheduler.remove(row)
        if req.done:
            return
        req.finish_reason = reason
        req.t_done = time.perf_counter()
        with self._lock:
            self._unfinished -= 1
            self._task_rows[req.task] -= 1
            if not self._task_rows[req.task]:
                del self._task_rows[req.task]
        if reason == CANCELLED:
            self.requests["cancelled"] += 1
        elif reason != ERROR:
            self.requests["completed"] += 1
            self.latencies.append(req.t_done - req.t_submit)
        try:
            req.sink.finish(reason, error)
        except Exception:  # the sink's own failure cannot be reported to it again
            self.requests["sink_errors"] += 1

    # ------------------------------------------------------------------ metrics

    def step_time_percentiles(self) -> dict[str, dict[str, Any]]:
        """Step-time percentiles (seconds) of the last 4096 steps of each kind:
        ``decode_time_s`` (decode-only steps), ``prefill_time_s`` (with a prefill chunk)."""
        return {
            "decode_time_s": _percentiles(self.decode_step_times),
            "prefill_time_s": _percentiles(self.prefill_step_times),
        }

    def graph_stats(self) -> dict[str, Any]:
        """CUDA-graph decode: whether it is on, graphs captured per key, replays, and the
        decode steps that ran eagerly (see :meth:`.cuda_graphs.DecodeGraphs.stats`)."""
        replays = 0 if self.graphs is None else self.graphs.replays
        out: dict[str, Any] = {
            "enabled": self.graphs is not None,
            "decode_steps": self.decode_steps,
            "eager_decode_steps": self.decode_steps - replays,
        }
        if self.graphs is not None:
            out.update(self.graphs.stats())
        return out

    def metrics(self) -> dict[str, Any]:
        """Counters, running rows, KV usage, step statistics, latency and TTFT (seconds)."""
        rows = list(self.scheduler.running)
        used = sum(r.kv_len for r in rows)
        steps = list(self.step_times)
        bp, per_block = self.kv.block_pool, self.pool.bytes_per_block
        row_blocks = sum(len(r.blocks) for r in rows)
        snap = self.bank.snapshot()
        prefix_bytes = 0 if snap.bank is None else snap.bank.numel() * snap.bank.element_size()
        return {
            "requests": dict(self.requests),
            "tokens_generated": self.tokens_generated,
            "prompt_tokens": self.prompt_tokens,
            "running": len(rows),
            "queue_depth": self.queue_depth,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "kv_cache": {
                "num_blocks": bp.num_blocks,
                "block_size": self.kv.block_size,
                "blocks_used": bp.num_blocks - bp.num_free,
                "blocks_free": bp.num_free,
                "max_model_len": self.max_model_len,
                "positions_used": used,
                "usage": bp.usage(),
                "bytes": self.pool.bytes,
                "bytes_per_block": per_block,
                # a row's KV memory: its own tokens' blocks (its task's prefix is not there)
                "bytes_per_running_row": row_blocks * per_block / len(rows) if rows else 0.0,
                "preemptions": self.scheduler.num_preemptions,
            },
            # the task prefixes: one copy per task in the bank, shared by all its rows
            "prefix": {"bytes": prefix_bytes, "copies_per_task": 1, "tasks": len(snap.names)},
            "prefix_cache": {**self.kv.stats(), "cached_prompt_tokens": self.cached_prompt_tokens},
            "steps": {
                "count": self.batches,
                "prefill_tokens": self.prefill_tokens,
                "decode_tokens": self.decode_tokens,
                "time_s": _percentiles(steps),
                "mean_time_s": sum(steps) / len(steps) if steps else None,
                **self.step_time_percentiles(),
                "decode_steps": self.decode_steps,
                "mixed_steps": self.mixed_steps,
                "static_decode": 0 if self.graphs is None else self.graphs.steps,
                "graph_replays": 0 if self.graphs is None else self.graphs.replays,
                "graph_eager_steps": 0 if self.graphs is None else self.graphs.eager_steps,
            },
            "cuda_graphs": self.graph_stats(),
            "linear": (self.linears.stats() if self.linears is not None else {"path": "torch"}),
            "batches": self.batches,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "mixed_task_batches": self.mixed_task_batches,
            "max_tasks_in_batch": self.max_tasks_in_batch,
            "latency_s": _percentiles(self.latencies),
            "ttft_s": _percentiles(self.ttfts),
            "tasks": self.bank.tasks,
        }


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """The ids that end a row: the tokenizer's EOS and the model's generation config's."""
    ids: set[int] = set()
    for eos in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(int(e) for e in eos)
    return frozenset(ids)


def _req(item: GenRequest | Row) -> GenRequest:
    """The request of a waiting item (a new request or a preempted row)."""
    return item.req if isinstance(item, Row) else item


def context_limit(model: Any) -> int | None:
    """The model's maximum number of positions (None if it does not say)."""
    cfg = model.config
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
