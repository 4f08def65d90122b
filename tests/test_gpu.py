"""GPU-only checks: every autotune candidate, long sequences, 64-bit offsets, memory; the
model-family features (sliding window, soft-capping, sinks) and the KV-cache pool
(``cache_seqlens`` / ``cache_batch_idx``, paged: ``block_table``) at GPU tile sizes in
bf16 / fp16.

The rest of the suite also runs on GPU (compiled kernels, bf16 added to the dtypes).
The GPU session (benchmarks/run_gpu.sh) runs a subset in its correctness core:
``benchmarks/gpu_session/core.py`` ``GRAPH_TESTS``.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import gpu_only
from helpers import (
    DIFF_NAMES,
    TOL,
    Case,
    check_against_float64,
    make_inputs,
    page_pool,
    pool_attention64,
)
from reference64 import attention64, rel_err

import prefixattn
from prefixattn.ops import kernels
from prefixattn.ops import settings as ops_settings
from prefixattn.ops.backward import prefix_splits
from prefixattn.ops.call import AttentionCall

pytestmark = gpu_only
triton_attn = functools.partial(prefixattn.prefix_attention, backend="triton")

KERNEL_CONFIGS = [
    (name, cfg)
    for name, cfgs in (
        ("fwd", ops_settings.FWD_CONFIGS),
        ("dkdv", ops_settings.DKDV_CONFIGS),
        ("dq", ops_settings.DQ_CONFIGS),
        ("prefix_dkdv", ops_settings.PREFIX_DKDV_CONFIGS),
        ("bwd", ops_settings.BWD_CONFIGS),
    )
    for cfg in [*cfgs, ops_settings.SAFE_BWD_CONFIG if name == "bwd" else ops_settings.SAFE_CONFIG]
]


def _cfg_id(name: str, c: ops_settings.KernelConfig) -> str:
    tiles = "".join(f"{k[6:]}{v}" for k, v in c.tiles().items())  # M32N128M2128N232
    return f"{name}-{tiles}w{c.num_warps}s{c.num_stages}"


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize(
    "name,cfg", KERNEL_CONFIGS, ids=[_cfg_id(n, c) for n, c in KERNEL_CONFIGS]
)  # fmt: skip
def test_every_autotune_candidate_is_correct(
    name: str, cfg: ops_settings.KernelConfig, D: int, settings
) -> None:
    """Autotuning may pick any candidate: each must be right on an awkward shape (the fused
    backward's under PREFIXATTN_BWD=fused)."""
    from triton.runtime.errors import OutOfResources

    settings(backward="fused" if name == "bwd" else "split")

    c = Case(B=2, H=4, Hkv=2, Nq=300, Nk=333, P=40, D=D, prefix="bank", T=3, pad="left")
    kw = make_inputs(c, torch.bfloat16, "cuda")
    with ops_settings.use_settings(**{name: cfg}, prefix_splits=3):
        try:
            check_against_float64(triton_attn, kw, torch.bfloat16)
        except OutOfResources as e:  # autotune skips such configs the same way
            pytest.skip(f"config does not fit this GPU at D={D}: {e}")


@pytest.mark.parametrize("bwd_mode", ["split", "fused"])
def test_autotuned_path_is_correct(bwd_mode: str, settings) -> None:
    settings(autotune=True)
    settings(backward=bwd_mode)
    c = Case(B=2, H=4, Hkv=2, Nq=200, Nk=256, P=64, D=64, prefix="shared", pad="right")
    check_against_float64(triton_attn, make_inputs(c, torch.bfloat16, "cuda"), torch.bfloat16)


@pytest.mark.parametrize("D", [16, 256])
def test_extreme_head_dims(D: int) -> None:
    c = Case(B=2, H=2, Hkv=1, Nq=130, Nk=150, P=20, D=D, prefix="row", pad="random")
    check_against_float64(triton_attn, make_inputs(c, torch.float16, "cuda"), torch.float16)


def _sdpa_concat_fp32(q, k, v, pk, pv) -> torch.Tensor:
    """fp32 reference through PyTorch's SDPA over the concatenated keys (lower-right causal
    over P + Nk keys is exactly the prefix-aware mask)."""
    from torch.nn.attention.bias import causal_lower_right

    B, H, Nq, _ = q.shape
    g = H // k.shape[1]
    kk = torch.cat([pk.float().expand(B, -1, -1, -1), k.float()], 2).repeat_interleave(g, 1)
    vv = torch.cat([pv.float().expand(B, -1, -1, -1), v.float()], 2).repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(
        q.float(), kk, vv, attn_mask=causal_lower_right(Nq, kk.shape[2])
    )


@pytest.mark.parametrize("bwd_mode", ["split", "fused"])
@pytest.mark.parametrize("N,backward", [(4096, True), (16384, True)])
def test_long_sequences(N: int, backward: bool, bwd_mode: str, settings) -> None:
    settings(backward=bwd_mode)
    torch.manual_seed(0)
    B, H, Hkv, P, D = 1, 4, 2, 64, 64
    q = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pk = torch.randn(Hkv, P, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pv = torch.randn(Hkv, P, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = triton_attn(q, k, v, pk, pv)
    leaves = [q, k, v, pk, pv]
    ref_leaves = [t.detach().float().requires_grad_(True) for t in leaves]
    ref = _sdpa_concat_fp32(*ref_leaves)
    assert rel_err(out, ref) < TOL[torch.bfloat16][0]
    if backward:
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, g)
        ref_grads = torch.autograd.grad(ref, ref_leaves, g.float())
        for name, a, b in zip(["q", "k", "v", "pk", "pv"], grads, ref_grads):
            assert rel_err(a, b) < TOL[torch.bfloat16][1], name


def test_64bit_offsets() -> None:
    """K/V with more than 2^31 elements: batch and row offsets need 64-bit arithmetic."""
    free = torch.cuda.mem_get_info()[0]
    if free < 24 * 2**30:
        pytest.skip("needs ~24 GiB of free GPU memory")
    B, Hkv, D, Nq, P = 2, 1, 128, 16, 8
    Nk = 2**31 // (B * Hkv * D) + 64  # k.numel() > 2^31
    gen = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(B, Hkv, Nk, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(B, Hkv, Nk, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    assert k.numel() > 2**31
    q = torch.randn(B, 2, Nq, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    pk = torch.randn(Hkv, P, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    pv = torch.randn(Hkv, P, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    out = triton_attn(q, k, v, pk, pv)  # Nq = 16 queries at the end of a 8M-token cache
    b = B - 1  # the last row: every offset past 2^31
    s_pre = torch.einsum("hqd,kpd->hqp", q[b].float(), pk.float())
    s_seq = torch.einsum("hqd,knd->hqn", q[b].float(), k[b].float())
    s = torch.cat([s_pre, s_seq], -1) / D**0.5
    w = torch.softmax(s, -1)
    ref = torch.einsum("hqp,kpd->hqd", w[..., :P], pv.float()) + torch.einsum(
        "hqn,knd->hqd", w[..., P:], v[b].float()
    )
    assert rel_err(out[b], ref) < TOL[torch.bfloat16][0]


def test_shared_prefix_is_never_expanded_in_memory() -> None:
    """Peak memory of forward and backward: a per-row copy of the shared prefix (B x the
    prefix) would show up; the kernel allocates only its outputs and small buffers."""
    B, H, N, P, D = 64, 12, 64, 512, 64
    dt = torch.bfloat16
    q = torch.randn(B, H, N, D, device="cuda", dtype=dt, requires_grad=True)
    k = torch.randn(B, H, N, D, device="cuda", dtype=dt, requires_grad=True)
    v = torch.randn(B, H, N, D, device="cuda", dtype=dt, requires_grad=True)
    pk = torch.randn(H, P, D, device="cuda", dtype=dt, requires_grad=True)
    pv = torch.randn(H, P, D, device="cuda", dtype=dt, requires_grad=True)
    expanded = B * H * P * D * 2  # bytes of one expanded prefix tensor
    out = triton_attn(q, k, v, pk, pv)  # warm-up (compile / autotune)
    torch.autograd.grad(out, [q, k, v, pk, pv], torch.ones_like(out))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = triton_attn(q, k, v, pk, pv)
    fwd_extra = torch.cuda.max_memory_allocated() - base
    assert fwd_extra < out.numel() * 2 + B * H * N * 4 + 2**20 < expanded
    torch.cuda.reset_peak_memory_stats()
    torch.autograd.grad(out, [q, k, v, pk, pv], torch.ones_like(out))
    bwd_extra = torch.cuda.max_memory_allocated() - base
    # grads of q, k, v, prefix + fp32 per-row prefix partials (the deterministic reduction)
    grads = 3 * out.numel() * 2 + 2 * H * P * D * 2
    call = AttentionCall(q, k, v, pk, pv, settings=ops_settings.current_settings())
    splits = prefix_splits(call, prefixattn.ops.validation.validate(call), False)
    partials = 2 * B * splits * H * P * D * 4
    assert bwd_extra < grads + partials + out.numel() * 4 + 2**22


def test_decode_bucket_does_not_retune(settings) -> None:
    """Growing the cache inside one power-of-two bucket reuses the tuned config."""
    settings(autotune=True)
    q = torch.randn(4, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
    tuned = kernels.DEFAULT_SOURCE.tuned("fwd")
    for n in range(1025, 1040):
        k = torch.randn(4, 8, n, 64, device="cuda", dtype=torch.bfloat16)
        triton_attn(q, k, k)
    keys = [key for key in tuned.cache if 2048 in key]
    assert len(keys) == 1, keys


def _graph_case(prefix: str, nq: int) -> tuple[dict, list[torch.Tensor], torch.Tensor]:
    c = Case(B=3, H=4, Hkv=2, Nq=nq, Nk=40, P=9, D=64, prefix=prefix, T=2, pad="left")
    kw = make_inputs(c, torch.float16, "cuda", seed=nq)
    leaves = [kw[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    gout = torch.randn(c.B, c.H, c.Nq, c.D, device="cuda", dtype=torch.float16)
    return kw, leaves, gout


@pytest.mark.parametrize("bwd_mode", ["auto", "split"])
@pytest.mark.parametrize("prefix", ["shared", "bank"])
def test_cuda_graph_replays_forward_backward_with_new_values(
    prefix: str, bwd_mode: str, settings
) -> None:
    """Forward + backward (torch.autograd.grad) captured in a CUDA graph: nothing in the
    call path syncs with the device (capture would fail), and a replay after new values
    are copied into the static inputs gives what an eager call on those values gives."""
    settings(backward=bwd_mode)
    kw, leaves, gout = _graph_case(prefix, 17)

    def step() -> tuple[torch.Tensor, ...]:
        out = triton_attn(**kw)
        return (out, *torch.autograd.grad(out, leaves, gout))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # plans built, configs chosen, direct launches captured
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    gen = torch.Generator(device="cuda").manual_seed(7)
    with torch.no_grad():
        for t in [*leaves, gout]:
            t.copy_(torch.randn(t.shape, generator=gen, device="cuda", dtype=t.dtype))
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    for name, got, want in zip(("out", "dq", "dk", "dv", "dpk", "dpv"), static, eager):
        assert torch.equal(got, want), f"{name}: graph replay differs from eager"


def test_cuda_graph_replays_a_decode_step() -> None:
    """One mixed-task decode step (Nq = 1, bank prefix, no grad) in a CUDA graph, replayed
    with a new query and a new task per row."""
    kw, _, _ = _graph_case("bank", 1)
    kw = {n: (t.detach() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}

    def step() -> torch.Tensor:
        with torch.no_grad():
            return triton_attn(**kw)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    kw["q"].copy_(torch.randn_like(kw["q"]))
    kw["prefix_index"].copy_(kw["prefix_index"].flip(0))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static, step())


# --------------------------------------------------------------------------------------
# model families: sliding window, soft-capping, sinks (bf16 / fp16, GPU tiles)
# --------------------------------------------------------------------------------------

DTYPES = [torch.bfloat16, torch.float16]
FAMILY = ["window", "softcap", "sinks", "all"]


def family_kwargs(feature: str, H: int, T: int, P: int, device: str) -> dict:
    """The keywords of ``feature``: ``all`` is window + softcap + sinks with a ragged bank
    (``prefix_lengths``; the prefix seen by every query: ``prefix_window="all"``)."""
    sinks = torch.linspace(-1.0, 2.0, H, device=device)  # [H] float32 sink logits
    kw: dict = {
        "window": {"window": 256},
        "softcap": {"softcap": 30.0},
        "sinks": {"sinks": sinks},
        "all": {"window": 256, "softcap": 20.0, "sinks": sinks,
                "prefix_lengths": torch.tensor([P, P // 2 - 3, 0][:T], device=device)},
    }[feature]  # fmt: skip
    return dict(kw)


def check_family(kw: dict, dtype: torch.dtype, attn=None) -> None:
    """Output and every gradient (``dsinks`` too) vs float64; with a window, key blocks
    wholly left of every query's window are never read: NaN written there changes no
    output bit, and their dk / dv are exactly 0."""
    attn = attn or triton_attn
    check_against_float64(attn, kw, dtype)  # out, dq, dk, dv, dprefix_k, dprefix_v
    leaves = {n: kw[n].detach() for n in DIFF_NAMES if n in kw}
    g = torch.randn(kw["q"].shape, generator=torch.Generator().manual_seed(5)).to(kw["q"])
    if kw.get("sinks") is not None:
        s = kw["sinks"].detach().clone().requires_grad_(True)
        (ds,) = torch.autograd.grad(attn(**{**kw, **leaves, "sinks": s}), [s], g)
        s64 = s.detach().double().requires_grad_(True)
        ref = attention64(**{**kw, **{n: t.double() for n, t in leaves.items()}, "sinks": s64})
        (ds64,) = torch.autograd.grad(ref, [s64], g.double())
        assert rel_err(ds, ds64) < TOL[dtype][1], f"dsinks: rel err {rel_err(ds, ds64):.2e}"
    W = kw.get("window")
    if W is None:
        return
    Nq, Nk = kw["q"].shape[2], kw["k"].shape[2]
    cut = ((Nk - Nq - W + 1) // 128) * 128  # whole blocks of the largest BLOCK_N
    assert cut >= 128, "the case must leave whole key blocks left of every window"
    clean = {n: t.clone().requires_grad_(True) for n, t in leaves.items()}
    poisoned = dict(clean)
    for n in ("k", "v"):
        t = leaves[n].clone()
        t[:, :, :cut] = float("nan")
        poisoned[n] = t.requires_grad_(True)
    outs, grads = [], []
    for x in (clean, poisoned):
        out = attn(**{**kw, **x})
        outs.append(out)
        grads.append(torch.autograd.grad(out, [x["q"], x["k"], x["v"]], g))
    assert torch.equal(outs[0], outs[1]), "a key block left of every window was read"
    assert torch.equal(grads[0][0], grads[1][0]), "dq read a key block left of every window"
    for dk_or_dv in grads[1][1:]:
        assert (dk_or_dv[:, :, :cut] == 0).all() and torch.isfinite(dk_or_dv[:, :, cut:]).all()


@pytest.mark.parametrize("bwd_mode", ["fused", "split"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature", FAMILY)
def test_family_long_sequence(feature: str, dtype: torch.dtype, bwd_mode: str, settings) -> None:
    """A ragged bank, GQA, left padding, Nq != Nk over many key blocks: the window's block
    skipping, soft-capping and sinks at the GPU's tile sizes, fused and split backward."""
    settings(backward=bwd_mode)
    c = Case(B=2, H=8, Hkv=2, Nq=300, Nk=1000, P=40, D=64, prefix="bank", T=3, pad="left")
    kw = make_inputs(c, dtype, "cuda", seed=11)
    kw.update(family_kwargs(feature, c.H, c.T, c.P, "cuda"))
    check_family(kw, dtype)


# --------------------------------------------------------------------------------------
# the KV-cache pool (cache_seqlens / cache_batch_idx): the serving engine's decode path
# --------------------------------------------------------------------------------------

POOL_FEATURES = ["alone", "bank", "window", "softcap", "sinks", "all"]


def pool_kwargs(feature: str, Nq: int, dtype: torch.dtype, device: str) -> dict:
    """7 rows over a pool of 6 slots x 300 keys (several key blocks): lengths 0, 1, 17,
    64, 129, 255, 300; slots out of order, slot 3 read by two rows; GQA 8:2; ``bank`` /
    ``all`` a ragged bank (P = 40, entry lengths 40, 17, 0); ``all`` also a window,
    soft-capping, sinks and a key padding mask."""
    g = torch.Generator().manual_seed(Nq)
    B, S, Nmax, H, Hkv, D, T, P = 7, 6, 300, 8, 2, 64, 3, 40

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype)

    kw: dict = {
        "q": rnd(B, H, Nq, D), "k": rnd(S, Hkv, Nmax, D), "v": rnd(S, Hkv, Nmax, D),
        "cache_seqlens": torch.tensor([300, 0, 1, 129, 64, 255, 17], dtype=torch.int32,
                                      device=device),
        "cache_batch_idx": torch.tensor([3, 0, 5, 3, 1, 2, 4], dtype=torch.int32, device=device),
    }  # fmt: skip
    if feature in ("bank", "all"):
        kw["prefix_k"], kw["prefix_v"] = rnd(T, Hkv, P, D), rnd(T, Hkv, P, D)
        kw["prefix_index"] = torch.tensor([0, 1, 2, 0, 2, 1, 0], device=device)
        kw["prefix_lengths"] = torch.tensor([P, 17, 0], device=device)
    if feature in ("window", "all"):
        kw["window"] = 100
    if feature in ("softcap", "all"):
        kw["softcap"] = 30.0
    if feature in ("sinks", "all"):
        kw["sinks"] = torch.linspace(-1.0, 2.0, H, device=device)
    if feature == "all":
        kw["key_padding_mask"] = (torch.rand(B, Nmax, generator=g) > 0.2).to(device)
    return kw


def check_pool(kw: dict, dtype: torch.dtype, attn=None) -> None:
    """The pool call's output vs float64 row by row on each row's own keys; the rows that
    share a slot differ only by their lengths / prefixes (no cross-row leak)."""
    with torch.no_grad():
        out = (attn or triton_attn)(**kw)
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref = pool_attention64(**kw)
    err = rel_err(out, ref)
    assert err < TOL[dtype][0], f"output: rel err {err:.2e} >= {TOL[dtype][0]:.0e}"
    for b in range(out.shape[0]):  # each row on its own, too (a short row is small in the norm)
        e = rel_err(out[b], ref[b])
        assert (ref[b].norm() == 0 and out[b].abs().max() == 0) or e < TOL[dtype][0], (b, e)


@pytest.mark.parametrize("Nq", [1, 4])
@pytest.mark.parametrize(
    "feature,dtype",
    [(f, torch.bfloat16) for f in POOL_FEATURES] + [("all", torch.float16)],
    ids=[f"{f}-bfloat16" for f in POOL_FEATURES] + ["all-float16"],
)  # fmt: skip
def test_kv_pool_matches_float64(feature: str, dtype: torch.dtype, Nq: int) -> None:
    check_pool(pool_kwargs(feature, Nq, dtype, "cuda"), dtype)


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("Nq", [1, 4])
@pytest.mark.parametrize(
    "feature,dtype",
    [(f, torch.bfloat16) for f in POOL_FEATURES] + [("all", torch.float16)],
    ids=[f"{f}-bfloat16" for f in POOL_FEATURES] + ["all-float16"],
)  # fmt: skip
def test_paged_kv_matches_float64(
    feature: str, dtype: torch.dtype, Nq: int, block_size: int
) -> None:
    """The same pool cut into shuffled blocks (``block_table``; rows reading one slot share
    its blocks, -1 past a row's last block): pages smaller and larger than a key tile."""
    kw = page_pool(pool_kwargs(feature, Nq, dtype, "cuda"), block_size, seed=Nq)
    assert kw["block_table"].shape == (7, -(-300 // block_size))
    check_pool(kw, dtype)


@pytest.mark.parametrize("paged", [0, 16], ids=["slots", "paged16"])
@pytest.mark.parametrize(
    "cfg", [*ops_settings.FWD_CONFIGS, ops_settings.SAFE_CONFIG],
    ids=[_cfg_id("fwd", c) for c in [*ops_settings.FWD_CONFIGS, ops_settings.SAFE_CONFIG]],
)  # fmt: skip
def test_kv_pool_every_fwd_config(cfg: ops_settings.KernelConfig, paged: int) -> None:
    """Decode autotuning may pick any forward config: each reads the pool (and the pages)
    right."""
    from triton.runtime.errors import OutOfResources

    kw = pool_kwargs("all", 4, torch.bfloat16, "cuda")
    if paged:
        kw = page_pool(kw, paged, seed=1)
    with ops_settings.use_settings(fwd=cfg):
        try:
            check_pool(kw, torch.bfloat16)
        except OutOfResources as e:
            pytest.skip(f"config does not fit this GPU: {e}")
