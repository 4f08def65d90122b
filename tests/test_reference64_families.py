"""Sanity tests of the float64 reference's sliding window, soft-capping and sinks
(tests/reference64.py) against a per-query loop written from the definitions, and of the
sink gradient formula the kernels use (dsink[h] = -sum_{b,i} p_sink * Delta)."""

from __future__ import annotations

import math

import pytest
import torch
from reference64 import attention64


def _loop(q, k, v, pk, pv, kpm, window, softcap, sinks, prefix_window, plen):
    """One query at a time: list its visible keys, softmax (with the sink), sum values."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    P = 0 if pk is None else pk.shape[-2]
    out = torch.zeros(B, H, Nq, D, dtype=torch.float64)
    for b in range(B):
        L = P if plen is None else int(plen[b])
        for h in range(H):
            hk = h // (H // Hkv)
            for i in range(Nq):
                pos = i + Nk - Nq
                logits, vals = [], []
                for c in range(L):
                    if window is not None and prefix_window == "sliding" and c - L <= pos - window:
                        continue
                    logits.append(float(q[b, h, i] @ pk[b, hk, c]) / math.sqrt(D))
                    vals.append(pv[b, hk, c])
                for j in range(Nk):
                    if j > pos or (kpm is not None and not kpm[b, j]):
                        continue
                    if window is not None and j <= pos - window:
                        continue
                    logits.append(float(q[b, h, i] @ k[b, hk, j]) / math.sqrt(D))
                    vals.append(v[b, hk, j])
                if softcap is not None:
                    logits = [softcap * math.tanh(x / softcap) for x in logits]
                if sinks is not None:
                    logits.append(float(sinks[h]))
                    vals.append(torch.zeros(D, dtype=torch.float64))
                if not logits:
                    continue
                m = max(logits)
                e = [math.exp(x - m) for x in logits]
                z = sum(e)
                out[b, h, i] = sum(w / z * val for w, val in zip(e, vals))
    return out


@pytest.mark.parametrize("window", [None, 1, 3, 8])
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("prefix_window", ["all", "sliding"])
@pytest.mark.parametrize("shape", [(5, 9, 3), (7, 7, 0), (1, 12, 4)])
def test_reference_matches_loop(window, softcap, sinks, prefix_window, shape) -> None:
    Nq, Nk, P = shape
    g = torch.Generator().manual_seed(Nq * 100 + Nk + P)
    B, H, Hkv, D = 2, 4, 2, 8
    q = torch.randn(B, H, Nq, D, generator=g, dtype=torch.float64) * 2
    k = torch.randn(B, Hkv, Nk, D, generator=g, dtype=torch.float64) * 2
    v = torch.randn(B, Hkv, Nk, D, generator=g, dtype=torch.float64)
    pk = torch.randn(B, Hkv, P, D, generator=g, dtype=torch.float64)
    pv = torch.randn(B, Hkv, P, D, generator=g, dtype=torch.float64)
    kpm = torch.ones(B, Nk, dtype=torch.bool)
    kpm[1, :4] = False  # left padding on row 1
    plen = torch.tensor([P, max(P - 2, 0)]) if P else None
    s = torch.randn(H, generator=g, dtype=torch.float64) if sinks else None
    ref = attention64(
        q, k, v, pk if P else None, pv if P else None, key_padding_mask=kpm,
        prefix_lengths=plen, window=window, softcap=softcap, sinks=s,
        prefix_window=prefix_window,
    )  # fmt: skip
    loop = _loop(q, k, v, pk, pv, kpm, window, softcap, s, prefix_window, plen)
    torch.testing.assert_close(ref, loop, rtol=1e-12, atol=1e-12)


def test_window_as_wide_as_keys_is_plain_causal() -> None:
    """A window covering every key changes nothing; a narrower one does."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 6, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 10, 8, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 10, 8, generator=g, dtype=torch.float64)
    plain = attention64(q, k, v)
    assert torch.equal(attention64(q, k, v, window=10), plain)
    assert not torch.allclose(attention64(q, k, v, window=9), plain)


def test_sink_gradient_formula() -> None:
    """dsink[h] = -sum_{b, i} exp(sink[h] - lse[b, h, i]) * rowsum(dO * O)[b, h, i]
    (the sink has no value: its dP is 0), checked against autograd and gradcheck."""
    g = torch.Generator().manual_seed(1)
    B, H, Nq, Nk, D, P = 2, 3, 5, 9, 8, 4
    q = torch.randn(B, H, Nq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, Nk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, Nk, D, generator=g, dtype=torch.float64)
    pk = torch.randn(H, P, D, generator=g, dtype=torch.float64)
    pv = torch.randn(H, P, D, generator=g, dtype=torch.float64)
    sinks = torch.randn(H, generator=g, dtype=torch.float64, requires_grad=True)
    do = torch.randn(B, H, Nq, D, generator=g, dtype=torch.float64)
    kw = dict(window=3, softcap=1.5)
    out = attention64(q, k, v, pk, pv, sinks=sinks, **kw)
    (auto,) = torch.autograd.grad(out, sinks, do)
    # the row's log-sum-exp over its visible logits and the sink
    s = torch.einsum("bhid,bhjd->bhij", q, torch.cat([pk.expand(B, -1, -1, -1), k], 2))
    s = 1.5 * torch.tanh(s / math.sqrt(D) / 1.5)
    pos = torch.arange(Nq)[:, None] + Nk - Nq
    j = torch.arange(Nk)[None, :]
    vis = torch.cat([torch.ones(Nq, P, dtype=torch.bool), (j <= pos) & (j > pos - 3)], 1)
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(
        torch.cat([s, sinks.detach().view(1, H, 1, 1).expand(B, H, Nq, 1)], -1), -1
    )
    delta = (do * out.detach()).sum(-1)  # [B, H, Nq]
    formula = -(torch.exp(sinks.detach()[None, :, None] - lse) * delta).sum((0, 2))
    torch.testing.assert_close(auto, formula, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda s_: attention64(q[:1, :, :3], k[:1], v[:1], pk, pv, sinks=s_, **kw), (sinks,)
    )


def test_softcap_gradient_gradcheck() -> None:
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 6, 8, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b: attention64(a * 3, b, v, softcap=0.7, window=2), (q, k)
    )
