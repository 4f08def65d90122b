"""The sliding-window, soft-capping and sink variants of the kernels (HAS_WINDOW,
PREFIX_WINDOWED, HAS_SOFTCAP, HAS_SINKS: every flag a kernel takes switched on) lower to
an sm_90 cubin without a GPU and do not spill with the default configs at D = 64 (see
tests/test_cuda_lowering.py for the plain variants and how this works)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_compiled_triton_script

_SCRIPT = """
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, "scripts")
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
import resource_probe
from prefixattn.ops import settings

# the feature flags each kernel (or backward KIND) reads, as the launchers pass them
FEATURES = {
    "fwd": ("HAS_WINDOW", "PREFIX_WINDOWED", "HAS_SOFTCAP", "HAS_SINKS"),
    "dkdv": ("HAS_WINDOW", "HAS_SOFTCAP"),
    "dq": ("HAS_WINDOW", "PREFIX_WINDOWED", "HAS_SOFTCAP"),
    "prefix_dkdv": ("PREFIX_WINDOWED", "HAS_SOFTCAP"),
    "bwd": ("HAS_WINDOW", "PREFIX_WINDOWED", "HAS_SOFTCAP"),
}

def family_flags(name, D, _plain=resource_probe.kernel_flags):
    return {**_plain(name, D), **dict.fromkeys(FEATURES[name], True)}

def job(args):
    resource_probe.kernel_flags = family_flags
    return resource_probe._probe_job(args)

jobs = [(name, settings.CONFIG_LISTS[name][0], 64, "bf16", 90) for name in FEATURES]
with ProcessPoolExecutor(2) as pool:
    rows = [asdict(r) for r in pool.map(job, jobs)]
print(json.dumps(rows))
"""


def test_window_softcap_sink_kernels_lower_for_sm90() -> None:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        pytest.skip("this Triton build ships no NVIDIA backend tools (cuobjdump)")
    rows = run_compiled_triton_script(_SCRIPT)
    assert {r["kernel"] for r in rows} == {"fwd", "dkdv", "dq", "prefix_dkdv", "bwd"}
    for r in rows:
        assert 0 < r["regs"] <= 255, r
        assert r["stack"] == 0, f"{r['kernel']} {r['config']} spills {r['stack']} B"
