#!/usr/bin/env python3
"""Turn one benchmark results file into a markdown report and PNG plots.

Usage::

    python benchmarks/report.py RESULTS.json --out benchmarks/results/

Writes ``<out>/<stem>.md`` and ``<out>/<stem>-*.png`` (``<stem>`` = the JSON file name
without ``.json``) and prints the markdown. Input is a ``--benchmark-json`` file written by
this suite (pytest-benchmark's JSON, with each row's ``extra_info`` and the session's
``prefixattn_bench`` block); rows or implementations that are missing show as "—".

Results of a smoke run (CPU, reference backend, Triton interpreter) are refused unless
``--allow-smoke`` is given, and are then labelled as smoke everywhere: they exercise the
code, they say nothing about kernel speed.

Only the standard library and matplotlib (Agg backend) are needed; torch is not imported.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

KERNEL_BASELINES = ("prefixattn_fused", "prefixattn_split", "concat_sdpa", "concat_eager", "flex")
SERVING_BASELINES = ("gather_concat_sdpa", "gather_concat_eager")
E2E_IMPLS = (
    "prefixattn",
    "prefixattn_ckpt",
    "prefixattn_compiled",
    "prefixattn_compiled_cg",
    "prefixattn_chunked_loss",
    "peft_sdpa",
    "peft_sdpa_compiled",
    "peft_eager",
)
MODE_ORDER = {"fwd": 0, "fwd_graph": 1, "bwd": 2, "fwd_bwd": 3, "train_step": 4}
DASH = "—"


# --------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------


def load_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat dict per benchmark of this suite: extra_info plus time / name fields.

    ``time_ms`` is the CUDA-event median recorded by the suite, or pytest-benchmark's
    wall-clock median when a row has none.
    """
    rows = []
    for b in data.get("benchmarks", []):
        e = dict(b.get("extra_info") or {})
        if "suite" not in e or "impl" not in e:
            continue
        if not e.get("time_ms"):
            med = (b.get("stats") or {}).get("median")
            e["time_ms"] = med * 1e3 if med else None
            e["timer"] = "wall" if med else None
        e["name"] = b.get("name", "")
        e.setdefault("case", e["name"])
        e.setdefault("mode", "?")
        rows.append(e)
    return rows


def is_smoke(data: dict[str, Any], rows: Sequence[dict[str, Any]]) -> bool:
    meta = data.get("prefixattn_bench") or {}
    return bool(meta.get("smoke")) or any(r.get("smoke") for r in rows)


# --------------------------------------------------------------------------------------
# formatting helpers
# --------------------------------------------------------------------------------------


def fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return DASH
    return f"{x:{spec}}{suffix}"


def ratio(num: float | None, den: float | None) -> float | None:
    if not num or not den:
        return None
    return num / den


def table(header: Sequence[str], body: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def mib(b: int | None) -> float | None:
    return b / 2**20 if b else None


def by_key(rows: Iterable[dict[str, Any]]) -> OrderedDict[tuple[str, str], dict[str, dict]]:
    """(case, mode) -> impl -> row, in first-appearance order of the case (modes sorted)."""
    groups: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    order: dict[str, int] = {}
    for r in rows:
        order.setdefault(r["case"], len(order))
        groups[(r["case"], r["mode"])][r["impl"]] = r
    keys = sorted(groups, key=lambda k: (order[k[0]], MODE_ORDER.get(k[1], 9)))
    return OrderedDict((k, groups[k]) for k in keys)


# --------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------


def header_md(data: dict[str, Any], rows: Sequence[dict[str, Any]], smoke: bool) -> str:
    meta = data.get("prefixattn_bench") or {}
    dev = meta.get("device") or {}
    ver = meta.get("versions") or {}
    gemm = meta.get("gemm") or {}
    name = dev.get("name") or next((r.get("device") for r in rows if r.get("device")), "?")
    title = f"# prefixattn benchmark: {name}"
    if smoke:
        title = f"# SMOKE RUN ({name}): not performance data"
    out = [title, ""]
    if smoke:
        out += [
            "> **Smoke results.** CPU timings of tiny shapes with the reference backend and "
            "Triton's interpreter: they show that every code path runs, **not** how fast "
            "any kernel is. TFLOP/s columns are left out.",
            "",
        ]
    vers = ", ".join(f"{k} {v}" for k, v in ver.items() if v) or DASH
    out.append(f"- date (UTC): {meta.get('date_utc') or data.get('datetime') or DASH}")
    out.append(f"- grid: {meta.get('grid') or DASH}; versions: {vers}")
    if dev.get("type") == "cuda":
        bits = [name]
        for key, label in (("capability", "compute capability {}"), ("sm_count", "{} SMs"),
                           ("memory_gib", "{} GiB")):  # fmt: skip
            if dev.get(key) is not None:
                bits.append(label.format(dev[key]))
        out.append("- device: " + ", ".join(bits))
    if gemm:
        out.append(
            f"- measured bf16 GEMM peak ({gemm.get('gemm_n')}^3 matmul, same run): "
            f"**{fmt(gemm.get('gemm_tflops'), '.0f')} TFLOP/s**"
        )
    if meta.get("command"):
        out.append(f"- command: `{meta['command']}`")
    if meta.get("session_s"):
        out.append(f"- session wall time: {meta['session_s']:.0f} s (incl. autotuning / compiles)")
    out += [
        "",
        "Time = median device time (CUDA events) of the timed rounds after warm-up; speed-up "
        "= baseline time / prefixattn time (> 1: prefixattn is faster); memory = peak "
        "allocated during one call (forward + backward for `bwd`), ratio = baseline peak / "
        "prefixattn peak (> 1: prefixattn uses less). FLOPs: 4·B·H·D·(Nq·P + visible causal "
        "pairs) forward (prefix columns in full, the causal part ~half), x2.5 backward, "
        "x3.5 forward+backward, the same count for every implementation. Every row passed a "
        "correctness check against the fp32 reference before it was timed. prefixattn "
        "runs `PREFIXATTN_BWD=auto` (the default: the fused backward up to "
        "`launch.FUSED_BWD_MAX_WORK` score elements, the split one above); "
        "`prefixattn_fused` / `prefixattn_split` force one layout, so `vs prefixattn_split` "
        "< 1 means auto's choice is slower than the split backward there.",
        "",
    ]
    return "\n".join(out)


def attention_section(
    title: str, rows: Sequence[dict[str, Any]], baselines: Sequence[str], smoke: bool, unit: str
) -> str:
    """Summary (prefixattn vs each baseline per shape) and the per-impl detail table."""
    groups = by_key(rows)
    if not groups:
        return ""
    scale, ulabel = (1e3, "µs") if unit == "us" else (1.0, "ms")
    present = [b for b in baselines if any(b in g for g in groups.values())]
    head = ["shape", "mode", f"prefixattn {ulabel}"]
    if not smoke:
        head += ["TFLOP/s", "% GEMM peak"]
    head += [f"vs {b}" for b in present] + [f"mem vs {b}" for b in present]
    body = []
    for (case, mode), impls in groups.items():
        p = impls.get("prefixattn", {})
        t = p.get("time_ms")
        line = [f"`{case}`", mode, fmt(t * scale if t else None, ".1f" if unit == "us" else ".3f")]
        if not smoke:
            share = p.get("gemm_share")
            line += [fmt(p.get("tflops"), ".1f"), fmt(share * 100 if share else None, ".0f", "%")]
        line += [fmt(ratio(impls.get(b, {}).get("time_ms"), t), ".2f", "x") for b in present]
        line += [
            fmt(ratio(impls.get(b, {}).get("peak_mem_bytes"), p.get("peak_mem_bytes")), ".2f", "x")
            for b in present
        ]
        body.append(line)
    out = [f"## {title}", "", table(head, body), ""]
    # detail
    dhead = ["shape", "mode", "impl", ulabel]
    if not smoke:
        dhead += ["TFLOP/s", "% GEMM peak"]
    dhead += ["peak MiB", "first call s", "max err (out / grads)", "notes"]
    dbody = []
    for (case, mode), impls in groups.items():
        for impl in ("prefixattn", *baselines):
            r = impls.get(impl)
            if r is None:
                continue
            t = r.get("time_ms")
            line = [
                f"`{case}`",
                mode,
                impl,
                fmt(t * scale if t else None, ".1f" if unit == "us" else ".3f"),
            ]
            if not smoke:
                share = r.get("gemm_share")
                line += [
                    fmt(r.get("tflops"), ".1f"),
                    fmt(share * 100 if share else None, ".0f", "%"),
                ]
            chk = r.get("check") or {}
            grads = [v for k, v in chk.items() if k.startswith("d")]
            err = fmt(chk.get("out"), ".1e")
            if grads:
                err += " / " + fmt(max(grads), ".1e")
            notes = ", ".join(
                f"{k}={r[k]}" for k in ("gqa", "compiled", "grad") if r.get(k) is not None
            )
            line += [
                fmt(mib(r.get("peak_mem_bytes")), ".0f"),
                fmt(r.get("first_call_s"), ".1f"),
                err,
                notes,
            ]
            dbody.append(line)
    out += ["<details><summary>all rows</summary>", "", table(dhead, dbody), "", "</details>", ""]
    return "\n".join(out)


def e2e_section(rows: Sequence[dict[str, Any]], smoke: bool) -> str:
    groups = by_key(rows)
    if not groups:
        return ""
    head = [
        "case",
        "impl",
        "tokens/s",
        "step ms",
        "prefixattn speed-up over it",
        "peak GiB",
        "mem ratio",
        "loss0",
        "notes",
    ]
    body = []
    for (case, _mode), impls in groups.items():
        p = impls.get("prefixattn", {})
        for impl in E2E_IMPLS:
            r = impls.get(impl)
            if r is None:
                continue
            notes = []
            if r.get("grad_ckpt"):
                notes.append("gradient checkpointing")
            if r.get("attn_implementation"):
                notes.append(f"attn={r['attn_implementation']}")
            if r.get("backend"):
                notes.append(f"backend={r['backend']}")
            if r.get("compiled"):
                notes.append(f"torch.compile({r['compiled']})")
            if r.get("chunked_loss"):
                notes.append("chunked_loss=True")
            peak = r.get("peak_mem_bytes")
            body.append(
                [
                    f"`{case}`",
                    impl,
                    fmt(r.get("tokens_per_s"), ",.0f"),
                    fmt(r.get("time_ms"), ".1f"),
                    fmt(ratio(r.get("time_ms"), p.get("time_ms")), ".2f", "x")
                    if impl != "prefixattn"
                    else "1.00x",
                    fmt(peak / 2**30 if peak else None, ".2f"),
                    fmt(ratio(peak, p.get("peak_mem_bytes")), ".2f", "x"),
                    fmt(r.get("loss0"), ".3f"),
                    ", ".join(notes),
                ]
            )
    return "\n".join(
        [
            "## End to end: GPT-2 small prefix-tuning train step",
            "",
            "bf16 weights, B x N tokens per step (forward + backward + AdamW on the prefix). "
            "Speed-up = this impl's step time / prefixattn's; mem ratio = this impl's peak / "
            "prefixattn's. The issue's target compares `prefixattn` with `peft_sdpa`; the "
            "`_compiled` rows compare the two stacks under torch.compile.",
            "",
            table(head, body),
            "",
        ]
    )


def headline_md(kernel: Sequence[dict[str, Any]], smoke: bool) -> str:
    """The issue's target rows, if present."""
    groups = by_key(kernel)
    picks = []
    for (case, mode), impls in groups.items():
        p = impls.get("prefixattn")
        if not p:
            continue
        s = p.get("shape") or {}
        gpt2s = s.get("family") == "gpt2s" and s.get("dtype") == "bf16" and s.get("P") == 64
        if gpt2s and s.get("Nk") == 1024 and s.get("Nq") == 1024 and mode == "fwd_bwd":
            bits = [
                f"{b}: {fmt(ratio(impls.get(b, {}).get('time_ms'), p.get('time_ms')), '.2f', 'x')}"
                for b in ("concat_sdpa", "concat_eager", "flex")
            ]
            picks.append(
                f"- fwd+bwd `{case}`: prefixattn {fmt(p.get('time_ms'), '.3f')} ms; "
                f"speed-up over {', '.join(bits)}"
            )
        if gpt2s and s.get("Nk") == 4096 and s.get("Nq") == 4096 and mode in ("fwd", "bwd"):
            share = p.get("gemm_share")
            extra = (
                ""
                if smoke
                else (
                    f", {fmt(p.get('tflops'), '.0f')} TFLOP/s = "
                    f"{fmt(share * 100 if share else None, '.0f', '%')} of the measured GEMM peak"
                )
            )
            picks.append(f"- {mode} `{case}`: prefixattn {fmt(p.get('time_ms'), '.3f')} ms{extra}")
    if not picks:
        return ""
    return "\n".join(["## Target rows", "", *picks, ""])


def not_measured_md(data: dict[str, Any]) -> str:
    items = (data.get("prefixattn_bench") or {}).get("not_measured") or []
    if not items:
        return ""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    failed = []
    for it in items:
        if it.get("outcome", "").startswith("failed"):
            failed.append(it)
        else:
            counts[(it.get("outcome", "?"), it.get("reason", ""))] += 1
    out = ["## Rows not measured", ""]
    for it in failed:
        out.append(
            f"- **{it['outcome']}** `{it['nodeid'].split('::')[-1]}`: {it.get('reason', '')}"
        )
    for (outcome, reason), n in counts.items():
        out.append(f"- {n} {outcome}: {reason}")
    return "\n".join([*out, ""])


# --------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------


def _short(case: str) -> str:
    """Drop the parts every GPT-2 row shares, for axis labels."""
    for part in ("-B8", "-D64", "-H12"):
        case = case.replace(part, "")
    return case


# one colour per implementation in every plot
COLORS = {
    "prefixattn": "#1f77b4",
    "prefixattn_ckpt": "#aec7e8",
    "prefixattn_fused": "#9467bd",
    "prefixattn_split": "#8c564b",
    "prefixattn_compiled": "#17becf",
    "prefixattn_compiled_cg": "#9edae5",
    "prefixattn_chunked_loss": "#c5b0d5",
    "peft_sdpa_compiled": "#ffbb78",
    "concat_sdpa": "#ff7f0e",
    "gather_concat_sdpa": "#ff7f0e",
    "peft_sdpa": "#ff7f0e",
    "concat_eager": "#2ca02c",
    "gather_concat_eager": "#2ca02c",
    "peft_eager": "#2ca02c",
    "flex": "#d62728",
}


def _bars(
    ax: Any,
    labels: Sequence[str],
    series: Sequence[tuple[str, Sequence[float | None]]],
    rotation: int = 35,
) -> None:
    """Grouped bars, one group per label; series without any value are left out (no empty
    legend entry), missing values leave a gap."""
    present = [(name, vals) for name, vals in series if any(vals)]
    w = 0.8 / max(1, len(present))
    for j, (name, vals) in enumerate(present):
        off = (j - (len(present) - 1) / 2) * w
        xs = [i + off for i, v in enumerate(vals) if v]
        color = COLORS.get(name.removeprefix("vs "))
        ax.bar(xs, [v for v in vals if v], width=w, label=name, color=color)
    ax.set_xticks(range(len(labels)))
    ha = "right" if rotation else "center"
    ax.set_xticklabels(labels, rotation=rotation, ha=ha, fontsize=7 if rotation else 8)
    if present:
        ax.legend(fontsize=7, ncol=min(5, len(present) + 1))


def make_plots(
    rows: Sequence[dict[str, Any]], out: Path, stem: str, smoke: bool, gemm: float | None
) -> list[Path]:
    """PNG plots; returns the paths written (none if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report.py: matplotlib not installed, no plots", file=sys.stderr)
        return []
    written: list[Path] = []
    tag = "  [SMOKE: not performance]" if smoke else ""

    def save(fig: Any, name: str) -> None:
        path = out / f"{stem}-{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    kernel = [r for r in rows if r["suite"] == "kernel"]
    groups = by_key(kernel)
    modes = [m for m in ("fwd", "bwd", "fwd_bwd") if any(k[1] == m for k in groups)]
    impls = ("prefixattn", *KERNEL_BASELINES)

    def per_mode_figure() -> tuple[Any, Any]:
        n_keys = max(len([k for k in groups if k[1] == m]) for m in modes)
        return plt.subplots(
            len(modes), 1, figsize=(max(8, 0.6 * n_keys + 4), 3.2 * len(modes)), squeeze=False
        )

    # 1. speed-up of prefixattn over each baseline
    if modes and any("prefixattn" in g for g in groups.values()):
        fig, axes = per_mode_figure()
        for ax, mode in zip(axes[:, 0], modes):
            keys = [k for k in groups if k[1] == mode and "prefixattn" in groups[k]]
            p_ms = [groups[k]["prefixattn"].get("time_ms") for k in keys]
            series = [
                (
                    f"vs {b}",
                    [ratio(groups[k].get(b, {}).get("time_ms"), t) for k, t in zip(keys, p_ms)],
                )
                for b in KERNEL_BASELINES
            ]
            _bars(ax, [_short(k[0]) for k in keys], series)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_ylabel("speed-up (x)")
            ax.set_title(
                f"prefixattn speed-up (baseline time / prefixattn time), {mode}{tag}", fontsize=10
            )
        save(fig, "kernel-speedup")
    # 2. TFLOP/s of every impl against the measured GEMM peak
    if modes and not smoke:
        fig, axes = per_mode_figure()
        for ax, mode in zip(axes[:, 0], modes):
            keys = [k for k in groups if k[1] == mode]
            series = [(i, [groups[k].get(i, {}).get("tflops") for k in keys]) for i in impls]
            _bars(ax, [_short(k[0]) for k in keys], series)
            if gemm:
                ax.axhline(gemm, color="r", ls="--", lw=1, label=f"bf16 GEMM {gemm:.0f}")
                ax.set_ylim(top=gemm * 1.3)  # room for the legend above the line
                ax.legend(fontsize=7, ncol=5, loc="upper left")
            ax.set_ylabel("TFLOP/s")
            ax.set_title(f"attention TFLOP/s, {mode}", fontsize=10)
        save(fig, "kernel-tflops")
    # 3. peak memory (the last mode: fwd_bwd when present)
    if modes and any(r.get("peak_mem_bytes") for r in kernel):
        keys = [k for k in groups if k[1] == modes[-1]]
        fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(keys) + 4), 4))
        series = [
            (i, [(groups[k].get(i, {}).get("peak_mem_bytes") or 0) / 2**30 or None for k in keys])
            for i in impls
        ]
        _bars(ax, [_short(k[0]) for k in keys], series)
        ax.set_ylabel("peak GiB")
        ax.set_title(f"peak memory, {modes[-1]}{tag}", fontsize=10)
        save(fig, "kernel-memory")
    # 4. end to end
    e2e = by_key(r for r in rows if r["suite"] == "e2e")
    if e2e:
        keys = list(e2e)
        fig, ax = plt.subplots(figsize=(max(7, 2.5 * len(keys) + 3), 4))
        series = [(i, [e2e[k].get(i, {}).get("tokens_per_s") for k in keys]) for i in E2E_IMPLS]
        _bars(ax, [k[0] for k in keys], series, rotation=0)
        ax.set_ylabel("tokens / s")
        ax.set_title(f"GPT-2 small prefix-tuning train step{tag}", fontsize=10)
        save(fig, "e2e")
    # 5. serving
    serving = by_key(r for r in rows if r["suite"] == "serving")
    if serving:
        keys = list(serving)
        fig, ax = plt.subplots(figsize=(max(7, 2.5 * len(keys) + 3), 4))
        series = [
            (i, [(serving[k].get(i, {}).get("time_ms") or 0) * 1e3 or None for k in keys])
            for i in ("prefixattn", *SERVING_BASELINES)
        ]
        _bars(ax, [k[0] for k in keys], series, rotation=0)
        ax.set_ylabel("decode step, µs")
        ax.set_title(f"mixed-task decode over a prefix bank{tag}", fontsize=10)
        save(fig, "serving")
    return written


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def render(data: dict[str, Any], smoke: bool) -> str:
    rows = load_rows(data)
    kernel = [r for r in rows if r["suite"] == "kernel"]
    serving = [r for r in rows if r["suite"] == "serving"]
    e2e = [r for r in rows if r["suite"] == "e2e"]
    parts = [header_md(data, rows, smoke), headline_md(kernel, smoke)]
    parts.append(
        attention_section(
            "Kernel: prefixattn vs the concat paths", kernel, KERNEL_BASELINES, smoke, "ms"
        )
    )
    parts.append(e2e_section(e2e, smoke))
    parts.append(
        attention_section(
            "Serving: one decode step, B=64 rows over a bank of 8 prefixes",
            serving,
            SERVING_BASELINES,
            smoke,
            "us",
        )
    )
    parts.append(not_measured_md(data))
    if not rows:
        parts.append("_No benchmark rows in this file._\n")
    return "\n".join(p for p in parts if p)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, help="--benchmark-json file of this suite")
    ap.add_argument(
        "--out", type=Path, default=None, help="output folder (default: beside the JSON)"
    )
    ap.add_argument("--allow-smoke", action="store_true", help="render smoke results (labelled)")
    ap.add_argument("--no-plots", action="store_true", help="markdown only")
    ap.add_argument("--quiet", action="store_true", help="do not print the markdown")
    args = ap.parse_args(argv)

    data = json.loads(args.results.read_text())
    rows = load_rows(data)
    smoke = is_smoke(data, rows)
    if smoke and not args.allow_smoke:
        print(
            f"report.py: {args.results} holds smoke results (CPU / Triton interpreter), which "
            "are not performance data; pass --allow-smoke to render them, labelled as smoke",
            file=sys.stderr,
        )
        return 2
    out = args.out or args.results.parent
    out.mkdir(parents=True, exist_ok=True)
    stem = args.results.name.removesuffix(".json")
    md = render(data, smoke)
    plots: list[Path] = []
    if not args.no_plots:
        gemm = ((data.get("prefixattn_bench") or {}).get("gemm") or {}).get("gemm_tflops")
        plots = make_plots(rows, out, stem, smoke, gemm)
    if plots:
        md += "\n## Plots\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n"
    md_path = out / f"{stem}.md"
    md_path.write_text(md)
    if not args.quiet:
        print(md)
    print(
        f"report.py: wrote {md_path}" + (f" and {len(plots)} plots" if plots else ""),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
