"""The engine's batched sampling and logprobs against the per-row forms it replaced.

``choose_tokens`` draws every sampled row of a step in a few batched calls; a seeded row
must draw exactly the token per-row ``torch.multinomial`` with its own generator draws
(the engine's former code, kept here as the reference), whatever else shares the step,
and greedy rows the argmax. ``token_outs`` reports the chosen token's log-probability and
the top ``k`` in batched calls; checked against a float64 log-softmax and against the
former per-row ``topk``.
"""

from __future__ import annotations

import math

import pytest
import torch

from prefixattn.serve.engine.request import SamplingParams
from prefixattn.serve.engine.sampling import (
    TOP_P_CANDIDATES,
    RowSampler,
    _top_p_sorted,
    choose_tokens,
    token_out,
    token_outs,
)


def _reference_sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """The engine's former per-row draw (before the step was batched)."""
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        drop = (sorted_p.cumsum(0) - sorted_p) >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        return int(order[torch.multinomial(sorted_p, 1, generator=gen)])
    return int(torch.multinomial(probs, 1, generator=gen))


def _logits(B: int, V: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, generator=g) * 4
    x[:6, : V // 3] = x[:6, :1]  # ties: a third of rows 0-5 equal to their first logit
    if B > 1:
        x[1] = x[0]  # two identical rows
    return x.to(dtype)


PARAMS = [
    SamplingParams(8),  # greedy
    SamplingParams(8, temperature=0.7, seed=3),
    SamplingParams(8, temperature=0.7, top_p=0.9, seed=3),  # same seed, cut
    SamplingParams(8, temperature=1.3, top_p=0.5, seed=11),
    SamplingParams(8, temperature=1.0, seed=2**40 + 5),
    SamplingParams(8),  # greedy
    SamplingParams(8, temperature=0.05, top_p=0.999, seed=7),
    SamplingParams(8, temperature=0.6, top_p=0.95, seed=8),  # no ties (row 7): topk cut
    SamplingParams(8, temperature=9.0, top_p=0.97, seed=9),  # a long tail: the full sort
]


@pytest.mark.parametrize("V", [5, 1000, 32771])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_choose_tokens_matches_per_row_multinomial(V: int, dtype: torch.dtype) -> None:
    """Several steps of a mixed batch (greedy, temperatures, top-p, equal seeds): each
    row's tokens equal the per-row reference drawing from its own generator."""
    samplers = [RowSampler(p, fallback_seed=100 + i, device=torch.device("cpu"))
                for i, p in enumerate(PARAMS)]  # fmt: skip
    refs = [None if s.generator is None else torch.Generator().manual_seed(s.generator.initial_seed())
            for s in samplers]  # fmt: skip
    for step in range(4):
        logits = _logits(len(PARAMS), V, step, dtype)
        got = choose_tokens(logits, samplers)
        want = [
            int(logits[b].argmax()) if g is None else _reference_sample(logits[b].float(), p, g)
            for b, (p, g) in enumerate(zip(PARAMS, refs))
        ]
        assert got == want, (step, got, want)
        # the generators advanced exactly as the reference's
        for s, g in zip(samplers, refs):
            if g is not None:
                assert torch.equal(s.generator.get_state(), g.get_state())


def test_seeded_row_independent_of_its_batch() -> None:
    """A seeded row draws the same tokens alone (``RowSampler.sample``) and beside other
    sampled rows of other temperatures and seeds."""
    V, p = 4099, SamplingParams(8, temperature=0.9, top_p=0.8, seed=42)
    cpu = torch.device("cpu")
    alone, mine = RowSampler(p, 0, cpu), RowSampler(p, 1, cpu)
    crowd = [RowSampler(SamplingParams(8, temperature=t, seed=s), 9, cpu)
             for t, s in ((0.5, 1), (1.5, 2))]  # fmt: skip
    drawn = set()
    for step in range(6):
        logits = _logits(3, V, 50 + step)
        a = alone.sample(logits[2])
        b = choose_tokens(logits, [*crowd, mine])[2]
        assert a == b, step
        drawn.add(a)
    assert len(drawn) > 1  # it did sample


def test_greedy_only_step_is_argmax_first_maximum() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    s = [RowSampler(SamplingParams(4), 0, torch.device("cpu")) for _ in range(2)]
    assert choose_tokens(logits, s) == [1, 0]


def test_non_finite_logits_raise_before_drawing() -> None:
    """NaN logits on a sampled row raise (as torch.multinomial did), the generator untouched."""
    s = RowSampler(SamplingParams(4, temperature=1.0, seed=1), 0, torch.device("cpu"))
    state = s.generator.get_state()
    logits = torch.zeros(2, 6)
    logits[1, 2] = float("nan")
    greedy = RowSampler(SamplingParams(4), 0, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="inf, nan"):
        choose_tokens(logits, [greedy, s])
    assert torch.equal(s.generator.get_state(), state)


def test_choose_tokens_shape_error_names_argument() -> None:
    s = RowSampler(SamplingParams(4), 0, torch.device("cpu"))
    with pytest.raises(ValueError, match="logits must be"):
        choose_tokens(torch.zeros(2, 5), [s])


@pytest.mark.parametrize("V", [3, 517])
def test_token_outs_against_float64_and_per_row_topk(V: int) -> None:
    """Chosen logprob equals the float64 log-softmax (to float32 rounding) and the per-row
    ``topk`` exactly; rows with different k, k=0, k > V and rows asking nothing."""
    logits = _logits(6, V, 1)
    lp = torch.log_softmax(logits, dim=-1)
    ref64 = torch.log_softmax(logits.double(), dim=-1)
    tokens = [0, 1, V - 1, 2, 0, 1]
    ks = [None, 0, 2, 5, V + 3, 2]
    outs = token_outs(lp, tokens, ks)
    for r, (out, t, k) in enumerate(zip(outs, tokens, ks)):
        assert out.token_id == t
        if k is None:
            assert out.logprob is None and out.top is None
            continue
        assert math.isclose(out.logprob, float(ref64[r, t]), rel_tol=1e-5, abs_tol=1e-5)
        assert out.logprob == float(lp[r, t])
        if k == 0:
            assert out.top is None
            continue
        vals, ids = lp[r].topk(min(k, V))  # the former per-row call
        assert out.top == list(zip(ids.tolist(), vals.tolist()))
        assert len(out.top) == min(k, V)
        top64 = sorted(ref64[r].tolist(), reverse=True)[: min(k, V)]
        assert all(math.isclose(a, b, abs_tol=1e-5) for (_, a), b in zip(out.top, top64))
    assert token_out(lp[3], 2, 5) == outs[3]
    assert token_out(None, 2, 5).logprob is None


def test_token_outs_errors() -> None:
    with pytest.raises(ValueError, match="tokens and ks"):
        token_outs(None, [1, 2], [None])
    with pytest.raises(ValueError, match="logprobs must be"):
        token_outs(None, [1], [2])
    assert [o.token_id for o in token_outs(None, [4, 5], [None, None])] == [4, 5]


def test_top_p_candidates_cut_equals_full_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    """The top-p cut from ``topk`` candidates equals the full sort's wherever it is taken
    (a peaked row), and a flat row or a tie inside the kept set takes the full sort."""
    V = 5000
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, V, generator=g, dtype=torch.float64).float()
    logits[0] *= 8  # peaked, distinct: candidates suffice
    logits[1] *= 0.01  # flat: the kept set is far beyond the candidates
    logits[2] *= 8
    top = int(logits[2].argmax())
    second = int(logits[2].topk(2).indices[1])
    logits[2, second] = logits[2, top]  # a tie at the top: the full sort decides its order
    logits[3] *= 8
    probs = torch.softmax(logits, dim=-1)
    top_p = torch.tensor([0.9, 0.9, 0.999, 0.5])
    sorts: list[int] = []
    real_sort = torch.sort

    def counting_sort(x: torch.Tensor, *a: object, **k: object) -> object:
        sorts.append(x.shape[0])
        return real_sort(x, *a, **k)

    monkeypatch.setattr(torch, "sort", counting_sort)
    dist, order = _top_p_sorted(probs, top_p)
    monkeypatch.undo()
    assert sorts == [2]  # rows 1 and 2 only
    ref_p, ref_ids = torch.sort(probs, dim=-1, descending=True)
    ref = ref_p.masked_fill((ref_p.cumsum(-1) - ref_p) >= top_p.unsqueeze(1), 0.0)
    assert torch.equal(dist, ref)
    kept = ref > 0
    assert torch.equal(order[kept], ref_ids[kept])
    assert 1 < int(kept[0].sum()) < TOP_P_CANDIDATES  # the fast row did cut a tail
