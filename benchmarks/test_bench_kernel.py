"""Kernel benchmark: prefixattn vs the concat paths (eager, sdpa, flex), fwd / bwd / fwd_bwd.

Rows are ``test_kernel[<mode>-<impl>-<case>]`` with parameters ``case`` (the shape id),
``impl`` and ``mode``. See benchmarks/README.md for the grid and how to run it.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import benchlib as bl
from benchmarks.benchlib import AttnShape
from prefixattn.ops.settings import use_settings


def gpt2(N: int, P: int, dtype: str = "bf16", H: int = 12, family: str = "gpt2s") -> AttnShape:
    """GPT-2 attention: B=8, D=64, causal self-attention over N tokens plus P prefix keys."""
    return AttnShape(family, 8, H, H, N, N, P, 64, dtype)


LLAMA_GQA = AttnShape("llama-gqa", 4, 32, 8, 2048, 2048, 64, 128, "bf16")
DECODE = AttnShape("gpt2s-decode", 8, 12, 12, 1, 2048, 64, 64, "bf16", inference=True)

TARGETS = {gpt2(1024, 64), gpt2(4096, 64)}  # the target rows
TRAIN_MODES = bl.MODES
DECODE_MODES = ("fwd",)

# flex needs one torch.compile per shape (~10-20 s for forward + backward on an H100), so
# it runs on a subset of shapes that keeps the whole grid within its time budget.
FLEX_FULL = {gpt2(1024, 64), gpt2(4096, 64), LLAMA_GQA}
FLEX_CORE = {gpt2(1024, 64), gpt2(4096, 64)}
FLEX_SKIP = (
    "flex: torch.compile of flex_attention costs ~10-20 s per shape; to keep the {grid} grid "
    "within ~5 min it is compiled only for {which}"
)
FLEX_WHICH = {
    "full": "GPT-2 small bf16 P=64 at N=1024 and N=4096 and the GQA shape",
    "core": "the GPT-2 small bf16 P=64 shapes at N=1024 and N=4096",
}


def full_grid() -> list[tuple[AttnShape, tuple[str, ...]]]:
    """The issue's grid: GPT-2 small N x P x dtype, GPT-2 medium / large heads, GQA, decode.

    The target rows (GPT-2 small bf16 P=64 at N=1024 and 4096) come first.
    """
    grid = [(gpt2(1024, 64), TRAIN_MODES), (gpt2(4096, 64), TRAIN_MODES)]
    for dtype in ("bf16", "fp16"):
        for N in (256, 1024, 4096):
            for P in (16, 64, 256):
                if (dtype, P) == ("bf16", 64) and N != 256:
                    continue  # already first
                grid.append((gpt2(N, P, dtype), TRAIN_MODES))
    grid += [
        (gpt2(1024, 64, H=16, family="gpt2m"), TRAIN_MODES),
        (gpt2(1024, 64, H=20, family="gpt2l"), TRAIN_MODES),
        (LLAMA_GQA, TRAIN_MODES),
        (DECODE, DECODE_MODES),
    ]
    return grid


def core_grid() -> list[tuple[AttnShape, tuple[str, ...]]]:
    """~36 kernel rows: both target shapes in every mode, the prefix length at N=1024, GQA
    and decode (bf16 only, so each autotune / compile bucket is paid once)."""
    return [
        (gpt2(1024, 64), TRAIN_MODES),
        (gpt2(4096, 64), TRAIN_MODES),
        (gpt2(1024, 16), ("fwd_bwd",)),
        (gpt2(1024, 256), ("fwd_bwd",)),
        (LLAMA_GQA, ("fwd_bwd",)),
        (DECODE, DECODE_MODES),
    ]


SMOKE_GRID = [
    (AttnShape("smoke", 2, 4, 2, 32, 32, 8, 16, "fp32"), TRAIN_MODES),
    (AttnShape("smoke-decode", 2, 4, 2, 1, 32, 8, 16, "fp32", inference=True), DECODE_MODES),
]

SHAPES: dict[str, AttnShape] = {s.id: s for grid in (full_grid(), SMOKE_GRID) for s, _ in grid}
SMOKE_IDS = {s.id for s, _ in SMOKE_GRID}


def _params(grid_name: str) -> list:
    out = []
    gpu = core_grid() if grid_name == "core" else full_grid()
    flex_ok = FLEX_CORE if grid_name == "core" else FLEX_FULL
    for grid, smoke in ((gpu, False), (SMOKE_GRID, True)):
        for shape, modes in grid:
            for mode in modes:
                for impl in bl.KERNEL_IMPLS:
                    if impl in ("prefixattn_fused", "prefixattn_split") and mode == "fwd":
                        continue  # the same forward as prefixattn
                    marks = [pytest.mark.bench_smoke if smoke else pytest.mark.bench_gpu]
                    if not smoke:
                        marks.append(pytest.mark.bench_priority(0 if shape in TARGETS else 3))
                    if impl == "flex" and not smoke and shape not in flex_ok:
                        reason = FLEX_SKIP.format(grid=grid_name, which=FLEX_WHICH[grid_name])
                        marks.append(pytest.mark.skip(reason=reason))
                    out.append(
                        pytest.param(
                            shape.id, impl, mode, marks=marks, id=f"{mode}-{impl}-{shape.id}"
                        )
                    )
    return out


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.function.__name__ == "test_kernel":
        grid = metafunc.config.stash[bl.SETTINGS_KEY].grid
        metafunc.parametrize("case,impl,mode", _params(grid))


def test_kernel(
    benchmark,
    request: pytest.FixtureRequest,
    bench_settings: bl.BenchSettings,
    case: str,
    impl: str,
    mode: str,
) -> None:
    """One kernel row: correctness gate, then peak memory and CUDA-event timing."""
    shape = SHAPES[case]
    smoke = case in SMOKE_IDS
    if impl in ("prefixattn_fused", "prefixattn_split"):
        # the backward layout of this row's calls (their plans are keyed on the settings)
        chosen = use_settings(backward=impl.split("_")[1])
        chosen.__enter__()
        request.addfinalizer(lambda: chosen.__exit__(None, None, None))
    if smoke:
        device, gemm = torch.device("cpu"), None
        if impl.startswith("prefixattn"):
            request.getfixturevalue("triton_interpreter")
    else:
        device, gemm = torch.device("cuda"), request.getfixturevalue("gemm_peak")
    bl.bench_attention_row(
        benchmark,
        suite="kernel",
        shape=shape,
        impl=impl,
        mode=mode,
        device=device,
        rounds=bench_settings.rounds_for("kernel"),
        gemm=gemm,
        smoke=smoke,
    )
