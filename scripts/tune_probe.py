"""Quick GPU probe used while tuning: GEMM ceiling, the issue's target shapes, and the
baselines they are judged against. Not the benchmark suite (see benchmarks/): a fast read
of where the kernel stands, printed as a table and written as JSON to $OUT if set.

    PYTHONPATH=. python scripts/tune_probe.py
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention.bias import causal_lower_right

import prefixattn

dev, dt = "cuda", torch.bfloat16
rows: list[dict] = []


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def gemm_tflops() -> float:
    a = torch.randn(8192, 8192, device=dev, dtype=dt)
    b = torch.randn(8192, 8192, device=dev, dtype=dt)
    ms = bench(lambda: a @ b)
    return 2 * 8192**3 / ms / 1e9


def attn_flops(B, H, Nq, Nk, P, D, causal=True) -> float:
    seq = Nq * Nk - (Nq * (Nq - 1) / 2 if causal and Nq == Nk else 0)
    return 4 * B * H * D * (Nq * P + seq)


def inputs(B, H, Hkv, Nq, Nk, P, D, T=None, grad=True):
    g = torch.Generator(device=dev).manual_seed(0)
    mk = lambda *s: torch.randn(*s, device=dev, dtype=dt, generator=g).requires_grad_(grad)  # noqa: E731
    q, k, v = mk(B, H, Nq, D), mk(B, Hkv, Nk, D), mk(B, Hkv, Nk, D)
    lead = () if T is None else (T,)
    pk, pv = mk(*lead, Hkv, P, D), mk(*lead, Hkv, P, D)
    idx = None if T is None else torch.arange(B, device=dev) % T
    return q, k, v, pk, pv, idx


def concat_sdpa(q, k, v, pk, pv, idx=None):
    B, H = q.shape[:2]
    if idx is not None:
        pk, pv = pk[idx], pv[idx]
    else:
        pk, pv = pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1)
    kk, vv = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    if kk.shape[1] != H:
        kk, vv = (
            kk.repeat_interleave(H // kk.shape[1], 1),
            vv.repeat_interleave(H // vv.shape[1], 1),
        )
    return F.scaled_dot_product_attention(
        q, kk, vv, attn_mask=causal_lower_right(q.shape[2], kk.shape[2])
    )


def concat_eager(q, k, v, pk, pv, idx=None):
    B, _, Nq, D = q.shape
    pk, pv = pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1)
    kk, vv = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    s = (q @ kk.transpose(-1, -2)) * D**-0.5
    Nk = kk.shape[2]
    i = torch.arange(Nq, device=dev)[:, None]
    j = torch.arange(Nk, device=dev)[None]
    s = s.masked_fill(j > i + (Nk - Nq), float("-inf"))
    return torch.softmax(s.float(), -1).to(q.dtype) @ vv


def ours(q, k, v, pk, pv, idx=None):
    return prefixattn.prefix_attention(q, k, v, pk, pv, prefix_index=idx, backend="triton")


def fwd_bwd(fn, args):
    out = fn(*args)
    g = torch.ones_like(out)
    leaves = [a for a in args[:5]]

    def run():
        o = fn(*args)
        torch.autograd.grad(o, leaves, g)

    return run


def main() -> None:
    peak = gemm_tflops()
    print(
        f"device {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}"
    )
    print(f"bf16 GEMM 8192^3: {peak:.0f} TFLOP/s")
    # target 1: fwd+bwd B=8 H=12 N=1024 D=64 P=64
    shape = (8, 12, 12, 1024, 1024, 64, 64)
    args = inputs(*shape)
    fl = attn_flops(8, 12, 1024, 1024, 64, 64) * 3.5
    for name, fn in (
        ("prefixattn", ours),
        ("concat_sdpa", concat_sdpa),
        ("concat_eager", concat_eager),
    ):
        ms = bench(fwd_bwd(fn, args))
        rows.append(
            dict(case="fwd_bwd B8 H12 N1024 D64 P64", impl=name, ms=ms, tflops=fl / ms / 1e9)
        )
    # target 2: fwd / bwd at N=4096
    for D in (64, 128):
        H = 12 if D == 64 else 16
        args = inputs(4, H, H, 4096, 4096, 64, D)
        fl = attn_flops(4, H, 4096, 4096, 64, D)
        ms = bench(lambda: ours(*args))
        rows.append(
            dict(case=f"fwd B4 H{H} N4096 D{D} P64", impl="prefixattn", ms=ms, tflops=fl / ms / 1e9)
        )
        out = ours(*args)
        g = torch.ones_like(out)
        ms_b = bench(lambda: torch.autograd.grad(out, list(args[:5]), g, retain_graph=True))
        rows.append(
            dict(
                case=f"bwd B4 H{H} N4096 D{D} P64",
                impl="prefixattn",
                ms=ms_b,
                tflops=2.5 * fl / ms_b / 1e9,
            )
        )
        ms = bench(lambda: concat_sdpa(*args))
        rows.append(
            dict(
                case=f"fwd B4 H{H} N4096 D{D} P64", impl="concat_sdpa", ms=ms, tflops=fl / ms / 1e9
            )
        )
    # target 3: mixed-task decode, bank of 8, P=512, cache 512, B=64
    for P in (64, 512):
        args = inputs(64, 12, 12, 1, 512, P, 64, T=8, grad=False)
        with torch.no_grad():
            for name, fn in (("prefixattn", ours), ("gather_concat_sdpa", concat_sdpa)):
                ms = bench(lambda: fn(*args))
                rows.append(
                    dict(case=f"decode bank8 B64 P{P} cache512", impl=name, ms=ms, tflops=0.0)
                )
    for r in rows:
        r["share_of_gemm"] = r["tflops"] / peak
        print(
            f"{r['case']:<36} {r['impl']:<20} {r['ms']:8.3f} ms {r['tflops']:7.1f} TFLOP/s {100 * r['share_of_gemm']:5.1f}%"
        )
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "probe.json"), "w") as f:
            json.dump({"gemm_tflops": peak, "rows": rows, "argv": sys.argv}, f, indent=1)


if __name__ == "__main__":
    main()
