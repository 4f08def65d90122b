"""Stage 2, the kernel rows: the bf16 GEMM rate, fwd+bwd at the target shapes against the
fastest SDPA backend that takes the concatenated problem, Llama-style GQA, the
fused / split backward crossover, and the bank decode step, eager and CUDA-graphed.

"Fastest SDPA": for every mode, each of flash / memory-efficient / cuDNN is forced with
``torch.nn.attention.sdpa_kernel`` and fed the concat problem with the prefix-aware mask
written two ways (``causal_lower_right`` over P + Nk keys, or the same mask as a bool
tensor) and, for GQA, with ``enable_gqa`` or repeated heads. A variant that raises is
recorded as a ``skip`` with torch's reason; one that runs must pass the correctness gate
(``benchlib.check_impl``); the fastest of those that pass is timed against prefixattn,
alternating, and recorded (``baseline`` says which). ``concat_eager`` (HF's eager path)
is timed in the same alternation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from benchmarks import benchlib as bl
from benchmarks.benchlib import AttnShape

from .common import Skip, StepContext, host_ms_per_call, peak_mem, time_alternating
from .core import backward_layout

# GPU shapes (the rows) and their dry-run stand-ins (tiny, fp32, interpreter)
N1024 = AttnShape("gpt2s", 8, 12, 12, 1024, 1024, 64, 64, "bf16")
N4096 = AttnShape("gpt2s", 8, 12, 12, 4096, 4096, 64, 64, "bf16")
GQA = AttnShape("llama-gqa", 4, 32, 8, 2048, 2048, 64, 128, "bf16")
DRY = AttnShape("dry", 2, 2, 2, 16, 16, 4, 16, "fp32")
DRY_GQA = AttnShape("dry-gqa", 1, 4, 2, 16, 16, 4, 16, "fp32")


def decode_shape(P: int, dry: bool) -> AttnShape:
    """One decode step of 64 rows over a bank of 8 task prefixes, 512-token cache."""
    if dry:
        return AttnShape("dry-decode", 4, 2, 2, 1, 16, P // 16, 16, "fp32", bank=2, inference=True)
    return AttnShape("bank-decode", 64, 12, 12, 1, 512, P, 64, "bf16", bank=8, inference=True)


# (B, N) points of the crossover sweep at H12 D64 P64, nearest the current threshold first
# (work 208M, 311M, 415M, 107M, 1.6G score elements; N1024 / N4096 were tuned by the
# kernel steps before, N2048 is one new autotune bucket; H100 first calls: ~10-15 s each)
CROSSOVER_POINTS = ((4, 2048), (6, 2048), (8, 2048), (8, 1024), (8, 4096))
DRY_CROSSOVER_POINTS = ((1, 16),)


def _device(ctx: StepContext) -> Any:
    import torch

    if ctx.dry:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise Skip("no CUDA device")
    return torch.device("cuda")


# --------------------------------------------------------------------------------------
# the SDPA variants of the concat problem
# --------------------------------------------------------------------------------------


@functools.cache
def _bool_mask(Nq: int, Nkc: int, device: Any) -> Any:
    """bool [Nq, P + Nk], True = attend: lower-right causal over the concatenated keys."""
    import torch

    i = torch.arange(Nq, device=device)[:, None]
    c = torch.arange(Nkc, device=device)[None, :]
    return c <= i + (Nkc - Nq)


def sdpa_variant(backend: str, mask: str, gqa: str) -> Callable[[bl.AttnInputs], Any]:
    """cat (or gather + cat for a bank) + SDPA with only ``backend`` enabled."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    which = getattr(SDPBackend, backend)

    def run(x: bl.AttnInputs) -> torch.Tensor:
        kc, vc = bl.concat_kv(x)
        q = x.q
        kwargs: dict[str, Any] = {}
        H, Hkv = q.shape[1], kc.shape[1]
        if Hkv != H:
            if gqa == "enable_gqa":
                kwargs["enable_gqa"] = True
            else:
                kc = kc.repeat_interleave(H // Hkv, dim=1)  # [B, H, P + Nk, D]
                vc = vc.repeat_interleave(H // Hkv, dim=1)
        Nq, Nkc = q.shape[2], kc.shape[2]
        attn_mask = None  # Nq == 1 sees every key
        if Nq > 1:
            attn_mask = (
                causal_lower_right(Nq, Nkc)
                if mask == "lower_right"
                else _bool_mask(Nq, Nkc, q.device)
            )
        with sdpa_kernel([which]):
            return F.scaled_dot_product_attention(q, kc, vc, attn_mask=attn_mask, **kwargs)

    return run


def sdpa_variants(shape: AttnShape) -> dict[str, Callable[[bl.AttnInputs], Any]]:
    from torch.nn.attention import SDPBackend

    backends = [b for b in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")
                if hasattr(SDPBackend, b)]  # fmt: skip
    masks = ("lower_right", "bool") if shape.Nq > 1 else ("none",)
    gqas = ("enable_gqa", "repeat") if shape.Hkv != shape.H else ("same_heads",)
    return {
        f"sdpa[{b.split('_')[0].lower()},{m},{g}]": sdpa_variant(b, m, g)
        for b in backends
        for m in masks
        for g in gqas
    }


def _step_fn(fn: Callable, x: bl.AttnInputs, mode: str) -> Callable[[], Any]:
    import torch

    if mode in ("fwd", "graph"):
        return lambda: fn(x)
    if mode == "fwd_bwd":
        return lambda: torch.autograd.grad(fn(x), x.leaves, x.dout)
    if mode == "bwd":
        out = fn(x)  # backward alone: the graph kept, replayed
        return lambda: torch.autograd.grad(out, x.leaves, x.dout, retain_graph=True)
    raise ValueError(f"mode: {mode!r}")


def _gate(ctx: StepContext, name: str, fn: Callable, x: bl.AttnInputs, shape: AttnShape,
          mode: str, rows: tuple[int, ...]) -> bool:  # fmt: skip
    """The correctness gate at the benchmarked shape. prefixattn failing it is a failed
    check (the step fails); a baseline failing it is left out with a ``skip`` saying why."""
    try:
        bl.check_impl(fn, x, shape, with_grads=mode in ("fwd_bwd", "bwd"), rows=rows)
    except AssertionError as e:
        if name == "prefixattn":
            ctx.write("check", name=f"gate {name} {shape.id} {mode}", ok=False,
                      errors={}, detail=str(e)[:500])  # fmt: skip
        else:
            ctx.write("skip", name=f"{name} {shape.id} {mode}",
                      reason=f"wrong values, left out: {str(e)[:400]}")  # fmt: skip
        return False
    return True


def fastest_sdpa(
    ctx: StepContext, shape: AttnShape, x: bl.AttnInputs, mode: str, device: Any,
    rows: tuple[int, ...] = (0,),
) -> tuple[str, Callable] | None:  # fmt: skip
    """Try every SDPA variant on this problem; record why each that cannot run fails;
    time those that pass the gate briefly; return the fastest (name, fn)."""
    ok: dict[str, Callable] = {}
    for name, fn in sdpa_variants(shape).items():
        try:
            step = _step_fn(fn, x, mode)
            step()
            bl.synchronize(device)
        except (RuntimeError, ValueError, NotImplementedError, TypeError) as e:
            msg = str(e).strip().splitlines()
            ctx.write("skip", name=f"{name} {shape.id} {mode}",
                      reason=f"{type(e).__name__}: {' '.join(msg[:3])[:400]}")  # fmt: skip
            continue
        if _gate(ctx, name, fn, x, shape, "fwd" if mode == "graph" else mode, rows):
            ok[name] = fn
    if not ok:
        ctx.write("skip", name=f"fastest SDPA {shape.id} {mode}",
                  reason="no SDPA backend ran the concat problem correctly (see the sdpa[...] skips)")  # fmt: skip
        return None
    if len(ok) == 1:
        return next(iter(ok.items()))
    quick = time_alternating(
        {n: _step_fn(f, x, mode) for n, f in ok.items()}, device, rounds=3, target_ms=10
    )
    ctx.write("row", name=f"sdpa variants {shape.id} {mode}", impl="sdpa_variants",
              mode=mode, time_ms=min(q["time_ms"] for q in quick.values()), times_ms=[],
              variants={n: q["time_ms"] for n, q in quick.items()})  # fmt: skip
    best = min(quick, key=lambda n: quick[n]["time_ms"])
    return best, ok[best]


# --------------------------------------------------------------------------------------
# rows
# --------------------------------------------------------------------------------------


def measure_shape(
    ctx: StepContext, tag: str, shape: AttnShape, modes: tuple[str, ...], *,
    eager: bool = True, host: bool = False, rows: tuple[int, ...] = (0,),
) -> None:  # fmt: skip
    """For each mode: prefixattn, the fastest SDPA variant and (``eager``) concat_eager,
    gated, then timed alternating; ``row`` records per impl, ``compare`` records of
    prefixattn against each baseline."""
    import torch

    device = _device(ctx)
    x = bl.make_inputs(shape, device)
    if shape.inference:
        x = x.detached()
    for mode in modes:
        with ctx.part(f"{shape.id} {mode}"):
            if mode == "graph" and device.type != "cuda":
                raise Skip("CUDA-graph capture needs CUDA (the eager rows ran)")
            impls: dict[str, Callable] = {"prefixattn": bl.prefixattn_call}
            if not _gate(ctx, "prefixattn", bl.prefixattn_call, x, shape,
                         "fwd" if mode == "graph" else mode, rows):  # fmt: skip
                continue
            best = fastest_sdpa(ctx, shape, x, mode, device, rows)
            if best is not None:
                impls[best[0]] = best[1]
            if eager:
                impls["concat_eager"] = bl.concat_eager
            steps = {n: _step_fn(f, x, mode) for n, f in impls.items()}
            if mode == "graph":
                with torch.no_grad():
                    steps = {n: bl.capture_cuda_graph(s) for n, s in steps.items()}
            timed = time_alternating(steps, device)
            flops = bl.attention_flops(shape, "fwd" if mode == "graph" else mode)
            for n, t in timed.items():
                extra: dict[str, Any] = {}
                if host and n == "prefixattn":
                    extra["host_ms"] = host_ms_per_call(steps[n], device)
                ctx.write("row", name=f"{shape.id} {mode}", impl=n, mode=mode, tag=tag,
                          shape=shape.as_dict(), case=shape.id, flops=flops,
                          tflops=flops / (t["time_ms"] * 1e-3) / 1e12,
                          peak_mem_bytes=peak_mem(steps[n], device),
                          baseline=n.startswith("sdpa["), **t, **extra)  # fmt: skip
            for n in timed:
                if n != "prefixattn":
                    ctx.write("compare", name=f"{shape.id} {mode}", a="prefixattn", b=n,
                              tag=tag, mode=mode, case=shape.id,
                              ratio=timed[n]["time_ms"] / timed["prefixattn"]["time_ms"],
                              baseline_kind="sdpa" if n.startswith("sdpa[") else n)  # fmt: skip
            del steps
            bl.free_memory(device)


def gemm(ctx: StepContext) -> None:
    """The bf16 GEMM rate, measured in this run (the %-of-peak targets divide by it)."""
    import torch

    device = _device(ctx)
    if device.type != "cuda":
        n = 256
        a, b = torch.randn(n, n), torch.randn(n, n)
        t = time_alternating({"mm": lambda: a @ b}, device, rounds=3)["mm"]
        ctx.write("gemm", tflops=2 * n**3 / (t["time_ms"] * 1e-3) / 1e12, ms=t["time_ms"], n=n,
                  dtype="fp32", note="dry run: CPU fp32, not a GPU rate")  # fmt: skip
        return
    g = bl.measure_gemm_tflops(device, n=8192, reps=7)
    ctx.write("gemm", tflops=g["gemm_tflops"], ms=g["gemm_ms"], n=g["gemm_n"], dtype="bf16",
              tflops_best=g["gemm_tflops_best"])  # fmt: skip


def n1024(ctx: StepContext) -> None:
    """The first target: fwd+bwd B8 H12 N1024 D64 P64 (host time per call too)."""
    modes = ("fwd_bwd",) if ctx.dry else ("fwd_bwd", "fwd", "bwd")
    measure_shape(ctx, "n1024", DRY if ctx.dry else N1024, modes, host=True)


def n4096(ctx: StepContext) -> None:
    """N = 4096: fwd and bwd TFLOP/s (the %-of-GEMM targets), and fwd+bwd."""
    if ctx.dry:
        measure_shape(ctx, "n4096", DRY, ("bwd",))
        return
    # concat_eager at N4096 materialises 6.5 GB of fp32 scores: in the fwd+bwd row only
    measure_shape(ctx, "n4096", N4096, ("fwd", "bwd"), eager=False)
    measure_shape(ctx, "n4096", N4096, ("fwd_bwd",), eager=True)


def gqa(ctx: StepContext) -> None:
    measure_shape(
        ctx, "gqa", DRY_GQA if ctx.dry else GQA, ("fwd",) if ctx.dry else ("fwd_bwd", "fwd")
    )


def decode(ctx: StepContext) -> None:
    """Bank decode over 8 tasks, P = 64 and 512: eager launches and CUDA-graph replay,
    against gather + concat + (fastest) SDPA and the eager concat path."""
    for P in (64,) if ctx.dry else (64, 512):
        shape = decode_shape(P, ctx.dry)
        rows = tuple(range(min(shape.B, 8)))  # rows with different bank entries
        measure_shape(ctx, f"decode-P{P}", shape, ("fwd", "graph"), rows=rows)


def crossover(ctx: StepContext) -> None:
    """Backward time, fused vs split layout, alternating, over problem sizes around the
    current ``FUSED_BWD_MAX_WORK`` (B·H·Nq·(P+Nk) score elements); the measured crossover
    is the geometric mean of the largest size where fused wins and the smallest where
    split wins."""
    import torch

    device = _device(ctx)
    try:
        from prefixattn.ops import settings as ops_settings

        current = getattr(ops_settings, "FUSED_BWD_MAX_WORK", None)
    except ImportError:
        current = None
    points = []
    pts = DRY_CROSSOVER_POINTS if ctx.dry else CROSSOVER_POINTS
    for B, N in pts:
        shape = AttnShape("xover", B, 2 if ctx.dry else 12, 2 if ctx.dry else 12, N, N,
                          4 if ctx.dry else 64, 16 if ctx.dry else 64, "fp32" if ctx.dry else "bf16")  # fmt: skip
        work = shape.B * shape.H * shape.Nq * (shape.P + shape.Nk)
        with ctx.part(f"crossover {shape.id}"):
            x = bl.make_inputs(shape, device)
            times: dict[str, list[float]] = {"fused": [], "split": []}
            for r in range(5 if not ctx.dry else 1):
                for layout in ("fused", "split") if r % 2 == 0 else ("split", "fused"):
                    with backward_layout(layout):
                        step = _step_fn(bl.prefixattn_call, x, "bwd")  # forward here
                        step()
                        t = time_alternating({layout: step}, device, rounds=1, warmup=1)
                        times[layout].append(t[layout]["time_ms"])
                    del step
            med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
            pt = {"B": B, "N": N, "work": work, "fused_ms": med["fused"], "split_ms": med["split"],
                  "split_over_fused": med["split"] / med["fused"]}  # fmt: skip
            points.append(pt)
            ctx.write("row", name=f"crossover {shape.id}", impl="fused_vs_split", mode="bwd",
                      time_ms=med["fused"], times_ms=times["fused"], split_times_ms=times["split"],
                      **pt)  # fmt: skip
            del x
            if device.type == "cuda":
                torch.cuda.empty_cache()
    ctx.write("crossover", points=points, measured_max_work=crossover_work(points),
              current_max_work=current)  # fmt: skip
    measured = crossover_work(points)
    print(f"FUSED_BWD_MAX_WORK: measured {measured} (current {current})", flush=True)


def crossover_work(points: list[dict[str, Any]]) -> int | None:
    """Geometric mean of the largest work where fused is faster and the smallest where
    split is faster, when they are ordered so (else the measured side's bound, or None)."""
    fused = [p["work"] for p in points if p["fused_ms"] <= p["split_ms"]]
    split = [p["work"] for p in points if p["split_ms"] < p["fused_ms"]]
    if fused and split:
        lo, hi = max(fused), min(split)
        if lo < hi:
            return int((lo * hi) ** 0.5)
        return None  # not monotonic: noise or a shape effect; the points say more
    return None
