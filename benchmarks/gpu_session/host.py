"""Stage 2, host microseconds per call: ``scripts/host_overhead.py`` (Python-level calls,
launches and allocations counted; host µs with the launches stubbed and, on the GPU, with
the real launches; the concat + SDPA path's host cost in the same run)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from .common import StepContext

ROOT = Path(__file__).resolve().parents[2]


def run(ctx: StepContext) -> None:
    scripts = str(ROOT / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    import host_overhead

    calls = ["--calls", "3", "--repeats", "1"] if ctx.dry else ["--calls", "200", "--repeats", "5"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "host.json"
        host_overhead.main([*calls, "--json", str(path)])
        data = json.loads(path.read_text())
    ctx.write("host", rows=data["rows"], meta=data["meta"])
