"""The GPU session's report: the step files -> one JSON, a markdown report and a PNG.

    python -m benchmarks.gpu_session.report SESSION_DIR [--out benchmarks/results]

``SESSION_DIR`` holds what the session wrote (``0-env.jsonl`` ... ``3-serve.jsonl``).
Writes ``<out>/<gpu>-<date>.json`` (every record, the targets, the summary),
``<gpu>-<date>.md``, ``<gpu>-<date>.png`` (matplotlib; left out with a note if it is
missing) and ``<gpu>-<date>.log`` (the session's run.log). ``--session-files`` writes
``report.md`` / ``report.json`` instead (what run.py does at the end of a session, so the
device tool brings the report back with the files).

Every target of issue 23 is computed from the records, never typed in: met, missed (by
how much), or "not measured" with the step's status. A dry run's report says so on top
and in every target line: its numbers are plumbing, not measurements.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

STAGE_FILES = ("0-env.jsonl", "1-core.jsonl", "2-headline.jsonl", "3-serve.jsonl")


def load(session_dir: Path) -> list[dict[str, Any]]:
    """Every record of the session, in file order (a line cut by a kill is skipped)."""
    recs = []
    for name in STAGE_FILES:
        path = session_dir / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return recs


def _one(recs: list[dict], **match: Any) -> dict | None:
    hits = [r for r in recs if all(r.get(k) == v for k, v in match.items())]
    return hits[-1] if hits else None


def _all(recs: list[dict], **match: Any) -> list[dict]:
    return [r for r in recs if all(r.get(k) == v for k, v in match.items())]


# --------------------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------------------


def _target(tid: str, text: str, value: float | None, threshold: float, higher: bool,
            unit: str, source: str, why_missing: str = "") -> dict[str, Any]:  # fmt: skip
    if value is None:
        met = None
        verdict = f"not measured{': ' + why_missing if why_missing else ''}"
    else:
        met = value >= threshold if higher else value <= threshold
        if met:
            verdict = "met"
        else:
            by = (threshold / value) if higher and value > 0 else (value / threshold)
            verdict = f"missed: {value:.3g}{unit} vs {threshold:g}{unit} ({by:.2f}x short)"
    return {"id": tid, "target": text, "value": value, "threshold": threshold,
            "higher_is_better": higher, "unit": unit, "met": met, "verdict": verdict,
            "source": source}  # fmt: skip


def _step_status(recs: list[dict], step: str) -> str:
    """Why a target has no value: the step's status and its first error or skip."""
    r = _one(recs, kind="step", step=step)
    if r is None:
        return f"step {step} did not run"
    out = f"step {step} {r['status']}" + (f" ({r['reason']})" if r.get("reason") else "")
    mine = [x for x in recs if x.get("step") == step]
    first = next((x for x in mine if x["kind"] == "error"), None) or next(
        (x for x in mine if x["kind"] == "skip" and not x["name"].startswith("sdpa[")), None
    )
    if first:
        out += f"; {first['name']}: {first.get('error') or first.get('reason')}"[:300]
    return out


def _ratio(recs: list[dict], tag: str, mode: str, kind: str) -> tuple[float | None, str]:
    r = _one(recs, kind="compare", tag=tag, mode=mode, baseline_kind=kind)
    return (r["ratio"], f"{r['case']} {mode}: prefixattn vs {r['b']}") if r else (None, "")


def targets(recs: list[dict]) -> list[dict[str, Any]]:
    """Issue 23's targets, each computed from the records."""
    out = []
    gemm = _one(recs, kind="gemm")
    v, src = _ratio(recs, "n1024", "fwd_bwd", "sdpa")
    out.append(_target("fwdbwd_vs_sdpa", "fwd+bwd B8 H12 N1024 D64 P64: >= 1.25x the fastest "
                       "concat + SDPA backend", v, 1.25, True, "x", src,
                       _step_status(recs, "kernel.n1024")))  # fmt: skip
    v, src = _ratio(recs, "n1024", "fwd_bwd", "concat_eager")
    out.append(_target("fwdbwd_vs_eager", "fwd+bwd N1024: >= 4x concat_eager", v, 4.0, True,
                       "x", src, _step_status(recs, "kernel.n1024")))  # fmt: skip
    row = _one(recs, kind="row", tag="n1024", mode="fwd_bwd", impl="prefixattn")
    host = row.get("host_ms") if row else None
    out.append(_target("host_below_gpu", "fwd+bwd N1024: host time per call below its GPU "
                       "time (host / GPU)", host / row["time_ms"] if host else None, 1.0, False,
                       "", "host_ms / time_ms of the prefixattn row",
                       _step_status(recs, "kernel.n1024")))  # fmt: skip
    for mode, thr in (("fwd", 0.40), ("bwd", 0.30)):
        row = _one(recs, kind="row", tag="n4096", mode=mode, impl="prefixattn")
        share = row["tflops"] / gemm["tflops"] if row and gemm else None
        out.append(_target(f"n4096_{mode}_gemm", f"N4096 D64 {mode}: >= {thr:.0%} of the bf16 "
                           "GEMM rate of the same run", share, thr, True, "",
                           "prefixattn TFLOP/s / GEMM TFLOP/s",
                           _step_status(recs, "kernel.n4096" if gemm else "gemm")))  # fmt: skip
    out += _e2e_targets(recs)
    for P, thr in ((512, 3.0), (64, 1.5)):
        for mode, label in (("fwd", "eager"), ("graph", "CUDA graph")):
            v, src = _ratio(recs, f"decode-P{P}", mode, "sdpa")
            out.append(_target(f"decode_P{P}_{mode}", f"bank decode, 8 tasks, P={P} ({label}): "
                               f">= {thr:g}x gather + concat + sdpa", v, thr, True, "x", src,
                               _step_status(recs, "decode")))  # fmt: skip
    eager = _one(recs, kind="serve", variant="eager")
    graph = _one(recs, kind="serve", variant="cuda_graph")
    v = graph["tokens_per_s"] / eager["tokens_per_s"] if eager and graph else None
    skip = _one(recs, kind="skip", name="serve cuda_graph")
    out.append(_target("serve_graph", "serving: CUDA-graph decode >= 2x eager decode tokens/s",
                       v, 2.0, True, "x", "serve records",
                       skip["reason"] if skip else _step_status(recs, "serve")))  # fmt: skip
    return out


def _e2e_targets(recs: list[dict]) -> list[dict[str, Any]]:
    best: dict[str, dict] = {}
    for r in _all(recs, kind="e2e"):
        if r["impl"] not in best or r["tokens_per_s"] > best[r["impl"]]["tokens_per_s"]:
            best[r["impl"]] = r
    a, b = best.get("prefixattn"), best.get("peft_sdpa")
    why = ", ".join(_step_status(recs, s) for s in ("e2e.eager", "e2e.compiled"))
    speed = a["tokens_per_s"] / b["tokens_per_s"] if a and b else None
    ran = {
        s: sorted(r["variant"] for r in _all(recs, kind="e2e", impl=s))
        for s in ("prefixattn", "peft_sdpa")
    }
    src = ""
    if a and b:
        src = f"prefixattn {a['variant']} vs PEFT {b['variant']} (measured: {ran})"
        if ran["prefixattn"] != ran["peft_sdpa"]:
            src += "; NOT the same variants: the comparison is incomplete"
    mem = None
    if a and b and a.get("peak_mem_bytes") and b.get("peak_mem_bytes"):
        mem = a["peak_mem_bytes"] / b["peak_mem_bytes"]
    return [
        _target(
            "e2e_speed",
            "GPT-2 small prefix-tuning step, each at its fastest: >= 1.3x PEFT's tokens/s",
            speed,
            1.3,
            True,
            "x",
            src,
            why,
        ),
        _target(
            "e2e_memory",
            "... at <= 0.85x PEFT's peak memory (each stack's own)",
            mem,
            0.85,
            False,
            "x",
            src,
            why or "no CUDA memory statistics",
        ),
    ]


# --------------------------------------------------------------------------------------
# summary and markdown
# --------------------------------------------------------------------------------------


def graph_decode(recs: list[dict]) -> dict[str, Any]:
    """Issue 29's verdict on the engine's CUDA-graph decode: the token checks (graph ==
    eager == the row alone) and the counters (captures, replays, eager steps) of
    ``core.engine_graph``, and the serve step's counters. ``verified`` only when every
    check passed and graphs were replayed (a CPU dry run checks the eager fallback only)."""
    checks = [r for r in recs if r["kind"] == "check" and (r.get("step") == "core.engine_graph"
              or (r.get("step") == "serve" and "cuda_graph" in r["name"]))]  # fmt: skip
    rows = []
    for c in checks:
        if "tokens_compared" in c:
            detail = (f"{c['tokens_compared']}/{c['tokens_total']} tokens compared, "
                      f"{len(c['near_tie_stops'])} rows stopped at a near tie "
                      f"(gap <= {c['tie_tol']:g}), {len(c['mismatches'])} mismatched")  # fmt: skip
            if c["mismatches"]:
                detail += f": {json.dumps(c['mismatches'][:2])}"
        elif "counters" in c or "delta" in c:
            bad = [k for k, v in c["errors"].items() if v]
            n = c["delta"] if "delta" in c else c["counters"]["after"]
            caps = c.get("captures") or (c.get("counters") or {}).get("after", {}).get("captures")
            detail = (f"captures {caps or 0}, replays {n['replays']} by bucket "
                      f"{c.get('replays_by_bucket')}, eager static steps {n['eager_steps']}, "
                      f"key misses {n['key_misses']}"
                      + (f", re-captures {c['recaptures']}" if "recaptures" in c else "")
                      + ("" if "delta" not in c else
                      " (during the timed load)") + (f"; failed: {', '.join(bad)}" if bad else ""))  # fmt: skip
        else:
            detail = json.dumps(c["errors"])
        rows.append({"step": c["step"], "name": c["name"], "ok": c["ok"], "detail": detail})
    replayed = any(c.get("replays") or (c.get("delta") or {}).get("replays") for c in checks)
    failed = [c["name"] for c in checks if not c["ok"]]
    if failed:
        verdict = f"FAILED: {'; '.join(failed)}"
    elif not checks:
        verdict = f"not checked: {_step_status(recs, 'core.engine_graph')}"
    elif not replayed:
        verdict = "not verified on a GPU: no graph was replayed (the eager fallback passed)"
    else:
        verdict = "verified: graph decode == eager decode == the row alone; replayed, no re-capture"
    return {"verdict": verdict, "checks": rows}


def summary(recs: list[dict]) -> dict[str, Any]:
    env = _one(recs, kind="env") or {}
    checks = _all(recs, kind="check")
    tests = _all(recs, kind="test")
    xo = _one(recs, kind="crossover")
    return {
        "dry_run": bool(env.get("dry_run")),
        "device": env.get("device"),
        "versions": env.get("versions"),
        "command": env.get("command"),
        "date_utc": env.get("date_utc"),
        "git_commit": env.get("git_commit"),
        "loadavg": env.get("loadavg"),
        "nvidia_smi": env.get("nvidia_smi"),
        "gemm_tflops": (_one(recs, kind="gemm") or {}).get("tflops"),
        "steps": {
            r["step"]: {k: r.get(k) for k in ("status", "wall_s", "budget_s", "reason")}
            for r in _all(recs, kind="step")
        },
        "checks": {
            "passed": sum(c["ok"] for c in checks),
            "failed": [
                c["name"] + (f" [{c['layout']}]" if c.get("layout") else "")
                for c in checks
                if not c["ok"]
            ],
        },
        "graph_decode": graph_decode(recs),
        "tests": dict(Counter(t["outcome"] for t in tests)),
        "failed_tests": [t["nodeid"] for t in tests if t["outcome"] == "failed"],
        "fused_bwd_max_work": {
            "measured": xo and xo["measured_max_work"],
            "current": xo and xo["current_max_work"],
        },
        "errors": [f"{r['step']}: {r['name']}: {r['error']}" for r in _all(recs, kind="error")],
        "skips": [f"{r['step']}: {r['name']}: {r['reason']}" for r in _all(recs, kind="skip")],
    }


def _f(x: Any, fmt: str = ".3g") -> str:
    return "—" if x is None else format(x, fmt)


def markdown(recs: list[dict], tgts: list[dict], summ: dict) -> str:
    dev = summ["device"] or {}
    gemm = summ["gemm_tflops"]
    lines = []
    if summ["dry_run"]:
        lines += ["> **DRY RUN (CPU, Triton interpreter, tiny shapes): plumbing only, not a "
                  "measurement.**", ""]  # fmt: skip
    lines += [
        f"# GPU session: {dev.get('name', '?')}", "",
        f"- device: {dev.get('name')} (capability {dev.get('capability')}, "
        f"{dev.get('sm_count')} SMs, {dev.get('memory_gib')} GiB)",
        f"- versions: {json.dumps(summ['versions'])}",
        f"- command: `{summ['command']}`; date {summ['date_utc']}; commit {summ['git_commit']}",
        f"- load average at start: {summ['loadavg']}; bf16 GEMM rate this run: "
        f"{_f(gemm, '.1f')} TFLOP/s",
        f"- nvidia-smi: `{(summ['nvidia_smi'] or '').replace(chr(10), ' | ')}`", "",
        "## Targets (issue 23)", "", "| target | value | verdict | from |", "|---|---|---|---|",
    ]  # fmt: skip
    for t in tgts:
        lines.append(f"| {t['target']} | {_f(t['value'])}{t['unit'] if t['value'] else ''} | "
                     f"{t['verdict']} | {t['source']} |")  # fmt: skip
    lines += ["", "## Correctness core", "",
              f"- value checks: {summ['checks']['passed']} passed, "
              f"{len(summ['checks']['failed'])} failed {summ['checks']['failed'] or ''}",
              f"- pytest (CUDA-graph capture etc.): {summ['tests']} "
              f"{summ['failed_tests'] or ''}", ""]  # fmt: skip
    gd = summ["graph_decode"]
    lines += ["## CUDA-graph decode (serving engine, issue 29)", "", f"**{gd['verdict']}**", "",
              "| step | check | ok | detail |", "|---|---|---|---|"]  # fmt: skip
    for c in gd["checks"]:
        lines.append(f"| {c['step']} | {c['name']} | {c['ok']} | {c['detail']} |")
    lines.append("")
    lines += ["## Kernel rows", "", "| row | impl | ms | TFLOP/s | % GEMM | peak MiB | "
              "baseline time / prefixattn |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    ratios = {(r["name"], r["b"]): r["ratio"] for r in _all(recs, kind="compare")}
    for r in _all(recs, kind="row"):
        if r["impl"] in ("sdpa_variants", "fused_vs_split"):
            continue
        share = r.get("tflops") / gemm if gemm and r.get("tflops") else None
        mem = r.get("peak_mem_bytes")
        lines.append(f"| {r['name']} | {r['impl']} | {_f(r['time_ms'], '.4g')} | "
                     f"{_f(r.get('tflops'), '.1f')} | {_f(share and 100 * share, '.0f')} | "
                     f"{_f(mem and mem / 2**20, '.0f')} | "
                     f"{_f(ratios.get((r['name'], r['impl'])), '.2f')} |")  # fmt: skip
    xo = _one(recs, kind="crossover")
    if xo:
        lines += ["", "## Fused / split backward crossover", "",
                  f"measured FUSED_BWD_MAX_WORK ~ {xo['measured_max_work']} (current "
                  f"{xo['current_max_work']}); set it in prefixattn/ops/settings.py", "",
                  "| B | N | work | fused ms | split ms | split / fused |", "|---|---|---|---|---|---|"]  # fmt: skip
        for p in xo["points"]:
            lines.append(f"| {p['B']} | {p['N']} | {p['work']} | {_f(p['fused_ms'], '.4g')} | "
                         f"{_f(p['split_ms'], '.4g')} | {_f(p['split_over_fused'], '.2f')} |")  # fmt: skip
    e2e = _all(recs, kind="e2e")
    if e2e:
        lines += ["", "## GPT-2 small prefix-tuning step", "",
                  "| stack | variant | tokens/s | step ms | peak MiB (own) | first step s |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for r in e2e:
            mem = r.get("peak_mem_bytes")
            lines.append(f"| {r['impl']} | {r['variant']} | {_f(r['tokens_per_s'], '.0f')} | "
                         f"{_f(r['time_ms'], '.4g')} | {_f(mem and mem / 2**20, '.0f')} | "
                         f"{_f(r.get('first_call_s'), '.1f')} |")  # fmt: skip
    host = _one(recs, kind="host")
    if host:
        lines += ["", "## Host µs per call (tiny shape)", "",
                  "| bwd | prefix | mode | calls | launches | python µs | full µs | concat+sdpa µs |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for h in host["rows"]:
            lines.append(f"| {h['bwd']} | {h['prefix']} | {h['mode']} | {h['calls']} | "
                         f"{h['launches']} | {h['python_us']} | {h.get('full_us', '—')} | "
                         f"{h['concat_sdpa_us']} |")  # fmt: skip
    serve = _all(recs, kind="serve")
    if serve:
        lines += ["", "## Serving", "", "| variant | tokens/s | p50 s | p99 s | TTFT p50 s |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for r in serve:
            lines.append(f"| {r['variant']} | {_f(r['tokens_per_s'], '.1f')} | "
                         f"{_f(r.get('latency_p50_s'))} | {_f(r.get('latency_p99_s'))} | "
                         f"{_f(r.get('ttft_p50_s'))} |")  # fmt: skip
    lines += ["", "## Steps", "", "| step | status | wall s | budget s |", "|---|---|---|---|"]
    for name, s in summ["steps"].items():
        lines.append(f"| {name} | {s['status']}{' (' + s['reason'] + ')' if s.get('reason') else ''} "
                     f"| {s['wall_s']} | {s['budget_s']} |")  # fmt: skip
    if summ["errors"] or summ["skips"]:
        lines += ["", "## Not measured", ""]
        lines += [f"- error: {e}" for e in summ["errors"]]
        grouped: dict[str, int] = defaultdict(int)
        for s in summ["skips"]:
            grouped[s.split(": ", 2)[-1][:200]] += 1
        lines += [f"- skipped ({n}x): {why}" for why, n in grouped.items()]
    return "\n".join(lines) + "\n"


def plot(recs: list[dict], tgts: list[dict], path: Path, dry: bool) -> str | None:
    """Targets as value / threshold bars (1 = just met) and the kernel speed-ups."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"no plot: matplotlib missing ({e})"
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(14, 6))
    measured = [t for t in tgts if t["value"]]
    score: Callable[[dict], float] = lambda t: (  # noqa: E731
        t["value"] / t["threshold"] if t["higher_is_better"] else t["threshold"] / t["value"]
    )
    a1.barh([t["id"] for t in measured], [score(t) for t in measured],
            color=["tab:green" if t["met"] else "tab:red" for t in measured])  # fmt: skip
    a1.axvline(1.0, color="k", lw=1)
    a1.set_xlabel("measured / target (>= 1: met)")
    a1.set_title("issue 23 targets" + (" (DRY RUN)" if dry else ""))
    comps = _all(recs, kind="compare")
    labels = [f"{c.get('tag', c['name'])} {c.get('mode', '')} vs {c['b'][:22]}" for c in comps]
    a2.barh(labels, [c["ratio"] for c in comps], color="tab:blue")
    a2.axvline(1.0, color="k", lw=1)
    a2.set_xscale("log")
    a2.set_xlabel("baseline time / prefixattn time (same run, alternating)")
    a2.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _local_commit() -> str | None:
    from .env import git_commit

    commit = git_commit()
    return f"{commit} (the checkout that wrote the report)" if commit else None


def stem_for(summ: dict) -> str:
    import re

    name = (summ.get("device") or {}).get("name", "gpu").lower().replace("nvidia", "")
    name = re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"
    date = (summ.get("date_utc") or "")[:10].replace("-", "") or "undated"
    return f"{'dryrun-' if summ['dry_run'] else ''}{name}-{date}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("session_dir")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--session-files", action="store_true",
                    help="write report.md / report.json (no plot) into --out")  # fmt: skip
    args = ap.parse_args(argv)
    recs = load(Path(args.session_dir))
    tgts = targets(recs)
    summ = summary(recs)
    if not summ["git_commit"]:  # the device machine's copy has no .git: this checkout's
        summ["git_commit"] = _local_commit()
    md = markdown(recs, tgts, summ)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "report" if args.session_files else stem_for(summ)
    data = {"schema": 1, "summary": summ, "targets": tgts, "records": recs}
    if args.session_files:
        data.pop("records")  # they are in the step files beside it
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    if not args.session_files:
        note = plot(recs, tgts, out / f"{stem}.png", summ["dry_run"])
        if note:
            md += f"\n{note}\n"
    (out / f"{stem}.md").write_text(md)
    log = Path(args.session_dir) / "run.log"
    if not args.session_files and log.is_file():
        (out / f"{stem}.log").write_text(log.read_text())
    print("\n".join(f"{t['verdict'][:60]:60s} {t['target']}" for t in tgts))
    return {"summary": summ, "targets": tgts, "stem": stem}


if __name__ == "__main__":
    main()
