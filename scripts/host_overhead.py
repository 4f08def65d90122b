"""Host time per call of ``prefix_attention``, split into prefixattn's own Python and the
rest (Triton's launch path, the driver), for the split and the fused backward.

* ``python``: the Triton launches are replaced by no-ops, everything else runs
  (validation, autograd, allocation, config lookup, grids). Runs on CPU or GPU.
* ``full`` (GPU only): the real calls at a tiny shape whose GPU work is negligible,
  launched back to back without synchronizing: host wall time per call.

``full - python`` is what the kernel launches cost on the host. Timings are the best of
``--repeats`` repeats of ``--calls`` calls, in microseconds; they describe this machine's
CPU, not kernel speed.

    PYTHONPATH=. python scripts/host_overhead.py [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
import types
from collections.abc import Callable, Iterator
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

import prefixattn  # noqa: E402
from prefixattn.ops import attention as attention_mod  # noqa: E402
from prefixattn.ops import launch  # noqa: E402

KERNELS = (
    "_attn_fwd",
    "_attn_bwd_preprocess",
    "_attn_bwd_dkdv",
    "_attn_bwd_dq",
    "_attn_bwd_prefix_dkdv",
    "_attn_bwd",
    "_prefix_grad_reduce",
)


class _NoLaunch:
    """Stands in for a jit kernel (or its autotuner): ``k[grid](...)`` evaluates the grid
    and launches nothing."""

    def __init__(self, best_config=None) -> None:
        self.best_config = best_config

    def __getitem__(self, grid):
        meta = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M2": 64, "BLOCK_N2": 64}
        if callable(grid):
            grid(meta)
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def no_launches() -> Iterator[None]:
    """Replace every Triton launch by a no-op; the launcher takes its GPU path (a tuned
    config cached per bucket, as after the first call)."""
    import triton

    tuned = {
        name: _NoLaunch(triton.Config(cfg.tiles(), num_warps=cfg.num_warps, num_stages=2))
        for name, cfgs in launch.CONFIG_LISTS.items()
        for cfg in cfgs[:1]
    }
    stubs = types.SimpleNamespace(**{k: _NoLaunch() for k in KERNELS})
    with (
        mock.patch.multiple(
            launch,
            _kernels=lambda: stubs,
            kernels_interpreted=lambda: False,
            _autotune_enabled=lambda q: True,
            _tuned=lambda name: tuned[name],
            _sm_count=lambda index: 132,
            _best_config={},
        ),
        mock.patch.object(attention_mod, "check_triton_device", lambda q: None),
    ):
        yield


def make_calls(device: str, dtype: torch.dtype) -> dict[str, Callable[[], None]]:
    """fwd (no grad) and fwd+bwd at B=1, H=2, N=16, P=4, D=64 (shared prefix)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def mk(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()

    q, k, v = mk(1, 2, 16, 64), mk(1, 2, 16, 64), mk(1, 2, 16, 64)
    pk, pv = mk(2, 4, 64), mk(2, 4, 64)
    leaves = [q, k, v, pk, pv]
    gout = torch.ones(1, 2, 16, 64, device=device, dtype=dtype)

    def fwd() -> None:
        with torch.no_grad():
            prefixattn.prefix_attention(q, k, v, pk, pv, backend="triton")

    def fwd_bwd() -> None:
        out = prefixattn.prefix_attention(q, k, v, pk, pv, backend="triton")
        torch.autograd.grad(out, leaves, gout)

    return {"fwd": fwd, "fwd_bwd": fwd_bwd}


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
    ap.add_argument("--json", help="write the rows as JSON to this file")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    calls = make_calls(device, dtype)
    rows = []
    for bwd in ("split", "fused"):
        os.environ["PREFIXATTN_BWD"] = bwd
        for mode, fn in calls.items():
            row = {"bwd": bwd, "mode": mode}
            with no_launches():
                row["python_us"] = round(per_call_us(fn, args.calls, sync, args.repeats), 1)
            if cuda:
                row["full_us"] = round(per_call_us(fn, args.calls, sync, args.repeats), 1)
                row["launches_us"] = round(row["full_us"] - row["python_us"], 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "command": "python scripts/host_overhead.py " + " ".join(argv or sys.argv[1:]),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
