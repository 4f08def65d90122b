"""Microbenchmark: one linear layer at a decode step's few rows, ``nn.Linear`` (MKL
``sgemm`` over the row-major weight) against oneDNN over a weight packed once
(``serve/engine/cpu_linear.py``) for several batch hints, on SmolLM2-135M's shapes and
their sibling fusions (q/k/v 576 -> 960, gate/up 576 -> 3072).

Each weight is called again and again, so a small one stays in cache: a best case for
the small shapes (a model's step reads every weight once, from memory). Best of
``--rounds`` of ``--calls`` calls; GB/s = weight bytes / time.

    python benchmarks/linear_shapes.py --rows 8
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch

SHAPES = [(576, 576), (576, 192), (576, 960), (576, 1536), (576, 3072), (1536, 576),
          (576, 49152)]  # fmt: skip


def _best_us(f: Callable[[], object], calls: int, rounds: int) -> float:
    for _ in range(10):
        f()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            f()
        best = min(best, (time.perf_counter() - t) / calls)
    return best * 1e6


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=8, help="M: rows of x")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--hints", default="1,8,16", help="oneDNN batch hints to pack for")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, M = {args.rows}, "
          f"load {os.getloadavg()}")  # fmt: skip
    print("K -> N | MB | " + " | ".join(["nn.Linear us"] + [f"packed({h}) us" for h in
                                          args.hints.split(",")]))  # fmt: skip
    with torch.no_grad():
        for k, n in SHAPES:
            w, x = torch.randn(n, k), torch.randn(args.rows, k)
            calls = max(5, args.calls // (1 + n * k // 2_000_000))
            us = [_best_us(lambda x=x, w=w: torch.nn.functional.linear(x, w), calls, args.rounds)]
            for h in args.hints.split(","):
                pk = torch.ops.mkldnn._reorder_linear_weight(w, int(h))
                us.append(_best_us(
                    lambda x=x, pk=pk: torch.ops.mkldnn._linear_pointwise(x, pk, None, "none", [], ""),
                    calls, args.rounds))  # fmt: skip
            mb = n * k * 4 / 1e6
            cells = [f"{u:.0f} ({mb / u * 1e3:.1f} GB/s)" for u in us]
            print(f"{k} -> {n} | {mb:.2f} | " + " | ".join(cells), flush=True)
    print(f"load {os.getloadavg()}")


if __name__ == "__main__":
    main()
