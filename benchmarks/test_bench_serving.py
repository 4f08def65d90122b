"""Serving benchmark: one decode step of a mixed batch over a bank of task prefixes.

B=64 rows, each with its own task (``prefix_index`` into a bank of T=8 prefixes), one new
token against a 512-token KV cache, GPT-2 small heads (H=12, D=64), bf16. ``prefixattn``
reads each row's prefix from the bank inside the kernel; ``gather_concat_sdpa`` /
``gather_concat_eager`` gather ``bank[prefix_index]`` and concatenate it with the cache
before attention, which is what a user without the bank path would run.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import benchlib as bl
from benchmarks.benchlib import AttnShape


def serving_shape(P: int) -> AttnShape:
    return AttnShape("serve", 64, 12, 12, 1, 512, P, 64, "bf16", bank=8, inference=True)


GPU_SHAPES = [serving_shape(64), serving_shape(512)]
SMOKE_SHAPES = [AttnShape("smoke-serve", 4, 2, 2, 1, 16, 8, 16, "fp32", bank=2, inference=True)]
SHAPES = {s.id: s for s in GPU_SHAPES + SMOKE_SHAPES}
SMOKE_IDS = {s.id for s in SMOKE_SHAPES}


def _params() -> list:
    out = []
    for shapes, smoke in ((GPU_SHAPES, False), (SMOKE_SHAPES, True)):
        marks = [pytest.mark.bench_smoke] if smoke else [pytest.mark.bench_gpu]
        if not smoke:
            marks.append(pytest.mark.bench_priority(1))
        for shape in shapes:
            for mode in ("fwd", "fwd_graph"):
                for impl in bl.SERVING_IMPLS:
                    out.append(
                        pytest.param(
                            shape.id, impl, mode, marks=marks, id=f"{impl}-{mode}-{shape.id}"
                        )
                    )
    return out


@pytest.mark.parametrize("case,impl,mode", _params())
def test_serving_decode(
    benchmark,
    request: pytest.FixtureRequest,
    bench_settings: bl.BenchSettings,
    case: str,
    impl: str,
    mode: str,
) -> None:
    """One decode step (inference forward) of the mixed-task batch: launched eagerly
    (``fwd``: host launch overhead included) and replayed from a CUDA graph (``fwd_graph``:
    device time, as a server running decode under CUDA graphs sees it)."""
    shape = SHAPES[case]
    smoke = case in SMOKE_IDS
    if smoke:
        device, gemm = torch.device("cpu"), None
        if impl == "prefixattn":
            request.getfixturevalue("triton_interpreter")
    else:
        device, gemm = torch.device("cuda"), request.getfixturevalue("gemm_peak")
    bl.bench_attention_row(
        benchmark,
        suite="serving",
        shape=shape,
        impl=impl,
        mode=mode,
        device=device,
        rounds=bench_settings.rounds_for("serving"),
        gemm=gemm,
        smoke=smoke,
        check_rows=tuple(range(min(shape.B, 8))),  # rows with different bank entries
    )
