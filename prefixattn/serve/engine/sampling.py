"""Per-row token choice and log-probabilities.

Every row of a step is sampled on its own terms: greedy rows take the argmax (one batched
call), sampled rows apply their temperature and top-p and draw with their *own*
``torch.Generator``, so a seeded row draws the same numbers whatever else shares the step.
Log-probabilities are the log-softmax of the raw logits (before temperature / top-p), as
OpenAI and vLLM report them.
"""

from __future__ import annotations

import torch

from .request import SamplingParams, TokenOut

__all__ = ["RowSampler", "choose_tokens", "token_out"]


class RowSampler:
    """One row's sampling state: its params and its generator (None when greedy).

    A seeded row's generator starts from ``params.seed``; an unseeded sampled row's from
    ``fallback_seed`` (drawn by the engine), so rows never share a random stream.
    """

    def __init__(self, params: SamplingParams, fallback_seed: int, device: torch.device) -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            seed = params.seed if params.seed is not None else fallback_seed
            self.generator.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)

    def sample(self, logits: torch.Tensor) -> int:
        """Draw one token from ``logits`` [V] (float32) with temperature and top-p."""
        p = self.params
        probs = torch.softmax(logits / p.temperature, dim=-1)  # [V]
        if p.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)  # [V]
            # keep the smallest set whose mass reaches top_p (the first token always kept)
            drop = (sorted_p.cumsum(0) - sorted_p) >= p.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            pick = torch.multinomial(sorted_p, 1, generator=self.generator)
            return int(order[pick])
        return int(torch.multinomial(probs, 1, generator=self.generator))


def choose_tokens(logits: torch.Tensor, samplers: list[RowSampler]) -> list[int]:
    """The next token of each row: ``logits`` [B, V], one sampler per row."""
    greedy = logits.argmax(dim=-1).tolist()  # [B]
    out = []
    for b, s in enumerate(samplers):
        out.append(greedy[b] if s.generator is None else s.sample(logits[b].float()))
    return out


def token_out(logprobs: torch.Tensor | None, token: int, k: int | None) -> TokenOut:
    """``TokenOut`` for ``token`` given the row's log-softmax ``logprobs`` [V] (None: no
    log-probabilities asked)."""
    if logprobs is None or k is None:
        return TokenOut(token)
    top = None
    if k > 0:
        vals, ids = logprobs.topk(min(k, logprobs.shape[0]))
        top = list(zip(ids.tolist(), vals.tolist()))
    return TokenOut(token, float(logprobs[token]), top)
