"""Test set-up: without CUDA, Triton kernels run under the CPU interpreter.

TRITON_INTERPRET must be set before the first kernel call (prefixattn imports the kernel
module lazily), so it is set here, at collection time.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if HAS_CUDA else "cpu"
# The interpreter's bf16 tl.dot is broken (it multiplies raw bit patterns): bf16 through
# the Triton path is tested on GPU only.
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])

gpu_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (compiled Triton kernels)")


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_call_plans() -> None:
    """Each test starts without cached call plans (prefixattn/ops/plan.py), so a test
    that swaps kernels, limits or environment variables sees them take effect."""
    from prefixattn.ops.plan import clear_plans

    clear_plans()


@pytest.fixture
def settings() -> Iterator[Callable[..., object]]:
    """``settings(backward="fused", ...)``: the kernel path's settings
    (``prefixattn.ops.settings.Settings``) with these changes, for the rest of the test."""
    from prefixattn.ops.settings import use_settings

    with contextlib.ExitStack() as stack:
        yield lambda **changes: stack.enter_context(use_settings(**changes))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """With PREFIXATTN_FAIL_LOG=path, append each failure as it happens (long GPU runs can
    be cut off before pytest's summary)."""
    path = os.environ.get("PREFIXATTN_FAIL_LOG")
    if path and report.failed:
        with open(path, "a") as f:
            f.write(f"=== {report.nodeid} [{report.when}]\n{report.longreprtext[-3000:]}\n\n")
