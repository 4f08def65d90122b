"""Which rows run in the next step (iteration-level scheduling, as vLLM's scheduler).

Each step the scheduler spends a token budget (``max_num_batched_tokens``): first one
token for every running row that is decoding, then chunks of prompts still being
prefilled (oldest first), then it admits waiting requests (first come, first served)
while fewer than ``max_num_seqs`` rows run and the KV pool has the blocks for their first
chunk (after a prefix-cache hit, only the rest of the prompt is prefilled). A prompt
longer than the budget is prefilled over several steps (chunked prefill) while the
decoding rows keep producing a token every step.

KV blocks are taken as a row grows (:mod:`.kv_cache_manager`). When a running row needs a
block and none is free, the newest running row is preempted (vLLM's recompute): its
blocks go back (full ones stay in the prefix cache), it returns to the front of the
waiting queue and, readmitted, prefills its prompt and the tokens it already generated.

The scheduler decides; it runs nothing (:mod:`.runner` runs the model).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from .kv_cache_manager import KVCacheManager
from .request import GenRequest
from .sampling import RowSampler

__all__ = ["Row", "Scheduler", "StepPlan"]


@dataclass(eq=False)
class Row:
    """A running (or preempted) request: its KV blocks and how far it got."""

    req: GenRequest
    task_key: Hashable  # the task's prefix-cache key (name, offset, P, prefix digest)
    prefix_len: int  # P of its task (read from the bank every step, never stored here)
    position_offset: int  # the task's position offset (a converted soft prompt: its P)
    sampler: RowSampler
    blocks: list[int] = field(default_factory=list)  # its block table
    block_hashes: list[int] = field(default_factory=list)  # of its full blocks
    num_computed: int = 0  # tokens whose keys are in its blocks
    num_cached_blocks: int = 0  # its first blocks registered in the prefix cache
    prefill_len: int = 0  # tokens to prefill: the prompt (+ the generated after preemption)
    num_hit_tokens: int = 0  # tokens found in the prefix cache at its last admission
    last_token: int | None = None  # the token the next decode step feeds
    prompt_outs: list = field(default_factory=list)  # prompt logprobs gathered so far
    prompt_sent: bool = False  # prompt logprobs handed to the sink
    preemptions: int = 0

    def __post_init__(self) -> None:
        self.prefill_len = self.prefill_len or len(self.req.prompt_ids)

    @property
    def task(self) -> str:
        return self.req.task

    @property
    def prompt_len(self) -> int:
        return len(self.req.prompt_ids)

    @property
    def cacheable(self) -> bool:
        """Prefix caching applies (not to rows asking prompt logprobs: every prompt token's
        logits are needed)."""
        return self.req.params.prompt_logprobs is None

    @property
    def token_ids(self) -> list[int]:
        """Prompt then generated tokens (the row's keys, in order)."""
        return self.req.prompt_ids + self.req.out_ids

    @property
    def kv_len(self) -> int:
        return self.num_computed

    @property
    def decoding(self) -> bool:
        return self.num_computed >= self.prefill_len

    @property
    def next_position(self) -> int:
        """The position id of the next token fed (the prefix takes no positions)."""
        return self.position_offset + self.num_computed


@dataclass
class StepPlan:
    """One step: the decoding rows (one token each) and the prefill chunks ``(row, n)``
    (``n`` tokens from ``row.num_computed``)."""

    decode: list[Row]
    prefill: list[tuple[Row, int]]
    admitted: list[Row]
    preempted: list[Row] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(n for _, n in self.prefill)

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill)


class Scheduler:
    """Holds the waiting queue and the running rows; :meth:`plan` picks each step's work.

    Arguments:
        kv: the KV cache manager (blocks per row).
        max_num_seqs: running rows at most.
        max_num_batched_tokens: tokens per step at most (decode tokens + prefill chunks).
    """

    def __init__(
        self, kv: KVCacheManager, *, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < max_num_seqs:
            raise ValueError(
                "max_num_seqs must be >= 1 and max_num_batched_tokens >= max_num_seqs, got "
                f"{max_num_seqs} and {max_num_batched_tokens}"
            )
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # requests not yet admitted, and preempted rows (at the front)
        self.waiting: deque[GenRequest | Row] = deque()
        self.running: list[Row] = []
        self.num_preemptions = 0

    def _preempt(self, row: Row, plan: StepPlan) -> None:
        """``row`` gives its blocks back and waits (first in line) to be recomputed."""
        self.running.remove(row)
        self.kv.free(row)
        row.num_computed = 0
        row.prefill_len = row.prompt_len + len(row.req.out_ids)
        row.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(row)
        plan.preempted.append(row)
        if row in plan.decode:
            plan.decode.remove(row)
        plan.prefill = [(r, n) for r, n in plan.prefill if r is not row]

    def _reserve(self, row: Row, n: int, plan: StepPlan) -> bool:
        """Blocks for ``n`` more tokens of ``row``, preempting the newest rows as needed;
        False when ``row`` itself was preempted."""
        while not self.kv.allocate_slots(row, n):
            self._preempt(self.running[-1], plan)
            if row not in self.running:
                return False
        return True

    def plan(self, admit: Callable[[GenRequest], Row | None]) -> StepPlan:
        """The next step. ``admit(req) -> Row | None`` turns a waiting request into a row
        (no blocks yet), or returns None when it finished without running (an error)."""
        budget = self.max_num_batched_tokens
        plan = StepPlan([], [], [])
        for row in [r for r in self.running if r.decoding]:
            if row in self.running and self._reserve(row, 1, plan):
                plan.decode.append(row)
        budget -= len(plan.decode)
        for row in [r for r in self.running if not r.decoding]:
            if budget <= 0:
                break
            n = min(row.prefill_len - row.num_computed, budget)
            if row in self.running and self._reserve(row, n, plan):
                plan.prefill.append((row, n))
                budget -= n
        budget = self.max_num_batched_tokens - plan.num_tokens  # preemptions gave some back
        while budget > 0 and self.waiting and len(self.running) < self.max_num_seqs:
            if plan.preempted:
                break  # the pool is short: no new rows this step
            item = self.waiting[0]
            row = item if isinstance(item, Row) else admit(item)
            if row is None:
                self.waiting.popleft()
                continue
            self.waiting[0] = row  # admitted once (its sampler's seed drawn once)
            computed = self.kv.get_computed_blocks(row)
            hit = len(computed) * self.kv.block_size
            n = min(row.prefill_len - hit, budget)
            if not self.kv.can_take(computed, hit + n):
                break  # first come, first served: wait for blocks
            self.waiting.popleft()
            self.kv.take(row, computed, hit + n)
            row.num_hit_tokens = hit
            self.running.append(row)
            plan.admitted.append(row)
            plan.prefill.append((row, n))
            budget -= n
        return plan

    def remove(self, row: Row) -> None:
        """``row`` finished: it leaves the running set and its blocks go back."""
        self.running.remove(row)
        self.kv.free(row)
