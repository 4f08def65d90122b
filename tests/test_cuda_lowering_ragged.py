"""The ragged-bank variants of the kernels (bank prefix, ``HAS_PLEN``) lower to an sm_90
cubin without a GPU, and do not spill with the default configs at D = 64 (see
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

def ragged_flags(name, D, _plain=resource_probe.kernel_flags):
    flags = _plain(name, D)
    if "PREFIX_MODE" in flags:
        flags.update(PREFIX_MODE=3, HAS_PLEN=True)  # a bank with prefix_lengths
    return flags

def job(args):
    resource_probe.kernel_flags = ragged_flags
    return resource_probe._probe_job(args)

jobs = [(name, settings.CONFIG_LISTS[name][0], 64, "bf16", 90)
        for name in ("fwd", "dq", "prefix_dkdv", "bwd")]
with ProcessPoolExecutor(2) as pool:
    rows = [asdict(r) for r in pool.map(job, jobs)]
print(json.dumps(rows))
"""


def test_ragged_kernels_lower_for_sm90() -> None:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        pytest.skip("this Triton build ships no NVIDIA backend tools (cuobjdump)")
    rows = run_compiled_triton_script(_SCRIPT)
    assert {r["kernel"] for r in rows} == {"fwd", "dq", "prefix_dkdv", "bwd"}
    for r in rows:
        assert 0 < r["regs"] <= 255, r
        assert r["stack"] == 0, f"{r['kernel']} {r['config']} spills {r['stack']} B"
