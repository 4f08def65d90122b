"""Attention dropout in the kernel: exact no-dropout path at p = 0, an unbiased output,
and a backward that uses exactly the forward's mask."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import DEVICE
from helpers import Case, make_inputs, run_with_grads
from reference64 import attention64, rel_err

import prefixattn

triton_attn = functools.partial(prefixattn.prefix_attention, backend="triton")


def test_p_zero_is_the_exact_no_dropout_path() -> None:
    kw = make_inputs(
        Case(B=2, H=2, Hkv=1, Nq=9, Nk=13, P=5, D=16, pad="left"), torch.float32, DEVICE
    )
    state = torch.get_rng_state()
    out0 = triton_attn(**kw, dropout_p=0.0)
    assert torch.equal(torch.get_rng_state(), state), "p = 0 must not draw random numbers"
    assert torch.equal(out0, triton_attn(**kw))


def _keep_mask(c: Case, p: float, seed: int) -> torch.Tensor:
    """Read the kernel's keep mask back: with one-hot values (v_c = e_c over the P + Nk
    columns) the output row i *is* row i of (P * Z), which is 0 exactly where dropped."""
    n = c.P + c.Nk
    assert n <= c.D
    kw = make_inputs(c, torch.float32, DEVICE, seed=5)
    eye = torch.eye(c.D, device=DEVICE)
    kw = {k: (t.detach() if torch.is_tensor(t) else t) for k, t in kw.items()}
    kw["prefix_v"] = eye[: c.P].expand(kw["prefix_v"].shape).contiguous()
    kw["v"] = eye[c.P : n].expand(c.B, c.Hkv, c.Nk, c.D).contiguous()
    torch.manual_seed(seed)
    out = triton_attn(**kw, dropout_p=p)
    return out[..., :n] != 0  # [B, H, Nq, P + Nk]


def test_keep_rate_matches_p() -> None:
    c = Case(B=4, H=4, Hkv=2, Nq=24, Nk=24, P=8, D=64, causal=False)
    p = 0.3
    keep = _keep_mask(c, p, seed=11)
    n = keep.numel()
    rate = keep.float().mean().item()
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(rate - (1 - p)) < 5 * sd, f"keep rate {rate:.4f}, expected {1 - p} +- {5 * sd:.4f}"
    # a different seed gives a different mask; the same seed the same one
    assert not torch.equal(keep, _keep_mask(c, p, seed=12))
    assert torch.equal(keep, _keep_mask(c, p, seed=11))


def test_output_is_unbiased() -> None:
    """Mean over 64 rows with identical inputs (independent masks per row) ~ no dropout."""
    c = Case(B=1, H=2, Hkv=2, Nq=8, Nk=16, P=4, D=16)
    kw = make_inputs(c, torch.float32, DEVICE, seed=2)
    reps = 64
    rep = {
        "q": kw["q"].detach().expand(reps, -1, -1, -1),
        "k": kw["k"].detach().expand(reps, -1, -1, -1),
        "v": kw["v"].detach().expand(reps, -1, -1, -1),
        "prefix_k": kw["prefix_k"].detach(),
        "prefix_v": kw["prefix_v"].detach(),
    }
    torch.manual_seed(0)
    out = triton_attn(**rep, dropout_p=0.25)  # [reps, H, Nq, D]
    ref = triton_attn(**rep, dropout_p=0.0)[0]
    mean, sem = out.mean(0), out.std(0) / reps**0.5
    z = ((mean - ref) / sem.clamp_min(1e-6)).abs()
    assert (z < 4).float().mean() > 0.97, f"z-scores too large: max {z.max():.1f}"
    assert not torch.allclose(out[0], out[1]), "rows must get independent masks"


@pytest.mark.parametrize(
    "c",
    [
        Case(B=2, H=4, Hkv=2, Nq=12, Nk=20, P=8, D=64, prefix="shared", pad="left"),
        Case(B=3, H=2, Hkv=2, Nq=12, Nk=20, P=8, D=64, prefix="bank", T=2, causal=False),
    ],
    ids=Case.id,
)
def test_backward_uses_the_forward_mask(c: Case) -> None:
    """Forward and all gradients equal the float64 reference run with the kernel's own
    mask (read back with one-hot values under the same seed)."""
    p, seed = 0.2, 123
    keep = _keep_mask(c, p, seed)
    kw = make_inputs(c, torch.float32, DEVICE, seed=5)
    torch.manual_seed(seed)
    out, g, grads = run_with_grads(functools.partial(triton_attn, dropout_p=p), kw)
    ref_kw = {n: (t.detach().double().requires_grad_(True) if t.is_floating_point() else t)
              if torch.is_tensor(t) else t for n, t in kw.items()}  # fmt: skip
    fn = functools.partial(attention64, keep=keep, dropout_p=p)
    ref_out, _, ref_grads = run_with_grads(fn, ref_kw, grad_out=g.double())
    assert rel_err(out, ref_out) < 3e-5
    for n, gr in grads.items():
        assert rel_err(gr, ref_grads[n]) < 1e-4, n
