"""What the serving front end hands the engine, and what the engine hands back.

The engine is token-level (as vLLM's engine core): it schedules rows, runs the model,
samples, and ends a row on EOS / a stop token id / ``max_tokens`` / a cancel, or when the
request's :class:`OutputSink` says so (a stop string matched in the text). Text is the
front end's business (``serve/output.py``): incremental detokenization, stop strings,
logprob formatting. The sink's methods are called from the engine's worker thread.

    front end (app.py)                  engine (worker thread)
    ------------------                  ----------------------
    GenRequest(task, prompt_ids,  --->  submit(): queue, schedule, prefill, decode
               params, sink)
    sink.prompt_logprobs(outs)    <---  once, after the prompt's prefill, if asked
    sink.token(out) -> stop?      <---  each generated token (EOS / stop ids excluded)
    sink.finish(reason, error)    <---  exactly once
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

# finish reasons, as OpenAI names them; "cancelled": the client went away; "error": the
# engine could not run the row (``error`` says why, the front end answers a 4xx/5xx)
STOP, LENGTH, CANCELLED, ERROR = "stop", "length", "cancelled", "error"


class QueueFullError(Exception):
    """The request queue is full (the server answers 429 with ``Retry-After``)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request's tokens are chosen and reported (validated by the front end).

    ``temperature == 0`` is greedy. ``seed`` makes a sampled row reproducible whatever else
    shares its batch (a per-row generator). ``logprobs = k`` reports each generated token's
    log-probability and the top ``k`` alternatives; ``prompt_logprobs = k`` the same for
    each prompt token after the first (OpenAI's ``echo`` + ``logprobs``). Log-probabilities
    are log-softmax of the model's raw logits (before temperature and top-p), as OpenAI and
    vLLM report them.
    """

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class TokenOut:
    """One token with its log-probability and the top alternatives (descending)."""

    token_id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


class OutputSink(Protocol):
    """Receives one request's results from the engine's worker thread."""

    def prompt_logprobs(self, outs: list[TokenOut | None]) -> None:
        """Once, before the first token, when ``params.prompt_logprobs`` is set: one entry
        per prompt token, the first None (nothing predicts it)."""

    def token(self, out: TokenOut) -> bool:
        """Each generated token; return True to end the row now (finish reason "stop")."""

    def finish(self, reason: str, error: str | None = None) -> None:
        """Exactly once: STOP, LENGTH, CANCELLED or ERROR (with ``error``)."""


@dataclass(eq=False)
class GenRequest:
    """One completion of one prompt: the inputs, and the engine's state for the row."""

    task: str  # a task of the bank (the base model is one: TaskBank.add_base, no prefix)
    prompt_ids: list[int]
    params: SamplingParams
    sink: OutputSink
    request_id: str = ""
    # filled in by the engine
    out_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False
    t_submit: float = field(default_factory=time.perf_counter)
    t_first_token: float | None = None
    t_done: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None
