"""The pure-PyTorch backend (the CPU default) against the float64 reference, including
bf16 (which the CPU interpreter cannot run through the kernel), and backend="auto"."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import DEVICE, HAS_CUDA
from helpers import Case, check_against_float64, make_inputs, run_with_grads
from test_kernel_values import CASES

import prefixattn

ref_attn = functools.partial(prefixattn.prefix_attention, backend="reference")


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str
)
@pytest.mark.parametrize("case", CASES, ids=Case.id)
def test_reference_matches_float64(case: Case, dtype: torch.dtype) -> None:
    check_against_float64(ref_attn, make_inputs(case, dtype, DEVICE), dtype)


def test_reference_gradcheck() -> None:
    c = Case(B=2, H=2, Hkv=1, Nq=4, Nk=5, P=2, D=16, prefix="bank", T=2, pad="left")
    kw = make_inputs(c, torch.float64, DEVICE)
    names = ["q", "k", "v", "prefix_k", "prefix_v"]
    rest = {n: t for n, t in kw.items() if n not in names}

    def f(*xs):
        return ref_attn(**dict(zip(names, xs)), **rest)

    assert torch.autograd.gradcheck(f, [kw[n] for n in names], eps=1e-6, atol=1e-6)


def test_auto_backend_choice() -> None:
    c = Case(B=2, H=2, Hkv=2, Nq=9, Nk=9, P=3, D=16, pad="right")
    kw = make_inputs(c, torch.float32, DEVICE)
    auto, _, _ = run_with_grads(functools.partial(prefixattn.prefix_attention, backend="auto"), kw)
    chosen = "triton" if HAS_CUDA else "sdpa"
    same, _, _ = run_with_grads(functools.partial(prefixattn.prefix_attention, backend=chosen), kw)
    assert torch.equal(auto, same)
