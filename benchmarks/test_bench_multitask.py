"""Smoke run of ``benchmarks/multitask_step.py`` on a tiny shape, so that the script cannot
rot. Its numbers are not a measurement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.bench_smoke
def test_multitask_step_script_runs(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(ROOT / "benchmarks" / "multitask_step.py"), "--tasks", "2",
           "--rows", "1", "--seq", "8", "--layers", "1", "--hidden", "128", "--rounds", "1",
           "--steps", "1", "--lengths", "2,3", "--out", str(tmp_path / "r")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "r.json").read_text())
    assert set(data["results"]) == {"mixed", "per_task", "single", "peft"}
    assert all(r["tokens_per_s"] > 0 for r in data["results"].values())
    assert "loadavg_start" in data["env"] and (tmp_path / "r.md").is_file()
