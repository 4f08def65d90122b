"""The Triton kernel (interpreter on CPU, compiled on GPU) against the float64 reference:
forward and all five gradients, on awkward shapes."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import DEVICE, HAS_CUDA, KERNEL_DTYPES
from helpers import Case, check_against_float64, make_inputs, run_with_grads
from reference64 import attention64, rel_err

import prefixattn
from prefixattn.ops.kernels import DEFAULT_SOURCE, KernelSource
from prefixattn.ops.settings import KernelConfig, use_settings

triton_attn = functools.partial(prefixattn.prefix_attention, backend="triton")

# Each value the standards name appears at least once: P in {0, 1, 7, 33}; Nq in
# {1, 17, 113}; Nk > Nq (decode); D in {16, 40, 64, 80, 96, 128}; H/Hkv in {1, 2, 4};
# padding left/right/random; shared, per-row and bank prefixes (repeated indices).
CASES = [
    Case(B=2, H=2, Hkv=2, Nq=17, Nk=17, P=7, D=40, prefix="shared"),
    Case(B=2, H=4, Hkv=1, Nq=17, Nk=17, P=0, D=16, prefix="none", pad="left"),
    Case(B=2, H=4, Hkv=2, Nq=1, Nk=113, P=33, D=64, prefix="bank", T=5),
    Case(B=3, H=2, Hkv=2, Nq=17, Nk=50, P=1, D=80, prefix="row", pad="right"),
    Case(B=2, H=4, Hkv=4, Nq=113, Nk=113, P=33, D=16, prefix="shared", pad="random"),
    Case(B=2, H=2, Hkv=1, Nq=33, Nk=40, P=7, D=96, prefix="bank", pad="left", T=2),
    Case(B=1, H=2, Hkv=2, Nq=17, Nk=17, P=7, D=128, prefix="row", causal=False),
    Case(B=2, H=2, Hkv=2, Nq=40, Nk=17, P=0, D=32, prefix="none"),  # Nq > Nk: empty rows
    Case(B=2, H=2, Hkv=2, Nq=40, Nk=17, P=1, D=32, prefix="shared", pad="right"),
    Case(B=3, H=4, Hkv=2, Nq=1, Nk=17, P=0, D=64, prefix="none", pad="left"),  # decode
    Case(B=2, H=2, Hkv=1, Nq=20, Nk=30, P=7, D=48, prefix="shared", causal=False, pad="random"),
    Case(B=2, H=2, Hkv=2, Nq=5, Nk=0, P=7, D=16, prefix="shared"),  # no sequence keys
    Case(B=4, H=2, Hkv=2, Nq=9, Nk=9, P=33, D=16, prefix="bank", T=2),  # T < B: shared entries
]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=Case.id)
def test_triton_matches_float64(case: Case, dtype: torch.dtype) -> None:
    kw = make_inputs(case, dtype, DEVICE)
    check_against_float64(triton_attn, kw, dtype)


@pytest.mark.parametrize(
    "case",
    [
        Case(B=2, H=4, Hkv=2, Nq=17, Nk=23, P=7, D=40, prefix="shared", pad="left"),
        Case(B=2, H=2, Hkv=1, Nq=9, Nk=30, P=5, D=32, prefix="bank", T=3),
        Case(B=2, H=2, Hkv=2, Nq=9, Nk=9, P=5, D=32, prefix="row"),
    ],
    ids=Case.id,
)
def test_noncontiguous_inputs(case: Case) -> None:
    """HF-style [B, N, H, D] views and strided prefixes go in as they are."""
    kw = make_inputs(case, torch.float32, DEVICE, noncontiguous=True)
    assert not kw["q"].is_contiguous() and not kw["v"].is_contiguous()
    assert not kw["prefix_v"].is_contiguous()
    check_against_float64(triton_attn, kw, torch.float32)


BLOCK_CASES = [
    Case(B=2, H=2, Hkv=1, Nq=50, Nk=70, P=9, D=32, prefix="shared", pad="left"),
    Case(B=2, H=2, Hkv=2, Nq=70, Nk=50, P=9, D=32, prefix="bank", T=2),
    Case(B=1, H=2, Hkv=2, Nq=50, Nk=70, P=40, D=32, prefix="row", causal=False),
]


@pytest.mark.parametrize(
    "cfg",
    [KernelConfig(16, 32), KernelConfig(32, 16), KernelConfig(16, 16)],
    ids=lambda c: f"M{c.BLOCK_M}N{c.BLOCK_N}",
)
@pytest.mark.parametrize("case", BLOCK_CASES, ids=Case.id)
def test_block_shapes_and_split_prefix_reduction(case: Case, cfg: KernelConfig) -> None:
    """BLOCK_M != BLOCK_N moves the off-band/on-band boundaries; splits > 1 exercises the
    fixed-order reduction of prefix partials."""
    kw = make_inputs(case, torch.float32, DEVICE, seed=3)
    with use_settings(fwd=cfg, dkdv=cfg, dq=cfg, prefix_dkdv=cfg, prefix_splits=3):
        check_against_float64(triton_attn, kw, torch.float32)


def test_empty_rows_are_zero_with_zero_grads() -> None:
    """P == 0 and rows that see nothing (Nq > Nk, fully padded rows): zeros, no NaN."""
    c = Case(B=2, H=2, Hkv=2, Nq=12, Nk=5, P=0, D=16, prefix="none", pad="left")
    kw = make_inputs(c, torch.float32, DEVICE)
    out, _, grads = run_with_grads(triton_attn, kw)
    # row 1 of the batch has every key padded; queries i < Nq - Nk see no key at all
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(out[0, :, : c.Nq - c.Nk], torch.zeros_like(out[0, :, : c.Nq - c.Nk]))
    assert out[0, :, -1].abs().sum() > 0
    for g in grads.values():
        assert torch.isfinite(g).all()
    assert torch.equal(grads["q"][1], torch.zeros_like(grads["q"][1]))


def test_zero_length_prefix_equals_no_prefix() -> None:
    c = Case(B=2, H=2, Hkv=1, Nq=9, Nk=11, P=0, D=16, prefix="shared", pad="random")
    kw = make_inputs(c, torch.float32, DEVICE)
    out, g, grads = run_with_grads(triton_attn, kw)
    plain = {n: t for n, t in kw.items() if n not in ("prefix_k", "prefix_v")}
    out0, _, grads0 = run_with_grads(triton_attn, plain, grad_out=g)
    assert torch.equal(out, out0)
    assert torch.equal(grads["q"], grads0["q"])
    # the empty prefix is part of the graph (no allow_unused) and gets empty gradients
    dpk, dpv = torch.autograd.grad(triton_attn(**kw).sum(), [kw["prefix_k"], kw["prefix_v"]])
    assert dpk.shape == (1, 0, 16) and dpv.shape == (1, 0, 16)


def test_custom_scale_and_no_grad_inputs() -> None:
    c = Case(B=2, H=2, Hkv=2, Nq=9, Nk=9, P=3, D=16)
    kw = make_inputs(c, torch.float32, DEVICE)
    kw["k"].requires_grad_(False)
    out = triton_attn(**kw, sm_scale=0.3)
    ref = attention64(**{n: t.detach() if torch.is_tensor(t) else t for n, t in kw.items()},
                      sm_scale=0.3)  # fmt: skip
    assert rel_err(out, ref) < 2e-5
    dq, dpk = torch.autograd.grad(out.sum(), [kw["q"], kw["prefix_k"]])
    assert dq.shape == kw["q"].shape and dpk.shape == kw["prefix_k"].shape


def test_zero_batch() -> None:
    q = torch.randn(0, 2, 5, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(0, 2, 5, 16, device=DEVICE)
    pk = torch.randn(2, 3, 16, device=DEVICE, requires_grad=True)
    out = triton_attn(q, k, k, pk, pk.detach())
    assert out.shape == (0, 2, 5, 16)
    (g,) = torch.autograd.grad(out.sum(), [pk])
    assert torch.equal(g, torch.zeros_like(pk))


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU interpreter requirement")
def test_triton_on_cpu_requires_interpreter(settings) -> None:
    settings(interpret=False)
    x = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="backend"):
        prefixattn.prefix_attention(x, x, x, backend="triton")


# --------------------------------------------------------------------------------------
# the fused backward (PREFIXATTN_BWD=fused): one launch for dK/dV, dQ and prefix partials
# --------------------------------------------------------------------------------------


@pytest.fixture
def fused_backward(settings) -> None:
    settings(backward="fused")


@pytest.mark.parametrize("case", CASES, ids=Case.id)
def test_fused_backward_matches_float64(case: Case, fused_backward: None) -> None:
    kw = make_inputs(case, torch.float32, DEVICE)
    check_against_float64(triton_attn, kw, torch.float32)


@pytest.mark.parametrize(
    "cfg",
    [
        KernelConfig(16, 32, 4, 1, 32, 16),  # dQ tiles unlike dK/dV tiles
        KernelConfig(32, 16, 4, 1, 16, 16),
    ],
    ids=lambda c: f"M{c.BLOCK_M}N{c.BLOCK_N}M2{c.BLOCK_M2}N2{c.BLOCK_N2}",
)
@pytest.mark.parametrize("case", BLOCK_CASES, ids=Case.id)
def test_fused_backward_block_shapes_and_splits(
    case: Case, cfg: KernelConfig, fused_backward: None
) -> None:
    kw = make_inputs(case, torch.float32, DEVICE, seed=5)
    with use_settings(bwd=cfg, prefix_splits=3):
        check_against_float64(triton_attn, kw, torch.float32)


@pytest.mark.parametrize(
    "case",
    [
        Case(B=2, H=4, Hkv=2, Nq=17, Nk=23, P=7, D=40, prefix="bank", T=3, pad="left"),
        Case(B=2, H=2, Hkv=2, Nq=9, Nk=9, P=5, D=32, prefix="row"),
    ],
    ids=Case.id,
)
def test_fused_backward_fp16_and_partial_needs(case: Case, fused_backward: None) -> None:
    """fp16, and calls that need only some gradients (no dQ; no dK/dV; no prefix)."""
    check_against_float64(triton_attn, make_inputs(case, torch.float16, DEVICE), torch.float16)
    kw = make_inputs(case, torch.float32, DEVICE)
    out = triton_attn(**kw)
    g = torch.randn_like(out)
    ref = dict(zip(("q", "k", "v", "prefix_k"), torch.autograd.grad(
        out, [kw["q"], kw["k"], kw["v"], kw["prefix_k"]], g, retain_graph=True)))  # fmt: skip
    for subset in (["k", "prefix_k"], ["q", "v"], ["q"], ["prefix_k"]):
        got = torch.autograd.grad(out, [kw[n] for n in subset], g, retain_graph=True)
        for n, t in zip(subset, got):
            assert torch.equal(t, ref[n]), f"d{n} differs when only {subset} are asked for"


class _SpySource(KernelSource):
    """The real kernels, each launch recorded in ``log`` (by kernel name)."""

    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    def module(self):
        return _LaunchSpy(super().module(), self.log)

    def interpreted(self) -> bool:
        return DEFAULT_SOURCE.interpreted()  # the wrapped kernels'


class _LaunchSpy:
    """Records which kernels a call launches (wraps the jit functions)."""

    def __init__(self, kernels, log: list[str]) -> None:
        self._kernels, self._log = kernels, log

    def __getattr__(self, name: str):
        kernel = getattr(self._kernels, name)
        log = self._log

        class Spy:
            def __getitem__(self, grid):
                launch = kernel[grid]

                def logged(*args, **kwargs):
                    log.append(name)
                    return launch(*args, **kwargs)

                return logged

        return Spy()


@pytest.mark.parametrize(
    "mode,prefix,expected",
    [
        ("split", "shared", ["_attn_bwd_preprocess", "_attn_bwd_dq", "_attn_bwd_dkdv",
                             "_attn_bwd_prefix_dkdv", "_prefix_grad_reduce"]),
        ("split", "row", ["_attn_bwd_preprocess", "_attn_bwd_dq", "_attn_bwd_dkdv",
                          "_attn_bwd_prefix_dkdv"]),
        ("fused", "shared", ["_attn_bwd", "_prefix_grad_reduce"]),
        ("fused", "bank", ["_attn_bwd", "_prefix_grad_reduce"]),
        ("fused", "row", ["_attn_bwd"]),
        ("fused", "none", ["_attn_bwd"]),
        ("auto", "shared", ["_attn_bwd", "_prefix_grad_reduce"]),
    ],
)  # fmt: skip
def test_backward_launches(mode: str, prefix: str, expected: list[str], settings) -> None:
    """The fused backward is one launch (Delta computed in the kernel), plus the prefix
    reduce when an entry has several partials; a per-row prefix's programs write its
    gradient directly. ``auto`` picks the fused one for a small problem."""
    c = Case(B=2, H=2, Hkv=1, Nq=9, Nk=9, P=3, D=16, prefix=prefix)
    kw = make_inputs(c, torch.float32, DEVICE)
    log: list[str] = []
    settings(backward=mode, kernels=_SpySource(log))  # a call keeps its settings
    out = triton_attn(**kw)
    log.clear()  # the forward's launch
    out.sum().backward()
    assert log == expected


def test_inference_call_is_the_training_forward() -> None:
    """Under no_grad (decoding) the kernel runs without autograd.Function: same output,
    bitwise, and nothing recorded; dropout draws from the same seed stream."""
    c = Case(B=2, H=4, Hkv=2, Nq=9, Nk=13, P=5, D=32, prefix="bank", T=2, pad="left")
    kw = make_inputs(c, torch.float32, DEVICE)
    out = triton_attn(**kw)
    assert out.grad_fn is not None
    with torch.no_grad():
        out_ng = triton_attn(**kw)
    assert out_ng.grad_fn is None and torch.equal(out_ng, out)
    torch.manual_seed(11)
    drop = triton_attn(**kw, dropout_p=0.3)
    torch.manual_seed(11)
    with torch.no_grad():
        drop_ng = triton_attn(**kw, dropout_p=0.3)
    assert torch.equal(drop_ng, drop) and not torch.equal(drop, out)


@pytest.mark.parametrize("bwd_mode", ["split", "fused"])
@pytest.mark.parametrize(
    "case",
    [
        Case(B=5, H=4, Hkv=2, Nq=9, Nk=12, P=5, D=16, prefix="bank", T=3, pad="left"),
        Case(B=5, H=2, Hkv=2, Nq=7, Nk=7, P=3, D=16, prefix="row", pad="random"),
        Case(B=4, H=2, Hkv=1, Nq=6, Nk=9, P=4, D=16, prefix="shared"),
    ],
    ids=Case.id,
)
def test_batch_over_the_grid_limit_runs_in_chunks(case: Case, bwd_mode: str, settings) -> None:
    """B * H past CUDA's grid-axis limit: the launchers cover the batch in chunks of rows
    (views), with the same values and gradients, bitwise, as one launch."""
    from prefixattn.ops.args import batch_chunks
    from prefixattn.ops.call import AttentionCall
    from prefixattn.ops.validation import validate

    settings(backward=bwd_mode)
    kw = make_inputs(case, torch.float32, DEVICE)
    out, g, grads = run_with_grads(triton_attn, kw)
    chunked = settings(max_grid_y=2 * case.H)  # chunks of 2 rows
    names = ("q", "k", "v", "prefix_k", "prefix_v", "prefix_index", "key_padding_mask")
    prob = validate(AttentionCall(**{n: kw.get(n) for n in names}, causal=case.causal))
    assert len(batch_chunks(prob, chunked, None)) == -(-case.B // 2)
    out_c, _, grads_c = run_with_grads(triton_attn, kw, grad_out=g)
    assert torch.equal(out_c, out)
    for name in grads:
        assert torch.equal(grads_c[name], grads[name]), f"d{name} differs in chunks"


def test_dropout_masks_differ_between_batch_chunks(settings) -> None:
    """Each chunk draws its own dropout stream: identical rows in different chunks get
    different masks (the kernels number rows from the chunk's first row)."""
    settings(max_grid_y=2)  # H = 2: one row per chunk
    c = Case(B=3, H=2, Hkv=2, Nq=8, Nk=8, P=4, D=16, prefix="shared")
    kw = make_inputs(c, torch.float32, DEVICE)
    for name in ("q", "k", "v"):  # every row the same
        kw[name] = kw[name][:1].expand_as(kw[name]).detach().clone().requires_grad_()
    torch.manual_seed(3)
    out = triton_attn(**kw, dropout_p=0.5)
    assert not torch.equal(out[0], out[1]) and not torch.equal(out[1], out[2])


def test_fused_backward_falls_back_to_split_past_the_grid_limit(settings) -> None:
    """When the fused kernel's programs per (row, kv head) could exceed the grid-axis limit
    (very long sequences), the split kernels run instead, with the same gradients."""
    c = Case(B=2, H=2, Hkv=1, Nq=40, Nk=40, P=9, D=16, prefix="shared")
    kw = make_inputs(c, torch.float32, DEVICE)
    settings(backward="fused")
    out, g, grads = run_with_grads(triton_attn, kw)
    log: list[str] = []
    # 16 + 2 * 3 programs would not fit a grid-axis limit of 21
    settings(backward="fused", max_grid_y=21, kernels=_SpySource(log))
    out2, _, grads2 = run_with_grads(triton_attn, kw, grad_out=g)
    assert "_attn_bwd" not in log and "_attn_bwd_dkdv" in log
    assert torch.equal(out2, out)
    for name in grads:
        assert torch.allclose(grads2[name], grads[name], rtol=1e-5, atol=1e-6), name
