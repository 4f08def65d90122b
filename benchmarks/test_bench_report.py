"""report.py on synthetic results files (no GPU needed, runs everywhere).

The numbers below are made up to exercise the report's arithmetic and layout; they are
written to a temporary folder only and are not results.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

REPORT = Path(__file__).with_name("report.py")


def _report_module() -> Any:
    spec = importlib.util.spec_from_file_location("prefixattn_bench_report", REPORT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(suite: str, case: str, mode: str, impl: str, ms: float, **extra: Any) -> dict:
    info = {"suite": suite, "case": case, "mode": mode, "impl": impl, "time_ms": ms, **extra}
    return {
        "name": f"test[{mode}-{impl}-{case}]",
        "extra_info": info,
        "stats": {"median": ms * 1e-3 * 1.05},
    }


def synthetic_results(smoke: bool = False, drop: tuple[str, ...] = ()) -> dict:
    """A results file shaped like the suite's, with made-up timings."""
    shape = {"family": "gpt2s", "dtype": "bf16", "P": 64, "Nq": 1024, "Nk": 1024}
    long = {**shape, "Nq": 4096, "Nk": 4096}
    rows = []
    for case, shp, base in (
        ("gpt2s-B8-H12-N1024-P64-D64-bf16", shape, 1.0),
        ("gpt2s-B8-H12-N4096-P64-D64-bf16", long, 10.0),
    ):
        for mode, f in (("fwd", 1.0), ("bwd", 2.5), ("fwd_bwd", 3.5)):
            for impl, slow, mem in (
                ("prefixattn", 1.0, 1.0),
                ("concat_sdpa", 2.0, 1.5),
                ("concat_eager", 4.0, 6.0),
                ("flex", 1.5, 1.4),
            ):
                if impl in drop:
                    continue
                rows.append(
                    _row(
                        "kernel", case, mode, impl, base * f * slow, shape=shp, smoke=smoke,
                        tflops=100.0 / slow, gemm_share=0.125 / slow,
                        peak_mem_bytes=int(2**30 * mem), check={"out": 1e-3, "dq": 2e-3},
                    )
                )  # fmt: skip
    for impl, ms in (("prefixattn", 0.05), ("gather_concat_sdpa", 0.1)):
        rows.append(_row("serving", "serve-B64-H12-q1-k512-P64-T8-D64-bf16", "fwd", impl, ms))
    for impl, ms in (("prefixattn", 100.0), ("peft_sdpa", 150.0), ("prefixattn_ckpt", 130.0)):
        rows.append(
            _row("e2e", "gpt2-124M-B8-N1024-P64-bf16", "train_step", impl, ms,
                 tokens_per_s=8192 / (ms * 1e-3), peak_mem_bytes=2**32, loss0=10.9)
        )  # fmt: skip
    return {
        "benchmarks": rows,
        "datetime": "2000-01-01T00:00:00",
        "prefixattn_bench": {
            "smoke": smoke,
            "grid": "smoke" if smoke else "core",
            "device": {"type": "cuda", "name": "Synthetic GPU", "capability": "9.0"},
            "versions": {"torch": "x"},
            "gemm": {"gemm_n": 8192, "gemm_tflops": 800.0},
            "not_measured": [
                {"nodeid": "b::t[x]", "outcome": "skipped", "reason": "flex: too slow"},
                {"nodeid": "b::t[y]", "outcome": "failed (call)", "reason": "E boom"},
            ],
        },
    }


def _write(tmp_path: Path, data: dict, name: str = "synthetic-gpu-20000101.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_report_tables_and_plots(tmp_path: Path) -> None:
    report = _report_module()
    src = _write(tmp_path, synthetic_results())
    out = tmp_path / "out"
    assert report.main([str(src), "--out", str(out), "--quiet"]) == 0
    md = (out / "synthetic-gpu-20000101.md").read_text()
    assert "Synthetic GPU" in md and "800 TFLOP/s" in md
    assert "## Target rows" in md and "## Rows not measured" in md and "E boom" in md
    # speed-ups: baseline time / prefixattn time; memory: baseline peak / prefixattn peak
    line = next(ln for ln in md.splitlines() if "N1024" in ln and "| fwd_bwd |" in ln)
    assert "2.00x" in line and "4.00x" in line and "1.50x" in line and "6.00x" in line
    assert "12%" in line  # share of the measured GEMM peak
    assert "SMOKE" not in md
    if importlib.util.find_spec("matplotlib") is not None:
        pngs = sorted(p.name for p in out.glob("*.png"))
        assert "synthetic-gpu-20000101-kernel-speedup.png" in pngs
        assert "synthetic-gpu-20000101-e2e.png" in pngs
        assert all((out / p).stat().st_size > 1000 for p in pngs)


def test_report_refuses_smoke_unless_allowed(tmp_path: Path) -> None:
    report = _report_module()
    src = _write(tmp_path, synthetic_results(smoke=True), "smoke.json")
    assert report.main([str(src), "--out", str(tmp_path), "--quiet", "--no-plots"]) == 2
    assert not (tmp_path / "smoke.md").exists()
    assert report.main([str(src), "--out", str(tmp_path), "--quiet", "--allow-smoke"]) == 0
    md = (tmp_path / "smoke.md").read_text()
    assert md.startswith("# SMOKE RUN") and "TFLOP/s |" not in md


@pytest.mark.parametrize("drop", [("prefixattn",), ("concat_sdpa", "flex"), ("concat_eager",)])
def test_report_missing_impls(tmp_path: Path, drop: tuple[str, ...]) -> None:
    report = _report_module()
    src = _write(tmp_path, synthetic_results(drop=drop))
    assert report.main([str(src), "--out", str(tmp_path), "--quiet"]) == 0
    md = (tmp_path / "synthetic-gpu-20000101.md").read_text()
    assert report.DASH in md or "prefixattn" not in drop


def test_report_empty_file(tmp_path: Path) -> None:
    report = _report_module()
    src = _write(tmp_path, {"benchmarks": []}, "empty.json")
    assert report.main([str(src), "--out", str(tmp_path), "--quiet"]) == 0
    assert "No benchmark rows" in (tmp_path / "empty.md").read_text()
