"""Step ``env``: the device, driver, clocks, versions, load and command, first."""

from __future__ import annotations

import os
import subprocess
import sys

from .common import StepContext, loadavg, versions


def _nvidia_smi() -> str | None:
    query = "name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,power.limit,temperature.gpu"
    try:
        res = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable: {e}"
    return (res.stdout or res.stderr).strip()


def git_commit() -> str | None:
    """This checkout's commit (None without git or outside a repository)."""
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() or None


def run(ctx: StepContext) -> None:
    import torch

    from benchmarks.benchlib import device_info

    try:
        import triton

        autotune_cache = bool(getattr(getattr(triton, "knobs", None), "autotuning", None))
    except ImportError:
        autotune_cache = False
    dev = device_info()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        dev["l2_mb"] = round(getattr(p, "L2_cache_size", 0) / 2**20, 1)
    ctx.write(
        "env",
        device=dev,
        versions=versions(),
        dry_run=ctx.dry,
        nvidia_smi=_nvidia_smi() if torch.cuda.is_available() else None,
        loadavg=loadavg(),
        cpu_count=os.cpu_count(),
        git_commit=git_commit(),
        command=os.environ.get("PREFIXATTN_SESSION_COMMAND", " ".join(sys.argv)),
        triton_autotune_disk_cache=autotune_cache,
        date_utc=__import__("datetime")
        .datetime.now(__import__("datetime").timezone.utc)
        .isoformat(timespec="seconds"),
    )
