"""What every generating endpoint shares (vLLM's ``OpenAIServing``): model and field
checks, the limits on what one request may cost, tokenization off the event loop,
sampling parameters, submitting rows to the engine and reading their events back
(cancelling them as soon as the client goes away).

The tokenizer is used from one thread only: the context's worker (``ServeContext.pool``)
runs every encode, decode and chat template, and the rows' output sinks hand it the
engine's tokens (the engine's thread and the event loop never call the tokenizer).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from ...hf.bank import TaskBank
from ..engine.request import (
    CANCELLED,
    ERROR,
    LENGTH,
    STOP,
    GenRequest,
    QueueFullError,
    SamplingParams,
)
from ..task_registry import TaskNameError, TaskNotFoundError, TasksBusyError
from .errors import APIError
from .metrics import ServeMetrics
from .output import Event, LogprobEntry, RequestOutput, TokenStrings
from .protocol import MAX_N, MAX_SEED, refused_fields

MAX_PROMPTS = 64  # prompts per request
GREEDY_BELOW = 1e-5  # temperatures below this are greedy (as vLLM: no inf/nan sampling)
RETRY_AFTER_S = 1  # what a 429 tells the client to wait

_ids = itertools.count()
logger = logging.getLogger(__name__)


def new_id(prefix: str = "cmpl") -> str:
    """A process-unique response id."""
    return f"{prefix}-{int(time.time() * 1000):x}{next(_ids):06x}"


def sse(data: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data)}\n\n"


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for (each over-limit request gets a 400 naming the field
    and the limit). They bound what a request costs before it reaches the queue: every
    row matches every stop string against its text, and every generated token is
    checked against the stop strings (the tokenizer's thread) and the stop token ids
    (the engine's thread). A request also never has more rows (prompts x ``n``) than the
    engine's queue holds (``--max-queue``): it could never be queued.

    Defaults: ``max_prompts`` 64, ``max_n`` 16 (vLLM has no limit; OpenAI's ``n`` goes
    to 128), ``max_stop`` 32 stop strings (OpenAI allows 4) of at most
    ``max_stop_chars`` 256 characters, ``max_stop_token_ids`` 64.
    """

    max_prompts: int = MAX_PROMPTS
    max_n: int = MAX_N
    max_stop: int = 32
    max_stop_chars: int = 256
    max_stop_token_ids: int = 64


class SerialJobs:
    """Jobs for a one-worker pool, handed over a batch at a time.

    :meth:`submit` appends to a list and hands the pool one drain job only when none is
    queued or running: the engine's thread pays a list append per token (not a
    ``Future``, a lock and a queue put per token), and the worker runs the jobs queued
    so far (typically a whole step's tokens) in order, one after another; jobs queued
    while a batch runs form the next batch, queued behind the pool's other work.
    """

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self.pool = pool
        self._lock = threading.Lock()
        self._jobs: list[Callable[[], None]] = []
        self._scheduled = False
        self.batches = 0  # drain batches run (a batch: the jobs queued since the last)
        self.jobs_run = 0

    def submit(self, job: Callable[[], None]) -> None:
        """Queue ``job`` (thread-safe).

        Raises:
            RuntimeError: the pool is shut down.
        """
        with self._lock:
            self._jobs.append(job)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.pool.submit(self._drain)
        except RuntimeError:
            with self._lock:
                self._scheduled = False
                self._jobs.clear()
            raise

    def _drain(self) -> None:
        with self._lock:
            batch, self._jobs = self._jobs, []
        self.batches += 1
        self.jobs_run += len(batch)
        for job in batch:
            try:
                job()
            except Exception:  # a job's failure must not drop the jobs after it
                logger.exception("a job on the tokenizer's thread failed")
        with self._lock:
            if not self._jobs:
                self._scheduled = False
                return
        # more came meanwhile: their batch queues behind the pool's other jobs (a prompt
        # to tokenize waits for one batch at most, never for the whole stream)
        try:
            self.pool.submit(self._drain)
        except RuntimeError:  # shut down (the server stopped)
            with self._lock:
                self._scheduled = False
                self._jobs.clear()


class LoopPoster:
    """Hands items to ``asyncio.Queue`` s of one event loop from other threads, a batch per
    wake-up: :meth:`post` appends (queue, item) and calls ``call_soon_threadsafe`` only
    when no hand-over is pending, so a step's events cost the loop one wake-up, not one
    per token. Items reach each queue in the order they were posted."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, Any]] = []
        self._scheduled = False
        self.wakeups = 0

    def post(self, q: asyncio.Queue, item: Any) -> None:
        """Queue ``item`` for ``q`` (thread-safe; dropped if the loop is closed)."""
        with self._lock:
            self._items.append((q, item))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # a closed loop (the server stopped): nobody is listening
            with self._lock:
                self._scheduled = False
                self._items.clear()

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        self.wakeups += 1
        for q, item in items:
            q.put_nowait(item)


@dataclass
class ServeContext:
    """The pieces every endpoint uses (built once by :func:`~prefixattn.serve.create_app`)."""

    engine: Any  # submit / cancel / queue_depth / running / model_lock
    bank: TaskBank
    tokenizer: Any
    model_name: str
    metrics: ServeMetrics
    limit: int | None  # the model's context (positions), None: unknown
    vocab_size: int
    eos_ids: frozenset[int] = frozenset()
    tasks: Any = None  # a TaskRegistry (--task-dir): tasks loaded on first use; None: off
    limits: RequestLimits = field(default_factory=RequestLimits)
    created: int = field(default_factory=lambda: int(time.time()))
    # one worker: the tokenizer is not guaranteed thread-safe; never the event loop
    pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="prefixattn-tok")
    )

    def __post_init__(self) -> None:
        self.token_strings = TokenStrings(self.tokenizer)
        self.jobs = SerialJobs(self.pool)
        self._poster: LoopPoster | None = None

    def on_tokenizer_thread(self, job: Callable[[], None]) -> None:
        """Queue ``job`` on the tokenizer's thread (jobs run one at a time, in order; the
        jobs queued while one batch runs go over as the next batch, see :class:`SerialJobs`).

        Raises:
            RuntimeError: the pool is shut down (the server stopped).
        """
        self.jobs.submit(job)

    def poster(self, loop: asyncio.AbstractEventLoop) -> LoopPoster:
        """The :class:`LoopPoster` of ``loop`` (made on first use; a server has one loop,
        rows made on an earlier loop keep the poster they were given)."""
        if self._poster is None or self._poster.loop is not loop:
            self._poster = LoopPoster(loop)
        return self._poster

    def max_len(self, task: str) -> int | None:
        """Prompt + generated tokens a row of ``task`` may hold: the model's context less
        the task's position offset, and the engine's ``max_model_len`` (the task's prefix
        is read from the bank, not held in the row's KV memory; None: no limit known)."""
        caps = []
        if self.limit is not None:
            caps.append(self.limit - self.bank.offsets.get(task, 0))
        kv_len = getattr(self.engine, "max_model_len", None)
        if isinstance(kv_len, int):
            caps.append(kv_len)
        return min(caps) if caps else None


@dataclass(eq=False)
class Choice:
    """One choice: the engine's request and what came back of it."""

    index: int
    req: GenRequest
    prompt_index: int = 0
    first: bool = True  # the first choice of its prompt
    text: str = ""
    # the tokens reported (the engine may run a step past a stop string: not these)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[LogprobEntry | None] = field(default_factory=list)
    prompt_logprobs: list[LogprobEntry | None] | None = None
    reason: str | None = None
    error: str | None = None


class OpenAIServing:
    """Base of the endpoint classes (completions, chat)."""

    def __init__(self, ctx: ServeContext) -> None:
        self.ctx = ctx

    async def create(self, body: Any, request: Request) -> Any:
        """Answer one request of this endpoint (a JSON body, or an SSE stream)."""
        task = await self.acquire_model(body.model)
        try:
            return await self._create(body, request, task)
        except APIError as err:
            if not getattr(err, "counted", False):  # a failed row's error is counted once
                self.ctx.metrics.request(task, "rejected" if err.status == 429 else "invalid")
            raise
        finally:  # the rows are submitted (the engine keeps the task) or done
            self.release_model(task)

    async def _create(self, body: Any, request: Request, task: str) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not generate")

    def stream_end(self, rows: list[Choice], head: dict[str, Any], usage: bool) -> list[str]:
        """The last SSE events: the usage chunk (``include_usage``) and ``[DONE]``; none
        when the client went away."""
        if self.client_gone(rows):
            return []
        out = [sse({**head, "choices": [], "usage": self.usage(rows)})] if usage else []
        return [*out, "data: [DONE]\n\n"]

    # ------------------------------------------------------------------ checks

    def check_model(self, name: str) -> str:
        """``name`` if it is a served task or the base model, else 404."""
        if name not in self.ctx.bank:
            raise APIError(
                404, f"model {name!r} is not served; served: {self.ctx.bank.tasks}",
                "model_not_found", "model",
            )  # fmt: skip
        return name

    async def acquire_model(self, name: str) -> str:
        """``name`` once it is served: with a task folder (``--task-dir``) a task not yet
        loaded is loaded (off the event loop and the step loop) and leased until
        :meth:`release_model`; else :meth:`check_model`. 400 for a bad name, 404 for an
        unknown task, 429 when every loaded task is busy."""
        reg = self.ctx.tasks
        if reg is None:
            return self.check_model(name)
        try:
            fut = reg.acquire(name)
        except TaskNameError as err:
            raise APIError(400, str(err), "invalid_model_name", "model") from None
        if fut is None:
            return name
        try:  # shielded: a client that goes away does not cancel the others' shared load
            await asyncio.shield(asyncio.wrap_future(fut))
        except BaseException as err:
            reg.release(name)
            if isinstance(err, TaskNotFoundError):
                raise APIError(404, str(err), "model_not_found", "model") from None
            if isinstance(err, TasksBusyError):
                raise APIError(429, str(err), "too_many_tasks", kind="rate_limit_error",
                               headers={"Retry-After": str(RETRY_AFTER_S)}) from None  # fmt: skip
            raise
        return name

    def release_model(self, name: str) -> None:
        """End the lease :meth:`acquire_model` took (no-op without a task folder)."""
        if self.ctx.tasks is not None:
            self.ctx.tasks.release(name)

    def check_fields(self, body: Any) -> None:
        """400 naming the first field that would change the output but is not implemented."""
        bad = refused_fields(body)
        if bad is not None:
            raise APIError(400, bad[1], "unsupported_field", bad[0])
        lim, stops = self.ctx.limits, body.stop_list()
        if len(stops) > lim.max_stop:
            raise APIError(400, f"stop: {len(stops)} stop strings; at most {lim.max_stop} "
                           "are allowed", "too_many_stop_strings", "stop")  # fmt: skip
        if any(not s for s in stops):
            raise APIError(400, "stop strings must be non-empty", "invalid_stop", "stop")
        longest = max((len(s) for s in stops), default=0)
        if longest > lim.max_stop_chars:
            raise APIError(400, f"stop: a stop string of {longest} characters; at most "
                           f"{lim.max_stop_chars} are allowed", "stop_too_long",
                           "stop")  # fmt: skip
        ids = body.stop_token_ids or []
        if len(ids) > lim.max_stop_token_ids:
            raise APIError(400, f"stop_token_ids: {len(ids)} ids; at most "
                           f"{lim.max_stop_token_ids} are allowed", "too_many_stop_token_ids",
                           "stop_token_ids")  # fmt: skip
        self.check_token_ids(ids, "stop_token_ids")

    def check_rows(self, n_prompts: int, n: int) -> None:
        """400 when the request has more rows (prompts x ``n``) than the limits allow or
        than the engine's queue holds: such a request could never be queued (a 429
        would have the client retry forever)."""
        lim = self.ctx.limits
        if not 1 <= n_prompts <= lim.max_prompts:
            raise APIError(400, f"prompt must hold 1 to {lim.max_prompts} prompts, got "
                           f"{n_prompts}", "invalid_prompt", "prompt")  # fmt: skip
        if n > lim.max_n:
            raise APIError(400, f"n={n}; at most {lim.max_n} choices per prompt",
                           "invalid_n", "n")  # fmt: skip
        cap = getattr(self.ctx.engine, "max_queue", None)
        rows = n_prompts * n
        if isinstance(cap, int) and rows > cap:
            raise APIError(
                400, f"this request has {rows} rows ({n_prompts} prompts x n={n}); the "
                f"server's queue holds at most {cap} (--max-queue), so it could never be "
                "queued: send fewer prompts or a smaller n", "too_many_rows", "n",
            )  # fmt: skip

    def check_token_ids(self, ids: Sequence[int], param: str) -> None:
        """400 naming the first id outside the vocabulary (one pass in C over the ids,
        then a Python scan only for the message)."""
        if ids and (min(ids) < 0 or max(ids) >= self.ctx.vocab_size):
            self.check_token_id(next(t for t in ids if not 0 <= t < self.ctx.vocab_size), param)

    def check_token_id(self, t: int, param: str) -> None:
        if not 0 <= t < self.ctx.vocab_size:
            raise APIError(
                400, f"{param}: token id {t} is outside the vocabulary [0, {self.ctx.vocab_size})",
                "invalid_token_id", param,
            )  # fmt: skip

    def check_context(self, task: str, n_prompt: int, max_tokens: int, i: int = 0) -> None:
        if n_prompt == 0:
            raise APIError(400, f"prompt {i} is empty after tokenization", "empty_prompt",
                           "prompt")  # fmt: skip
        cap = self.ctx.max_len(task)
        if cap is not None and n_prompt + max_tokens > cap:
            raise APIError(
                400,
                f"prompt {i} has {n_prompt} tokens; with max_tokens={max_tokens} that exceeds "
                f"the {cap} tokens a row of {task!r} may hold (the model's context of "
                f"{self.ctx.limit} tokens less the task's position offset, and the server's "
                f"--max-model-len)",
                "context_length_exceeded", "max_tokens",
            )  # fmt: skip

    async def off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` in the tokenizer's thread (never on the event loop): every
        use of the tokenizer goes through here or :meth:`ServeContext.on_tokenizer_thread`."""
        return await asyncio.get_running_loop().run_in_executor(self.ctx.pool, fn, *args)

    # ------------------------------------------------------------------ rows

    def sampling(
        self, body: Any, max_tokens: int, choice: int, logprobs: int | None,
        prompt_logprobs: int | None = None, stop_ids: tuple[int, ...] = (),
    ) -> SamplingParams:  # fmt: skip
        """The engine's parameters for choice ``choice`` of ``body`` (choice j > 0 of a
        seeded request uses seed + j, so the n choices differ and are reproducible)."""
        temperature = 0.0 if body.temperature < GREEDY_BELOW else body.temperature
        seed = None if body.seed is None else (body.seed + choice) % (MAX_SEED + 1)
        return SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=body.top_p, seed=seed,
            stop_token_ids=stop_ids, ignore_eos=body.ignore_eos,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        )  # fmt: skip

    def make_rows(
        self, task: str, prompts: Sequence[list[int]], body: Any, max_tokens: Sequence[int],
        logprobs: int | None, prompt_logprobs: int | None = None,
    ) -> tuple[list[Choice], asyncio.Queue]:  # fmt: skip
        """``body.n`` rows per prompt, their sinks feeding one queue of (row, Event). The
        stop strings and ids are shared by the rows (one copy per request)."""
        q: asyncio.Queue = asyncio.Queue()
        post = self.ctx.poster(asyncio.get_running_loop()).post
        rows: list[Choice] = []
        stops, stop_ids = tuple(body.stop_list()), tuple(body.stop_token_ids or ())
        for p, ids in enumerate(prompts):
            for j in range(body.n):
                index = len(rows)

                def emit(ev: Event, index: int = index) -> None:
                    post(q, (index, ev))

                # with logprobs the sink ends the row on EOS, so that EOS is reported
                eos = self.ctx.eos_ids if logprobs is not None and not body.ignore_eos else None
                sink = RequestOutput(
                    self.ctx.tokenizer, self.ctx.token_strings, emit, stop=stops,
                    include_stop=body.include_stop_str_in_output,
                    logprobs=logprobs is not None,
                    skip_special_tokens=body.skip_special_tokens, eos_ids=eos or frozenset(),
                    run=self.ctx.on_tokenizer_thread,
                )  # fmt: skip
                params = self.sampling(body, max_tokens[p], j, logprobs, prompt_logprobs, stop_ids)
                if eos:
                    params = dataclasses.replace(params, ignore_eos=True)
                req = GenRequest(task=task, prompt_ids=list(ids), params=params, sink=sink)
                rows.append(Choice(index, req, prompt_index=p, first=j == 0))
        return rows, q

    def submit(self, rows: list[Choice]) -> None:
        """Queue every row, or none (429 with ``Retry-After`` when the queue is full)."""
        done: list[Choice] = []
        try:
            for row in rows:
                self.ctx.engine.submit(row.req)
                done.append(row)
        except QueueFullError as err:
            for row in done:
                self.ctx.engine.cancel(row.req)
            raise APIError(
                429, str(err), "queue_full", kind="rate_limit_error",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None  # fmt: skip

    async def events(
        self, rows: list[Choice], q: asyncio.Queue, request: Request
    ) -> AsyncIterator[tuple[Choice, Event]]:
        """Each row's events in arrival order until every row finished. The ASGI receive
        channel is watched meanwhile: when the client goes away (``http.disconnect``, even
        while tokens flow) the rows are cancelled at once and the engine drops them before
        its next step; they then finish with reason "cancelled"."""
        left = len(rows)
        watcher = asyncio.create_task(self._watch_disconnect(request, rows))
        try:
            while left:
                index, ev = await q.get()
                row = rows[index]
                self._update(row, ev)
                if ev.kind == "finish":
                    left -= 1
                yield row, ev
        finally:  # the client went away (or we are done): free the rows
            watcher.cancel()
            self.cancel(rows)
            self.ctx.metrics.request(rows[0].req.task, self.outcome(rows))

    @staticmethod
    def outcome(rows: list[Choice]) -> str:
        """One request's outcome for the metrics: "error" if a row failed, "cancelled"
        if the client went away, else "length" if a row hit max_tokens, else "stop"."""
        reasons = {r.reason for r in rows}
        for worst in (ERROR, CANCELLED, None):
            if worst in reasons:
                return worst or CANCELLED
        return LENGTH if LENGTH in reasons else STOP

    async def _watch_disconnect(self, request: Request, rows: list[Choice]) -> None:
        """Wait for ``http.disconnect`` on the request's receive channel (the body is
        already read), then cancel the rows."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                self.cancel(rows)
                return

    def cancel(self, rows: list[Choice]) -> None:
        for row in rows:
            if not row.req.done:
                self.ctx.engine.cancel(row.req)

    @staticmethod
    def client_gone(rows: list[Choice]) -> bool:
        """Whether a row ended because the client went away (or never ended)."""
        return any(r.reason in (None, CANCELLED) for r in rows)

    def _update(self, row: Choice, ev: Event) -> None:
        if ev.kind == "prompt":
            row.prompt_logprobs = ev.logprobs
            return
        row.text += ev.text
        row.token_ids.extend(ev.token_ids)
        if ev.logprobs:
            row.logprobs.extend(ev.logprobs)
        if ev.kind == "finish":
            row.reason, row.error = ev.reason, ev.error
            req = row.req
            sink = req.sink
            ttft = None if sink.t_first_token is None else sink.t_first_token - req.t_submit
            prompt_tokens = len(req.prompt_ids) if row.first else 0  # once per prompt
            latency = time.perf_counter() - req.t_submit
            self.ctx.metrics.row_done(
                req.task, ev.reason or ERROR, prompt_tokens, sink.num_tokens, ttft, latency
            )

    async def collect(self, rows: list[Choice], q: asyncio.Queue, request: Request) -> bool:
        """Wait for every row (non-streamed); False if the client went away first."""
        async for _ in self.events(rows, q, request):
            pass
        if self.client_gone(rows):
            return False
        failed = next((r for r in rows if r.reason == ERROR), None)
        if failed is not None:
            err = self.row_error(failed)
            err.counted = True  # type: ignore[attr-defined]  # outcome "error", by events()
            raise err
        return True

    def row_error(self, row: Choice) -> APIError:
        """The answer for a row the engine could not run: 404 when its task was removed
        while it waited (retrying cannot help), else 500."""
        if row.req.task not in self.ctx.bank:
            return APIError(404, row.error or f"task {row.req.task!r} was removed",
                            "model_not_found", "model")  # fmt: skip
        return APIError(500, row.error or "generation failed", "generation_failed")

    @staticmethod
    def finish_reason(row: Choice) -> str | None:
        return None if row.reason in (CANCELLED, None) else row.reason

    @staticmethod
    def usage(rows: list[Choice]) -> dict[str, int]:
        """Prompt tokens once per prompt (not per choice), completion tokens per choice."""
        seen: dict[int, int] = {}
        for r in rows:
            seen[r.prompt_index] = len(r.req.prompt_ids)
        p = sum(seen.values())
        c = sum(len(r.token_ids) for r in rows)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
