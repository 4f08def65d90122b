"""Hypothesis: random shapes, layouts, masks and flags, Triton vs the float64 reference."""

from __future__ import annotations

import functools

import torch
from conftest import DEVICE
from helpers import Case, check_against_float64, make_inputs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prefixattn


@st.composite
def cases(draw: st.DrawFn) -> Case:
    hkv = draw(st.sampled_from([1, 2]))
    prefix = draw(st.sampled_from(["none", "shared", "row", "bank"]))
    return Case(
        B=draw(st.integers(1, 3)),
        H=hkv * draw(st.sampled_from([1, 2, 4])),
        Hkv=hkv,
        Nq=draw(st.integers(1, 40)),
        Nk=draw(st.integers(0, 48)),
        P=0 if prefix == "none" else draw(st.integers(0, 35)),
        D=draw(st.sampled_from([16, 24, 40, 64, 72])),
        prefix=prefix,
        pad=draw(st.sampled_from(["none", "left", "right", "random"])),
        causal=draw(st.booleans()),
        T=draw(st.integers(1, 4)),
    )


@settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(case=cases(), dtype=st.sampled_from([torch.float32, torch.float16]))
def test_property_triton_matches_float64(case: Case, dtype: torch.dtype) -> None:
    kw = make_inputs(case, dtype, DEVICE, seed=case.Nq * 31 + case.Nk)
    check_against_float64(
        functools.partial(prefixattn.prefix_attention, backend="triton"), kw, dtype
    )
