"""Sliding window, logit soft-capping and attention sinks on every backend against the
float64 reference (tests/reference64.py), with GQA, padding, banks + prefix_lengths,
decode past the window, dropout; blocks outside the window are never visited by the
Triton kernel; bad input raises errors naming the argument."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import DEVICE
from helpers import TOL, Case, check_against_float64, make_inputs
from reference64 import attention64, rel_err

import prefixattn


@dataclasses.dataclass
class Feat:
    window: int | None = None
    softcap: float | None = None
    sinks: bool = False
    prefix_window: str = "all"
    lengths: bool = False  # prefix_lengths (row / bank prefixes)

    def id(self) -> str:
        return (
            f"w{self.window}-c{self.softcap}-s{int(self.sinks)}-{self.prefix_window}"
            f"{'-len' if self.lengths else ''}"
        )


# (case, features): each feature alone and combined, with GQA, padding, banks, ragged
# lengths, decode past the window (Nq = 1), P in {0, 1, 7, 33}, D in {16, 40, 64, 80, 96}
GRID = [
    (Case(B=2, H=4, Hkv=2, Nq=17, Nk=29, P=7, D=40, prefix="shared", pad="left"), Feat(window=5)),
    (Case(B=2, H=2, Hkv=2, Nq=17, Nk=17, P=33, D=16, prefix="bank", pad="right", T=3),
     Feat(window=1, lengths=True)),
    (Case(B=3, H=4, Hkv=1, Nq=1, Nk=113, P=1, D=64, prefix="row"), Feat(window=8)),
    (Case(B=2, H=2, Hkv=2, Nq=40, Nk=40, P=33, D=32, prefix="shared"),
     Feat(window=7, prefix_window="sliding")),
    (Case(B=2, H=2, Hkv=1, Nq=17, Nk=17, P=7, D=32, prefix="bank", pad="left", T=3),
     Feat(window=20, prefix_window="sliding", lengths=True)),
    (Case(B=2, H=2, Hkv=2, Nq=17, Nk=17, P=7, D=96, prefix="shared", pad="random"),
     Feat(softcap=2.0)),
    (Case(B=2, H=2, Hkv=2, Nq=113, Nk=113, P=0, D=16, prefix="none"), Feat(window=6, softcap=0.5)),
    (Case(B=2, H=2, Hkv=2, Nq=17, Nk=17, P=0, D=16, prefix="none", pad="left"), Feat(sinks=True)),
    (Case(B=2, H=4, Hkv=1, Nq=33, Nk=40, P=7, D=80, prefix="bank", T=2),
     Feat(window=4, softcap=3.0, sinks=True)),
    (Case(B=2, H=2, Hkv=2, Nq=17, Nk=30, P=7, D=32, prefix="row", pad="left"),
     Feat(window=9, sinks=True, prefix_window="sliding", lengths=True)),
]  # fmt: skip


def _kwargs(case: Case, feat: Feat, dtype: torch.dtype, seed: int = 0) -> dict:
    kw = make_inputs(case, dtype, DEVICE, seed=seed)
    if feat.window is not None:
        kw["window"] = feat.window
        kw["prefix_window"] = feat.prefix_window
    if feat.softcap is not None:
        kw["softcap"] = feat.softcap
    if feat.sinks:
        g = torch.Generator().manual_seed(seed + 7)
        kw["sinks"] = (torch.randn(case.H, generator=g) * 2).to(DEVICE)
    if feat.lengths:
        n = case.B if case.prefix == "row" else case.T
        lens = [(case.P * (i + 1)) // n - (i % 2) for i in range(n)]
        kw["prefix_lengths"] = torch.tensor([max(x, 0) for x in lens], device=DEVICE)
    return kw


def _backend(name: str):
    def fn(**kw):
        return prefixattn.prefix_attention(**kw, backend=name)

    return fn


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize(("case", "feat"), GRID, ids=[f"{c.id()}-{f.id()}" for c, f in GRID])
def test_torch_backends_match_float64(case: Case, feat: Feat, backend: str) -> None:
    check_against_float64(_backend(backend), _kwargs(case, feat, torch.float32), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(("case", "feat"), GRID, ids=[f"{c.id()}-{f.id()}" for c, f in GRID])
def test_triton_matches_float64(case: Case, feat: Feat, dtype: torch.dtype) -> None:
    if dtype == torch.float16 and case.Nq * case.Nk > 1000:
        pytest.skip("fp16 on the small cases only (interpreter time)")
    check_against_float64(_backend("triton"), _kwargs(case, feat, dtype), dtype)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
def test_sink_gradient(backend: str) -> None:
    """dsink = -sum_{b,i} p_sink * Delta (autograd.sink_grad on Triton) = the float64
    reference's autograd gradient, with a window, soft-capping, GQA and padding."""
    case = Case(B=2, H=4, Hkv=2, Nq=17, Nk=23, P=7, D=32, prefix="shared", pad="left")
    kw = _kwargs(case, Feat(window=5, softcap=4.0, sinks=True), torch.float32)
    kw["sinks"].requires_grad_(True)
    out = prefixattn.prefix_attention(**kw, backend=backend)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    (ds,) = torch.autograd.grad(out, kw["sinks"], do)
    ref_kw = {k: (t.detach().double() if torch.is_tensor(t) and t.is_floating_point() else t)
              for k, t in kw.items()}  # fmt: skip
    ref_kw["sinks"].requires_grad_(True)
    (ref,) = torch.autograd.grad(attention64(**ref_kw), ref_kw["sinks"], do.double())
    assert ref.abs().min() > 0
    assert rel_err(ds, ref) < TOL[torch.float32][1]
    # bitwise reproducible
    out2 = prefixattn.prefix_attention(**kw, backend=backend)
    assert torch.equal(torch.autograd.grad(out2, kw["sinks"], do)[0], ds)


def test_window_blocks_outside_band_never_visited() -> None:
    """NaN in the keys/values of key blocks wholly left of every query's window: the
    Triton kernel never loads them (a visited block would spread NaN through p @ v), the
    output and dq are finite and equal to the reference, their dk/dv exactly 0."""
    c = Case(B=1, H=2, Hkv=2, Nq=16, Nk=160, P=3, D=16, prefix="shared")
    W = 20
    kw = _kwargs(c, Feat(window=W), torch.float32)
    first = c.Nk - c.Nq - W + 1  # first key query 0 sees
    cut = (first // 32) * 32  # whole 32-key blocks (the interpreter's BLOCK_N) before it
    assert cut >= 64
    clean = {k: t for k, t in kw.items()}
    for name in ("k", "v"):
        t = kw[name].detach().clone()
        t[:, :, :cut] = float("nan")
        kw[name] = t.requires_grad_(True)
    out = prefixattn.prefix_attention(**kw, backend="triton")
    assert torch.isfinite(out).all()
    dq, dk, dv = torch.autograd.grad(out, (kw["q"], kw["k"], kw["v"]), torch.ones_like(out))
    assert torch.isfinite(dq).all() and torch.isfinite(dk[:, :, cut:]).all()
    assert (dk[:, :, :cut] == 0).all() and (dv[:, :, :cut] == 0).all()
    ref = attention64(**{k: (t.detach() if torch.is_tensor(t) else t) for k, t in clean.items()})
    assert rel_err(out, ref) < 2e-5


def test_window_with_dropout_uses_the_forward_mask() -> None:
    """Dropout under a window: the kernel's keep mask (read back with one-hot values, as
    tests/test_dropout.py does) applied to the float64 reference gives the kernel's output
    and gradients."""
    from test_dropout import _keep_mask

    c = Case(B=2, H=2, Hkv=1, Nq=12, Nk=20, P=4, D=32, prefix="shared", pad="left", causal=False)
    p, seed = 0.25, 5
    keep = _keep_mask(c, p, seed)  # [B, H, Nq, P + Nk]: depends on (seed, row, column) only
    cw = dataclasses.replace(c, causal=True)
    kw = _kwargs(cw, Feat(window=6, softcap=2.0), torch.float32, seed=9)
    torch.manual_seed(seed)
    out = prefixattn.prefix_attention(**kw, backend="triton", dropout_p=p)
    names = ["q", "k", "v", "prefix_k", "prefix_v"]
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, [kw[n] for n in names], do)
    ref_kw = {k: (t.detach().double().requires_grad_(True) if k in names else t)
              for k, t in kw.items()}  # fmt: skip
    ref = attention64(**ref_kw, keep=keep, dropout_p=p)
    ref_grads = torch.autograd.grad(ref, [ref_kw[n] for n in names], do.double())
    assert rel_err(out, ref) < 2e-5
    for n, g, r in zip(names, grads, ref_grads):
        assert rel_err(g, r) < 5e-5, n


def test_decode_past_the_window_equals_prefill() -> None:
    """Nq = 1 steps over a growing cache past the window = the rows of one prefill."""
    c = Case(B=2, H=4, Hkv=2, Nq=24, Nk=24, P=5, D=16, prefix="bank", T=3)
    kw = _kwargs(c, Feat(window=6, sinks=True, prefix_window="sliding"), torch.float32)
    kw = {k: (t.detach() if torch.is_tensor(t) else t) for k, t in kw.items()}
    for backend in ("reference", "sdpa", "triton"):
        full = prefixattn.prefix_attention(**kw, backend=backend)
        for i in (5, 6, 13, 23):
            step = dict(kw, q=kw["q"][:, :, i : i + 1], k=kw["k"][:, :, : i + 1],
                        v=kw["v"][:, :, : i + 1])  # fmt: skip
            one = prefixattn.prefix_attention(**step, backend=backend)
            torch.testing.assert_close(one, full[:, :, i : i + 1], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        (dict(window=0), ValueError, "window"),
        (dict(window=-3), ValueError, "window"),
        (dict(window=2.5), TypeError, "window"),
        (dict(window=True), TypeError, "window"),
        (dict(window=4, causal=False), ValueError, "window"),
        (dict(softcap=0.0), ValueError, "softcap"),
        (dict(softcap=-1.0), ValueError, "softcap"),
        (dict(softcap=float("inf")), ValueError, "softcap"),
        (dict(softcap="1"), TypeError, "softcap"),
        (dict(sinks=torch.zeros(3)), ValueError, "sinks"),
        (dict(sinks=torch.zeros(2, 2)), ValueError, "sinks"),
        (dict(sinks=torch.zeros(2, dtype=torch.int64)), TypeError, "sinks"),
        (dict(sinks=[0.0, 0.0]), TypeError, "sinks"),
        (dict(window=4, prefix_window="peft"), ValueError, "prefix_window"),
    ],
)
@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
def test_bad_input(kwargs: dict, err: type, match: str, backend: str) -> None:
    q = torch.randn(1, 2, 4, 16)
    k = v = torch.randn(1, 2, 4, 16)
    with pytest.raises(err, match=match):
        prefixattn.prefix_attention(q, k, v, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_fullgraph_compile_traces_the_torch_paths(backend: str) -> None:
    """Under torch.compile a window / soft-capping / sinks call traces the sdpa and
    reference paths (no graph break) with the eager values; the Triton custom ops do not
    take them yet and say so."""
    case = Case(B=2, H=4, Hkv=2, Nq=9, Nk=15, P=3, D=16, prefix="shared", pad="left")
    kw = _kwargs(case, Feat(window=4, softcap=2.0, sinks=True), torch.float32)
    kw = {k: (t.detach() if torch.is_tensor(t) else t) for k, t in kw.items()}

    def f(q, k, v):
        return prefixattn.prefix_attention(**dict(kw, q=q, k=k, v=v), backend=backend)

    eager = f(kw["q"], kw["k"], kw["v"])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(kw["q"], kw["k"], kw["v"])
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-5)


def test_compile_with_triton_backend_says_not_supported() -> None:
    case = Case(B=1, H=2, Hkv=2, Nq=4, Nk=4, P=0, D=16, prefix="none")
    kw = _kwargs(case, Feat(window=2), torch.float32)
    kw = {k: (t.detach() if torch.is_tensor(t) else t) for k, t in kw.items()}

    def f(q):
        return prefixattn.prefix_attention(**dict(kw, q=q), backend="triton")

    with pytest.raises(Exception, match=r"torch\.compile"):
        torch.compile(f, fullgraph=True, backend="aot_eager")(kw["q"])
