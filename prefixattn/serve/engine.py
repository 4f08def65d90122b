"""The serving engine: a bounded request queue and one worker thread that batches.

Requests that arrive together (up to ``max_batch_size`` within ``max_wait_ms`` of the
first), for any mix of tasks, run as one :meth:`TaskBank.generate` call on the ragged bank.
Each row stops on its own (``max_tokens``, EOS, a stop string, or its client gone) through
a per-row stopping criterion; the batch ends when every row is done. Greedy requests share
a batch; sampling requests share one only with the same (temperature, top_p) and no seed
(a seeded request runs alone so that its seed reproduces it).
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..hf.bank import TaskBank

# finish reasons, as OpenAI names them (plus "cancelled": the client went away)
STOP, LENGTH, CANCELLED = "stop", "length", "cancelled"


class QueueFullError(Exception):
    """The request queue is full (the server answers 429)."""


@dataclass
class GenRequest:
    """One completion of one prompt.

    ``on_event`` (called from the worker thread) gets ``("delta", text)`` as text becomes
    final and ``("done", None)`` once; the app turns it into SSE chunks or one response.
    """

    task: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    on_event: Callable[[str, str | None], None] | None = None
    # filled in by the engine
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    sent: int = 0  # characters of text already sent as deltas
    cancelled: bool = False
    t_submit: float = field(default_factory=time.perf_counter)
    t_done: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def sampling_key(self) -> tuple:
        """Requests with equal keys may share a batch."""
        if self.temperature <= 0.0:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", id(self))
        return ("sample", self.temperature, self.top_p)


class _RowStop:
    """A per-row stopping criterion for ``generate``: records each row's new token and
    says which rows are done (so one batch serves requests with different limits)."""

    def __init__(self, engine: Engine, reqs: list[GenRequest], prompt_len: int) -> None:
        self.engine, self.reqs, self.prompt_len = engine, reqs, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        last = input_ids[:, -1].tolist()  # [B]: the token each row just produced
        done = []
        for req, tok in zip(self.reqs, last):
            if not req.done:
                self.engine._advance(req, tok)
            done.append(req.done)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class Engine:
    """Batches completion requests for a :class:`TaskBank` in a worker thread.

    Arguments:
        bank: the bank (its model patched); tasks may change while serving.
        tokenizer: the model's tokenizer (decodes each row's tokens; gives EOS and pad).
        max_batch_size: rows per generate call.
        max_wait_ms: how long the first request of a batch waits for company.
        max_queue: queued requests beyond which :meth:`submit` raises QueueFullError.
    """

    def __init__(
        self,
        bank: TaskBank,
        tokenizer: Any,
        *,
        max_batch_size: int = 8,
        max_wait_ms: float = 10.0,
        max_queue: int = 256,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError(
                "max_batch_size and max_queue must be >= 1 and max_wait_ms >= 0, got "
                f"{max_batch_size}, {max_queue}, {max_wait_ms}"
            )
        self.bank, self.tokenizer = bank, tokenizer
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._queue: queue.Queue[GenRequest] = queue.Queue()
        self._pending = 0  # queued, not yet in a batch
        self._count_lock = threading.Lock()
        # held while the model runs: admin loads (which run the model to convert soft
        # prompts) wait for the batch in flight
        self.model_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
        cfg_eos = getattr(bank.model.generation_config, "eos_token_id", None)
        if isinstance(cfg_eos, int):
            self.eos_ids.add(cfg_eos)
        elif cfg_eos:
            self.eos_ids.update(cfg_eos)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)
        # metrics
        # submitted, completed, cancelled, rejected, failed, client_gone (cancel asked)
        self.requests = Counter()
        self.tokens_generated = 0
        self.prompt_tokens = 0
        self.batches = 0
        self.mixed_task_batches = 0
        self.batch_sizes: Counter[int] = Counter()
        self.max_tasks_in_batch = 0
        self.latencies: deque[float] = deque(maxlen=4096)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="prefixattn-batcher")
            self._thread.daemon = True
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker after the batch in flight."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ requests

    @property
    def queue_depth(self) -> int:
        return self._pending

    def submit(self, req: GenRequest) -> None:
        """Queue ``req``.

        Raises:
            QueueFullError: ``max_queue`` requests are already waiting.
        """
        with self._count_lock:
            if self._pending >= self.max_queue:
                self.requests["rejected"] += 1
                raise QueueFullError(
                    f"the request queue is full ({self.max_queue} waiting); retry later"
                )
            self._pending += 1
            self.requests["submitted"] += 1
        self._queue.put(req)

    def cancel(self, req: GenRequest) -> None:
        """The client went away: the row stops at its next token (or is never run)."""
        if not req.done and not req.cancelled:
            self.requests["client_gone"] += 1
        req.cancelled = True

    # ------------------------------------------------------------------ worker

    def _take(self, timeout: float | None) -> GenRequest | None:
        try:
            req = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        with self._count_lock:
            self._pending -= 1
        return req

    def _run(self) -> None:
        carry: list[GenRequest] = []
        while not self._stop.is_set():
            batch = carry or []
            carry = []
            if not batch:
                first = self._take(timeout=0.05)
                if first is None:
                    continue
                batch = [first]
            deadline = time.perf_counter() + self.max_wait
            while len(batch) < self.max_batch_size:
                # wait out the rest of the window; after it, take only what is there
                nxt = self._take(timeout=max(deadline - time.perf_counter(), 0.0))
                if nxt is None:
                    break
                batch.append(nxt)
            live = []
            for r in batch:
                if r.cancelled:
                    self._finish(r, CANCELLED)
                elif r.task not in self.bank:  # removed while it waited
                    self.requests["failed"] += 1
                    r.text = f"task {r.task!r} was removed while the request waited"
                    self._finish(r, "error")
                else:
                    live.append(r)
            if not live:
                continue
            # one sampling mode per generate call; the others wait for the next round
            key = live[0].sampling_key()
            group = [r for r in live if r.sampling_key() == key]
            carry = [r for r in live if r.sampling_key() != key]
            try:
                self._generate(group)
            except Exception as err:  # a failing batch must not kill the server
                for r in group:
                    if not r.done:
                        self.requests["failed"] += 1
                        r.text = f"internal error: {type(err).__name__}: {err}"
                        self._finish(r, "error")

    def _generate(self, reqs: list[GenRequest]) -> None:
        """One generate call for ``reqs`` (left-padded into one batch)."""
        from transformers import StoppingCriteriaList

        n = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((len(reqs), n), self.pad_id, dtype=torch.long)  # [B, N]
        mask = torch.zeros((len(reqs), n), dtype=torch.long)  # [B, N]
        for b, r in enumerate(reqs):
            ids[b, n - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[b, n - len(r.prompt_ids) :] = 1
        device = next(self.bank.model.parameters()).device
        kw: dict[str, Any] = dict(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max(r.max_tokens for r in reqs),
            pad_token_id=self.pad_id,
            stopping_criteria=StoppingCriteriaList([_RowStop(self, reqs, n)]),
        )
        r0 = reqs[0]
        if r0.temperature > 0.0:
            kw.update(do_sample=True, temperature=r0.temperature, top_p=r0.top_p, top_k=0)
        else:
            kw.update(do_sample=False)
        self.batches += 1
        self.batch_sizes[len(reqs)] += 1
        n_tasks = len({r.task for r in reqs})
        self.max_tasks_in_batch = max(self.max_tasks_in_batch, n_tasks)
        self.mixed_task_batches += n_tasks > 1
        self.prompt_tokens += sum(len(r.prompt_ids) for r in reqs)
        with self.model_lock:
            if r0.seed is not None and r0.temperature > 0.0:
                torch.manual_seed(r0.seed)
            self.bank.generate([r.task for r in reqs], **kw)
        for r in reqs:  # rows generate stopped at max_new_tokens without our criterion
            if not r.done:
                self._finish(r, LENGTH)

    def _advance(self, req: GenRequest, tok: int) -> None:
        """Row ``req`` produced ``tok``: update its text, send the final part, maybe stop."""
        if req.cancelled:
            self._finish(req, CANCELLED)
            return
        if tok in self.eos_ids:
            self._finish(req, STOP)
            return
        req.out_ids.append(tok)
        self.tokens_generated += 1
        req.text = self.tokenizer.decode(req.out_ids, skip_special_tokens=True)
        if req.stop:
            cut = min((i for i in (req.text.find(s) for s in req.stop) if i >= 0), default=-1)
            if cut >= 0:
                req.text = req.text[:cut]
                self._finish(req, STOP)
                return
        if len(req.out_ids) >= req.max_tokens:
            self._finish(req, LENGTH)
            return
        # text that a stop string could still swallow is held back
        hold = max((len(s) - 1 for s in req.stop), default=0)
        self._emit(req, len(req.text) - hold)

    def _emit(self, req: GenRequest, upto: int) -> None:
        if upto > req.sent and req.on_event is not None:
            req.on_event("delta", req.text[req.sent : upto])
        req.sent = max(req.sent, upto)

    def _finish(self, req: GenRequest, reason: str) -> None:
        if req.done:
            return
        req.finish_reason = reason
        req.t_done = time.perf_counter()
        if reason == CANCELLED:
            self.requests["cancelled"] += 1
        elif reason != "error":
            self.requests["completed"] += 1
            self.latencies.append(req.t_done - req.t_submit)
        if reason != "error":
            self._emit(req, len(req.text))
        if req.on_event is not None:
            req.on_event("done", None)

    # ------------------------------------------------------------------ metrics

    def metrics(self) -> dict[str, Any]:
        """Counters, batch-size histogram, queue depth and latency percentiles (seconds)."""
        lat = sorted(self.latencies)

        def pct(p: float) -> float | None:
            return None if not lat else lat[min(len(lat) - 1, round(p / 100 * (len(lat) - 1)))]

        return {
            "requests": dict(self.requests),
            "tokens_generated": self.tokens_generated,
            "prompt_tokens": self.prompt_tokens,
            "batches": self.batches,
            "mixed_task_batches": self.mixed_task_batches,
            "max_tasks_in_batch": self.max_tasks_in_batch,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "queue_depth": self.queue_depth,
            "max_batch_size": self.max_batch_size,
            "latency_s": {"count": len(lat), "p50": pct(50), "p90": pct(90), "p99": pct(99)},
            "tasks": self.bank.tasks,
        }


def threadsafe_events(loop: asyncio.AbstractEventLoop, q: asyncio.Queue) -> Callable:
    """An ``on_event`` that forwards the worker's events into ``q`` on ``loop``."""

    def on_event(kind: str, text: str | None) -> None:
        loop.call_soon_threadsafe(q.put_nowait, (kind, text))

    return on_event


_ids = itertools.count()


def new_id(prefix: str = "cmpl") -> str:
    """A process-unique response id."""
    return f"{prefix}-{int(time.time() * 1000):x}{next(_ids):06x}"


def context_limit(model: Any) -> int | None:
    """The model's maximum number of positions (None if it does not say)."""
    cfg = model.config
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
