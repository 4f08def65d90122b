"""Prefix gradients are bitwise identical from run to run (no float atomics)."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, HAS_CUDA
from helpers import Case, make_inputs, run_with_grads

import prefixattn

SIZE = (
    dict(B=8, H=4, Hkv=2, Nq=256, Nk=256, D=64, P=64)
    if HAS_CUDA
    else dict(B=3, H=2, Hkv=1, Nq=40, Nk=40, D=16, P=9)
)


@pytest.mark.parametrize("bwd_mode", ["split", "fused"])
@pytest.mark.parametrize("prefix", ["shared", "bank", "row"])
def test_prefix_grads_bitwise_reproducible(prefix: str, bwd_mode: str, settings) -> None:
    settings(backward=bwd_mode)
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    c = Case(**SIZE, prefix=prefix, T=3, pad="right")
    kw = make_inputs(c, dtype, DEVICE)

    def grads() -> dict:
        return run_with_grads(lambda **a: prefixattn.prefix_attention(**a, backend="triton"), kw)[2]

    first = grads()
    for _ in range(3):
        again = grads()
        for n in ("prefix_k", "prefix_v", "k", "v", "q"):
            assert torch.equal(first[n], again[n]), f"d{n} changed between runs"
