"""pytest set-up of the benchmark suite (options, grids, skips, session metadata).

Two kinds of rows:

* GPU rows (marker ``bench_gpu``): the real benchmark on a CUDA device, grid chosen with
  ``--bench-grid=core|full``. Run them with ``--benchmark-enable`` (the project's pytest
  config has ``--benchmark-disable``, under which every row still runs once).
* smoke rows (marker ``bench_smoke``): tiny shapes on the CPU (the reference backend,
  Triton's interpreter for ``prefixattn``) so that CI exercises every code path. They are
  never kernel performance and are labelled ``smoke`` in the JSON.

Smoke mode is on with ``--bench-smoke``, with ``PREFIXATTN_BENCH_SMOKE=1``, or whenever no
CUDA device is present (so a plain ``pytest`` on a CPU machine skips the GPU rows with a
reason and runs the smoke rows). In smoke mode the GPU rows are skipped.

Triton decides at import time whether kernels are compiled or interpreted, so
``TRITON_INTERPRET=1`` is set here, when this file is loaded (before any test module
imports triton); prefixattn imports its kernel module on the first kernel call.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
import time
from typing import Any

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
SMOKE_ENV = "PREFIXATTN_BENCH_SMOKE"


def _env_smoke() -> bool:
    return os.environ.get(SMOKE_ENV, "0").lower() in ("1", "true", "yes", "on")


if not HAS_CUDA or _env_smoke() or "--bench-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks import benchlib  # noqa: E402  (after TRITON_INTERPRET is settled)

# --------------------------------------------------------------------------------------
# options and settings
# --------------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("prefixattn-bench", "prefixattn benchmark suite")
    group.addoption(
        "--bench-grid",
        choices=("core", "full"),
        default="core",
        help="GPU grid: 'core' (~45 rows incl. the target rows, ~3-4 min on an H100) or "
        "'full' (the whole issue grid). Default: core.",
    )
    group.addoption(
        "--bench-smoke",
        action="store_true",
        default=False,
        help=f"CPU smoke mode (tiny shapes, reference / Triton interpreter); also "
        f"{SMOKE_ENV}=1, and automatic without CUDA. GPU rows are skipped.",
    )
    group.addoption(
        "--bench-rounds",
        type=int,
        default=None,
        help="timed rounds per kernel / serving row (default 10 / 20; e2e uses half).",
    )
    group.addoption(
        "--bench-budget-s",
        type=float,
        default=0.0,
        help="soft wall-clock budget of the session in seconds: GPU rows that would start "
        "after it are skipped with a reason (0 = no budget).",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "bench_gpu: benchmark row that needs a CUDA device")
    config.addinivalue_line("markers", "bench_smoke: CPU smoke row of the benchmark suite")
    config.addinivalue_line("markers", "bench_priority(n): run order of GPU rows (low first)")
    opt = config.getoption
    smoke_flag = bool(opt("--bench-smoke", default=False))
    if smoke_flag or _env_smoke():
        why = "--bench-smoke" if smoke_flag else f"{SMOKE_ENV}=1"
    elif not HAS_CUDA:
        why = "no CUDA device"
    else:
        why = ""
    settings = benchlib.BenchSettings(
        grid=opt("--bench-grid", default="core") or "core",
        smoke=bool(why),
        smoke_reason=why,
        cuda=HAS_CUDA,
        rounds=opt("--bench-rounds", default=None),
        budget_s=float(opt("--bench-budget-s", default=0.0) or 0.0),
        start=time.monotonic(),
        command=_command(config),
    )
    config.stash[benchlib.SETTINGS_KEY] = settings
    _SETTINGS[:] = [settings]


_SETTINGS: list[benchlib.BenchSettings] = []  # this session's settings, for report hooks


def _command(config: pytest.Config) -> str:
    """The pytest command line, with the invocation directory shown as '.'."""
    args = [str(a) for a in config.invocation_params.args]
    root = str(config.invocation_params.dir)
    args = [a.replace(root + os.sep, "").replace(root, ".") for a in args]
    cmd = "pytest " + " ".join(args)
    outer = os.environ.get("PREFIXATTN_BENCH_COMMAND")
    return f"{outer}  ->  {cmd}" if outer else cmd


@pytest.fixture(scope="session")
def bench_settings(pytestconfig: pytest.Config) -> benchlib.BenchSettings:
    """The suite's settings (grid, smoke mode, rounds, budget)."""
    return pytestconfig.stash[benchlib.SETTINGS_KEY]


# --------------------------------------------------------------------------------------
# skipping
# --------------------------------------------------------------------------------------


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    s = config.stash[benchlib.SETTINGS_KEY]
    if s.smoke:
        gpu_skip = pytest.mark.skip(
            reason=f"GPU benchmark row: smoke mode ({s.smoke_reason}) runs only the tiny CPU "
            "smoke rows; run on a CUDA machine without --bench-smoke (benchmarks/run_gpu.sh)"
        )
        smoke_skip = None
    else:
        gpu_skip = None
        smoke_skip = pytest.mark.skip(
            reason="smoke row: runs with --bench-smoke / PREFIXATTN_BENCH_SMOKE=1 or on a "
            "machine without CUDA"
        )

    # GPU rows in priority order (the target rows first, then serving, end to end,
    # the rest of the kernel grid), so that a --bench-budget-s cut drops the least
    # important rows; within a priority the collection order is kept.
    def priority(item: pytest.Item) -> int:
        mark = item.get_closest_marker("bench_priority")
        return mark.args[0] if mark else -1

    items[:] = sorted(items, key=priority)
    for item in items:
        if gpu_skip is not None and item.get_closest_marker("bench_gpu"):
            item.add_marker(gpu_skip)
        if smoke_skip is not None and item.get_closest_marker("bench_smoke"):
            item.add_marker(smoke_skip)


@pytest.fixture(autouse=True)
def _bench_row_guard(request: pytest.FixtureRequest) -> Any:
    """Budget check before each GPU row; GPU memory given back after each row."""
    gpu_row = request.node.get_closest_marker("bench_gpu") is not None
    if gpu_row:
        s = request.config.stash[benchlib.SETTINGS_KEY]
        elapsed = time.monotonic() - s.start
        if s.budget_s and elapsed > s.budget_s:
            pytest.skip(
                f"--bench-budget-s={s.budget_s:g} exhausted ({elapsed:.0f} s elapsed): row "
                "not started"
            )
    yield
    if gpu_row and HAS_CUDA:
        benchlib.free_memory(torch.device("cuda"))


# --------------------------------------------------------------------------------------
# session fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def gemm_peak(bench_settings: benchlib.BenchSettings) -> dict[str, Any]:
    """The device's measured bf16 GEMM throughput (8192^3 matmul), measured once."""
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    if bench_settings.gemm is None:
        bench_settings.gemm = benchlib.measure_gemm_tflops(torch.device("cuda"))
    return bench_settings.gemm


@pytest.fixture(scope="session")
def triton_interpreter() -> None:
    """Make sure prefixattn's Triton kernels run under the CPU interpreter (smoke rows)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 is not set (it must be set before triton is imported)")
    from prefixattn.ops.kernels import DEFAULT_SOURCE

    if not DEFAULT_SOURCE.interpreted():
        pytest.skip(
            "prefixattn's Triton kernels were built compiled (triton was imported before "
            "TRITON_INTERPRET=1 was set), so they cannot run on the CPU in this process"
        )


# --------------------------------------------------------------------------------------
# results metadata: skipped / failed rows, device, versions, command
# --------------------------------------------------------------------------------------


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "test_bench_" not in report.nodeid:
        return
    if not _SETTINGS:
        return
    s = _SETTINGS[0]
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        s.outcomes.append({"nodeid": report.nodeid, "outcome": "skipped", "reason": reason})
    elif report.failed:
        text = report.longreprtext.strip().splitlines()
        msg = next((ln for ln in reversed(text) if ln.startswith("E ")), text[-1] if text else "")
        s.outcomes.append(
            {"nodeid": report.nodeid, "outcome": f"failed ({report.when})", "reason": msg[:500]}
        )


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    for mod in ("triton", "transformers", "peft", "prefixattn"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # not installed / broken: recorded as missing
            out[mod] = None
    return out


def _session_meta(config: pytest.Config) -> dict[str, Any]:
    s = config.stash[benchlib.SETTINGS_KEY]
    meta: dict[str, Any] = {
        "suite": "prefixattn-bench",
        "schema": 1,
        "smoke": s.smoke,
        "smoke_reason": s.smoke_reason or None,
        "grid": "smoke" if s.smoke else s.grid,
        "command": s.command,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "device": benchlib.device_info(),
        "gemm": s.gemm,
        "rounds": s.rounds,
        "budget_s": s.budget_s or None,
        "session_s": round(time.monotonic() - s.start, 1),
    }
    return meta


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["node"] = "(not recorded)"  # no host names in committed results
    machine_info["prefixattn_bench"] = _session_meta(config)


def pytest_benchmark_update_json(
    config: pytest.Config, benchmarks: list, output_json: dict
) -> None:
    meta = _session_meta(config)
    s = config.stash[benchlib.SETTINGS_KEY]
    meta["not_measured"] = list(s.outcomes)
    output_json["prefixattn_bench"] = meta
