"""The measurement scripts a GPU session relies on run (here on CPU, tiny settings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_host_overhead_script(tmp_path: Path) -> None:
    """scripts/host_overhead.py: prefixattn's Python time per call with the launches
    stubbed, for both backward modes and both call kinds (no timing is asserted)."""
    out = tmp_path / "host.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "scripts/host_overhead.py", "--calls", "20", "--json", str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {(r["bwd"], r["mode"]): r for r in data["rows"]}
    assert set(rows) == {(b, m) for b in ("split", "fused") for m in ("fwd", "fwd_bwd")}
    for r in rows.values():
        assert 0 < r["python_us"] < 1e5, r
    assert data["meta"]["command"].startswith("python scripts/host_overhead.py")
