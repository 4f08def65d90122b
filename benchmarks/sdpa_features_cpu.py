"""Soft-capping and attention sinks on the CPU ``sdpa`` backend: peak memory and time,
before (the materialising reference path the ``sdpa`` backend used to run for them) and
after (this library's ``sdpa`` paths), against the same call without the features.

A Gemma-2-shaped call by default: B=1, H=8, Hkv=4, D=256, N=4096, causal, window 4096,
softcap 50 (gpt-oss's sinks: one logit per head). Every measurement is one fresh Python
process (``--worker``), so its ``ru_maxrss`` high-water mark is that call's alone:
``peak extra MiB`` = ``ru_maxrss`` after the timed calls - RSS once the inputs exist.
Configurations run back to back, alternating, ``--rounds`` times; the report gives the
minimum over rounds and repetitions and the ratio to the featureless call in the same
round, with ``uptime`` load before and after each process::

    python benchmarks/sdpa_features_cpu.py --out benchmarks/results/sdpa-features-cpu-DATE

``before`` is ``backend="reference"``: the same function the ``sdpa`` backend returned
for a call with soft-capping or sinks before this change (``reference_prefix_attention``).
CPU timings of PyTorch's CPU kernels: never Triton kernel speed.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

FEATURES = {
    "none": {},
    "softcap": {"softcap": 50.0},
    "sinks": {"sinks": True},
    "softcap+sinks": {"softcap": 50.0, "sinks": True},
}
IMPLS = {"after": "sdpa", "before": "reference"}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration in this process: times of ``--reps`` calls after one warm-up."""
    import torch

    import prefixattn
    from prefixattn.ops import sdpa_features

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    train = args.mode == "train"
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, D, N = 1, args.heads, args.kv_heads, args.head_dim, args.n

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(train)

    q, k, v = t(B, H, N, D), t(B, Hkv, N, D), t(B, Hkv, N, D)
    feat = dict(FEATURES[args.feature])
    if feat.pop("sinks", False):
        feat["sinks"] = (torch.randn(H, generator=g) * 2).requires_grad_(train)
    do = torch.randn(B, H, N, D, generator=g).to(dtype)

    def call() -> float:
        t0 = time.perf_counter()
        out = prefixattn.prefix_attention(
            q, k, v, causal=True, window=args.window, backend=IMPLS[args.impl], **feat
        )
        if train:
            out.backward(do)
        return time.perf_counter() - t0

    base = _rss_mib()
    times = [call() for _ in range(args.reps + 1)][1:]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    path = sdpa_features.feature_path(
        "softcap" in feat, "sinks" in feat, False, "cpu"
    ) if args.impl == "after" else "reference"  # fmt: skip
    return {
        "times_s": times,
        "rss_base_mib": base,
        "peak_mib": peak,
        "peak_extra_mib": peak - base,
        "path": path,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _load() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()


def configs(args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    """(impl, feature, dtype, mode) in the order one round runs them."""
    out = []
    for dtype in args.dtypes:
        for mode in args.modes:
            for feature in args.features:
                out.append(("after", feature, dtype, mode))
                if feature in args.before:
                    out.append(("before", feature, dtype, mode))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=256)
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--modes", nargs="+", default=["fwd", "train"])
    ap.add_argument("--features", nargs="+", default=list(FEATURES))
    ap.add_argument("--before", nargs="*", default=["softcap", "sinks"],
                    help="features also run on the materialising reference path")  # fmt: skip
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    ap.add_argument("--worker", nargs=4, metavar=("IMPL", "FEATURE", "DTYPE", "MODE"))
    args = ap.parse_args()
    if args.worker:
        args.impl, args.feature, args.dtype, args.mode = args.worker
        print(json.dumps(worker(args)))
        return

    rows = []
    start = datetime.datetime.now(datetime.timezone.utc)
    for rnd in range(args.rounds):
        for impl, feature, dtype, mode in configs(args):
            cmd = [sys.executable, __file__, "--worker", impl, feature, dtype, mode]
            for name in ("n", "heads", "kv_heads", "head_dim", "window", "reps", "threads"):
                cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            before = _load()
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            row = {"round": rnd, "impl": impl, "feature": feature, "dtype": dtype, "mode": mode,
                   "load_before": before, "load_after": _load()}  # fmt: skip
            if res.returncode:
                row["error"] = res.stderr[-2000:]
            else:
                row.update(json.loads(res.stdout.strip().splitlines()[-1]))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "error"}), flush=True)
    meta = {
        "date_utc": start.strftime("%Y-%m-%d %H:%M"),
        "command": "python benchmarks/sdpa_features_cpu.py " + " ".join(sys.argv[1:]),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "shape": dict(
            B=1,
            H=args.heads,
            Hkv=args.kv_heads,
            D=args.head_dim,
            N=args.n,
            window=args.window,
            softcap=50.0,
        ),
    }
    data = {"meta": meta, "rows": rows}
    if args.out:
        args.out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(render(data))


def render(data: dict[str, Any]) -> str:
    """The markdown report: one line per configuration, ratios to the featureless call."""
    meta, rows = data["meta"], [r for r in data["rows"] if "error" not in r]
    best: dict[tuple, float] = {}
    peak: dict[tuple, float] = {}
    per_round: dict[tuple, float] = {}
    for r in rows:
        key = (r["impl"], r["feature"], r["dtype"], r["mode"])
        best[key] = min(best.get(key, float("inf")), min(r["times_s"]))
        peak[key] = max(peak.get(key, 0.0), r["peak_extra_mib"])
        per_round[(*key, r["round"])] = min(r["times_s"])
    torch_v = rows[0]["torch"] if rows else "?"
    threads = rows[0]["threads"] if rows else "?"
    loads = [
        float(ast.literal_eval(r[w])[0])
        for r in data["rows"]
        for w in ("load_before", "load_after")
    ]
    lines = [
        "# Soft-capping and sinks on the CPU `sdpa` backend: before / after",
        "",
        "Written by `benchmarks/sdpa_features_cpu.py` (its docstring says what is measured).",
        "CPU wall-clock of PyTorch's CPU kernels: never Triton kernel speed.",
        "",
        f"- {meta['date_utc']} UTC: `{meta['command']}`",
        f"- CPU: {meta['cpu']}, {meta['cores']} cores, torch {torch_v}, {threads} threads, "
        f"Python {meta['python']}",
        f"- shape: {meta['shape']}",
        f"- 1-min load average (`/proc/loadavg`) before/after the processes: "
        f"{min(loads):.2f} .. {max(loads):.2f}",
        "",
        "`x none`: this configuration's best time / the best time of the same dtype and "
        "mode without soft-capping or sinks (`after`, fused SDPA); `per round`: the same "
        "ratio within each round (the processes of a round run one after the other). `peak extra MiB`: `ru_maxrss` of the process - its RSS once the "
        "inputs exist (the call's high-water mark, warm-up included).",
        "",
        "| dtype | mode | feature | impl | path | best s | x none | per round | peak extra MiB |",
        "|---|---|---|---|---|---:|---:|---|---:|",
    ]
    paths = {(r["impl"], r["feature"]): r["path"] for r in rows}
    for key in sorted(best, key=lambda k: (k[2], k[3], list(FEATURES).index(k[1]), k[0])):
        impl, feature, dtype, mode = key
        ratios = [
            per_round[(*key, rnd)] / per_round[("after", "none", dtype, mode, rnd)]
            for rnd in sorted({r["round"] for r in rows})
            if (*key, rnd) in per_round and ("after", "none", dtype, mode, rnd) in per_round
        ]
        none = best.get(("after", "none", dtype, mode))
        ratio = f"{best[key] / none:.2f}" if none else "-"
        lines.append(
            f"| {dtype} | {mode} | {feature} | {impl} | {paths[(impl, feature)]} | "
            f"{best[key]:.3f} | {ratio} | {' '.join(f'{x:.2f}' for x in ratios)} | "
            f"{peak[key]:.0f} |"
        )
    lines += ["", "Every process:", "", "| round | impl | feature | dtype | mode | times s | "
              "peak extra MiB | load before | load after |", "|---|---|---|---|---|---|---:|---|---|"]  # fmt: skip
    for r in data["rows"]:
        times = " ".join(f"{t:.3f}" for t in r.get("times_s", [])) or "error"
        lines.append(
            f"| {r['round']} | {r['impl']} | {r['feature']} | {r['dtype']} | {r['mode']} | "
            f"{times} | {r.get('peak_extra_mib', 0):.0f} | {r['load_before']} | {r['load_after']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
