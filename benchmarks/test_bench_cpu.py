"""CPU benchmark: ``prefix_attention(backend="auto")`` (the ``sdpa`` backend off CUDA) vs the
``torch.cat`` + SDPA path it replaces, and the materialising ``reference`` backend.

These are CPU timings (PyTorch's CPU kernels), never Triton kernel speed. Rows are
``test_cpu[<mode>-<impl>-<case>]``: modes ``fwd`` (inference, no autograd) and
``fwd_bwd``; impls ``auto``, ``concat_sdpa`` (:func:`benchmarks.benchlib.concat_sdpa`) and
``reference`` (the issue shape only). Each row checks its output (and, for ``fwd_bwd``,
all five gradients) against the fp32 reference before timing. Every ``auto`` row also
times ``auto`` and ``concat_sdpa`` alternately, round by round, on the same inputs
(``ab_ratio``: median of the per-round time ratios; a shared machine's load drifts, so
only an interleaved ratio compares them fairly) and records the bytes each keeps for
the backward (``saved_bytes``, unique storages of the autograd graph).

Shapes: the issue's (B4 H12 N256 D64, shared prefix P=20) and a GPT-2-small-like training
shape (B4 H12 N512 D64, P=20), fp32 and bf16. They run only with
``PREFIXATTN_BENCH_CPU=1``; otherwise (CI) the same rows run once on a tiny shape::

    PREFIXATTN_BENCH_CPU=1 PYTHONPATH=. pytest benchmarks/test_bench_cpu.py \\
        --benchmark-enable --benchmark-json=benchmarks/results/cpu-DATE.json
    python benchmarks/cpu_report.py benchmarks/results/cpu-DATE.json > benchmarks/results/cpu-DATE.md
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from benchmarks import benchlib as bl
from benchmarks.benchlib import AttnInputs, AttnShape

FULL = os.environ.get("PREFIXATTN_BENCH_CPU", "0").lower() in ("1", "true", "yes", "on")
DTYPES = ("fp32", "bf16")
MODES = ("fwd", "fwd_bwd")


def _shape(family: str, B: int, N: int, P: int, dtype: str, H: int = 12, D: int = 64) -> AttnShape:
    return AttnShape(family, B, H, H, N, N, P, D, dtype)


if FULL:
    SHAPES = [_shape("cpu-issue", 4, 256, 20, d) for d in DTYPES]
    SHAPES += [_shape("cpu-gpt2s", 4, 512, 20, d) for d in DTYPES]
    REFERENCE_FAMILIES = {"cpu-issue"}
    ROUNDS = {"cpu-issue": 20, "cpu-gpt2s": 10}
else:  # CI: every code path once, in well under a second per row
    SHAPES = [_shape("cpu-smoke", 2, 32, 8, d, H=4, D=16) for d in DTYPES]
    REFERENCE_FAMILIES = {"cpu-smoke"}
    ROUNDS = {"cpu-smoke": 2}
CASES = {s.id: s for s in SHAPES}


def auto_call(x: AttnInputs) -> torch.Tensor:
    """``prefix_attention(backend="auto")``: the prefix stays [Hkv, P, D]."""
    return bl.prefixattn_call(x, backend="auto")


def reference_call(x: AttnInputs) -> torch.Tensor:
    return bl.prefixattn_call(x, backend="reference")


IMPLS: dict[str, Callable[[AttnInputs], torch.Tensor]] = {
    "auto": auto_call,
    "concat_sdpa": bl.concat_sdpa,
    "reference": reference_call,
}


def _inputs(shape: AttnShape, mode: str) -> AttnInputs:
    x = bl.make_inputs(shape, "cpu")
    return x.detached() if mode == "fwd" else x


def _step(fn: Callable[[AttnInputs], torch.Tensor], x: AttnInputs, mode: str) -> Callable[[], Any]:
    if mode == "fwd":

        def fwd() -> Any:
            with torch.no_grad():
                return fn(x)

        return fwd
    return lambda: torch.autograd.grad(fn(x), x.leaves, x.dout)


def saved_bytes(fn: Callable[[AttnInputs], torch.Tensor], x: AttnInputs) -> int:
    """Bytes of the distinct storages the autograd graph of one call keeps for the
    backward, the inputs themselves not counted (what training holds per layer)."""
    inputs = {t.untyped_storage().data_ptr() for t in (x.q, x.k, x.v, x.pk, x.pv)}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in inputs:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x)
    del out
    return sum(seen.values())


def interleaved_ratio(x: AttnInputs, mode: str, rounds: int) -> dict[str, Any]:
    """``auto`` and ``concat_sdpa`` timed alternately (the order flips every round)."""
    steps = {name: _step(IMPLS[name], x, mode) for name in ("auto", "concat_sdpa")}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        order = ("auto", "concat_sdpa") if r % 2 == 0 else ("concat_sdpa", "auto")
        for name in order:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
    ratios = [a / c for a, c in zip(times["auto"], times["concat_sdpa"])]
    return {
        "ab_rounds": rounds,
        "ab_auto_ms": statistics.median(times["auto"]),
        "ab_concat_sdpa_ms": statistics.median(times["concat_sdpa"]),
        "ab_ratio": statistics.median(ratios),
    }


def _params() -> list:
    out = []
    for shape in SHAPES:
        for mode in MODES:
            for impl in IMPLS:
                if impl == "reference" and shape.family not in REFERENCE_FAMILIES:
                    continue
                out.append(pytest.param(shape.id, impl, mode, id=f"{mode}-{impl}-{shape.id}"))
    return out


@pytest.mark.parametrize("case,impl,mode", _params())
def test_cpu(benchmark, case: str, impl: str, mode: str) -> None:
    """One CPU row: correctness gate, saved bytes, interleaved A/B (auto), timing."""
    shape = CASES[case]
    info = benchmark.extra_info
    info.update(
        suite="cpu",
        impl=impl,
        mode=mode,
        case=case,
        shape=shape.as_dict(),
        device="cpu",
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        full=FULL,
        loadavg_1m=os.getloadavg()[0],  # a shared machine: how busy it was
    )
    benchmark.group = f"cpu {case} {mode}"
    fn = IMPLS[impl]
    x = _inputs(shape, mode)
    step = _step(fn, x, mode)
    step()  # warm-up
    info["check"] = bl.check_impl(fn, x, shape, with_grads=mode == "fwd_bwd")
    if mode == "fwd_bwd":
        info["saved_bytes"] = saved_bytes(fn, x)
        if impl == "auto":
            info["concat_sdpa_saved_bytes"] = saved_bytes(bl.concat_sdpa, x)
    rounds = ROUNDS[shape.family]
    if impl == "auto":
        info.update(interleaved_ratio(x, mode, rounds))
    times = bl.run_pedantic(benchmark, step, torch.device("cpu"), rounds=rounds)
    info.update(bl.timing_summary(times))
    info["timer"] = "perf_counter"


def test_cpu_report_renders_rows() -> None:
    """cpu_report.py on a synthetic JSON: one line per row, the ratio and memory shown."""
    from benchmarks.cpu_report import render

    info = {"suite": "cpu", "case": "c", "mode": "fwd_bwd", "torch": "x", "torch_threads": 2}
    data = {
        "prefixattn_bench": {"command": "pytest x", "date_utc": "d", "versions": {}},
        "benchmarks": [
            {"extra_info": {**info, "impl": "concat_sdpa", "time_ms": 2.0, "time_ms_min": 1.5}},
            {
                "extra_info": {
                    **info,
                    "impl": "auto",
                    "time_ms": 1.0,
                    "ab_ratio": 0.987,
                    "saved_bytes": 3 * 2**20,
                }
            },
        ],
    }
    md = render(data)
    lines = [ln for ln in md.splitlines() if ln.startswith("| c |")]
    assert len(lines) == 2 and "| auto |" in lines[0] and "0.987" in lines[0]
    assert "| 3.0 |" in lines[0] and "| 1.5 |" in lines[1]
    assert "not** Triton kernel speed" in md and "`pytest x`" in md
