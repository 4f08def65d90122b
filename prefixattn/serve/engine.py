"""The serving engine: a bounded request queue and one worker thread that batches.

Requests that arrive together (up to ``max_batch_size`` within ``max_wait_ms`` of the
first), for any mix of tasks, run as one :meth:`TaskBank.generate` call on the ragged bank.
Each row stops on its own (``max_tokens``, EOS, a stop token id, its sink's stop string,
or its client gone) through a per-row stopping criterion; the batch ends when every row is
done. Greedy requests share a batch; sampling requests share one only with the same
(temperature, top_p) and no seed (a seeded request runs alone so that its seed reproduces
it). The engine is token-level (:mod:`prefixattn.serve.request`): text, stop strings and
logprob formatting are the front end's (:mod:`prefixattn.serve.output`).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter, deque
from typing import Any

import torch

from ..hf.bank import TaskBank
from .logprobs import token_outs
from .request import CANCELLED, ERROR, LENGTH, STOP, GenRequest, QueueFullError, TokenOut

__all__ = ["CANCELLED", "ERROR", "LENGTH", "STOP", "Engine", "GenRequest", "QueueFullError"]


def sampling_key(req: GenRequest) -> tuple:
    """Requests with equal keys may share a batch."""
    p = req.params
    if p.greedy:
        return ("greedy",)
    if p.seed is not None:
        return ("seeded", id(req))
    return ("sample", p.temperature, p.top_p)


class _RowStop:
    """A per-row stopping criterion for ``generate``: records each row's new token and
    says which rows are done (so one batch serves requests with different limits)."""

    def __init__(self, engine: Engine, reqs: list[GenRequest], prompt_len: int) -> None:
        self.engine, self.reqs, self.prompt_len = engine, reqs, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        last = input_ids[:, -1].tolist()  # [B]: the token each row just produced
        k = max(
            (r.params.logprobs for r in self.reqs if r.params.logprobs is not None), default=None
        )
        outs = None
        if k is not None and self.engine._logits is not None:  # [B, V] raw, this step's
            outs = token_outs(self.engine._logits, last, k)
        done = []
        for b, (req, tok) in enumerate(zip(self.reqs, last)):
            if not req.done:
                out = outs[b] if outs is not None and req.params.logprobs is not None else None
                if out is not None:
                    out.top = out.top[: req.params.logprobs]
                self.engine._advance(req, tok, out)
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
        self.running = 0  # rows in the generate call in flight
        self._logits: torch.Tensor | None = None  # [B, V] raw logits of the last step

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
                    self._finish(r, ERROR, f"task {r.task!r} was removed while the request waited")
                else:
                    live.append(r)
            if not live:
                continue
            # one sampling mode per generate call; the others wait for the next round
            key = sampling_key(live[0])
            group = [r for r in live if sampling_key(r) == key]
            carry = [r for r in live if sampling_key(r) != key]
            try:
                self._generate(group)
            except Exception as err:  # a failing batch must not kill the server
                for r in group:
                    if not r.done:
                        self.requests["failed"] += 1
                        self._finish(r, ERROR, f"internal error: {type(err).__name__}: {err}")
            finally:
                self.running = 0

    def _generate(self, reqs: list[GenRequest]) -> None:
        """One generate call for ``reqs`` (left-padded into one batch)."""
        from transformers import StoppingCriteriaList

        self.running = len(reqs)
        for r in reqs:
            if r.params.prompt_logprobs is not None:
                self._prompt_logprobs(r)
        for r in reqs:  # echo only: nothing to generate
            if r.params.max_tokens == 0:
                self._finish(r, LENGTH)
        reqs = [r for r in reqs if not r.done]
        if not reqs:
            return
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
            max_new_tokens=max(r.params.max_tokens for r in reqs),
            pad_token_id=self.pad_id,
            stopping_criteria=StoppingCriteriaList([_RowStop(self, reqs, n)]),
        )
        r0 = reqs[0].params
        if not r0.greedy:
            kw.update(do_sample=True, temperature=r0.temperature, top_p=r0.top_p, top_k=0)
        else:
            kw.update(do_sample=False)
        self.batches += 1
        self.batch_sizes[len(reqs)] += 1
        n_tasks = len({r.task for r in reqs})
        self.max_tasks_in_batch = max(self.max_tasks_in_batch, n_tasks)
        self.mixed_task_batches += n_tasks > 1
        self.prompt_tokens += sum(len(r.prompt_ids) for r in reqs)
        want_logprobs = any(r.params.logprobs is not None for r in reqs)
        with self.model_lock:
            if r0.seed is not None and not r0.greedy:
                torch.manual_seed(r0.seed)
            hook = (
                self.bank.model.register_forward_hook(self._keep_logits) if want_logprobs else None
            )
            try:
                self.bank.generate([r.task for r in reqs], **kw)
            finally:
                if hook is not None:
                    hook.remove()
                self._logits = None
        for r in reqs:  # rows generate stopped at max_new_tokens without our criterion
            if not r.done:
                self._finish(r, LENGTH)

    def _keep_logits(self, module: Any, args: Any, output: Any) -> None:
        """Forward hook: the raw logits of each row's last position [B, V]."""
        logits = output.logits if hasattr(output, "logits") else output[0]  # [B, N, V]
        self._logits = logits[:, -1, :]

    @torch.no_grad()
    def _prompt_logprobs(self, req: GenRequest) -> None:
        """One forward of the prompt through the bank: each prompt token's logprob."""
        k = req.params.prompt_logprobs or 0
        device = next(self.bank.model.parameters()).device
        ids = torch.tensor([req.prompt_ids], dtype=torch.long, device=device)  # [1, N]
        with self.model_lock:
            logits = self.bank([req.task], input_ids=ids).logits[0, :-1]  # [N-1, V]
        outs = token_outs(logits, req.prompt_ids[1:], k) if len(req.prompt_ids) > 1 else []
        req.sink.prompt_logprobs([None, *outs])

    def _advance(self, req: GenRequest, tok: int, out: TokenOut | None = None) -> None:
        """Row ``req`` produced ``tok``: hand it to the sink, maybe stop the row."""
        if req.cancelled:
            self._finish(req, CANCELLED)
            return
        p = req.params
        if (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            self._finish(req, STOP)
            return
        req.out_ids.append(tok)
        self.tokens_generated += 1
        if req.t_first_token is None:
            req.t_first_token = time.perf_counter()
        if req.sink.token(out if out is not None else TokenOut(tok)):
            self._finish(req, STOP)
        elif len(req.out_ids) >= p.max_tokens:
            self._finish(req, LENGTH)

    def _finish(self, req: GenRequest, reason: str, error: str | None = None) -> None:
        if req.done:
            return
        req.finish_reason = reason
        req.t_done = time.perf_counter()
        if reason == CANCELLED:
            self.requests["cancelled"] += 1
        elif reason != ERROR:
            self.requests["completed"] += 1
            self.latencies.append(req.t_done - req.t_submit)
        req.sink.finish(reason, error)

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
