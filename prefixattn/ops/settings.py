"""What the kernel path is allowed to choose: kernel configs and the :class:`Settings` of
a call (the environment, read once, plus choices a caller or a test may fix).

The lowest module of ``prefixattn.ops`` after nothing: every layer above reads a call's
settings from its :class:`~prefixattn.ops.call.AttentionCall`, and a call plan is keyed
on them, so changing settings never needs a plan cache to be cleared::

    from prefixattn.ops.settings import use_settings, KernelConfig

    with use_settings(backward="split", fwd=KernelConfig(16, 32, 1, 1)):
        out = prefix_attention(q, k, v, pk, pv, backend="triton")

Environment variables (read once, when this module is imported, into
:data:`ENV_SETTINGS`): ``PREFIXATTN_AUTOTUNE`` (``0``: the first config of each list
instead of ``triton.autotune``), ``PREFIXATTN_BWD`` (``auto`` / ``split`` / ``fused``, see
:data:`BACKWARD_MODES`) and ``TRITON_INTERPRET`` (``1``: the kernels run in Triton's CPU
interpreter; it must be set before the first kernel call).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options of one kernel.

    BLOCK_M tiles queries and BLOCK_N keys. The fused backward (``_attn_bwd``) also takes
    the dQ programs' tiles, BLOCK_M2 x BLOCK_N2 (0 for every other kernel).
    """

    BLOCK_M: int
    BLOCK_N: int
    num_warps: int = 4
    num_stages: int = 2
    BLOCK_M2: int = 0
    BLOCK_N2: int = 0

    def tiles(self) -> dict[str, int]:
        """The tile constexprs a launch passes, e.g. ``{"BLOCK_M": 64, "BLOCK_N": 64}``."""
        out = {"BLOCK_M": self.BLOCK_M, "BLOCK_N": self.BLOCK_N}
        if self.BLOCK_M2:
            out.update(BLOCK_M2=self.BLOCK_M2, BLOCK_N2=self.BLOCK_N2)
        return out

    @classmethod
    def from_triton(cls, cfg: Any) -> KernelConfig:  # cfg: triton.Config
        """The config of a ``triton.Config`` (e.g. an autotuner's choice)."""
        kw = cfg.kwargs
        return cls(
            kw["BLOCK_M"], kw["BLOCK_N"], cfg.num_warps, cfg.num_stages,
            kw.get("BLOCK_M2", 0), kw.get("BLOCK_N2", 0),
        )  # fmt: skip


# Candidate configs per kernel (first = default when autotuning is off). BLOCK_M tiles
# queries, BLOCK_N keys. Each list starts with a config that compiles without register
# spills for sm_90 at D = 64 and D = 128 (``scripts/resource_probe.py``; the table is in
# benchmarks/results/); the rest are the earlier candidates, left to the autotuner.
FWD_CONFIGS = [
    KernelConfig(128, 64, 8, 3),
    KernelConfig(128, 64, 4, 3),
    KernelConfig(128, 128, 8, 3),
    KernelConfig(64, 64, 4, 3),
    KernelConfig(16, 64, 4, 3),  # decode: Nq <= 16
]
DKDV_CONFIGS = [
    KernelConfig(16, 128, 8, 3),
    KernelConfig(32, 128, 8, 3),
    KernelConfig(32, 128, 4, 3),
    KernelConfig(64, 128, 8, 3),
    KernelConfig(32, 64, 4, 3),
]
DQ_CONFIGS = [
    KernelConfig(128, 32, 8, 3),
    KernelConfig(128, 32, 4, 3),
    KernelConfig(128, 64, 8, 3),
    KernelConfig(64, 64, 4, 2),
]
PREFIX_DKDV_CONFIGS = [
    KernelConfig(32, 64, 8, 3),
    KernelConfig(64, 64, 4, 3),
    KernelConfig(32, 64, 4, 3),
    KernelConfig(64, 128, 8, 3),
]
# The fused backward: (BLOCK_M, BLOCK_N) tile the dK/dV programs (query x key; the prefix
# programs use BLOCK_M and PREFIX_BLOCK_N), (BLOCK_M2, BLOCK_N2) the dQ programs, with one
# num_warps / num_stages for all three. At D = 128 every fused config probed spills a
# little (the first: 48 bytes).
BWD_CONFIGS = [
    KernelConfig(16, 128, 8, 3, 128, 32),
    KernelConfig(32, 128, 8, 3, 128, 32),
    KernelConfig(16, 64, 8, 3, 64, 32),
    KernelConfig(32, 128, 4, 3, 128, 32),
]
# Fits any GPU, D and dtype: the last resort when autotuning is off and nothing else fits.
SAFE_CONFIG = KernelConfig(16, 32, 4, 1)
SAFE_BWD_CONFIG = KernelConfig(16, 32, 4, 1, 16, 32)
CONFIG_LISTS = {
    "fwd": FWD_CONFIGS,
    "dkdv": DKDV_CONFIGS,
    "dq": DQ_CONFIGS,
    "prefix_dkdv": PREFIX_DKDV_CONFIGS,
    "bwd": BWD_CONFIGS,
}
INTERPRET_CONFIG = KernelConfig(32, 32, 1, 1)
INTERPRET_BWD_CONFIG = KernelConfig(32, 32, 1, 1, 32, 32)
# Prefix keys per program of the fused backward (a fixed size, so that the number of
# prefix programs does not depend on the autotuned config): at most 64, less for short
# prefixes.
PREFIX_BLOCK_N = 64
BACKWARD_MODES = ("auto", "split", "fused")
# The dtype of the chunked soft-capping / sinks path's block GEMMs for bf16 / fp16 inputs
# on the CPU (ops/sdpa_features.py): "auto" (the input dtype where the CPU has bf16 / fp16
# matrix instructions, float32 elsewhere), "float32" (always), "input" (always the input
# dtype: slow on a CPU without them, where PyTorch's bf16 GEMMs are a scalar fallback)
CPU_BLOCK_GEMM_MODES = ("auto", "float32", "input")
REDUCE_BLOCK = 1024
# CUDA's limit on grid axis 1, where every kernel puts (batch row, head) pairs
MAX_GRID_Y = 65535
# The backward's launch layout below this much work (B * H * Nq * (P + Nk) score elements)
# is the fused one (1-2 launches: the host-bound regime, where a call's launches cost more
# host time than its kernels take on the GPU), above it the split one (4-5 launches, each
# kernel autotuned on its own). An estimate until measured on a GPU: the committed H100
# profile has GPT-2 small's shape (B8 H12 N1024 P64: 1.1e8) host-bound (0.28 ms of GPU
# work against ~1.2 ms of host time per fwd+bwd) and N = 4096 (B4: 8.2e8) GPU-bound.
FUSED_BWD_MAX_WORK = 1 << 28


@dataclass(frozen=True, eq=False)
class Settings:
    """The choices of the kernel path that are not inputs of a call.

    A call carries the settings active when it was made (:func:`current_settings`), and
    its plan is keyed on the object (by identity: a plan made under one ``Settings``
    object is never reused under another).

    Attributes:
        autotune: ``triton.autotune`` on CUDA (``PREFIXATTN_AUTOTUNE``, default on); off:
            the first fitting config of each list.
        backward: ``"auto"`` (fused up to :data:`FUSED_BWD_MAX_WORK`, split above),
            ``"split"`` or ``"fused"`` (``PREFIXATTN_BWD``).
        cpu_block_gemm: the dtype of the CPU chunked path's P V / dS K / dS^T Q / P^T dO
            block GEMMs for bf16 / fp16 inputs (``PREFIXATTN_CPU_BLOCK_GEMM``, see
            :data:`CPU_BLOCK_GEMM_MODES`; default ``"auto"``).
        interpret: Triton's CPU interpreter was requested (``TRITON_INTERPRET=1``).
        fwd, dkdv, dq, prefix_dkdv, bwd: one config for that kernel instead of the
            normal choice (``bwd``, the fused backward's, needs BLOCK_M2 / BLOCK_N2).
        prefix_splits: query runs per prefix-gradient program instead of the heuristic.
        max_grid_y: the grid-axis limit past which a batch runs in chunks of rows.
        kernels: where launches take their kernels and device facts from (a
            ``prefixattn.ops.kernels.KernelSource``); ``None``: the Triton kernels of
            ``csrc_triton`` on the real device. ``prefixattn.profiling`` passes stubs.
    """

    autotune: bool = True
    backward: str = "auto"
    cpu_block_gemm: str = "auto"
    interpret: bool = False
    fwd: KernelConfig | None = None
    dkdv: KernelConfig | None = None
    dq: KernelConfig | None = None
    prefix_dkdv: KernelConfig | None = None
    bwd: KernelConfig | None = None
    prefix_splits: int | None = None
    max_grid_y: int = MAX_GRID_Y
    kernels: Any = None

    def __post_init__(self) -> None:
        if self.backward not in BACKWARD_MODES:
            raise ValueError(
                f"PREFIXATTN_BWD / Settings.backward must be one of {BACKWARD_MODES}, "
                f"got {self.backward!r}"
            )
        if self.cpu_block_gemm not in CPU_BLOCK_GEMM_MODES:
            raise ValueError(
                "PREFIXATTN_CPU_BLOCK_GEMM / Settings.cpu_block_gemm must be one of "
                f"{CPU_BLOCK_GEMM_MODES}, got {self.cpu_block_gemm!r}"
            )
        if self.bwd is not None and not self.bwd.BLOCK_M2:
            raise ValueError("Settings.bwd needs a config with BLOCK_M2 and BLOCK_N2")
        if self.prefix_splits is not None and self.prefix_splits < 1:
            raise ValueError(f"Settings.prefix_splits must be >= 1, got {self.prefix_splits}")

    @classmethod
    def from_env(cls, **changes: Any) -> Settings:
        """The settings the environment asks for, with ``changes`` applied."""
        env = {
            "autotune": os.environ.get("PREFIXATTN_AUTOTUNE", "1") != "0",
            "backward": os.environ.get("PREFIXATTN_BWD", "auto").strip().lower(),
            "cpu_block_gemm": os.environ.get("PREFIXATTN_CPU_BLOCK_GEMM", "auto").strip().lower(),
            "interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        }
        return cls(**{**env, **changes})

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied (a new object: plans are keyed by identity)."""
        return dataclasses.replace(self, **changes)

    def forced(self, name: str) -> KernelConfig | None:
        """The config fixed for kernel ``name`` (a key of :data:`CONFIG_LISTS`), or None."""
        return getattr(self, name)


class _Active:
    """The settings new calls take (one per process; :func:`use_settings` swaps them)."""

    settings: Settings


ACTIVE = _Active()
ENV_SETTINGS = ACTIVE.settings = Settings.from_env()


def current_settings() -> Settings:
    """The settings a call made now gets."""
    return ACTIVE.settings


@contextlib.contextmanager
def use_settings(settings: Settings | None = None, **changes: Any) -> Iterator[Settings]:
    """Make calls in the block use ``settings`` (default: the current ones) with
    ``changes`` applied; yields them. Process-wide (not per thread)."""
    new = (settings or ACTIVE.settings).replace(**changes)
    saved = ACTIVE.settings
    ACTIVE.settings = new
    try:
        yield new
    finally:
        ACTIVE.settings = saved


__all__ = [
    "ACTIVE",
    "BACKWARD_MODES",
    "BWD_CONFIGS",
    "CONFIG_LISTS",
    "CPU_BLOCK_GEMM_MODES",
    "DKDV_CONFIGS",
    "DQ_CONFIGS",
    "ENV_SETTINGS",
    "FUSED_BWD_MAX_WORK",
    "FWD_CONFIGS",
    "INTERPRET_BWD_CONFIG",
    "INTERPRET_CONFIG",
    "MAX_GRID_Y",
    "PREFIX_BLOCK_N",
    "PREFIX_DKDV_CONFIGS",
    "REDUCE_BLOCK",
    "SAFE_BWD_CONFIG",
    "SAFE_CONFIG",
    "KernelConfig",
    "Settings",
    "current_settings",
    "use_settings",
]
