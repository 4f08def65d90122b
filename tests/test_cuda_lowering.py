"""Every kernel lowers to a cubin for an H100 (sm_90) on this machine, GPU or not, and
each candidate list's default config fits: no register spills, shared memory within the
limit. The CPU interpreter never runs Triton's GPU compiler, so without this a kernel
could pass every CPU test and fail to compile on the GPU.

Compiles run in a subprocess (this process may have the interpreted kernels loaded) by
``scripts/resource_probe.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_compiled_triton_script

SM90_SHARED_LIMIT = 227 * 1024

_SCRIPT = """
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, "scripts")
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
import resource_probe
from prefixattn.ops import settings
jobs = [(name, settings.CONFIG_LISTS[name][0], D, "bf16", 90)
        for name in resource_probe.KERNEL_NAMES for D in (64, 128)]
with ProcessPoolExecutor(2) as pool:
    rows = [asdict(r) for r in pool.map(resource_probe._probe_job, jobs)]
print(json.dumps(rows))
"""


def _cuobjdump_available() -> bool:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return tool.exists()


@pytest.fixture(scope="module")
def default_config_resources() -> list[dict]:
    if not _cuobjdump_available():
        pytest.skip("this Triton build ships no NVIDIA backend tools (cuobjdump)")
    return run_compiled_triton_script(_SCRIPT)


def test_every_kernel_lowers_for_sm90(default_config_resources: list[dict]) -> None:
    got = {(r["kernel"], r["D"]) for r in default_config_resources}
    assert got == {(k, d) for k in ("fwd", "dkdv", "dq", "prefix_dkdv", "bwd") for d in (64, 128)}
    for r in default_config_resources:
        assert 0 < r["regs"] <= 255, r
        assert 0 < r["shared"] <= SM90_SHARED_LIMIT, r


def test_default_configs_do_not_spill(default_config_resources: list[dict]) -> None:
    """The first config of each list is what runs with autotuning off: it must not spill
    registers (the fused backward is allowed its known small spill at D = 128)."""
    for r in default_config_resources:
        if (r["kernel"], r["D"]) == ("bwd", 128):
            assert r["stack"] <= 128, r
            continue
        assert r["stack"] == 0, f"{r['kernel']} {r['config']} D={r['D']} spills {r['stack']} B"
