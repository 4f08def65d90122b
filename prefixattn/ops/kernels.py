"""The Triton kernels and how one launch runs: where the kernels come from
(:class:`KernelSource`), their parameter lists, and the config a launch uses.

On CUDA the block sizes, warps and stages come from ``triton.autotune`` over a short
per-kernel list (``settings.CONFIG_LISTS``), keyed on the head dim, the flags and
power-of-two buckets of Nq and Nk (so a growing KV cache does not re-tune every step);
``Settings.autotune = False`` (``PREFIXATTN_AUTOTUNE=0``) uses the first fitting config of
each list instead, and a config fixed in the settings always runs. Under
``TRITON_INTERPRET=1`` one small fixed config runs.

A launch is described by name (:class:`LaunchSpec`: every runtime argument by parameter
name, read from the kernel's definition by :func:`kernel_params`); :func:`launch_now`
runs it eagerly, :func:`launch_wrapped` through ``torch.library.wrap_triton`` while
``torch.compile`` traces. Sizes may then be ``torch.SymInt`` (dynamic shapes), read here
through their example value (:func:`hint`) instead of guarding on them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from triton.runtime.errors import OutOfResources

from .settings import (
    CONFIG_LISTS,
    INTERPRET_BWD_CONFIG,
    INTERPRET_CONFIG,
    SAFE_BWD_CONFIG,
    SAFE_CONFIG,
    KernelConfig,
    Settings,
)
from .validation import check_kernel_dtype

# kernel name -> (attribute of csrc_triton, the size its key-tile count follows)
TUNED_KERNELS = {
    "fwd": ("_attn_fwd", "N_K"),
    "dkdv": ("_attn_bwd_dkdv", "N_K"),
    "dq": ("_attn_bwd_dq", "N_K"),
    "prefix_dkdv": ("_attn_bwd_prefix_dkdv", "N_P"),
    "bwd": ("_attn_bwd", "N_K"),
}
# the KIND constexpr of ``_attn_bwd`` per backward kernel name (csrc_triton's BWD_FUSED,
# BWD_DKDV, BWD_DQ, BWD_PREFIX): the split kernels are launches of the same kernel
BWD_KINDS = {"bwd": 0, "dkdv": 1, "dq": 2, "prefix_dkdv": 3}
# the constexprs each autotuned kernel's cache key has besides the size buckets
_TUNE_KEYS = {
    "fwd": [
        "IS_CAUSAL",
        "PREFIX_MODE",
        "HAS_KPM",
        "HAS_WINDOW",
        "HAS_SOFTCAP",
        "HAS_SINKS",
        "PAGE_SIZE",
    ],
    "dkdv": ["IS_CAUSAL", "HAS_KPM", "HAS_WINDOW", "HAS_SOFTCAP"],
    "dq": ["IS_CAUSAL", "PREFIX_MODE", "HAS_KPM", "HAS_WINDOW", "HAS_SOFTCAP"],
    "prefix_dkdv": ["PREFIX_MODE", "PREFIX_WINDOWED", "HAS_SOFTCAP"],
    "bwd": ["IS_CAUSAL", "PREFIX_MODE", "HAS_KPM"],
}


class KernelSource:
    """Where launches take their kernels from, and what they ask the device.

    The default (:data:`DEFAULT_SOURCE`) is ``csrc_triton`` on the real device. A
    subclass passed as ``Settings(kernels=...)`` replaces any of these methods (e.g.
    ``prefixattn.profiling`` counts launches with stub kernels and takes the GPU path on a
    CPU machine). Each source keeps its own config caches.
    """

    def __init__(self) -> None:
        # (kernel, dtype, device, buckets, constexprs) -> the config triton.autotune chose
        self.best_config: dict[tuple, KernelConfig] = {}
        # (kernel, BLOCK_D, dtype, buckets) -> the first default config that fitted the GPU
        self.fallback: dict[tuple, KernelConfig] = {}
        self._tuned: dict[str, Any] = {}
        self._interpreted: bool | None = None

    def module(self) -> Any:
        """The namespace of jit kernels (``csrc_triton``)."""
        import csrc_triton

        return csrc_triton

    def interpreted(self) -> bool:
        """True when the kernels were built by Triton's CPU interpreter."""
        if self._interpreted is None:
            from triton.runtime.interpreter import InterpretedFunction

            self._interpreted = isinstance(self.module()._attn_fwd, InterpretedFunction)
        return self._interpreted

    def autotune_enabled(self, q: torch.Tensor, settings: Settings) -> bool:
        """Whether launches on q's device autotune (CUDA, compiled kernels, setting on)."""
        return q.device.type == "cuda" and not self.interpreted() and settings.autotune

    def sm_count(self, device_index: int | None) -> int:
        """Streaming multiprocessors of the CUDA device."""
        return _sm_count(device_index)

    def tuned(self, name: str) -> Any:
        """Kernel ``name`` (a key of ``CONFIG_LISTS``) wrapped in ``triton.autotune``."""
        kernel = self._tuned.get(name)
        if kernel is None:
            kernel = self._tuned[name] = _autotuned(self.module(), name)
        return kernel

    def check_device(self, q: torch.Tensor, settings: Settings) -> None:
        """Raise a clear ValueError when ``backend='triton'`` cannot run on q's device."""
        check_kernel_dtype(q)
        if q.device.type == "cuda":
            return
        if q.device.type == "cpu":
            if not settings.interpret:
                raise ValueError(
                    "backend='triton' needs CUDA tensors; on CPU it runs only under Triton's "
                    "interpreter (set TRITON_INTERPRET=1 before importing prefixattn), or use "
                    "backend='reference' / 'auto'"
                )
            if not self.interpreted():
                raise ValueError(
                    "backend='triton' on CPU: the Triton kernels were already compiled for "
                    "the GPU in this process; TRITON_INTERPRET=1 must be set before the "
                    "first call"
                )
            return
        raise ValueError(
            f"backend='triton' supports CUDA (or CPU with TRITON_INTERPRET=1), got {q.device}"
        )


DEFAULT_SOURCE = KernelSource()


def source(settings: Settings) -> KernelSource:
    """The kernel source of ``settings`` (:data:`DEFAULT_SOURCE` unless one is set)."""
    return settings.kernels or DEFAULT_SOURCE


@functools.cache
def _sm_count(device_index: int | None) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def hint(n: Any) -> int:
    """``n`` as a concrete int for heuristics: a traced ``torch.SymInt`` gives its example
    value (no guard, so a compiled graph stays valid for other sizes)."""
    if isinstance(n, int):
        return n
    h = getattr(getattr(n, "node", None), "hint", None)
    return int(h) if h is not None else 64


def bucket(n: Any) -> int:
    """Power-of-two bucket in [16, 16384]: an autotune key that is stable while a KV cache
    grows (a traced SymInt gets its example value's bucket)."""
    if not isinstance(n, int):
        n = hint(n)
    return min(max(16, 1 << max(0, (n - 1)).bit_length()), 16384)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (int(n) - 1)).bit_length()


def block_d(D: int) -> int:
    """The head-dim tile: D rounded up to a power of two, at least 16."""
    return max(16, next_pow2(D))


def _fits(tiles: dict[str, int], bd: int, n_q: Any, n_kp: Any) -> bool:
    """Whether a config's tiles suit the problem: not far larger than Nq / Nk (or P), and
    at most 64 x 64 for D = 256."""
    cap_q = max(16, next_pow2(hint(n_q)))
    cap_k = max(16, next_pow2(hint(n_kp)))
    pairs = [(tiles["BLOCK_M"], tiles["BLOCK_N"])]
    if tiles.get("BLOCK_M2"):
        pairs.append((tiles["BLOCK_M2"], tiles["BLOCK_N2"]))
    return all(
        not (bd >= 256 and bm * bn > 64 * 64) and bm <= cap_q and bn <= cap_k for bm, bn in pairs
    )


def _autotuned(kernels: Any, name: str) -> Any:
    """Wrap one jit kernel in ``triton.autotune`` (built on first use, GPU only)."""
    import triton

    attr, n_key = TUNED_KERNELS[name]
    configs = [
        triton.Config(c.tiles(), num_warps=c.num_warps, num_stages=c.num_stages)
        for c in CONFIG_LISTS[name]
    ]

    def prune(configs: list, named_args: dict, **kwargs: Any) -> list:
        fit = [
            c
            for c in configs
            if _fits(c.kwargs, kwargs["BLOCK_D"], named_args["N_Q"], named_args[n_key])
        ]
        return fit or configs[-1:]

    key = ["TUNE_NQ", "TUNE_NK", "D", "HAS_DROPOUT", *_TUNE_KEYS[name]]
    return triton.autotune(
        configs=configs, key=key, prune_configs_by={"early_config_prune": prune}
    )(getattr(kernels, attr))


@functools.cache
def kernel_params(attr: str) -> tuple[str, ...]:
    """The runtime (non-constexpr) parameter names of kernel ``attr`` of csrc_triton, in
    order, read from the kernel's Python definition."""
    import triton.language as tl

    fn = getattr(DEFAULT_SOURCE.module(), attr).fn
    return tuple(
        name
        for name, p in inspect.signature(fn).parameters.items()
        if p.annotation is not tl.constexpr and p.annotation != "tl.constexpr"
    )


# Parameters whose value changes from call to call with the same signature: the tensors
# (their storage) and the dropout seed. Every kernel lists its pointers first.
DYNAMIC_PARAMS = frozenset(
    ("Q", "K", "V", "PK", "PV", "PIDX", "PLEN", "KPM", "CSL", "CBI", "Out", "LSE", "O", "DO", "Delta",
     "BT", "DQ", "DK", "DV", "DPK", "DPV", "GPK", "GPV", "SINKS", "seed")
)  # fmt: skip


@dataclass
class LaunchSpec:
    """One kernel launch, described by name: what :func:`launch_now`,
    :func:`launch_wrapped` and the call plans (``plan.py``) launch.

    ``name`` picks the config list (``CONFIG_LISTS``); kernels without one
    (``preprocess``, ``reduce``) take their tiles from ``consts``. ``grid(tiles)`` gives
    the grid for a config's tiles; ``n_q``, ``n_kp`` size the config choice.
    ``settings``: the call's (forced configs, autotuning, the kernel source).
    """

    name: str
    attr: str
    grid: Callable[[dict], tuple[int, ...]]
    n_q: int
    n_kp: int
    vals: dict
    consts: dict
    settings: Settings

    def args(self) -> tuple:
        """The runtime arguments in the kernel's parameter order."""
        return tuple(self.vals[n] for n in kernel_params(self.attr))

    def kernel(self) -> Any:
        """The jit kernel this spec launches (from the settings' kernel source)."""
        return getattr(source(self.settings).module(), self.attr)


def launch_now(spec: LaunchSpec, q: torch.Tensor) -> tuple[KernelConfig | None, tuple]:
    """Launch ``spec`` eagerly (autotuning or trying configs as needed); returns the config
    that ran (None for kernels without a config list, or when the autotuner kept its
    choice to itself) and the grid it ran on."""
    kernel = spec.kernel()
    args = spec.args()
    if spec.name not in CONFIG_LISTS:
        grid = spec.grid(spec.consts)
        kernel[grid](*args, **spec.consts)
        return None, grid
    cfg = _launch(spec, kernel, q, args)
    return cfg, (spec.grid(cfg.tiles()) if cfg is not None else ())


def _run_config(kernel: Any, grid_fn: Callable, cfg: KernelConfig, args: tuple, kw: dict) -> None:
    """Launch ``kernel`` with one explicit config."""
    tiles = cfg.tiles()
    kernel[grid_fn(tiles)](*args, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **tiles, **kw)


def _fixed_config(spec: LaunchSpec, src: KernelSource) -> KernelConfig | None:
    """The one config a launch must use (forced in the settings, or the interpreter's)."""
    forced = spec.settings.forced(spec.name)
    if forced is not None:
        return forced
    if src.interpreted():
        return INTERPRET_BWD_CONFIG if spec.name == "bwd" else INTERPRET_CONFIG
    return None


def _launch(spec: LaunchSpec, kernel: Any, q: torch.Tensor, args: tuple) -> KernelConfig | None:
    """Launch autotuned on CUDA, or with one fixed config otherwise; returns the config
    that ran (``spec.grid(tiles)`` gives the grid for a config's tile sizes)."""
    name, kw, src = spec.name, spec.consts, source(spec.settings)
    forced = spec.settings.forced(name)
    if forced is None and src.autotune_enabled(q, spec.settings):
        # triton.autotune picks the config once per key; after that the kernel is launched
        # directly with it, which skips the autotuner's per-call work (it costs about as
        # much host time as the launch itself).
        key = (name, q.dtype, q.device.index, bucket(spec.n_q), bucket(spec.n_kp), *kw.items())
        best = src.best_config.get(key)
        if best is None:
            tuned = src.tuned(name)
            tuned[spec.grid](*args, **kw)
            cfg = getattr(tuned, "best_config", None)
            if cfg is None:
                return None
            best = src.best_config[key] = KernelConfig.from_triton(cfg)
            return best
        _run_config(kernel, spec.grid, best, args, kw)
        return best
    fixed = _fixed_config(spec, src)
    if fixed is not None:
        _run_config(kernel, spec.grid, fixed, args, kw)
        return fixed
    key = (name, kw["BLOCK_D"], q.dtype, bucket(spec.n_q), bucket(spec.n_kp))
    candidates = default_configs(CONFIG_LISTS[name], kw["BLOCK_D"], spec.n_q, spec.n_kp)
    if key in src.fallback:  # the config that fitted last time goes first
        candidates.insert(0, src.fallback[key])
    for i, cfg in enumerate(candidates):
        try:
            _run_config(kernel, spec.grid, cfg, args, kw)
        except OutOfResources:  # a config too large for this GPU: try the next one
            if i == len(candidates) - 1:
                raise
            continue
        src.fallback[key] = cfg
        return cfg
    raise AssertionError("unreachable: the last candidate either ran or raised")


def launch_wrapped(spec: LaunchSpec, q: torch.Tensor, wrap: Callable) -> None:
    """:func:`launch_now` when it is traced: ``wrap`` (``torch.library.wrap_triton``) is
    applied to the kernel, or to its ``triton.autotune`` wrapper, before the launch.

    Nothing runs here at trace time, so there is no config cache and no OutOfResources
    fallback: on CUDA the ``triton.autotune`` wrapper goes to the compiler, which tunes it
    (with the same pruning); otherwise the first fitting config (or the forced one) is used.
    """
    kernel = spec.kernel()
    args = spec.args()
    if spec.name not in CONFIG_LISTS:
        wrap(kernel)[spec.grid(spec.consts)](*args, **spec.consts)
        return
    src = source(spec.settings)
    if spec.settings.forced(spec.name) is None and src.autotune_enabled(q, spec.settings):
        wrap(src.tuned(spec.name))[spec.grid](*args, **spec.consts)
        return
    cfg = _fixed_config(spec, src)
    if cfg is None:
        bd, cfgs = spec.consts["BLOCK_D"], CONFIG_LISTS[spec.name]
        cfg = default_configs(cfgs, bd, hint(spec.n_q), hint(spec.n_kp))[0]
    _run_config(wrap(kernel), spec.grid, cfg, args, spec.consts)


def launch_all(specs: list[LaunchSpec], q: torch.Tensor, wrap: Callable | None) -> None:
    """Launch ``specs`` in order (eagerly, or wrapped while tracing)."""
    for spec in specs:
        if wrap is None:
            launch_now(spec, q)
        else:
            launch_wrapped(spec, q, wrap)


def default_configs(cfgs: list[KernelConfig], bd: int, n_q: Any, n_kp: Any) -> list[KernelConfig]:
    """The configs worth trying, in preference order, when autotuning is off."""
    out = [c for c in cfgs if _fits(c.tiles(), bd, n_q, n_kp)]
    safe = SAFE_BWD_CONFIG if cfgs[0].BLOCK_M2 else SAFE_CONFIG
    return out + [c for c in cfgs if c not in out] + [safe]


def input_precision(q: torch.Tensor) -> str:
    """fp32 inputs get true fp32 products unless the user allowed TF32 for matmuls."""
    if q.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


__all__ = [
    "BWD_KINDS",
    "DEFAULT_SOURCE",
    "DYNAMIC_PARAMS",
    "KernelSource",
    "LaunchSpec",
    "block_d",
    "bucket",
    "default_configs",
    "hint",
    "input_precision",
    "kernel_params",
    "launch_all",
    "launch_now",
    "launch_wrapped",
    "next_pow2",
    "source",
]
