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
        [sys.executable, "scripts/host_overhead.py", "--calls", "20", "--repeats", "2", "--json", str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {(r["bwd"], r["prefix"], r["mode"]): r for r in data["rows"]}
    assert set(rows) == {
        (b, p, m) for b in ("auto", "split") for p in ("shared", "row", "bank")
        for m in ("fwd", "fwd_bwd")
    }  # fmt: skip
    for r in rows.values():
        assert 0 < r["python_us"] < 1e5 and 0 < r["concat_sdpa_us"] < 1e5, r
        assert r["launches"] == 1 if r["mode"] == "fwd" else r["launches"] >= 2, r
    assert data["meta"]["command"].startswith("python scripts/host_overhead.py")


def test_resource_probe_script(tmp_path: Path) -> None:
    """scripts/resource_probe.py writes its table (every forward candidate at D=64)."""
    from prefixattn.ops.settings import FWD_CONFIGS

    out = tmp_path / "res.md"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "scripts/resource_probe.py", "--kernels", "fwd", "--d", "64",
         "--jobs", "2", "--markdown", str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )  # fmt: skip
    if "cuobjdump" in proc.stderr and proc.returncode:
        import pytest

        pytest.skip("this Triton build ships no NVIDIA backend tools")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| fwd |")]
    assert len(rows) == len(FWD_CONFIGS)
    assert "python scripts/resource_probe.py --kernels fwd" in out.read_text()


def test_check_layers_script(tmp_path: Path, monkeypatch) -> None:
    """scripts/check_layers.py passes on the package and names an upward import, a
    module of its own layer, a cycle and an undeclared module."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import check_layers as cl

    assert cl.check() == []
    proc = subprocess.run([sys.executable, "scripts/check_layers.py"], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ops = tmp_path / "prefixattn" / "ops"
    ops.mkdir(parents=True)
    files = {
        "__init__.py": "from .ops import attention\n",
        "ops/__init__.py": "",
        "ops/settings.py": "from . import plan\n",  # upward, and a cycle with plan
        "ops/plan.py": "from .settings import Settings\nfrom .call import AttentionCall\n",
        "ops/call.py": "def f():\n    from .attention import prefix_attention\n",  # lazy, upward
        "ops/forward.py": "from prefixattn.ops.backward import x\n",  # its own layer
        "ops/backward.py": "",
        "ops/attention.py": "from .plan import lookup_plan\n",
        "extra.py": "",  # not declared
    }
    for name, text in files.items():
        (tmp_path / "prefixattn" / name).write_text(text)
    problems = cl.check(tmp_path)
    expected = [
        "prefixattn.extra: not declared",
        "prefixattn.ops.call imports prefixattn.ops.attention, which is in a layer above it",
        "prefixattn.ops.forward imports prefixattn.ops.backward, which is in its own layer",
        "prefixattn.ops.settings imports prefixattn.ops.plan, which is in a layer above it",
        "import cycle: prefixattn.ops.attention -> prefixattn.ops.plan -> prefixattn.ops.call",
        "import cycle: prefixattn.ops.plan -> prefixattn.ops.settings -> prefixattn.ops.plan",
    ]
    for line in expected:
        assert any(p.startswith(line) for p in problems), (line, problems)
    assert len(problems) == len(expected), problems
