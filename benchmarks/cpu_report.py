"""Markdown summary of a CPU benchmark JSON (``benchmarks/test_bench_cpu.py``).

    python benchmarks/cpu_report.py benchmarks/results/cpu-DATE.json > benchmarks/results/cpu-DATE.md

CPU timings of PyTorch's CPU kernels: never Triton kernel speed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _load(rows: list[dict[str, Any]]) -> str:
    loads = [b["extra_info"]["loadavg_1m"] for b in rows if "loadavg_1m" in b["extra_info"]]
    return f"{min(loads):.1f} .. {max(loads):.1f}" if loads else "not recorded"


def render(data: dict[str, Any]) -> str:
    """The markdown report of one pytest-benchmark JSON of the CPU suite."""
    rows = [b for b in data.get("benchmarks", []) if b.get("extra_info", {}).get("suite") == "cpu"]
    meta = data.get("prefixattn_bench", {})
    first = rows[0]["extra_info"] if rows else {}
    lines = [
        '# prefixattn CPU benchmark: `backend="auto"` (sdpa) vs `torch.cat` + SDPA',
        "",
        "CPU wall-clock times (`time.perf_counter`) of PyTorch's CPU kernels; **not** "
        "Triton kernel speed.",
        "",
        f"- date (UTC): {meta.get('date_utc', '?')}",
        f"- command: `{meta.get('command', '?')}`",
        f"- torch {first.get('torch', '?')}, {first.get('torch_threads', '?')} CPU threads, "
        f"python {meta.get('versions', {}).get('python', '?')}",
        f"- full shapes: {first.get('full', '?')} (False: the tiny CI shape)",
        f"- 1-min load average at the rows' start: {_load(rows)}",
        "",
        "`ab ratio`: auto / concat_sdpa, median of per-round ratios of the two timed "
        "alternately on the same inputs (the fair comparison on a machine whose load "
        "drifts). `saved MB`: bytes the autograd graph keeps for the backward.",
        "",
        "| case | mode | impl | median ms | min ms | ab ratio (auto / concat) | saved MB |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    order = {"auto": 0, "concat_sdpa": 1, "reference": 2}
    rows.sort(
        key=lambda b: (
            b["extra_info"]["case"],
            b["extra_info"]["mode"],
            order.get(b["extra_info"]["impl"], 9),
        )
    )
    for b in rows:
        e = b["extra_info"]
        ratio = f"{e['ab_ratio']:.3f}" if "ab_ratio" in e else ""
        saved = f"{e['saved_bytes'] / 2**20:.1f}" if "saved_bytes" in e else "-"
        lines.append(
            f"| {e['case']} | {e['mode']} | {e['impl']} | {_ms(e.get('time_ms'))} | "
            f"{_ms(e.get('time_ms_min'))} | {ratio} | {saved} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", type=Path, help="pytest-benchmark JSON of test_bench_cpu.py")
    args = ap.parse_args(argv)
    print(render(json.loads(args.json.read_text())), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
