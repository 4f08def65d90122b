"""The GPU session's one command, ``benchmarks/run_gpu.sh``: its ``--dry-run`` (every
step's plumbing on the CPU, tiny shapes, Triton's interpreter) writes the layout the
device tool brings back, records of the documented schema, one status per step; and the
report computes each target of issue 23 from the numbers.

The dry run is started once per module (~50 s of CPU time). Its numbers are plumbing,
never a measurement.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.gpu_session import report
from benchmarks.gpu_session.common import RECORD_KINDS, SCHEMA
from benchmarks.gpu_session.kernel import crossover_work
from benchmarks.gpu_session.run import STAGES, STEPS

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = {"0-env.jsonl", "1-core.jsonl", "2-headline.jsonl", "3-serve.jsonl", "run.log",
          "report.md", "report.json"}  # fmt: skip


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("session")
    # the python running this suite (a venv's need not be first on PATH): run_gpu.sh
    # takes $PYTHON, and run.py starts every step with its own sys.executable
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", "benchmarks/run_gpu.sh", "--dry-run", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    return out, proc


def _records(out: Path) -> list[tuple[str, dict]]:
    recs = []
    for name, _, _ in STAGES.values():
        for line in (out / name).read_text().splitlines():
            recs.append((name, json.loads(line)))
    return recs


def test_dry_run_writes_the_files_the_device_tool_brings_back(session) -> None:
    out, proc = session
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    names = {p.name for p in out.iterdir()}
    assert names == LAYOUT, names
    assert len(names) <= 8 and all((out / n).is_file() for n in names)  # no sub-folders
    assert "DRY RUN" in (out / "report.md").read_text()
    assert "## Targets" in proc.stdout  # the table is printed last (the reply's tail)


def test_every_record_has_the_documented_schema(session) -> None:
    out, _ = session
    stage_of = {s.name: STAGES[s.stage][0] for s in STEPS}
    for fname, rec in _records(out):
        assert rec["schema"] == SCHEMA
        assert rec["kind"] in RECORD_KINDS, rec
        missing = [f for f in RECORD_KINDS[rec["kind"]] if f not in rec]
        assert not missing, (missing, rec)
        assert stage_of[rec["step"]] == fname, rec  # each step writes to its stage's file
        assert isinstance(rec["t_s"], (int, float))


def test_every_step_ran_once_without_an_error(session) -> None:
    out, _ = session
    recs = [r for _, r in _records(out)]
    status = {}
    for r in recs:
        if r["kind"] == "step":
            assert r["step"] not in status, f"two step records for {r['step']}"
            status[r["step"]] = r["status"]
    assert status == {s.name: "ok" for s in STEPS}, status
    errors = [r for r in recs if r["kind"] == "error"]
    assert not errors, errors
    failed = [r for r in recs if r["kind"] == "check" and not r["ok"]]
    assert not failed, failed


def test_each_kind_of_result_is_produced(session) -> None:
    """The plumbing of every kind of measurement ran: values vs float64 for each feature
    line, the pytest graph tests (skipped on the CPU, with the reason), rows and
    comparisons, the crossover, host, train step, serving; CUDA-only parts skipped."""
    out, _ = session
    recs = [r for _, r in _records(out)]
    kinds = {r["kind"] for r in recs}
    assert {"env", "check", "test", "gemm", "row", "compare", "crossover", "host", "e2e",
            "serve", "skip"} <= kinds, kinds  # fmt: skip
    from benchmarks.gpu_session.features import FEATURES

    checked = {r["name"] for r in recs if r["kind"] == "check"}
    assert {f"feature: {f.name}" for f in FEATURES} <= checked
    tests = [r for r in recs if r["kind"] == "test"]
    assert tests and all(t["outcome"] == "skipped" and "CUDA" in t["reason"] for t in tests)
    skips = " ".join(r["reason"] for r in recs if r["kind"] == "skip")
    assert "CUDA-graph capture needs CUDA" in skips
    # the engine's graph decode check ran its CPU path: tokens compared, eager fallback
    engine = {
        r["name"]: r for r in recs if r["kind"] == "check" and r["step"] == "core.engine_graph"
    }
    assert set(engine) == {"engine eager decode == PrefixTuning.generate alone (float32)",
                           "engine graph decode == eager decode (float32)",
                           "engine graph decode == PrefixTuning.generate alone (float32)",
                           "engine graph counters, eager fallback (float32)"}, engine  # fmt: skip
    tokens = engine["engine graph decode == eager decode (float32)"]
    assert tokens["tokens_compared"] == tokens["tokens_total"] > 0 and not tokens["mismatches"]
    counters = engine["engine graph counters, eager fallback (float32)"]["counters"]["after"]
    assert counters["replays"] == 0 and counters["eager_steps"] == counters["static_steps"] > 0
    serve = [r for r in recs if r["kind"] == "check" and r["step"] == "serve"]
    assert [r["name"] for r in serve] == ["serve cuda_graph: decode-path counters"]
    # the serving path's value rows (the KV-cache pool), forward only
    pool = [r for r in recs if r["kind"] == "check" and "KV" in r["name"]]
    assert len(pool) == sum(f.name.startswith(("KV pool", "paged KV")) for f in FEATURES) >= 12
    assert sum(r["name"].startswith("feature: paged KV") for r in pool) >= 4
    assert all(r["layout"] == "fwd" and set(r["errors"]) == {"out"} for r in pool)
    env = next(r for r in recs if r["kind"] == "env")
    assert env["dry_run"] is True and env["versions"]["torch"]


def test_report_of_the_dry_run_lists_every_target(session) -> None:
    out, _ = session
    data = json.loads((out / "report.json").read_text())
    assert data["summary"]["dry_run"] is True
    ids = {t["id"] for t in data["targets"]}
    assert {"fwdbwd_vs_sdpa", "fwdbwd_vs_eager", "host_below_gpu", "n4096_fwd_gemm",
            "n4096_bwd_gemm", "e2e_speed", "e2e_memory", "decode_P512_fwd",
            "decode_P512_graph", "decode_P64_fwd", "decode_P64_graph", "serve_graph"} == ids  # fmt: skip
    measured = [t for t in data["targets"] if t["value"] is not None]
    assert measured and all(t["met"] in (True, False) for t in measured)
    gd = data["summary"]["graph_decode"]
    assert gd["verdict"].startswith("not verified on a GPU"), gd
    assert len(gd["checks"]) == 5 and all(c["ok"] for c in gd["checks"])
    md = (out / "report.md").read_text()
    assert "## CUDA-graph decode" in md and gd["verdict"] in md


def test_a_step_past_its_limit_is_killed_and_recorded(tmp_path: Path) -> None:
    """The hard limit: core.features gets ~6.5 s of an 11.5 s total (5 s are kept for the
    report). The step's process group is stopped (SIGSTOP) as soon as it starts, so it
    outlasts its limit on any machine, however fast; the runner must kill it (SIGTERM,
    then SIGKILL, which ends a stopped process too), go on, record ``timeout`` for it, and
    leave valid JSON lines."""
    import signal
    import threading

    from benchmarks.gpu_session import run

    stopped = threading.Event()

    def stop_the_step() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not stopped.is_set():
            procs = list(run._RUNNING)
            if procs:
                os.killpg(procs[0].pid, signal.SIGSTOP)
                stopped.set()
                return
            time.sleep(0.001)

    watcher = threading.Thread(target=stop_the_step, daemon=True)
    watcher.start()
    rc = run.main(["--out", str(tmp_path), "--dry-run", "--only", "core.features",
                   "--total-s", "11.5", "--no-report"])  # fmt: skip
    watcher.join(5)
    assert stopped.is_set(), "the step process was never seen running"
    assert rc == 1
    recs = [json.loads(line) for line in (tmp_path / "1-core.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["kind"] == "step"]
    assert [(r["step"], r["status"]) for r in steps] == [("core.features", "timeout")]
    # the limit was enforced: killed at its ~6.5 s limit plus the 3 s SIGTERM grace
    assert steps[0]["wall_s"] < 20, steps[0]


# --------------------------------------------------------------------------------------
# the report's arithmetic on synthetic records (no session needed)
# --------------------------------------------------------------------------------------


def _rec(kind: str, **f: object) -> dict:
    return {"schema": SCHEMA, "step": "x", "kind": kind, "t_s": 0.0, **f}


def test_targets_are_computed_from_the_numbers() -> None:
    recs = [
        _rec("gemm", tflops=800.0, ms=1.0, n=8192),
        _rec(
            "compare",
            tag="n1024",
            mode="fwd_bwd",
            baseline_kind="sdpa",
            ratio=1.5,
            case="c",
            b="sdpa[flash]",
            name="n",
            a="prefixattn",
        ),
        _rec(
            "compare",
            tag="n1024",
            mode="fwd_bwd",
            baseline_kind="concat_eager",
            ratio=3.0,
            case="c",
            b="concat_eager",
            name="n",
            a="prefixattn",
        ),
        _rec("row", tag="n1024", mode="fwd_bwd", impl="prefixattn", time_ms=2.0, host_ms=0.5),
        _rec("row", tag="n4096", mode="fwd", impl="prefixattn", tflops=400.0, time_ms=1.0),
        _rec("row", tag="n4096", mode="bwd", impl="prefixattn", tflops=200.0, time_ms=1.0),
        _rec("e2e", impl="prefixattn", variant="eager", tokens_per_s=100.0, peak_mem_bytes=80),
        _rec("e2e", impl="prefixattn", variant="compiled", tokens_per_s=140.0, peak_mem_bytes=90),
        _rec("e2e", impl="peft_sdpa", variant="eager", tokens_per_s=100.0, peak_mem_bytes=100),
        _rec("serve", variant="eager", tokens_per_s=100.0),
        _rec("step", step="serve", status="ok"),
        _rec("skip", name="serve cuda_graph", reason="no graph option"),
    ]
    t = {x["id"]: x for x in report.targets(recs)}
    assert t["fwdbwd_vs_sdpa"]["met"] is True and t["fwdbwd_vs_sdpa"]["value"] == 1.5
    assert t["fwdbwd_vs_eager"]["met"] is False and "1.33x short" in t["fwdbwd_vs_eager"]["verdict"]
    assert t["host_below_gpu"]["met"] is True and t["host_below_gpu"]["value"] == 0.25
    assert t["n4096_fwd_gemm"]["met"] is True and t["n4096_fwd_gemm"]["value"] == 0.5
    assert t["n4096_bwd_gemm"]["met"] is False and t["n4096_bwd_gemm"]["value"] == 0.25
    # each stack at its fastest: prefixattn compiled (140) vs PEFT eager (100), memory 90/100
    assert t["e2e_speed"]["value"] == pytest.approx(1.4) and t["e2e_speed"]["met"] is True
    assert t["e2e_memory"]["value"] == pytest.approx(0.9) and t["e2e_memory"]["met"] is False
    assert t["serve_graph"]["met"] is None and "no graph option" in t["serve_graph"]["verdict"]
    assert t["decode_P512_fwd"]["met"] is None and "did not run" in t["decode_P512_fwd"]["verdict"]


def test_graph_decode_verdict_is_computed_from_the_checks() -> None:
    """Verified only with every check passed and a replay counted; a failed check names
    itself; no check at all says why (the step's status)."""
    tokens = {"tokens_compared": 40, "tokens_total": 40, "near_tie_stops": [], "mismatches": [],
              "tie_tol": 1e-3}  # fmt: skip
    ok = [
        _rec("check", step="core.engine_graph", name="engine graph decode == eager decode (x)",
             ok=True, errors={}, **tokens),
        _rec("check", step="core.engine_graph", name="engine graphs: one capture per bucket, "
             "replayed, one re-capture per bucket after a task was added (x)", ok=True,
             errors={"key_misses": 0}, replays=12, recaptures=1,
             replays_by_bucket={"1": 4, "2": 8}, counters={"after": {
                 "replays": 12, "eager_steps": 0, "key_misses": 0, "captures": {"B1": 2}}}),
    ]  # fmt: skip
    assert report.graph_decode(ok)["verdict"].startswith("verified")
    detail = report.graph_decode(ok)["checks"][1]["detail"]
    assert "replays 12 by bucket" in detail and "re-captures 1" in detail
    no_replay = [ok[0], {**ok[1], "replays": 0}]
    assert report.graph_decode(no_replay)["verdict"].startswith("not verified on a GPU")
    bad = [{**ok[0], "ok": False, "mismatches": [{"row": 1, "at": 3, "gap": 2.0}]}, ok[1]]
    g = report.graph_decode(bad)
    assert g["verdict"] == "FAILED: engine graph decode == eager decode (x)"
    assert "1 mismatched" in g["checks"][0]["detail"]
    none = report.graph_decode([_rec("step", step="core.engine_graph", status="timeout")])
    assert none["verdict"] == "not checked: step core.engine_graph timeout"


def test_crossover_is_between_the_last_fused_win_and_the_first_split_win() -> None:
    pts = [{"work": w, "fused_ms": f, "split_ms": s}
           for w, f, s in ((100, 1.0, 2.0), (400, 2.0, 2.5), (1600, 5.0, 4.0))]  # fmt: skip
    assert crossover_work(pts) == 800  # sqrt(400 * 1600)
    assert crossover_work(pts[:2]) is None  # split never wins: no crossover measured
    noisy = [*pts, {"work": 200, "fused_ms": 3.0, "split_ms": 1.0}]
    assert crossover_work(noisy) is None  # not ordered: the points say more than one number


def test_token_comparison_forgives_only_near_ties() -> None:
    """Rows equal; a row that differs where both runs' top-2 gap is within the tolerance
    stops there (a near tie, counted); a difference with a clear winner, or one run
    stopping (EOS) where the other chose a token clearly, is a mismatch."""
    from benchmarks.gpu_session.engine_graphs import compare_tokens

    same = ([5, 6, 7], [1.0, 2.0, 3.0])
    tie = (([5, 9, 7], [1.0, 1e-4, 3.0]), ([5, 6, 7], [1.0, 5e-4, 3.0]))
    clear = (([5, 9, 7], [1.0, 0.5, 3.0]), ([5, 6, 7], [1.0, 1e-4, 3.0]))
    eos = (([5], [1.0]), ([5, 6], [1.0, 0.7]))
    r = compare_tokens([same, tie[0]], [same, tie[1]], 1e-3)
    assert r["ok"] and r["tokens_compared"] == 4 and r["tokens_total"] == 6
    assert r["near_tie_stops"] == [{"row": 1, "at": 1, "gap": 5e-4}]
    r = compare_tokens([same, clear[0]], [same, clear[1]], 1e-3)
    assert not r["ok"] and r["mismatches"][0]["at"] == 1 and r["mismatches"][0]["gap"] == 0.5
    r = compare_tokens([eos[0]], [eos[1]], 1e-3)
    assert not r["ok"] and r["mismatches"][0] == {"row": 0, "at": 1, "got": [], "want": [6],
                                                   "gap": 0.7}  # fmt: skip
    assert not compare_tokens([same], [same, same], 1e-3)["ok"]  # a row missing
