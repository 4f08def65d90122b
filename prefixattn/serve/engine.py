"""The serving engine: continuous batching over a slot KV cache, every row its own task.

One worker thread runs the step loop (iteration-level scheduling, as vLLM and
transformers' continuous batching)::

    while running:
        take new requests; drop cancelled rows (their slots are free at once)
        plan = scheduler.plan()     # decode rows + prefill chunks within the token budget,
                                    # new rows admitted while a slot is free
        logits = runner(plan)       # one decode forward + one forward per prefill chunk
        tokens = sample(logits)     # per row: greedy, or its own temperature/top-p/generator
        emit each token to its sink; finished rows leave before the next step

The engine is token-level (see :mod:`.request`): the front end turns tokens into text
and decides stop strings through the request's :class:`~.request.OutputSink`.
Modules: :mod:`.scheduler` (what runs), :mod:`.runner` (the forwards), :mod:`.kv_cache`
(the slot pool as a transformers ``Cache``), :mod:`.sampling` (per-row choice, logprobs).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import torch

from ..hf.bank import TaskBank
from ..ops.attention import resolve_backend
from .cuda_graphs import DecodeGraphs
from .kv_cache import KVPool
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
from .sampling import RowSampler, choose_tokens, token_out
from .scheduler import Row, Scheduler, StepPlan

__all__ = [
    "CANCELLED",
    "ERROR",
    "LENGTH",
    "STOP",
    "Engine",
    "GenRequest",
    "QueueFullError",
    "SamplingParams",
    "context_limit",
    "eos_token_ids",
]

DEFAULT_MAX_MODEL_LEN = 1024


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
        max_num_seqs: rows running at once (each holds one KV slot).
        max_num_batched_tokens: tokens per step (decode tokens + prefill chunks).
        max_queue: waiting requests beyond which :meth:`submit` raises QueueFullError.
        kv_slots: KV slots preallocated (default ``max_num_seqs``).
        max_model_len: keys per slot: task prefix + prompt + ``max_tokens`` of one row
            (default: the model's context, at most 1024). A request that needs more
            finishes with ERROR (the front end answers 400).
        max_batch_size: the former name of ``max_num_seqs`` (used when that is not given).
        seed: seeds the generators of sampled requests without a seed.
        decode_buckets: run decode steps padded to these batch sizes over static buffers,
            captured as CUDA graphs at :meth:`start` on a CUDA model (eager elsewhere);
            None: dynamic shapes (see :mod:`.cuda_graphs`).
        kv_in_place: decode attention reads the KV pool in place (the kernel's per-row
            ``cache_seqlens`` / ``cache_batch_idx``: no gather, no mask); None: where the
            bank's backend runs the Triton kernel (CUDA). Else the rows' slots are
            gathered up to the longest row (PyTorch's SDPA on the CPU).
    """

    def __init__(
        self,
        bank: TaskBank,
        tokenizer: Any = None,
        *,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int = 512,
        max_queue: int = 256,
        kv_slots: int | None = None,
        max_model_len: int | None = None,
        max_batch_size: int = 16,
        seed: int | None = None,
        decode_buckets: tuple[int, ...] | None = None,
        kv_in_place: bool | None = None,
    ) -> None:
        max_num_seqs = max_batch_size if max_num_seqs is None else max_num_seqs
        for name, value in (
            ("max_num_seqs", max_num_seqs),
            ("max_num_batched_tokens", max_num_batched_tokens),
            ("max_queue", max_queue),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        model = bank.model
        limit = context_limit(model)
        if max_model_len is None:
            max_model_len = min(limit or DEFAULT_MAX_MODEL_LEN, DEFAULT_MAX_MODEL_LEN)
        if not isinstance(max_model_len, int) or max_model_len < 2:
            raise ValueError(f"max_model_len must be an int >= 2, got {max_model_len!r}")
        kv_slots = max_num_seqs if kv_slots is None else kv_slots
        if not isinstance(kv_slots, int) or kv_slots < 1:
            raise ValueError(f"kv_slots must be an int >= 1, got {kv_slots!r}")
        self.bank, self.tokenizer = bank, tokenizer
        self.max_queue = max_queue
        self.context_limit = limit
        g = bank.geometry
        param = next(model.parameters())
        self.pool = KVPool(
            g.num_layers, g.num_kv_heads, g.head_dim, slots=kv_slots, max_len=max_model_len,
            dtype=param.dtype, device=param.device, scratch=decode_buckets is not None,
        )  # fmt: skip
        self.scheduler = Scheduler(
            self.pool, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens
        )
        if kv_in_place is None:
            probe = torch.empty(0, dtype=param.dtype, device=param.device)
            kv_in_place = resolve_backend(bank.backend, probe) == "triton"
        self.runner = ModelRunner(model, self.pool, in_place=bool(kv_in_place))
        self.graphs = None if decode_buckets is None else DecodeGraphs(self.runner, decode_buckets)
        self._captured = False
        self._rng = random.Random(seed)
        self._inbox: deque[GenRequest] = deque()
        self._lock = threading.Lock()  # guards _inbox and the counters submit touches
        self._wake = threading.Event()
        # held while the model runs: admin loads (which may run the model) wait for the step
        self.model_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._draining = False
        self._unfinished = 0  # submitted and not finished (waiting or running)
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
        self.decode_steps = 0  # decode forwards (graph replays among them: graph_stats)
        self.latencies: deque[float] = deque(maxlen=4096)
        self.ttfts: deque[float] = deque(maxlen=4096)
        self.step_times: deque[float] = deque(maxlen=4096)

    # ------------------------------------------------------------------ lifecycle

    @property
    def max_num_seqs(self) -> int:
        return self.scheduler.max_num_seqs

    @property
    def max_num_batched_tokens(self) -> int:
        return self.scheduler.max_num_batched_tokens

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self.graphs is not None and not self._captured:
            with self.model_lock:
                self.graphs.capture()  # CUDA graphs per bucket (a no-op off CUDA)
            self._captured = True
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._draining = False
            self._thread = threading.Thread(target=self._run, name="prefixattn-engine")
            self._thread.daemon = True
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker after the step in flight; requests not finished by then finish
        with ERROR ("the engine stopped")."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

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
        """Rows running (each holding a KV slot)."""
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
            self._inbox.append(req)
        self._wake.set()

    def cancel(self, req: GenRequest) -> None:
        """The client went away: the row leaves before the next step (its slot freed),
        or never runs; its sink gets ``finish(CANCELLED)``."""
        if not req.done and not req.cancelled:
            self.requests["client_gone"] += 1
        req.cancelled = True
        self._wake.set()

    # ------------------------------------------------------------------ worker

    def _run(self) -> None:
        while not self._stop.is_set():
            self._intake()
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
            self._finish(self.scheduler.waiting.popleft(), ERROR, "the engine stopped")

    def _intake(self) -> None:
        """New requests join the waiting queue; cancelled ones (waiting or running) leave."""
        with self._lock:
            while self._inbox:
                self.scheduler.waiting.append(self._inbox.popleft())
        for req in [r for r in self.scheduler.waiting if r.cancelled]:
            self.scheduler.waiting.remove(req)
            self._finish(req, CANCELLED)
        for row in [r for r in self.scheduler.running if r.req.cancelled]:
            self._finish(row.req, CANCELLED, None, row)

    def _admit(self, req: GenRequest) -> Row | None:
        """A waiting request becomes a row: a slot, its task's prefix written into it."""
        if req.cancelled:
            self._finish(req, CANCELLED)
            return None
        got = self.bank.task_prefix(req.task)
        if got is None:
            self.requests["failed"] += 1
            self._finish(req, ERROR, f"task {req.task!r} was removed while the request waited")
            return None
        prefix, offset = got
        P = 0 if prefix is None else int(prefix.shape[3])
        need = P + len(req.prompt_ids) + req.params.max_tokens
        problem = None
        if not req.prompt_ids:
            problem = "prompt_ids is empty"
        elif req.params.max_tokens < 0:
            problem = f"max_tokens must be >= 0, got {req.params.max_tokens}"
        elif req.params.max_tokens == 0 and req.params.prompt_logprobs is None:
            problem = "max_tokens 0 is only for scoring a prompt (prompt_logprobs)"
        elif need > self.pool.max_len:
            problem = (
                f"the request needs {need} KV positions (task prefix {P} + prompt "
                f"{len(req.prompt_ids)} + max_tokens {req.params.max_tokens}); the engine's KV "
                f"cache holds {self.pool.max_len} per row (--max-model-len)"
            )
        if problem is not None:
            self.requests["failed"] += 1
            self._finish(req, ERROR, problem)
            return None
        slot = self.pool.allocate()
        if slot is None:  # plan() checked can_admit; a slot is free
            raise RuntimeError("no free KV slot although the scheduler admitted a row")
        self.pool.write_prefix(slot, prefix)
        sampler = RowSampler(req.params, self._rng.getrandbits(63), self.pool.keys[0].device)
        self.prompt_tokens += len(req.prompt_ids)
        return Row(req, slot, P, offset, sampler, kv_len=P)

    def _step(self, plan: StepPlan) -> None:
        """Run one step: the forwards, then each row's token."""
        rows = plan.decode + [r for r, _ in plan.prefill]
        tasks = {r.req.task for r in rows}
        self.batch_sizes[len(rows)] += 1
        self.max_tasks_in_batch = max(self.max_tasks_in_batch, len(tasks))
        self.mixed_task_batches += len(tasks) > 1
        t0 = time.perf_counter()
        ready: list[tuple[Row, torch.Tensor]] = []  # rows that get a token: (row, logits [V])
        scored: list[Row] = []  # max_tokens 0: the prompt scored, nothing to generate
        with self.model_lock, torch.no_grad():
            for row, n in plan.prefill:
                want = row.req.params.prompt_logprobs is not None
                start = row.prefilled
                logits = self.runner.prefill(row, n, want)  # [n or 1, V]
                if want:
                    self._gather_prompt_logprobs(row, logits, start)
                if row.decoding and row.req.params.max_tokens == 0:
                    scored.append(row)
                elif row.decoding:
                    ready.append((row, logits[-1]))
            self.prefill_tokens += sum(n for _, n in plan.prefill)
            if plan.decode:
                # in slot order: consecutive slots are read in place (kv_cache.SlotCache)
                plan.decode.sort(key=lambda r: r.slot)
                logits = None if self.graphs is None else self.graphs.decode(plan.decode)
                if logits is None:  # dynamic shapes, or more rows than the largest bucket
                    logits = self.runner.decode(plan.decode)  # [B, V]
                ready.extend(zip(plan.decode, logits))
                self.decode_tokens += len(plan.decode)
                self.decode_steps += 1
            if ready:
                stacked = torch.stack([lg for _, lg in ready])  # [R, V]
                tokens = choose_tokens(stacked, [r.sampler for r, _ in ready])
                want_lp = any(r.req.params.logprobs is not None for r, _ in ready)
                logprobs = torch.log_softmax(stacked, dim=-1) if want_lp else None  # [R, V]
        self.step_times.append(time.perf_counter() - t0)
        for row in scored:
            self._finish(row.req, LENGTH, None, row)
        for i, (row, _) in enumerate(ready):
            lp = None if logprobs is None else logprobs[i]
            self._emit(row, tokens[i], lp)

    def _gather_prompt_logprobs(self, row: Row, logits: torch.Tensor, start: int) -> None:
        """Prompt logprobs of a chunk fed from ``start``: logits [n, V] predict the prompt
        tokens ``start + 1 ..``; sent once the whole prompt is in."""
        ids, k = row.req.prompt_ids, row.req.params.prompt_logprobs
        if start == 0:
            row.prompt_outs = [None]
        lp = torch.log_softmax(logits, dim=-1)  # [n, V]
        for i in range(lp.shape[0]):
            t = start + i + 1
            if t < len(ids):
                row.prompt_outs.append(token_out(lp[i], ids[t], k))
        if row.decoding:
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

    def _emit(self, row: Row, tok: int, logprobs: torch.Tensor | None) -> None:
        """``row`` produced ``tok``: report it, then end the row or feed it next step."""
        req, p = row.req, row.req.params
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
        out: TokenOut = token_out(logprobs, tok, p.logprobs)
        if self._call(row, lambda: req.sink.token(out)):
            self._finish(req, STOP, None, row)
        elif len(req.out_ids) >= p.max_tokens:
            self._finish(req, LENGTH, None, row)
        else:
            row.last_token = tok

    def _finish(
        self, req: GenRequest, reason: str, error: str | None = None, row: Row | None = None
    ) -> None:
        """End ``req`` once: counters, the sink's ``finish``, its slot back to the pool."""
        if row is not None and row in self.scheduler.running:
            self.scheduler.remove(row)
        if req.done:
            return
        req.finish_reason = reason
        req.t_done = time.perf_counter()
        with self._lock:
            self._unfinished -= 1
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
        return {
            "requests": dict(self.requests),
            "tokens_generated": self.tokens_generated,
            "prompt_tokens": self.prompt_tokens,
            "running": len(rows),
            "queue_depth": self.queue_depth,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "kv_cache": {
                "slots": self.pool.slots,
                "slots_used": self.pool.slots - self.pool.free_slots,
                "max_model_len": self.pool.max_len,
                "positions_used": used,
                "usage": used / (self.pool.slots * self.pool.max_len),
                "bytes": self.pool.bytes,
            },
            "steps": {
                "count": self.batches,
                "prefill_tokens": self.prefill_tokens,
                "decode_tokens": self.decode_tokens,
                "time_s": _percentiles(steps),
                "mean_time_s": sum(steps) / len(steps) if steps else None,
                "decode_steps": self.decode_steps,
                "static_decode": 0 if self.graphs is None else self.graphs.steps,
                "graph_replays": 0 if self.graphs is None else self.graphs.replays,
            },
            "cuda_graphs": self.graph_stats(),
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


def context_limit(model: Any) -> int | None:
    """The model's maximum number of positions (None if it does not say)."""
    cfg = model.config
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
