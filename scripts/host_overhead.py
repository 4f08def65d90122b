"""Host cost per call of ``prefix_attention``: deterministic counts (Python-level calls,
Triton launches, tensor allocations) and host microseconds, for the forward (inference)
and forward + backward (with ``torch.autograd.grad``), for shared, per-row and bank
prefixes, next to the same-run host cost of the concat path it replaces (cat + SDPA with
a ``causal_lower_right`` mask, + grad) on the same tiny shapes.

* ``python_us`` / the counts: the Triton launches are replaced by counting no-ops
  (``prefixattn.profiling.no_launches``), everything else runs (plan lookup, value
  checks, autograd, allocation). ``--path cuda`` (default) takes the GPU launch path on
  any machine; ``--path interpreter`` the CPU interpreter's.
* ``full_us`` (GPU only): the real calls at the tiny shape, launched back to back without
  synchronizing: host wall time per call; ``full - python`` is what the launches cost.
* ``concat_sdpa_us``: the concat path's wall time per call in the same run (on a CPU it
  includes SDPA's compute, which is small at this shape; on a GPU its launches).

Timings are the best of ``--repeats`` repeats of ``--calls`` calls; they describe this
machine's CPU, never kernel speed. Counts do not depend on the machine.

    PYTHONPATH=. python scripts/host_overhead.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

import torch.nn.functional as F  # noqa: E402
from torch.nn.attention.bias import causal_lower_right  # noqa: E402

import prefixattn  # noqa: E402
from prefixattn.ops.settings import use_settings  # noqa: E402
from prefixattn.profiling import count_host_work, no_launches  # noqa: E402

B, H, N, P, D = 2, 2, 16, 4, 64


def make_calls(device: str, dtype: torch.dtype, prefix: str) -> dict[str, Callable[[], None]]:
    """fwd (no grad) and fwd_bwd of prefixattn and of the concat path, B2 H2 N16 P4 D64."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def mk(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()

    q, k, v = mk(B, H, N, D), mk(B, H, N, D), mk(B, H, N, D)
    lead = {"shared": (), "row": (B,), "bank": (3,)}[prefix]
    pk, pv = mk(*lead, H, P, D), mk(*lead, H, P, D)
    idx = torch.tensor([2, 0], device=device) if prefix == "bank" else None
    leaves = [q, k, v, pk, pv]
    gout = torch.ones(B, H, N, D, device=device, dtype=dtype)
    mask = causal_lower_right(N, N + P)

    def fwd() -> None:
        with torch.no_grad():
            prefixattn.prefix_attention(q, k, v, pk, pv, prefix_index=idx, backend="triton")

    def fwd_bwd() -> None:
        out = prefixattn.prefix_attention(q, k, v, pk, pv, prefix_index=idx, backend="triton")
        torch.autograd.grad(out, leaves, gout)

    def concat(grad: bool) -> None:
        if prefix == "shared":
            ek, ev = pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1)
        elif prefix == "row":
            ek, ev = pk, pv
        else:
            ek, ev = pk[idx], pv[idx]
        kk, vv = torch.cat([ek, k], 2), torch.cat([ev, v], 2)
        out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
        if grad:
            torch.autograd.grad(out, leaves, gout)

    def concat_fwd() -> None:
        with torch.no_grad():
            concat(False)

    return {
        "fwd": fwd,
        "fwd_bwd": fwd_bwd,
        "concat_fwd": concat_fwd,
        "concat_fwd_bwd": lambda: concat(True),
    }


def per_call_us(
    fn: Callable[[], None], calls: int, sync: Callable[[], None], repeats: int
) -> float:
    for _ in range(20):
        fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - t0)
        sync()
    return best / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=500, help="calls per repeat")
    ap.add_argument(
        "--repeats", type=int, default=11, help="repeats; the fastest is reported (default 11)"
    )
    ap.add_argument("--path", default="cuda", choices=("cuda", "interpreter"))
    ap.add_argument("--json", help="write the rows as JSON to this file")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows = []
    for bwd in ("auto", "split"):
        with use_settings(backward=bwd):
            for prefix in ("shared", "row", "bank"):
                calls = make_calls(device, dtype, prefix)
                for mode in ("fwd", "fwd_bwd"):
                    fn = calls[mode]
                    row: dict = {"bwd": bwd, "prefix": prefix, "mode": mode}
                    with no_launches(args.path) as launches:
                        c = count_host_work(fn, launches)
                        row.update(calls=c.calls, launches=c.launches, allocations=c.allocations)
                        row["python_us"] = round(per_call_us(fn, args.calls, sync, args.repeats), 1)
                    if cuda:
                        row["full_us"] = round(per_call_us(fn, args.calls, sync, args.repeats), 1)
                        row["launches_us"] = round(row["full_us"] - row["python_us"], 1)
                    base = calls["concat_" + mode]
                    row["concat_sdpa_calls"] = count_host_work(base).calls
                    row["concat_sdpa_us"] = round(
                        per_call_us(base, args.calls, sync, args.repeats), 1
                    )
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    meta = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "shape": f"B{B} H{H} Nq=Nk={N} P{P} D{D} {str(dtype).replace('torch.', '')}",
        "command": "python scripts/host_overhead.py " + " ".join(argv or sys.argv[1:]),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
