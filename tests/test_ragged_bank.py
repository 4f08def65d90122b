"""A ragged bank: ``prefix_lengths`` [T] lets bank entry t expose only its first
``prefix_lengths[t]`` prefix keys. Forward and all five gradients against the float64
reference (Triton through the interpreter on CPU, and the reference backend), exact zeros
on the invisible keys, the zeros-not-NaN rule, and the bad-input catalogue."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import DEVICE, HAS_CUDA
from helpers import Case, check_against_float64, make_inputs, run_with_grads
from reference64 import attention64, rel_err

import prefixattn
from prefixattn.ops.settings import KernelConfig, use_settings

triton_attn = functools.partial(prefixattn.prefix_attention, backend="triton")
ref_attn = functools.partial(prefixattn.prefix_attention, backend="reference")
sdpa_attn = functools.partial(prefixattn.prefix_attention, backend="sdpa")


def ragged_inputs(
    c: Case, dtype: torch.dtype, lengths: list[int], index: list[int] | None = None, seed: int = 0
) -> dict:
    """make_inputs plus ``prefix_lengths`` (and an explicit bank index)."""
    kw = make_inputs(c, dtype, DEVICE, seed=seed)
    if index is not None:
        kw["prefix_index"] = torch.tensor(index, dtype=torch.int64, device=DEVICE)
    kw["prefix_lengths"] = torch.tensor(lengths, dtype=torch.int64, device=DEVICE)
    return kw


# (case, lengths per entry, row -> entry): lengths 0, 1, 7 and P; every row a different task
RAGGED = [
    (Case(B=4, H=2, Hkv=2, Nq=17, Nk=17, P=33, D=40, prefix="bank", T=4), [0, 1, 7, 33],
     [3, 0, 2, 1]),
    (Case(B=3, H=4, Hkv=2, Nq=1, Nk=113, P=7, D=80, prefix="bank", T=5, pad="left"),
     [7, 0, 3, 1, 5], [2, 4, 1]),  # decode with GQA
    (Case(B=4, H=2, Hkv=1, Nq=17, Nk=23, P=7, D=96, prefix="bank", T=4, pad="random"),
     [1, 7, 0, 4], [0, 1, 2, 3]),
    (Case(B=3, H=2, Hkv=2, Nq=20, Nk=13, P=33, D=16, prefix="row", pad="right"),
     [33, 0, 9], None),  # per-row layout (T = B); Nq > Nk and a fully padded row
    (Case(B=2, H=2, Hkv=2, Nq=9, Nk=9, P=0, D=16, prefix="bank", T=2), [0, 0], [1, 0]),
    (Case(B=3, H=2, Hkv=2, Nq=17, Nk=17, P=7, D=32, prefix="bank", T=2, causal=False),
     [7, 2], [1, 1, 0]),  # T < B: repeated entries
]  # fmt: skip


def _id(p) -> str:
    c, lengths, _ = p
    return f"{c.id()}-len{'.'.join(map(str, lengths))}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("param", RAGGED, ids=_id)
def test_triton_ragged_matches_float64(param, dtype: torch.dtype) -> None:
    c, lengths, index = param
    check_against_float64(triton_attn, ragged_inputs(c, dtype, lengths, index), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("param", RAGGED, ids=_id)
def test_reference_ragged_matches_float64(param, dtype: torch.dtype) -> None:
    c, lengths, index = param
    check_against_float64(ref_attn, ragged_inputs(c, dtype, lengths, index), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("param", RAGGED, ids=_id)
def test_sdpa_ragged_matches_float64(param, dtype: torch.dtype) -> None:
    """The sdpa backend (what auto runs off CUDA) masks the invisible prefix keys too."""
    c, lengths, index = param
    check_against_float64(sdpa_attn, ragged_inputs(c, dtype, lengths, index), dtype)


def test_float64_reference_is_a_truncated_prefix() -> None:
    """The test reference itself: a row with length n equals the same row run alone with
    its entry sliced to n keys (so the reference tests above test the right thing)."""
    c = Case(B=3, H=2, Hkv=1, Nq=6, Nk=8, P=7, D=16, prefix="bank", T=3, pad="left")
    kw = ragged_inputs(c, torch.float64, [7, 0, 3], [2, 0, 1])
    out = attention64(**{n: t.detach() if torch.is_tensor(t) else t for n, t in kw.items()})
    for b, (t, n) in enumerate(zip([2, 0, 1], [3, 7, 0])):
        row = attention64(
            kw["q"][b : b + 1].detach(), kw["k"][b : b + 1].detach(), kw["v"][b : b + 1].detach(),
            kw["prefix_k"][t, :, :n].detach(), kw["prefix_v"][t, :, :n].detach(),
            key_padding_mask=kw["key_padding_mask"][b : b + 1],
        )  # fmt: skip
        assert torch.allclose(out[b : b + 1], row, atol=1e-12, rtol=0)


@pytest.mark.parametrize("bwd", ["split", "fused"])
def test_invisible_keys_get_exact_zero_grads(bwd: str, settings) -> None:
    """Gradients land only on visible keys: bitwise 0 past each entry's length, for both
    backward launch layouts; and a full length equals no lengths bitwise."""
    settings(backward=bwd)
    c = Case(B=3, H=2, Hkv=2, Nq=9, Nk=11, P=20, D=16, prefix="bank", T=3)
    lengths = [5, 0, 20]
    kw = ragged_inputs(c, torch.float32, lengths, [0, 1, 2])
    out, g, grads = run_with_grads(triton_attn, kw)
    for t, n in enumerate(lengths):
        for name in ("prefix_k", "prefix_v"):
            assert torch.equal(grads[name][t, :, n:], torch.zeros_like(grads[name][t, :, n:]))
            if n:
                assert grads[name][t, :, :n].abs().sum() > 0
    check_against_float64(triton_attn, kw, torch.float32)
    # the full-length row (entry 2) is exactly what no lengths gives
    full = {n: t for n, t in kw.items() if n != "prefix_lengths"}
    out_full, _, grads_full = run_with_grads(triton_attn, full, grad_out=g)
    assert torch.equal(out[2], out_full[2])
    assert torch.equal(grads["prefix_k"][2], grads_full["prefix_k"][2])


def test_block_shapes_and_splits_ragged() -> None:
    """Lengths that end inside a key block and past block boundaries, with split prefix
    reductions."""
    c = Case(B=3, H=2, Hkv=2, Nq=40, Nk=30, P=40, D=16, prefix="bank", T=3)
    kw = ragged_inputs(c, torch.float32, [17, 33, 16], [1, 2, 0], seed=4)
    cfg = KernelConfig(16, 16)
    with use_settings(fwd=cfg, dkdv=cfg, dq=cfg, prefix_dkdv=cfg, prefix_splits=3):
        check_against_float64(triton_attn, kw, torch.float32)


@pytest.mark.parametrize(
    "attn", [triton_attn, ref_attn, sdpa_attn], ids=["triton", "reference", "sdpa"]
)
def test_nothing_visible_is_zero_not_nan(attn) -> None:
    """Length 0 with every sequence key padded: zeros out, zero grads, never NaN."""
    c = Case(B=2, H=2, Hkv=2, Nq=5, Nk=5, P=7, D=16, prefix="bank", T=2, pad="right")
    kw = ragged_inputs(c, torch.float32, [0, 7], [0, 1])  # row 1 (all padded) reads entry 1
    kw["key_padding_mask"][0] = False  # row 0: entry of length 0 and no real key
    out, _, grads = run_with_grads(attn, kw)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert out[1].abs().sum() > 0  # row 1 still sees its 7 prefix keys
    for g in grads.values():
        assert torch.isfinite(g).all()
    assert torch.equal(grads["q"][0], torch.zeros_like(grads["q"][0]))
    assert torch.equal(grads["prefix_k"][0], torch.zeros_like(grads["prefix_k"][0]))


def test_ragged_inference_path_without_grad() -> None:
    """The no-grad fast path (decoding) passes the lengths too."""
    c = Case(B=3, H=2, Hkv=2, Nq=1, Nk=12, P=7, D=16, prefix="bank", T=3)
    kw = ragged_inputs(c, torch.float32, [2, 7, 0], [0, 1, 2])
    with torch.no_grad():
        out = triton_attn(**kw)
    ref = attention64(**{n: t.detach() if torch.is_tensor(t) else t for n, t in kw.items()})
    assert rel_err(out, ref) < 2e-5


def _bad_cases():
    c = Case(B=2, H=2, Hkv=2, Nq=4, Nk=4, P=5, D=16, prefix="bank", T=3)
    i64 = functools.partial(torch.tensor, dtype=torch.int64)
    return c, [
        ("int32", torch.tensor([1, 2, 3], dtype=torch.int32), TypeError, "dtype torch.int64"),
        ("list", [1, 2, 3], TypeError, "torch.Tensor"),
        ("shape-B", i64([1, 2]), ValueError, "shape [T]=[3]"),
        ("shape-2d", i64([[1, 2, 3]]), ValueError, "shape [T]=[3]"),
        ("negative", i64([1, -1, 3]), ValueError, "in [0, P]"),
        ("too-long", i64([1, 6, 3]), ValueError, "in [0, P]"),
    ]


@pytest.mark.parametrize("backend", ["triton", "reference", "sdpa"])
def test_bad_prefix_lengths(backend: str) -> None:
    c, bad = _bad_cases()
    kw = make_inputs(c, torch.float32, DEVICE)
    for name, value, err, msg in bad:
        with pytest.raises(err, match="prefix_lengths") as info:
            prefixattn.prefix_attention(**kw, prefix_lengths=value, backend=backend)
        assert msg in str(info.value), (name, str(info.value))
    # a shared prefix or no prefix takes no lengths
    shared = make_inputs(Case(B=2, H=2, Hkv=2, Nq=4, Nk=4, P=5, D=16), torch.float32, DEVICE)
    with pytest.raises(ValueError, match="prefix_lengths needs a bank"):
        prefixattn.prefix_attention(
            **shared, prefix_lengths=torch.tensor([3], dtype=torch.int64), backend=backend
        )
    plain = {n: t for n, t in shared.items() if n not in ("prefix_k", "prefix_v")}
    with pytest.raises(ValueError, match="prefix_lengths was given without prefix_k"):
        prefixattn.prefix_attention(
            **plain, prefix_lengths=torch.tensor([3], dtype=torch.int64), backend=backend
        )


@pytest.mark.skipif(HAS_CUDA, reason="CPU device check")
def test_lengths_on_another_device_is_refused() -> None:
    c, _ = _bad_cases()
    kw = make_inputs(c, torch.float32, DEVICE)
    lengths = torch.tensor([1, 2, 3], dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match="prefix_lengths must be on the device of q"):
        ref_attn(**kw, prefix_lengths=lengths)


def test_compiled_reference_and_triton_take_lengths() -> None:
    """Under torch.compile the reference path traces the lengths, and the Triton custom
    ops take them (values and prefix gradients as the float64 reference's)."""
    c = Case(B=2, H=2, Hkv=2, Nq=4, Nk=4, P=5, D=16, prefix="bank", T=2)
    kw = ragged_inputs(c, torch.float32, [2, 5], [1, 0])
    kw = {n: t.detach() if torch.is_tensor(t) else t for n, t in kw.items()}

    def ref_call(**a):
        return prefixattn.prefix_attention(**a, backend="reference")

    got = torch.compile(ref_call, backend="eager", fullgraph=True)(**kw)
    assert rel_err(got, attention64(**kw)) < 2e-5

    def tri_call(**a):
        return prefixattn.prefix_attention(**a, backend="triton")

    got = torch.compile(tri_call, backend="eager", fullgraph=True)(**kw)
    assert rel_err(got, attention64(**kw)) < 2e-5


def test_ragged_prefix_grads_are_bitwise_deterministic() -> None:
    c = Case(B=4, H=2, Hkv=1, Nq=33, Nk=20, P=9, D=16, prefix="bank", T=2)
    kw = ragged_inputs(c, torch.float32, [4, 9], [1, 0, 1, 1], seed=5)
    with use_settings(prefix_splits=2):
        _, g, first = run_with_grads(triton_attn, kw)
        _, _, second = run_with_grads(triton_attn, kw, grad_out=g)
    for name in ("prefix_k", "prefix_v"):
        assert torch.equal(first[name], second[name])
