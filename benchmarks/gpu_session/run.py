"""The GPU session's one command: every step in its own process, under hard budgets.

    python -m benchmarks.gpu_session.run --out DIR [--dry-run] [--only NAME ...]
        [--total-s S]

Steps run in :data:`STEPS` order (the issue's order of importance). On the GPU each
runs as ``python -m benchmarks.gpu_session.step NAME`` in its own process group, killed
(SIGTERM, then SIGKILL) when its own budget or its stage's budget runs out; stages pass
unspent time on to the next. The dry run starts one process per stage instead (process
start-up is most of a tiny step's cost), under the same limits. A step appends its
records to its stage's file as it goes, so a killed step still leaves what it finished;
each step gets one ``step`` record (``ok`` / ``failed`` from the step process; ``timeout``
/ ``crashed`` / ``skipped`` with the reason from here). Everything lands in ``DIR`` (at
most 8 files, none in sub-folders: what the device tool brings back)::

    0-env.jsonl  1-core.jsonl  2-headline.jsonl  3-serve.jsonl  run.log
    report.md  report.json      (benchmarks.gpu_session.report, at the end)

``--dry-run``: CPU, tiny shapes, Triton's interpreter, fp32, generous limits: the plumbing
of every step (CI runs it: benchmarks/test_gpu_session_dryrun.py). Nothing it prints is
a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import DRY_ENV, SCHEMA

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Step:
    """One step: ``target`` is ``module:function`` under benchmarks.gpu_session, called
    with the step's context; ``budget_s`` / ``dry_budget_s`` its hard limit."""

    name: str
    stage: int
    budget_s: float
    dry_budget_s: float
    target: str
    what: str


STAGES = {
    # file, GPU budget (s), dry-run budget (s). The dry run needs ~50 s of CPU time; its
    # limits are a hang guard with room for a CI machine shared by several jobs.
    # GPU: 10 + 210 + 160 + 95 + REPORT_RESERVE_S = 480 s (8 min). The correctness core
    # first: issue 29 added ~50 compiled kernel specializations to it (the engine's graph
    # check in two dtypes ~12, the KV-pool / paged value rows 12, the family / pool GPU
    # tests ~14; counted at ~1.5 s each from the 2026-11-22 H100 run's first calls) and a
    # stage's unspent time moves on, so the headline rows lose time only if it is used;
    # their tail (compiled variants, GQA) is cut first
    0: ("0-env.jsonl", 10, 60),
    1: ("1-core.jsonl", 210, 170),
    2: ("2-headline.jsonl", 160, 150),
    3: ("3-serve.jsonl", 95, 90),
}

STEPS: tuple[Step, ...] = (
    Step("env", 0, 10, 60, "env:run", "device, versions, clocks, load"),
    # 1. the CUDA correctness core
    Step("core.direct", 1, 30, 60, "core:direct_launches", "direct launches vs float64"),
    # graph decode == eager decode == the row alone, captures / replays (issue 29)
    Step("core.engine_graph", 1, 40, 60, "engine_graphs:run", "engine CUDA-graph decode"),
    Step("core.graphs", 1, 70, 75, "core:pytest_graphs", "CUDA-graph, family, KV-pool tests"),
    Step("core.features", 1, 70, 150, "core:features", "bf16 value of each feature"),
    # 2. the headline rows, those with a target first (a cut drops the least needed)
    Step("gemm", 2, 15, 30, "kernel:gemm", "bf16 GEMM rate"),
    Step("kernel.n1024", 2, 40, 75, "kernel:n1024", "fwd+bwd B8 H12 N1024 D64 P64"),
    Step("kernel.n4096", 2, 40, 75, "kernel:n4096", "fwd / bwd N4096: % of GEMM"),
    Step("decode", 2, 25, 60, "kernel:decode", "bank decode P64 / P512"),
    Step("e2e.eager", 2, 35, 90, "e2e:eager", "GPT-2 small step, eager"),
    Step("e2e.cudagraph", 2, 35, 30, "e2e:cudagraph", "GPT-2 small step, CUDA graph"),
    Step("crossover", 2, 35, 60, "kernel:crossover", "fused / split backward"),
    Step("host", 2, 20, 75, "host:run", "host us per call"),
    Step("e2e.compiled", 2, 70, 90, "e2e:compiled", "GPT-2 small step, torch.compile"),
    # D128 autotuning alone took 31 s on an H100 (2026-11-22 run): last but one
    Step("kernel.gqa", 2, 45, 60, "kernel:gqa", "Llama GQA N2048 D128"),
    Step("e2e.compiled_cg", 2, 70, 30, "e2e:compiled_cg", "GPT-2 small, reduce-overhead"),
    # 3. the serving engine
    Step("serve", 3, 70, 120, "serving:run", "serving workload, eager / graph decode"),
    Step("serve.hf_cb", 3, 30, 30, "serving:hf_continuous_batching", "HF continuous batching"),
)
STEP_NAMES = tuple(s.name for s in STEPS)
REPORT_RESERVE_S = 5.0  # kept for the report at the end
MIN_STEP_S = 6.0  # a step with less than this left is skipped, not started


def stage_file(out: Path, stage: int) -> Path:
    return out / STAGES[stage][0]


def _record(path: Path, step: str, **fields: object) -> None:
    rec = {"schema": SCHEMA, "step": step, "kind": "step", "t_s": 0.0, **fields}
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _finished(out: Path, names: list[str]) -> dict[str, dict]:
    """The ``step`` records the step processes wrote for ``names``."""
    done: dict[str, dict] = {}
    for fname, _, _ in STAGES.values():
        path = out / fname
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if rec.get("kind") == "step" and rec.get("step") in names:
                done[rec["step"]] = rec
    return done


def _step_env(dry: bool, out: Path, budgets: dict[str, float]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1" if dry else "8")
    env[DRY_ENV] = "1" if dry else "0"
    # Triton: one cache for all steps, autotune results kept on disk (Triton >= 3.4), so a
    # kernel tuned by one step is not tuned again by the next
    env.setdefault("TRITON_CACHE_DIR", str(Path("/tmp") / "prefixattn-session-triton"))
    env.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    if dry:
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is the CPU path, even on a GPU box
    else:
        env.pop("TRITON_INTERPRET", None)
    env["PREFIXATTN_SESSION_OUT"] = str(out)
    env["PREFIXATTN_SESSION_BUDGETS"] = json.dumps({k: round(v, 1) for k, v in budgets.items()})
    return env


def _run_group(
    steps: list[Step], limit: float, out: Path, dry: bool, log: Any
) -> tuple[str, int | None]:
    """Run one process for ``steps`` with a hard limit; its output goes to the log."""
    names = [s.name for s in steps]
    log.write(f"\n===== {' '.join(names)} (limit {limit:.0f} s)\n")
    log.flush()
    cmd = [sys.executable, "-m", "benchmarks.gpu_session.step", *names]
    budgets = {s.name: limit for s in steps}
    # its own process group (not session): killed as a whole at its limit, and by the
    # device tool when the command returns
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_step_env(dry, out, budgets), stdout=log, stderr=subprocess.STDOUT,
        process_group=0,
    )  # fmt: skip
    _RUNNING[:] = [proc]
    try:
        return "exited", proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        _kill(proc)
        return "timeout", None
    finally:
        _RUNNING.clear()


_RUNNING: list[subprocess.Popen] = []  # the step process now running


def _kill(proc: subprocess.Popen) -> None:
    """SIGTERM to the step's process group, SIGKILL 3 s later if it is still there."""
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _on_term(signum: int, frame: Any) -> None:
    """run_gpu.sh's overall timeout (or ^C): end the running step's group too."""
    for proc in list(_RUNNING):
        _kill(proc)
    raise SystemExit(128 + signum)


def _groups(steps: list[Step], dry: bool) -> list[list[Step]]:
    """One process per step on the GPU (a hang or a crash costs one step); one per stage
    in the dry run (process start-up is most of a tiny step's time on a CPU)."""
    if not dry:
        return [[s] for s in steps]
    out: list[list[Step]] = []
    for s in steps:
        if out and out[-1][0].stage == s.stage:
            out[-1].append(s)
        else:
            out.append([s])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (created)")
    ap.add_argument("--dry-run", action="store_true", help="CPU plumbing run, tiny shapes")
    ap.add_argument("--only", nargs="*", choices=STEP_NAMES, help="run only these steps")
    ap.add_argument("--total-s", type=float, default=None, help="overall budget (s)")
    ap.add_argument("--no-report", action="store_true", help="skip the report at the end")
    args = ap.parse_args(argv)
    dry = args.dry_run
    signal.signal(signal.SIGTERM, _on_term)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    col = 2 if dry else 1
    total = args.total_s or sum(s[col] for s in STAGES.values()) + REPORT_RESERVE_S
    t0 = time.monotonic()
    stage_left = {k: float(v[col]) for k, v in STAGES.items()}
    steps = [s for s in STEPS if not args.only or s.name in args.only]
    bad = 0
    with open(out / "run.log", "a") as log:
        log.write(f"run: {' '.join(sys.argv)} dry_run={dry} total_s={total:.0f}\n")
        for group in _groups(steps, dry):
            stage = group[0].stage
            path = stage_file(out, stage)
            left_total = total - (time.monotonic() - t0) - REPORT_RESERVE_S
            own = sum(s.dry_budget_s if dry else s.budget_s for s in group)
            limit = min(own, left_total if args.only else min(stage_left[stage], left_total))
            if limit < MIN_STEP_S:
                why = "total budget spent" if left_total < MIN_STEP_S else "stage budget spent"
                for s in group:
                    _record(path, s.name, status="skipped", rc=None, wall_s=0.0,
                            budget_s=round(limit, 1), reason=why)  # fmt: skip
                    print(f"run: {s.name:18s} skipped  ({why})", flush=True)
                continue
            s0 = time.monotonic()
            how, rc = _run_group(group, limit, out, dry, log)
            wall = time.monotonic() - s0
            stage_left[stage] -= wall
            if stage + 1 in stage_left and not any(
                s.stage == stage for s in STEPS[STEPS.index(group[-1]) + 1 :]
            ):
                stage_left[stage + 1] += max(0.0, stage_left[stage])  # unspent time moves on
            done = _finished(out, [s.name for s in group])
            for s in group:
                rec = done.get(s.name)
                if rec is None:
                    status = "timeout" if how == "timeout" else "crashed"
                    _record(path, s.name, status=status, rc=rc, wall_s=round(wall, 1),
                            budget_s=round(limit, 1))  # fmt: skip
                    rec = {"status": status, "wall_s": round(wall, 1)}
                bad += rec["status"] in ("failed", "timeout", "crashed")
                print(f"run: {s.name:18s} {rec['status']:8s} {rec['wall_s']:6.1f} s "
                      f"(process limit {limit:.0f} s)", flush=True)  # fmt: skip
    print(f"run: steps done after {time.monotonic() - t0:.0f} s; results in {out}", flush=True)
    if not args.no_report:
        from . import report

        try:
            report.main([str(out), "--out", str(out), "--session-files"])
        except Exception as e:
            print(f"run: report failed: {type(e).__name__}: {e}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
