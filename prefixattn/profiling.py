"""Host-side counts of a call: Python-level calls, Triton launches, tensor allocations,
and a check that nothing synchronizes the host with the device.

These are deterministic properties of the code path (not timings), so tests can pin them
and ``scripts/host_overhead.py`` reports them next to the host microseconds::

    with no_launches(path="cuda"):          # the GPU path, kernels replaced by no-ops
        counts = count_host_work(lambda: prefix_attention(q, k, v, pk, pv, backend="triton"))
    counts.calls, counts.launches, counts.allocations

``path="cuda"`` runs the launchers as they run on a GPU after the first calls (configs
chosen, plans built) on any machine; ``path="interpreter"`` keeps the CPU interpreter's
configs. Both replace every kernel by a stub that only counts, so no GPU is needed.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch.utils._python_dispatch import TorchDispatchMode

from .ops.kernels import KernelSource
from .ops.settings import CONFIG_LISTS, use_settings

KERNELS = (
    "_attn_fwd",
    "_attn_bwd_preprocess",
    "_attn_bwd_dkdv",
    "_attn_bwd_dq",
    "_attn_bwd_prefix_dkdv",
    "_attn_bwd",
    "_prefix_grad_reduce",
)

# aten ops that make a new tensor (views are not allocations)
_ALLOCATING = frozenset(
    ("empty", "empty_strided", "zeros", "ones", "full", "empty_like", "zeros_like",
     "ones_like", "full_like", "new_empty", "new_empty_strided", "new_zeros", "new_ones",
     "new_full", "clone", "_to_copy", "cat", "stack", "contiguous", "randint", "rand",
     "randn")
)  # fmt: skip
# aten ops that wait for the device (a host read of a device value, or an output whose
# size depends on device values)
SYNCING = frozenset(
    ("_local_scalar_dense", "item", "is_nonzero", "equal", "allclose", "nonzero",
     "masked_select", "unique", "_unique", "_unique2", "unique_consecutive", "tolist")
)  # fmt: skip


class _Stub:
    """Stands in for a jit kernel (or its autotuner): ``k[grid](...)`` counts a launch."""

    def __init__(self, counter: list[int], best_config=None) -> None:
        self.counter, self.best_config = counter, best_config

    def __getitem__(self, grid):
        if callable(grid):
            grid({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M2": 64, "BLOCK_N2": 64})
        return self._launch

    def _launch(self, *args, **kwargs) -> None:
        self.counter[0] += 1

    def run(self, *args, grid=None, warmup=False, **kwargs) -> None:
        """``JITFunction.run``: a direct launch's capture goes here (and gets no kernel)."""
        self.counter[0] += 1


class StubKernels(KernelSource):
    """A kernel source whose kernels only count launches (see :func:`no_launches`).

    ``gpu=True``: the launchers take their GPU path on any machine (compiled kernels,
    autotuning, 132 SMs, every device accepted; each autotuned kernel reports its list's
    first config as the tuned one); ``gpu=False``: the interpreter's fixed configs."""

    def __init__(self, counter: list[int], gpu: bool) -> None:
        super().__init__()
        import triton

        self.gpu = gpu
        self.stubs = types.SimpleNamespace(**{k: _Stub(counter) for k in KERNELS})
        self.tuned_stubs = {
            name: _Stub(
                counter, triton.Config(cfgs[0].tiles(), num_warps=cfgs[0].num_warps, num_stages=2)
            )
            for name, cfgs in CONFIG_LISTS.items()
        }

    def module(self) -> types.SimpleNamespace:
        return self.stubs

    def interpreted(self) -> bool:
        return not self.gpu

    def autotune_enabled(self, q: object, settings: object) -> bool:
        return self.gpu

    def sm_count(self, device_index: int | None) -> int:
        return 132

    def tuned(self, name: str) -> _Stub:
        return self.tuned_stubs[name]

    def check_device(self, q: object, settings: object) -> None:
        return None


@contextlib.contextmanager
def no_launches(path: str = "cuda") -> Iterator[list[int]]:
    """Replace every Triton launch by a counting no-op; yields the launch counter
    (``[n]``). ``path="cuda"``: the launchers take their GPU path (a tuned config cached
    per bucket, as after the first call); ``"interpreter"``: the interpreter's configs.
    Calls in the block run under settings with :class:`StubKernels` (so they get plans of
    their own, and nothing is patched)."""
    if path not in ("cuda", "interpreter"):
        raise ValueError(f"path must be 'cuda' or 'interpreter', got {path!r}")
    counter = [0]
    with use_settings(kernels=StubKernels(counter, gpu=path == "cuda")):
        yield counter


@dataclass(frozen=True)
class HostCounts:
    """What one call did on the host: Python-level calls (``sys.setprofile``'s ``call``
    and ``c_call`` events, the measured function's own frame included), kernel launches,
    and tensor allocations (aten ops that make a new tensor)."""

    calls: int
    launches: int
    allocations: int


class _OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func._overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def dispatched_ops(fn: Callable[[], object]) -> list[str]:
    """The aten ops (packet names) that one call of ``fn`` dispatches, in order."""
    with _OpLog() as log:
        fn()
    return log.ops


def count_calls(fn: Callable[[], object]) -> int:
    """Python-level calls (``call`` + ``c_call`` profile events) of one call of ``fn``;
    the profiler's own switch-off is not counted. The cyclic garbage collector is off
    during the call (and run just before): a collection fires when the process's
    allocation count says so, and the finalizers and ``gc.callbacks`` it runs are Python
    calls of whatever died, not of ``fn``, so they would make the count depend on what
    ran before in the process."""
    n = [0]

    def prof(frame, event, arg) -> None:
        if event == "call" or event == "c_call":
            n[0] += 1

    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        sys.setprofile(prof)
        try:
            fn()
        finally:
            sys.setprofile(None)
    finally:
        if was_enabled:
            gc.enable()
    return n[0] - 1  # sys.setprofile(None)


def count_host_work(
    fn: Callable[[], object], launches: list[int] | None = None, warmup: int = 2
) -> HostCounts:
    """Counts of one call of ``fn`` after ``warmup`` calls (plans built, configs chosen);
    ``launches``: the counter :func:`no_launches` yields (0 launches without one)."""
    for _ in range(warmup):
        fn()
    before = launches[0] if launches is not None else 0
    calls = count_calls(fn)
    n_launch = (launches[0] - before) if launches is not None else 0
    allocs = sum(op in _ALLOCATING for op in dispatched_ops(fn))
    return HostCounts(calls=calls, launches=n_launch, allocations=allocs)


def syncing_ops(fn: Callable[[], object]) -> list[str]:
    """The ops of one call of ``fn`` that would make the host wait for the device."""
    return [op for op in dispatched_ops(fn) if op in SYNCING]


__all__ = [
    "SYNCING",
    "HostCounts",
    "StubKernels",
    "count_calls",
    "count_host_work",
    "dispatched_ops",
    "no_launches",
    "syncing_ops",
]
