"""The ``sdpa`` backend's paths for soft-capping and attention sinks (ops/sdpa_features.py):
values and every gradient (the sinks' too) against the float64 reference on awkward
shapes, fp32 and bf16, over several query blocks; no [B, H, Nq, Nk] score matrix is ever
allocated (measured with the profiler, and the reference path shown to allocate it);
the path each call takes is logged once, the materialising one warns."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from helpers import TOL, Case, make_inputs
from reference64 import attention64, rel_err

import prefixattn
from prefixattn.ops import sdpa_features


@dataclasses.dataclass
class F:
    softcap: float | None = None
    sinks: bool = False
    window: int | None = None
    prefix_window: str = "all"
    lengths: bool = False

    def id(self) -> str:
        return (
            f"c{self.softcap}-s{int(self.sinks)}-w{self.window}-{self.prefix_window}"
            f"{'-len' if self.lengths else ''}"
        )


# sinks alone (flash + lse), soft-capping alone and both (chunked); GQA, P in {0, 7, 33},
# shared / row / bank prefixes with ragged lengths, padding (the last row of "left" and
# "right" fully padded: with P = 0 it sees nothing), Nq != Nk, Nq > Nk, decode, non-causal
GRID = [
    (Case(B=2, H=4, Hkv=2, Nq=17, Nk=17, P=0, D=40, prefix="none", pad="left"), F(sinks=True)),
    (Case(B=2, H=2, Hkv=2, Nq=5, Nk=23, P=7, D=16, prefix="shared"), F(sinks=True, window=6)),
    (Case(B=3, H=2, Hkv=1, Nq=17, Nk=17, P=33, D=32, prefix="bank", pad="right", T=2),
     F(sinks=True, lengths=True)),
    (Case(B=2, H=4, Hkv=4, Nq=1, Nk=40, P=7, D=80, prefix="row"), F(sinks=True)),
    (Case(B=2, H=4, Hkv=2, Nq=33, Nk=40, P=7, D=96, prefix="row", pad="random"),
     F(softcap=2.0, window=9)),
    (Case(B=1, H=4, Hkv=1, Nq=113, Nk=113, P=0, D=16, prefix="none"), F(softcap=1.5)),
    (Case(B=2, H=2, Hkv=1, Nq=17, Nk=29, P=33, D=32, prefix="bank", pad="left", T=3),
     F(softcap=3.0, sinks=True, window=5, prefix_window="sliding", lengths=True)),
    (Case(B=2, H=2, Hkv=2, Nq=20, Nk=13, P=7, D=40, prefix="shared", causal=False),
     F(softcap=5.0, sinks=True)),
    (Case(B=2, H=2, Hkv=2, Nq=23, Nk=9, P=0, D=16, prefix="none", pad="left"),
     F(softcap=2.0, sinks=True)),
]  # fmt: skip
IDS = [f"{c.id()}-{f.id()}" for c, f in GRID]
NAMES = ("q", "k", "v", "prefix_k", "prefix_v", "sinks")
DEFAULT_BLOCK_ELEMS = sdpa_features.BLOCK_ELEMS


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 16 query rows: the tiny shapes run several blocks (and a partial one)."""
    monkeypatch.setattr(sdpa_features, "BLOCK_ELEMS", 1)


def _inputs(case: Case, feat: F, dtype: torch.dtype) -> dict:
    kw = make_inputs(case, dtype, "cpu")
    if feat.window is not None:
        kw["window"], kw["prefix_window"] = feat.window, feat.prefix_window
    if feat.softcap is not None:
        kw["softcap"] = feat.softcap
    if feat.sinks:
        g = torch.Generator().manual_seed(7)
        kw["sinks"] = (torch.randn(case.H, generator=g) * 2).requires_grad_(True)
    if feat.lengths:
        n = case.B if case.prefix == "row" else case.T
        kw["prefix_lengths"] = torch.tensor([(case.P * (i + 1)) // n - i % 2 for i in range(n)])
    return kw


def _grads(out: torch.Tensor, kw: dict, do: torch.Tensor) -> dict:
    names = [n for n in NAMES if n in kw]
    gs = torch.autograd.grad(out, [kw[n] for n in names], do, allow_unused=True)
    return {n: torch.zeros_like(kw[n]) if g is None else g for n, g in zip(names, gs)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("case", "feat"), GRID, ids=IDS)
def test_feature_paths_match_float64(case: Case, feat: F, dtype: torch.dtype) -> None:
    kw = _inputs(case, feat, dtype)
    out = prefixattn.prefix_attention(**kw, backend="sdpa")
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = _grads(out, kw, do)
    ref_kw = {n: (t.detach().double().requires_grad_(True) if n in NAMES else t)
              for n, t in kw.items()}  # fmt: skip
    ref = attention64(**ref_kw)
    ref_grads = _grads(ref, ref_kw, do.double())
    tol_o, tol_g = TOL[dtype]
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, ref) < tol_o
    for n, g in grads.items():
        assert g.shape == kw[n].shape and g.dtype == kw[n].dtype and torch.isfinite(g).all(), n
        if ref_grads[n].abs().max() == 0:
            assert g.abs().max() <= tol_g, f"d{n} should be 0"
            continue
        assert rel_err(g, ref_grads[n]) < tol_g, f"d{n}: {rel_err(g, ref_grads[n]):.2e}"


def test_rows_that_see_nothing_are_zero() -> None:
    """P = 0, the last row fully padded: output and gradients of that row exactly 0."""
    c = Case(B=2, H=2, Hkv=1, Nq=9, Nk=9, P=0, D=16, prefix="none", pad="left")
    for feat in (F(sinks=True), F(softcap=2.0), F(softcap=2.0, sinks=True)):
        kw = _inputs(c, feat, torch.float32)
        out = prefixattn.prefix_attention(**kw, backend="sdpa")
        (dq,) = torch.autograd.grad(out, kw["q"], torch.ones_like(out))
        assert (out[-1] == 0).all() and (dq[-1] == 0).all(), feat


def _max_alloc(fn) -> int:
    """The largest CPU allocation (bytes) any op made while ``fn()`` ran (the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.cpu_memory_usage for e in prof.events())


# N = 2048, H = 4: one [B, H, Nq, Nk] float32 score matrix is 64 MiB
BIG = Case(B=1, H=4, Hkv=2, Nq=2048, Nk=2048, P=0, D=16, prefix="none")
FULL = BIG.B * BIG.H * BIG.Nq * BIG.Nk * 4


def test_reference_allocates_the_score_matrix() -> None:
    """What soft-capping / sinks ran on ``sdpa`` before: the measure below can fail."""
    kw = _inputs(BIG, F(softcap=30.0, sinks=True), torch.float32)
    with torch.no_grad():
        assert _max_alloc(lambda: prefixattn.prefix_attention(**kw, backend="reference")) >= FULL


@pytest.mark.parametrize("feat", [F(softcap=30.0), F(sinks=True), F(softcap=30.0, sinks=True)],
                         ids=lambda f: f.id())  # fmt: skip
def test_no_score_matrix(monkeypatch: pytest.MonkeyPatch, feat: F) -> None:
    """The sdpa paths, forward and backward, at the default block size, never allocate
    half of the [B, H, Nq, Nk] scores (the reference allocates all of it, above)."""
    monkeypatch.setattr(sdpa_features, "BLOCK_ELEMS", DEFAULT_BLOCK_ELEMS)
    kw = _inputs(BIG, feat, torch.float32)

    def run() -> None:
        prefixattn.prefix_attention(**kw, backend="sdpa").sum().backward()

    assert _max_alloc(run) < FULL // 2


def test_path_logged_once_and_reference_warns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sdpa_features, "_seen", set())
    c = Case(B=1, H=2, Hkv=2, Nq=8, Nk=8, P=3, D=16, prefix="shared")
    caplog.set_level(logging.DEBUG, logger="prefixattn")
    for _ in range(2):
        for feat in (F(), F(sinks=True), F(softcap=2.0), F(softcap=2.0, sinks=True)):
            prefixattn.prefix_attention(**_inputs(c, feat, torch.float32), backend="sdpa")
    msgs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sdpa path:")]
    assert msgs == [
        "sdpa path: fused SDPA",
        "sdpa path: flash+lse sink rescale",
        "sdpa path: chunked exact (query blocks)",
    ]
    kw = _inputs(c, F(softcap=2.0), torch.float32)
    with pytest.warns(RuntimeWarning, match="materializes .* dropout with soft-capping"):
        prefixattn.prefix_attention(**kw, backend="sdpa", dropout_p=0.1)
    # once: the second call is silent (and on the same path)
    caplog.clear()
    prefixattn.prefix_attention(**kw, backend="sdpa", dropout_p=0.1)
    assert not [r for r in caplog.records if r.getMessage().startswith("sdpa path:")]


def test_describe_paths_is_what_calls_take() -> None:
    rows = dict(sdpa_features.describe_paths("cpu"))
    assert rows["plain"] == sdpa_features.PATH_FUSED
    assert rows["sinks"] == sdpa_features.PATH_SINK
    assert rows["softcap"] == rows["softcap+sinks"] == sdpa_features.PATH_CHUNKED
    assert rows["softcap|sinks with dropout"].startswith(sdpa_features.PATH_REFERENCE)
    # off the CPU (no flash kernel that returns the log-sum-exp) sinks go the chunked way
    assert dict(sdpa_features.describe_paths("cuda"))["sinks"] == sdpa_features.PATH_CHUNKED


@pytest.mark.parametrize("feat", [F(softcap=2.0), F(softcap=2.0, sinks=True), F(sinks=True)])
def test_strided_inputs_as_a_model_passes_them(feat: F) -> None:
    """q, k, v as transformers' attention hands them over: [B, N, H, D] projections
    transposed to [B, H, N, D] (not contiguous), GQA, several query blocks; a bank prefix.
    The feature paths take any strides (a Gemma-2 forward once failed on a view)."""
    g = torch.Generator().manual_seed(3)
    B, H, Hkv, N, D, P = 2, 4, 2, 37, 16, 5
    base = [torch.randn(B, N, h, D, generator=g).requires_grad_(True) for h in (H, Hkv, Hkv)]
    q, k, v = (t.transpose(1, 2) for t in base)  # [B, H(kv), N, D], strided
    pk, pv = (torch.randn(3, Hkv, P, D, generator=g) for _ in range(2))
    idx = torch.tensor([2, 0])
    kw = {"prefix_index": idx, "softcap": feat.softcap}
    if feat.sinks:
        kw["sinks"] = torch.randn(H, generator=g)
    assert not q.is_contiguous()
    got = prefixattn.prefix_attention(q, k, v, pk, pv, backend="sdpa", **kw)
    (dq,) = torch.autograd.grad(got.square().sum(), base[0])
    q64 = base[0].detach().double().requires_grad_(True)
    want = attention64(q64.transpose(1, 2), k.double(), v.double(), pk.double(), pv.double(), **kw)
    (dq64,) = torch.autograd.grad(want.square().sum(), q64)
    tol_o, tol_g = TOL[torch.float32]
    assert rel_err(got, want) < tol_o, rel_err(got, want)
    assert rel_err(dq, dq64) < tol_g, rel_err(dq, dq64)


def _chunked64(q, k, v, sinks, mask, softcap, scale):
    """Float64 attention with soft-capping, sinks and a bool mask, materialised (the test's
    own reference for direct :class:`ChunkedAttention` calls); a row that sees nothing is 0."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)  # [B, H, Nk, D]
    s = q @ k.transpose(-1, -2) * scale  # [B, H, Nq, Nk]
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask, float("-inf"))
    cols = [s]
    if sinks is not None:
        cols.append(sinks.view(1, -1, 1, 1).expand(*s.shape[:-1], 1))
    p = torch.softmax(torch.cat(cols, -1), -1)[..., : s.shape[-1]].nan_to_num(0.0)
    return p @ v


# a bottom-right causal band (window), rows of a tall Nq > Nk call that see no key at all
# (whole blocks of 16 rows skipped), the causal diagonal fill (no mask), key padding, a
# mask with every key visible (no fill)
MASKS = ["window", "empty_blocks", "is_causal", "padding", "all_visible"]


def _mask(kind: str, B: int, Nq: int, Nk: int) -> torch.Tensor:
    i, j = torch.arange(Nq)[:, None], torch.arange(Nk)[None, :]
    off = Nk - Nq
    if kind == "window":
        m = (j <= i + off) & (j > i + off - 5)
    elif kind in ("empty_blocks", "is_causal"):
        m = j <= i + off
    elif kind == "padding":
        m = torch.ones(B, 1, Nq, Nk, dtype=torch.bool)
        m[1, :, :, Nk - 10 :] = False
        return m
    else:
        m = torch.ones(Nq, Nk, dtype=torch.bool)
    return m.expand(B, 1, Nq, Nk)


@pytest.mark.parametrize("softcap", [0.0, 3.0, 100.0], ids=lambda c: f"c{c}")
@pytest.mark.parametrize("kind", MASKS)
def test_chunked_skips_keys_and_blocks(kind: str, softcap: float) -> None:
    """The chunked path computes only each block's key span (a window's block skips the
    keys left of it, a block whose rows see nothing is skipped) and stays exact: values and
    every gradient against a float64 reference. Soft-capping 3 takes the fixed shift (no row
    max; one sink logit of 60 > C shifts that head), 100 the row-max fallback, 0 plain."""
    B, H, Hkv, D = 2, 4, 2, 16
    Nq, Nk = (70, 20) if kind == "empty_blocks" else (70, 70)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((H, Nq), (Hkv, Nk), (Hkv, Nk)))
    sinks = torch.tensor([-1.0, 2.0, 60.0, 0.5]) if softcap != 100.0 else None
    ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
    sk = None if sinks is None else sinks.clone().requires_grad_(True)
    mask = _mask(kind, B, Nq, Nk)
    is_causal, causal = kind == "is_causal", kind in ("window", "empty_blocks")
    scale = D**-0.5
    out = sdpa_features.feature_attention(
        sdpa_features.PATH_CHUNKED, *ins, sk, softcap, attn_mask=None if is_causal else mask,
        is_causal=is_causal, scale=scale, causal=causal,
    )  # fmt: skip
    ref_ins = [t.double().requires_grad_(True) for t in (q, k, v)]
    ref_sk = None if sinks is None else sinks.double().requires_grad_(True)
    ref = _chunked64(*ref_ins, ref_sk, mask, softcap, scale)
    do = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, [*ins, *([sk] if sk is not None else [])], do)
    want = torch.autograd.grad(
        ref, [*ref_ins, *([ref_sk] if ref_sk is not None else [])], do.double()
    )
    tol_o, tol_g = TOL[torch.float32]
    assert rel_err(out, ref) < tol_o, f"out: {rel_err(out, ref):.2e}"
    for name, a, b in zip(["q", "k", "v", "sinks"], got, want):
        assert torch.isfinite(a).all() and rel_err(a, b) < tol_g, f"d{name}: {rel_err(a, b):.2e}"

    # the spans: derived from the mask's shape here, not from the mask's values
    pl = sdpa_features._Plan(q, k, sinks, scale, softcap)
    assert pl.step == 16 and pl.fixed == (softcap == 3.0)
    spans = [b[:4] for b in pl.blocks(None if is_causal else mask, is_causal, causal)]
    blocks = [(i0, min(Nq, i0 + 16)) for i0 in range(0, Nq, 16)]
    if kind == "window":  # rows [i0, i1) see keys (i0 - 5, i1 - 1]
        assert spans == [(i0, i1, max(0, i0 - 4), i1) for i0, i1 in blocks]
    elif kind == "empty_blocks":  # row i sees keys j <= i - 50: rows < 50 see nothing
        assert spans == [(i0, i1, 0, i1 - 50) for i0, i1 in blocks if i1 > 50]
        assert len(spans) == 2
    else:
        assert spans == [(i0, i1, 0, i1 if is_causal else Nk) for i0, i1 in blocks]
