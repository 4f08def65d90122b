"""Which rows run in the next step (iteration-level scheduling, as vLLM's scheduler).

Each step the scheduler spends a token budget (``max_num_batched_tokens``): first one
token for every running row that is decoding, then chunks of prompts still being
prefilled (oldest first), then it admits waiting requests (first come, first served)
while a KV slot is free and fewer than ``max_num_seqs`` rows run, giving each the budget
left as its first chunk. A prompt longer than the budget is prefilled over several steps
(chunked prefill) while the decoding rows keep producing a token every step.

The scheduler decides; it runs nothing (:mod:`.runner` runs the model).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .kv_cache import KVPool
from .request import GenRequest
from .sampling import RowSampler

__all__ = ["Row", "Scheduler", "StepPlan"]


@dataclass(eq=False)
class Row:
    """A running request: its slot in the KV pool and how far it got."""

    req: GenRequest
    slot: int
    prefix_len: int  # P of its task: the slot's first keys
    position_offset: int  # the task's position offset (a converted soft prompt: its P)
    sampler: RowSampler
    kv_len: int = 0  # keys in the slot: the prefix, then every token fed so far
    prefilled: int = 0  # prompt tokens whose keys are in the slot
    last_token: int | None = None  # the token the next decode step feeds
    prompt_outs: list = field(default_factory=list)  # prompt logprobs gathered so far

    @property
    def prompt_len(self) -> int:
        return len(self.req.prompt_ids)

    @property
    def decoding(self) -> bool:
        return self.prefilled >= self.prompt_len

    @property
    def next_position(self) -> int:
        """The position id of the next token fed (the prefix takes no positions)."""
        return self.position_offset + self.kv_len - self.prefix_len


@dataclass
class StepPlan:
    """One step: the decoding rows (one token each) and the prefill chunks ``(row, n)``
    (``n`` prompt tokens from ``row.prefilled``)."""

    decode: list[Row]
    prefill: list[tuple[Row, int]]
    admitted: list[Row]

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(n for _, n in self.prefill)

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill)


class Scheduler:
    """Holds the waiting queue and the running rows; :meth:`plan` picks each step's work.

    Arguments:
        pool: the KV slot pool (a row holds one slot from admission to finish).
        max_num_seqs: running rows at most.
        max_num_batched_tokens: tokens per step at most (decode tokens + prefill chunks).
    """

    def __init__(self, pool: KVPool, *, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < max_num_seqs:
            raise ValueError(
                "max_num_seqs must be >= 1 and max_num_batched_tokens >= max_num_seqs, got "
                f"{max_num_seqs} and {max_num_batched_tokens}"
            )
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[GenRequest] = deque()
        self.running: list[Row] = []

    def can_admit(self) -> bool:
        return len(self.running) < self.max_num_seqs and self.pool.free_slots > 0

    def plan(self, admit: Callable[[GenRequest], Row | None]) -> StepPlan:
        """The next step. ``admit(req) -> Row | None`` turns a waiting request into a row
        (taking a slot), or returns None when it finished without running (an error)."""
        budget = self.max_num_batched_tokens
        decode = [r for r in self.running if r.decoding]
        budget -= len(decode)
        prefill: list[tuple[Row, int]] = []
        for r in self.running:
            if budget <= 0:
                break
            if not r.decoding:
                n = min(r.prompt_len - r.prefilled, budget)
                prefill.append((r, n))
                budget -= n
        admitted = []
        while budget > 0 and self.waiting and self.can_admit():
            row = admit(self.waiting.popleft())
            if row is None:
                continue
            self.running.append(row)
            admitted.append(row)
            n = min(row.prompt_len, budget)
            prefill.append((row, n))
            budget -= n
        return StepPlan(decode, prefill, admitted)

    def remove(self, row: Row) -> None:
        """``row`` finished: it leaves the running set and its slot is free for the next."""
        self.running.remove(row)
        self.pool.release(row.slot)
