"""The paged-KV-cache forward (``block_table``, PAGE_SIZE > 0) lowers to an sm_90 cubin
without a GPU, with no spill the KV-cache-pool forward (``cache_seqlens`` +
``cache_batch_idx``) does not have: block size 16 (a key tile spans pages: one block id
per key) and 128 (one id per tile), default config, D = 64 and 128; and packed rows
(``cu_seqlens_q``) over pages of 16 at D = 128. See tests/test_cuda_lowering.py for how
this works; the full table (every config, block sizes 16 to 128) is in
benchmarks/results/resources-sm90-triton3.9-paged.md.
"""

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
jobs = [("fwd", settings.FWD_CONFIGS[0], D, "bf16", 90, variant)
        for variant in ("cache", "paged16", "paged128") for D in (64, 128)]
jobs.append(("fwd", settings.FWD_CONFIGS[0], 128, "bf16", 90, "varlen_paged16"))
with ProcessPoolExecutor(2) as pool:
    rows = [asdict(r) for r in pool.map(resource_probe._probe_job, jobs)]
print(json.dumps(rows))
"""


def test_paged_forward_lowers_for_sm90_without_new_spills() -> None:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        pytest.skip("this Triton build ships no NVIDIA backend tools (cuobjdump)")
    rows = run_compiled_triton_script(_SCRIPT)
    by = {(r["variant"], r["D"]): r for r in rows}
    want = {(v, d) for v in ("cache", "paged16", "paged128") for d in (64, 128)}
    assert set(by) == want | {("varlen_paged16", 128)}
    for (variant, D), r in by.items():
        assert 0 < r["regs"] <= 255, r
        assert r["stack"] <= by[("cache", D)]["stack"], f"{variant} D={D} spills more: {r}"
        assert r["stack"] == 0, f"{variant} {r['config']} D={D} spills {r['stack']} B"
