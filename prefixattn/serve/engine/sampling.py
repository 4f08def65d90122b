"""Token choice and log-probabilities for every row of a step, batched.

Every row of a step is sampled on its own terms, in a few batched calls per step (not per
row): greedy rows take the argmax (one call for the step); sampled rows are grouped by
temperature (one softmax per distinct temperature, the divisor a Python scalar as it was
per row, so the values are bit-identical on every device), rows with ``top_p < 1`` are
cut in one call (a ``topk`` of candidates on the CPU where that decides the cut, else a
full sort: see :func:`_top_p_sorted`), and each sampled row draws with its *own*
``torch.Generator``, so a seeded row draws the same numbers whatever else shares the step.

The draw is ``torch.multinomial(p, 1, generator=g)`` spelled out as torch computes it for
one sample (``argmax(p / q)`` with ``q ~ Exp(1)``, one exponential per vocabulary entry
drawn from the row's generator into its row of ``q``): the only per-row call left is that
``exponential_`` (one generator per row), the division and the argmax are one call for
the step, and the tokens come back in one transfer. ``tests/test_sampling.py`` checks the
tokens against per-row ``torch.multinomial`` (so a torch that samples differently is
caught there).

Log-probabilities are the log-softmax of the raw logits (before temperature / top-p), as
OpenAI and vLLM report them: the chosen tokens' in one gather, the top ``k`` in one
``topk`` per distinct ``k`` of the step (rows asking the same ``k`` share the call).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from .request import SamplingParams, TokenOut

__all__ = ["RowSampler", "choose_tokens", "token_out", "token_outs"]


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
        """Draw one token from ``logits`` [V] alone (the per-row form of
        :func:`choose_tokens`, which draws the same token in a batch)."""
        return choose_tokens(logits.unsqueeze(0), [self])[0]


def _check_probs(dist: torch.Tensor) -> None:
    """What ``torch.multinomial`` checks, for every row of ``dist`` [S, V] in one sync."""
    ok = (dist.amax(dim=-1) < float("inf")) & (dist.amin(dim=-1) >= 0) & (dist.sum(dim=-1) > 0)
    if not bool(ok.all()):
        bad = int((~ok).nonzero()[0, 0])
        raise RuntimeError(
            f"sampled row {bad} of the step: its probabilities contain inf, nan or a value "
            "< 0, or sum to 0 (logits not finite?)"
        )


#: candidates of the top-p cut taken by ``topk`` before a full sort is needed (CPU)
TOP_P_CANDIDATES = 256


def _top_p_sorted(probs: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``probs`` [C, V] sorted descending with the tail beyond ``top_p`` [C]
    zeroed, and the sorted positions' token ids [C, V].

    On the CPU the sort is skipped where it cannot matter: the top
    ``TOP_P_CANDIDATES`` by ``topk`` suffice for a row whose kept tokens all lie among
    them (the last candidate is cut) and are strictly decreasing down to the first cut
    one (no tie whose order ``sort`` might break otherwise); the cut entries are zero and
    are never drawn, so the draw is the full sort's. Other rows (and every row on other
    devices, whose scans differ with the row length) take the full sort.
    """
    C, V = probs.shape
    k0 = min(TOP_P_CANDIDATES, V)
    fast = torch.zeros(C, dtype=torch.bool, device=probs.device)
    dist = torch.zeros_like(probs)
    order = torch.zeros((C, V), dtype=torch.int64, device=probs.device)
    if probs.device.type == "cpu" and k0 < V:
        vals, ids = probs.topk(k0, dim=-1)  # [C, k0], descending
        drop = (vals.cumsum(dim=-1) - vals) >= top_p.unsqueeze(1)  # [C, k0]
        strict = (vals[:, :-1] > vals[:, 1:]) | drop[:, :-1]  # kept j: p_j > p_(j+1)
        fast = drop[:, -1] & strict.all(dim=-1)
        dist[:, :k0] = vals.masked_fill(drop, 0.0)
        order[:, :k0] = ids
    slow = (~fast).nonzero().flatten()
    if len(slow):
        sorted_p, sorted_ids = torch.sort(probs.index_select(0, slow), dim=-1, descending=True)
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p.index_select(0, slow).unsqueeze(1)
        dist[slow] = sorted_p.masked_fill(drop, 0.0)
        order[slow] = sorted_ids
    return dist, order


def choose_tokens(logits: torch.Tensor, samplers: Sequence[RowSampler]) -> list[int]:
    """The next token of each row: ``logits`` [B, V] (any float dtype), one sampler per row.

    Greedy rows: ``argmax`` (the first maximum). Sampled rows: softmax of
    ``logits / temperature`` in float32, cut to the smallest set of most likely tokens
    whose mass reaches ``top_p`` (the first token always kept), one draw from the row's
    generator. Returns B ints (one host transfer).
    """
    if logits.dim() != 2 or logits.shape[0] != len(samplers):
        raise ValueError(
            f"logits must be [B, V] with B = len(samplers) = {len(samplers)}, "
            f"got {tuple(logits.shape)}"
        )
    tokens = logits.argmax(dim=-1)  # [B]
    sampled = [b for b, s in enumerate(samplers) if s.generator is not None]
    if not sampled:
        return tokens.tolist()
    dev, V = logits.device, logits.shape[1]
    rows = torch.tensor(sampled, device=dev)  # [S]
    x = logits.index_select(0, rows).float()  # [S, V]
    probs = torch.empty_like(x)  # [S, V]
    by_temp: dict[float, list[int]] = defaultdict(list)
    for i, b in enumerate(sampled):
        by_temp[samplers[b].params.temperature].append(i)
    for temp, members in by_temp.items():
        if len(members) == len(sampled):
            probs = torch.softmax(x / temp, dim=-1)
        else:
            idx = torch.tensor(members, device=dev)
            probs[idx] = torch.softmax(x.index_select(0, idx) / temp, dim=-1)
    # top-p rows draw over their probabilities sorted (descending), cut; the others over
    # the probabilities as they are
    cut = [i for i, b in enumerate(sampled) if samplers[b].params.top_p < 1.0]
    order = None
    if cut:
        idx = torch.tensor(cut, device=dev)
        top_p = torch.tensor([samplers[sampled[i]].params.top_p for i in cut], device=dev)
        probs[idx], order = _top_p_sorted(probs.index_select(0, idx), top_p)
    _check_probs(probs)
    q = torch.empty((len(sampled), V), dtype=probs.dtype, device=dev)  # [S, V]
    for i, b in enumerate(sampled):
        q[i].exponential_(1, generator=samplers[b].generator)
    pick = (probs / q).argmax(dim=-1)  # [S]
    if cut:
        pick[idx] = order.gather(1, pick[idx].unsqueeze(1)).squeeze(1)
    tokens[rows] = pick
    return tokens.tolist()


def token_outs(
    logprobs: torch.Tensor | None, tokens: Sequence[int], ks: Sequence[int | None]
) -> list[TokenOut]:
    """``TokenOut`` of each row: its token, the token's log-probability and its top
    ``k`` alternatives (descending) from the rows' log-softmax ``logprobs`` [R, V].

    ``ks[r]`` None: row r asked no log-probabilities (its ``TokenOut`` has the token
    only; ``logprobs`` may be None when no row asks). One gather for the chosen tokens
    and one ``topk`` per distinct ``k`` (rows with the same ``k`` together).
    """
    if len(tokens) != len(ks):
        raise ValueError(f"tokens and ks differ in length: {len(tokens)} != {len(ks)}")
    outs = [TokenOut(int(t)) for t in tokens]
    want = [r for r, k in enumerate(ks) if k is not None]
    if not want:
        return outs
    if logprobs is None or logprobs.dim() != 2 or logprobs.shape[0] != len(tokens):
        shape = None if logprobs is None else tuple(logprobs.shape)
        raise ValueError(f"logprobs must be [R={len(tokens)}, V] when a row asks, got {shape}")
    dev, V = logprobs.device, logprobs.shape[1]
    idx = torch.tensor(want, device=dev)
    chosen = torch.tensor([tokens[r] for r in want], device=dev)
    lp = logprobs.index_select(0, idx).gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
    by_k: dict[int, list[int]] = defaultdict(list)
    for j, r in enumerate(want):
        outs[r].logprob = lp[j]
        if ks[r] > 0:  # type: ignore[operator]
            by_k[min(int(ks[r]), V)].append(r)  # type: ignore[arg-type]
    for k, members in by_k.items():
        sub = logprobs if len(members) == logprobs.shape[0] else (
            logprobs.index_select(0, torch.tensor(members, device=dev))
        )  # fmt: skip
        vals, ids = sub.topk(k, dim=-1)  # [M, k]
        for r, i_row, v_row in zip(members, ids.tolist(), vals.tolist()):
            outs[r].top = list(zip(i_row, v_row))
    return outs


def token_out(logprobs: torch.Tensor | None, token: int, k: int | None) -> TokenOut:
    """``TokenOut`` for ``token`` given one row's log-softmax ``logprobs`` [V] (None: no
    log-probabilities asked); the one-row form of :func:`token_outs`."""
    if logprobs is None or k is None:
        return TokenOut(token)
    return token_outs(logprobs.unsqueeze(0), [token], [k])[0]
