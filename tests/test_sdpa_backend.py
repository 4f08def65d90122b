"""The ``"sdpa"`` backend (PyTorch's fused scaled_dot_product_attention; what
``backend="auto"`` runs off CUDA) against the float64 reference: values and all five
gradients on the awkward grid, every mask path, empty rows, dropout, determinism, and
``auto`` choosing it."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import DEVICE, HAS_CUDA
from helpers import Case, check_against_float64, make_inputs, run_with_grads
from reference64 import attention64, rel_err
from test_kernel_values import CASES

import prefixattn
from prefixattn.ops.attention import resolve_backend
from prefixattn.ops.sdpa import prefix_visibility_mask

sdpa_attn = functools.partial(prefixattn.prefix_attention, backend="sdpa")

# Cases for the mask paths the kernel grid (CASES) touches little: the shared [1, 1, Nq,
# P + Nk] mask with Nq < Nk and GQA, plain is_causal (P == 0, Nq == Nk), no mask at all (not
# causal / Nq == 1), P == 0 with rows that see nothing, Nq > Nk with a prefix.
PATH_CASES = [
    Case(B=2, H=4, Hkv=2, Nq=9, Nk=20, P=5, D=40, prefix="shared"),  # one mask for all rows
    Case(B=3, H=2, Hkv=1, Nq=17, Nk=17, P=0, D=32, prefix="none"),  # is_causal, square
    Case(B=2, H=4, Hkv=1, Nq=13, Nk=13, P=7, D=16, prefix="bank", T=3, causal=False),
    Case(B=3, H=2, Hkv=2, Nq=1, Nk=33, P=1, D=96, prefix="row"),  # decode: no mask
    Case(B=3, H=4, Hkv=2, Nq=1, Nk=33, P=7, D=80, prefix="bank", T=2, pad="random"),
    Case(B=3, H=6, Hkv=2, Nq=17, Nk=17, P=0, D=16, prefix="shared", pad="right"),  # empty
    Case(B=2, H=2, Hkv=2, Nq=33, Nk=7, P=7, D=16, prefix="row", pad="left"),  # Nq > Nk
]


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str
)
@pytest.mark.parametrize("case", CASES + PATH_CASES, ids=Case.id)
def test_sdpa_matches_float64(case: Case, dtype: torch.dtype) -> None:
    check_against_float64(sdpa_attn, make_inputs(case, dtype, DEVICE), dtype)


@pytest.mark.parametrize(
    "case",
    [
        Case(B=2, H=4, Hkv=2, Nq=17, Nk=23, P=7, D=40, prefix="shared", pad="left"),
        Case(B=2, H=2, Hkv=1, Nq=9, Nk=30, P=5, D=32, prefix="bank", T=3),
    ],
    ids=Case.id,
)
def test_noncontiguous_inputs(case: Case) -> None:
    """HF-style [B, N, H, D] views and strided prefixes go in as they are."""
    kw = make_inputs(case, torch.float32, DEVICE, noncontiguous=True)
    assert not kw["q"].is_contiguous() and not kw["prefix_v"].is_contiguous()
    check_against_float64(sdpa_attn, kw, torch.float32)


def test_sdpa_gradcheck() -> None:
    """float64 gradcheck through the per-row mask (bank, padding) and the mask shared by
    the rows (shared prefix, Nq < Nk)."""
    for c in (
        Case(B=2, H=2, Hkv=1, Nq=4, Nk=5, P=2, D=16, prefix="bank", T=2, pad="left"),
        Case(B=2, H=2, Hkv=1, Nq=3, Nk=6, P=2, D=16, prefix="shared"),
    ):
        kw = make_inputs(c, torch.float64, DEVICE)
        names = ["q", "k", "v", "prefix_k", "prefix_v"]
        rest = {n: t for n, t in kw.items() if n not in names}

        def f(*xs, names=names, rest=rest):
            return sdpa_attn(**dict(zip(names, xs)), **rest)

        assert torch.autograd.gradcheck(
            f, [kw[n] for n in names], eps=1e-6, atol=1e-6, fast_mode=True
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_empty_rows_are_zero_with_zero_grads(dtype: torch.dtype) -> None:
    """P == 0 and rows that see nothing (Nq > Nk, fully padded rows): exact zeros, zero
    gradients, never NaN."""
    c = Case(B=2, H=2, Hkv=2, Nq=12, Nk=5, P=0, D=16, prefix="none", pad="left")
    kw = make_inputs(c, dtype, DEVICE)
    out, _, grads = run_with_grads(sdpa_attn, kw)
    # row 1 of the batch has every key padded; queries i < Nq - Nk see no key at all
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(out[0, :, : c.Nq - c.Nk], torch.zeros_like(out[0, :, : c.Nq - c.Nk]))
    assert out[0, :, -1].abs().sum() > 0
    for g in grads.values():
        assert torch.isfinite(g).all()
    assert torch.equal(grads["q"][1], torch.zeros_like(grads["q"][1]))
    assert torch.equal(grads["q"][0, :, :7], torch.zeros_like(grads["q"][0, :, :7]))
    assert torch.equal(grads["k"][1], torch.zeros_like(grads["k"][1]))
    assert grads["k"][0].abs().sum() > 0


def test_zero_length_prefix_equals_no_prefix() -> None:
    c = Case(B=2, H=2, Hkv=1, Nq=9, Nk=11, P=0, D=16, prefix="shared", pad="random")
    kw = make_inputs(c, torch.float32, DEVICE)
    out, g, grads = run_with_grads(sdpa_attn, kw)
    plain = {n: t for n, t in kw.items() if n not in ("prefix_k", "prefix_v")}
    out0, _, grads0 = run_with_grads(sdpa_attn, plain, grad_out=g)
    assert torch.equal(out, out0)
    assert torch.equal(grads["q"], grads0["q"])
    # the empty prefix is part of the graph (no allow_unused) and gets empty gradients
    dpk, dpv = torch.autograd.grad(sdpa_attn(**kw).sum(), [kw["prefix_k"], kw["prefix_v"]])
    assert dpk.shape == (1, 0, 16) and dpv.shape == (1, 0, 16)


def test_custom_scale_and_zero_batch() -> None:
    c = Case(B=2, H=2, Hkv=2, Nq=9, Nk=9, P=3, D=16, pad="right")
    kw = make_inputs(c, torch.float32, DEVICE)
    out = sdpa_attn(**kw, sm_scale=0.3)
    ref = attention64(**{n: t.detach() if torch.is_tensor(t) else t for n, t in kw.items()},
                      sm_scale=0.3)  # fmt: skip
    assert rel_err(out, ref) < 2e-5
    q = torch.randn(0, 2, 5, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(0, 2, 5, 16, device=DEVICE)
    pk = torch.randn(2, 3, 16, device=DEVICE, requires_grad=True)
    out = sdpa_attn(q, k, k, pk, pk.detach())
    assert out.shape == (0, 2, 5, 16)
    (g,) = torch.autograd.grad(out.sum(), [pk])
    assert torch.equal(g, torch.zeros_like(pk))


@pytest.mark.parametrize(
    "case",
    [
        Case(B=4, H=4, Hkv=2, Nq=17, Nk=17, P=7, D=32, prefix="shared", pad="left"),
        Case(B=5, H=2, Hkv=1, Nq=9, Nk=12, P=5, D=16, prefix="bank", T=3),
    ],
    ids=Case.id,
)
def test_prefix_gradients_are_bitwise_reproducible(case: Case) -> None:
    kw = make_inputs(case, torch.float32, DEVICE)
    _, g, first = run_with_grads(sdpa_attn, kw)
    for _ in range(2):
        _, _, again = run_with_grads(sdpa_attn, kw, grad_out=g)
        assert torch.equal(again["prefix_k"], first["prefix_k"])
        assert torch.equal(again["prefix_v"], first["prefix_v"])


def test_visibility_mask_with_per_row_prefix_visibility() -> None:
    """The mask helper against a hand-built mask, incl. the per-row prefix visibility that
    a per-entry prefix length would use (row b sees its first L[b] prefix keys)."""
    Nq, Nk, P = 4, 6, 3
    kpm = torch.tensor([[True] * 6, [False, False, True, True, True, True]])
    lengths = torch.tensor([3, 1])
    pre = torch.arange(P)[None, :] < lengths[:, None]  # [B, P]
    got = prefix_visibility_mask(Nq, Nk, P, True, kpm, torch.device("cpu"), pre)
    assert got.shape == (2, 1, Nq, P + Nk)
    want = torch.zeros(2, Nq, P + Nk, dtype=torch.bool)
    for b in range(2):
        for i in range(Nq):
            for c in range(P + Nk):
                if c < P:
                    want[b, i, c] = bool(c < lengths[b])
                else:
                    j = c - P
                    want[b, i, c] = bool(j <= i + Nk - Nq and kpm[b, j])
    assert torch.equal(got[:, 0], want)
    # no padding, no per-row part: one mask broadcast over the batch
    shared = prefix_visibility_mask(Nq, Nk, P, True, None, torch.device("cpu"))
    assert shared.shape == (1, 1, Nq, P + Nk) and torch.equal(shared[0, 0], want[0])


# --------------------------------------------------------------------------------------
# dropout: SDPA's own, read back with one-hot values
# --------------------------------------------------------------------------------------


def _keep_mask(c: Case, p: float, seed: int) -> torch.Tensor:
    """With one-hot values (v_c = e_c over the P + Nk columns) output row i *is* row i of
    (probs * keep / (1 - p)): 0 exactly where dropped (or masked)."""
    n = c.P + c.Nk
    assert n <= c.D
    kw = make_inputs(c, torch.float32, DEVICE, seed=5)
    eye = torch.eye(c.D, device=DEVICE)
    kw = {k: (t.detach() if torch.is_tensor(t) else t) for k, t in kw.items()}
    kw["prefix_v"] = eye[: c.P].expand(kw["prefix_v"].shape).contiguous()
    kw["v"] = eye[c.P : n].expand(c.B, c.Hkv, c.Nk, c.D).contiguous()
    torch.manual_seed(seed)
    out = sdpa_attn(**kw, dropout_p=p)
    return out[..., :n] != 0  # [B, H, Nq, P + Nk]


def test_dropout_keep_rate_and_seeding() -> None:
    c = Case(B=4, H=4, Hkv=2, Nq=24, Nk=24, P=8, D=64, causal=False)
    p = 0.3
    keep = _keep_mask(c, p, seed=11)
    rate = keep.float().mean().item()
    sd = (p * (1 - p) / keep.numel()) ** 0.5
    assert abs(rate - (1 - p)) < 5 * sd, f"keep rate {rate:.4f}, expected {1 - p} +- {5 * sd:.4f}"
    assert not torch.equal(keep, _keep_mask(c, p, seed=12))
    assert torch.equal(keep, _keep_mask(c, p, seed=11))
    kw = make_inputs(c, torch.float32, DEVICE)
    state = torch.get_rng_state()
    out0 = sdpa_attn(**kw, dropout_p=0.0)
    assert torch.equal(torch.get_rng_state(), state), "p = 0 must not draw random numbers"
    assert torch.equal(out0, sdpa_attn(**kw))


@pytest.mark.parametrize(
    "c",
    [
        Case(B=2, H=4, Hkv=2, Nq=12, Nk=20, P=8, D=64, prefix="shared", pad="left"),
        Case(B=3, H=2, Hkv=2, Nq=12, Nk=20, P=8, D=64, prefix="bank", T=2),
    ],
    ids=Case.id,
)
def test_dropout_backward_uses_the_forward_mask(c: Case) -> None:
    """Forward and all gradients equal the float64 reference run with the mask SDPA drew
    (read back with one-hot values under the same seed)."""
    p, seed = 0.2, 123
    keep = _keep_mask(c, p, seed)
    kw = make_inputs(c, torch.float32, DEVICE, seed=5)
    torch.manual_seed(seed)
    out, g, grads = run_with_grads(functools.partial(sdpa_attn, dropout_p=p), kw)
    ref_kw = {n: (t.detach().double().requires_grad_(True) if t.is_floating_point() else t)
              if torch.is_tensor(t) else t for n, t in kw.items()}  # fmt: skip
    fn = functools.partial(attention64, keep=keep, dropout_p=p)
    ref_out, _, ref_grads = run_with_grads(fn, ref_kw, grad_out=g.double())
    assert rel_err(out, ref_out) < 3e-5
    for n, gr in grads.items():
        assert rel_err(gr, ref_grads[n]) < 1e-4, n


# --------------------------------------------------------------------------------------
# backend="auto" and torch.compile
# --------------------------------------------------------------------------------------


def test_auto_picks_sdpa_off_cuda() -> None:
    x = torch.randn(1, 2, 4, 16)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        assert resolve_backend("auto", x.to(dtype)) == "sdpa"
    assert resolve_backend("reference", x) == "reference"
    if HAS_CUDA:
        assert resolve_backend("auto", x.cuda()) == "triton"
        assert resolve_backend("auto", x.cuda().double()) == "sdpa"
    c = Case(B=2, H=4, Hkv=2, Nq=9, Nk=9, P=3, D=16, pad="right")
    kw = make_inputs(c, torch.float32, "cpu")
    auto, g, auto_grads = run_with_grads(
        functools.partial(prefixattn.prefix_attention, backend="auto"), kw
    )
    same, _, same_grads = run_with_grads(sdpa_attn, kw, grad_out=g)
    assert torch.equal(auto, same)
    for n in auto_grads:
        assert torch.equal(auto_grads[n], same_grads[n]), n


@pytest.mark.parametrize(
    "case",
    [
        Case(B=2, H=4, Hkv=2, Nq=9, Nk=9, P=3, D=16, prefix="shared", pad="right"),
        Case(B=3, H=4, Hkv=2, Nq=5, Nk=11, P=4, D=16, prefix="bank", T=2),
    ],
    ids=Case.id,
)
def test_fullgraph_compile_matches_eager(case: Case) -> None:
    """Under torch.compile the sdpa path traces into one graph with the eager values."""
    from test_compile import RecordingBackend, compare

    torch._dynamo.reset()
    kw = make_inputs(case, torch.float32, DEVICE)

    def f(**kw):
        return prefixattn.prefix_attention(**kw, backend="sdpa")

    rec = RecordingBackend()
    compare(f, torch.compile(f, fullgraph=True, backend=rec), kw, atol=1e-6)
    assert len(rec.graphs) == 1
    assert any("scaled_dot_product" in name for name in rec.ops())
    torch._dynamo.reset()


def test_demo_step_time_script_runs() -> None:
    """scripts/demo_step_time.py on the tiny model: one JSON line per backend and the
    paired ratio (no timing is asserted)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("transformers")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "scripts/demo_step_time.py", "--tiny", "--rounds", "2", "--steps", "1"],
        capture_output=True, text=True, env=env, cwd=root, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    rows = [json.loads(ln) for ln in lines[:2]]
    assert [r["backend"] for r in rows] == ["reference", "sdpa"]
    assert all(r["s_per_step_median"] > 0 and r["rounds"] == 2 for r in rows)
    assert lines[2].startswith("sdpa / reference: ratio of medians")
