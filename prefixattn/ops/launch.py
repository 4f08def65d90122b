"""Launchers of the Triton kernels: device checks, block choice, allocation, grids.

Inputs arrive validated (``validation.validate``). Nothing here copies K, V or the prefix:
every tensor goes to the kernels with its own strides. On CUDA the block sizes, warps and
stages come from ``triton.autotune`` over a short per-kernel list, keyed on the head dim,
the flags and power-of-two buckets of Nq and Nk (so a growing KV cache does not re-tune
every step); ``PREFIXATTN_AUTOTUNE=0`` uses the first config of each list instead. Under
``TRITON_INTERPRET=1`` one small fixed config runs.

Every kernel's arguments are supplied by parameter name (:func:`kernel_params` reads each
kernel's parameter list from its definition): :func:`forward_spec` and
:func:`backward_specs` describe a call's launches as :class:`LaunchSpec` s, which eager
call plans (``plan.py``) turn into cached launches, and which :func:`attention_forward` /
:func:`attention_backward` launch directly (batches past the grid limit) or, with
``wrap``, through ``torch.library.wrap_triton`` for the custom ops of ``custom_op.py``, so
that ``torch.compile`` sees every launch; the sizes may then be ``torch.SymInt`` (dynamic
shapes), which the heuristics here read through their example value (:func:`_hint`)
instead of guarding on them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from triton.runtime.errors import OutOfResources

from .validation import (
    PREFIX_NONE,
    PREFIX_PER_ROW,
    PREFIX_SHARED,
    AttnProblem,
    check_kernel_dtype,
)


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
    def from_triton(cls, cfg) -> KernelConfig:  # cfg: triton.Config
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
REDUCE_BLOCK = 1024

# Test hook: force one config for every kernel (see ``forced_config``).
_forced: dict[str, KernelConfig | int] = {}


@contextlib.contextmanager
def forced_config(
    fwd: KernelConfig | None = None,
    dkdv: KernelConfig | None = None,
    dq: KernelConfig | None = None,
    prefix_dkdv: KernelConfig | None = None,
    prefix_splits: int | None = None,
    bwd: KernelConfig | None = None,
) -> Iterator[None]:
    """Run the kernels with the given configs (tests use it to cover BLOCK_M != BLOCK_N
    and split prefix reductions); ``None`` keeps the normal choice. ``bwd`` is the fused
    backward's config (it needs BLOCK_M2 / BLOCK_N2)."""
    if bwd is not None and not bwd.BLOCK_M2:
        raise ValueError("forced_config(bwd=...) needs a config with BLOCK_M2 and BLOCK_N2")
    saved = dict(_forced)
    for name, cfg in (
        ("fwd", fwd),
        ("dkdv", dkdv),
        ("dq", dq),
        ("prefix_dkdv", prefix_dkdv),
        ("prefix_splits", prefix_splits),
        ("bwd", bwd),
    ):
        if cfg is not None:
            _forced[name] = cfg
    from .plan import clear_plans  # plans hold the configs they launched with

    clear_plans()
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(saved)
        clear_plans()


def interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _kernels_module():  # -> module csrc_triton
    import csrc_triton

    return csrc_triton


def _kernels():  # -> module csrc_triton (a seam for tests that record launches)
    return _kernels_module()


@functools.cache
def kernels_interpreted() -> bool:
    """True when the kernels were built by Triton's CPU interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_kernels()._attn_fwd, InterpretedFunction)


def check_triton_device(q: torch.Tensor) -> None:
    """Raise a clear ValueError when ``backend='triton'`` cannot run on q's device."""
    check_kernel_dtype(q)
    if q.device.type == "cuda":
        return
    if q.device.type == "cpu":
        if not interpreter_requested():
            raise ValueError(
                "backend='triton' needs CUDA tensors; on CPU it runs only under Triton's "
                "interpreter (set TRITON_INTERPRET=1 before the first call), or use "
                "backend='reference' / 'auto'"
            )
        if not kernels_interpreted():
            raise ValueError(
                "backend='triton' on CPU: the Triton kernels were already compiled for the "
                "GPU in this process; TRITON_INTERPRET=1 must be set before the first call"
            )
        return
    raise ValueError(
        f"backend='triton' supports CUDA (or CPU with TRITON_INTERPRET=1), got {q.device}"
    )


def backward_mode() -> str:
    """``PREFIXATTN_BWD``: ``auto`` (default: fused up to :data:`FUSED_BWD_MAX_WORK`, split
    above), ``split`` (Delta pre-pass, then dK/dV, dQ and the prefix partials in three
    launches, each autotuned on its own, then the prefix reduce) or ``fused`` (everything
    in one launch of ``_attn_bwd``, Delta computed in the kernel, then the reduce if
    needed). Read when a backward is set up: a call plan's first backward for given
    needs (``plan.clear_plans()`` makes a change take effect at once)."""
    mode = os.environ.get("PREFIXATTN_BWD", "auto").strip().lower()
    if mode not in BACKWARD_MODES:
        raise ValueError(f"PREFIXATTN_BWD must be one of {BACKWARD_MODES}, got {mode!r}")
    return mode


def _autotune_enabled(q: torch.Tensor) -> bool:
    return (
        q.device.type == "cuda"
        and not kernels_interpreted()
        and os.environ.get("PREFIXATTN_AUTOTUNE", "1") != "0"
    )


def _hint(n) -> int:
    """``n`` as a concrete int for heuristics: a traced ``torch.SymInt`` gives its example
    value (no guard, so a compiled graph stays valid for other sizes)."""
    if isinstance(n, int):
        return n
    hint = getattr(getattr(n, "node", None), "hint", None)
    return int(hint) if hint is not None else 64


def _bucket(n: int) -> int:
    """Power-of-two bucket in [16, 16384]: an autotune key that is stable while a KV cache
    grows (a traced SymInt gets its example value's bucket)."""
    if not isinstance(n, int):
        n = _hint(n)
    return min(max(16, 1 << max(0, (n - 1)).bit_length()), 16384)


def _fits(tiles: dict[str, int], block_d: int, n_q, n_kp) -> bool:
    """Whether a config's tiles suit the problem: not far larger than Nq / Nk (or P), and
    at most 64 x 64 for D = 256."""
    cap_q = max(16, triton_next_pow2(_hint(n_q)))
    cap_k = max(16, triton_next_pow2(_hint(n_kp)))
    pairs = [(tiles["BLOCK_M"], tiles["BLOCK_N"])]
    if tiles.get("BLOCK_M2"):
        pairs.append((tiles["BLOCK_M2"], tiles["BLOCK_N2"]))
    return all(
        not (block_d >= 256 and bm * bn > 64 * 64) and bm <= cap_q and bn <= cap_k
        for bm, bn in pairs
    )


def _prune_for(block_d: int, n_q: int, n_k_or_p: int, configs: list) -> list:
    """Drop configs whose tiles are far larger than the problem or too big for D."""
    out = [c for c in configs if _fits(c.kwargs, block_d, n_q, n_k_or_p)]
    return out or configs[-1:]


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1)).bit_length()


@functools.cache
def _tuned(name: str):  # -> autotuned kernel
    """Wrap one jit kernel in ``triton.autotune`` (built on first use, GPU only)."""
    import triton

    ks = _kernels()
    kernel, n_key = {
        "fwd": (ks._attn_fwd, "N_K"),
        "dkdv": (ks._attn_bwd_dkdv, "N_K"),
        "dq": (ks._attn_bwd_dq, "N_K"),
        "prefix_dkdv": (ks._attn_bwd_prefix_dkdv, "N_P"),
        "bwd": (ks._attn_bwd, "N_K"),
    }[name]
    cfgs = CONFIG_LISTS[name]
    configs = [
        triton.Config(c.tiles(), num_warps=c.num_warps, num_stages=c.num_stages) for c in cfgs
    ]

    def prune(configs, named_args, **kwargs):
        return _prune_for(kwargs["BLOCK_D"], named_args["N_Q"], named_args[n_key], configs)

    common = ["TUNE_NQ", "TUNE_NK", "D", "HAS_DROPOUT", "HAS_SOFTCAP"]
    key = (
        common
        + {
            "fwd": ["IS_CAUSAL", "PREFIX_MODE", "HAS_KPM", "HAS_WINDOW", "HAS_SINKS"],
            "dkdv": ["IS_CAUSAL", "HAS_KPM", "HAS_WINDOW"],
            "dq": ["IS_CAUSAL", "PREFIX_MODE", "HAS_KPM", "HAS_WINDOW"],
            "prefix_dkdv": ["PREFIX_MODE", "PREFIX_WINDOWED"],
            "bwd": ["IS_CAUSAL", "PREFIX_MODE", "HAS_KPM", "HAS_WINDOW"],
        }[name]
    )
    return triton.autotune(
        configs=configs, key=key, prune_configs_by={"early_config_prune": prune}
    )(kernel)


# --------------------------------------------------------------------------------------
# Kernel arguments, by name. One place: each kernel's parameter list is read from its
# definition (csrc_triton), and the launchers supply values by parameter name.
# --------------------------------------------------------------------------------------


@functools.cache
def kernel_params(attr: str) -> tuple[str, ...]:
    """The runtime (non-constexpr) parameter names of kernel ``attr`` of csrc_triton, in
    order, read from the kernel's Python definition."""
    import triton.language as tl

    fn = getattr(_kernels_module(), attr).fn
    return tuple(
        name
        for name, p in inspect.signature(fn).parameters.items()
        if p.annotation is not tl.constexpr and p.annotation != "tl.constexpr"
    )


# Parameters whose value changes from call to call with the same signature: the tensors
# (their storage) and the dropout seed. Every kernel lists its pointers first.
DYNAMIC_PARAMS = frozenset(
    ("Q", "K", "V", "PK", "PV", "PIDX", "PLEN", "KPM", "Out", "LSE", "O", "DO", "Delta", "DQ",
     "DK", "DV", "DPK", "DPV", "GPK", "GPV", "SINKS", "seed")
)  # fmt: skip


def _strides(prefix: str, t: torch.Tensor | None, dims: str) -> dict[str, int]:
    """``{"stride_<prefix><dim>": ...}`` of a [Z, H, N, D] view (see :func:`_strides4`)."""
    return dict(zip([f"stride_{prefix}{d}" for d in dims], _strides4(t)))


@dataclass
class LaunchSpec:
    """One kernel launch, described by name: what :func:`launch_now`,
    :func:`launch_wrapped` and the call plans (``plan.py``) launch.

    ``name`` picks the config list (``CONFIG_LISTS``); kernels without one
    (``preprocess``, ``reduce``) take their tiles from ``consts``. ``grid(tiles)`` gives
    the grid for a config's tiles; ``n_q``, ``n_kp`` size the config choice.
    """

    name: str
    attr: str
    grid: Callable[[dict], tuple[int, ...]]
    n_q: int
    n_kp: int
    vals: dict
    consts: dict

    def args(self) -> tuple:
        """The runtime arguments in the kernel's parameter order."""
        return tuple(self.vals[n] for n in kernel_params(self.attr))


def launch_now(spec: LaunchSpec, q: torch.Tensor) -> tuple[KernelConfig | None, tuple]:
    """Launch ``spec`` eagerly (autotuning or trying configs as needed); returns the config
    that ran (None for kernels without a config list, or when the autotuner kept its
    choice to itself) and the grid it ran on."""
    kernel = getattr(_kernels(), spec.attr)
    args = spec.args()
    if spec.name not in CONFIG_LISTS:
        grid = spec.grid(spec.consts)
        kernel[grid](*args, **spec.consts)
        return None, grid
    cfg = _launch(spec.name, kernel, spec.grid, q, spec.n_q, spec.n_kp, args, spec.consts)
    return cfg, (spec.grid(cfg.tiles()) if cfg is not None else ())


def _run_config(kernel, grid_fn, cfg: KernelConfig, args: tuple, kwargs: dict) -> None:
    """Launch ``kernel`` with one explicit config."""
    tiles = cfg.tiles()
    kernel[grid_fn(tiles)](
        *args, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **tiles, **kwargs
    )


def _launch(
    name: str, kernel, grid_fn, q: torch.Tensor, n_q: int, n_kp: int, args: tuple, kwargs: dict
) -> KernelConfig | None:
    """Launch ``kernel`` autotuned on CUDA, or with one fixed config otherwise; returns the
    config that ran.

    ``grid_fn(meta)`` gives the grid for a config's tile sizes (``meta["BLOCK_M"]``, ...).
    """
    if _autotune_enabled(q) and name not in _forced:
        # triton.autotune picks the config once per key; after that the kernel is launched
        # directly with it, which skips the autotuner's per-call work (it costs about as
        # much host time as the launch itself).
        key = (name, q.dtype, q.device.index, _bucket(n_q), _bucket(n_kp), *kwargs.items())
        best = _best_config.get(key)
        if best is None:
            tuned = _tuned(name)
            tuned[grid_fn](*args, **kwargs)
            cfg = getattr(tuned, "best_config", None)
            if cfg is None:
                return None
            best = _best_config[key] = KernelConfig.from_triton(cfg)
            return best
        _run_config(kernel, grid_fn, best, args, kwargs)
        return best
    if name in _forced:
        candidates = [_forced[name]]
    elif kernels_interpreted():
        candidates = [INTERPRET_BWD_CONFIG if name == "bwd" else INTERPRET_CONFIG]
    else:
        cfgs = CONFIG_LISTS[name]
        key = (name, kwargs["BLOCK_D"], q.dtype, _bucket(n_q), _bucket(n_kp))
        candidates = _default_configs(cfgs, kwargs["BLOCK_D"], n_q, n_kp)
        if key in _fallback_cache:  # the config that fitted last time goes first
            candidates.insert(0, _fallback_cache[key])
    for i, cfg in enumerate(candidates):
        try:
            _run_config(kernel, grid_fn, cfg, args, kwargs)
        except OutOfResources:  # a config too large for this GPU: try the next one
            if i == len(candidates) - 1:
                raise
            continue
        if name not in _forced and not kernels_interpreted():
            _fallback_cache[key] = cfg
        return cfg
    raise AssertionError("unreachable: the last candidate either ran or raised")


def launch_wrapped(spec: LaunchSpec, q: torch.Tensor, wrap) -> None:
    """:func:`launch_now` when it is traced: ``wrap`` (``torch.library.wrap_triton``) is
    applied to the kernel, or to its ``triton.autotune`` wrapper, before the launch.

    Nothing runs here at trace time, so there is no config cache and no OutOfResources
    fallback: on CUDA the ``triton.autotune`` wrapper goes to the compiler, which tunes it
    (with the same pruning); otherwise the first fitting config (or the forced one) is used.
    """
    kernel = getattr(_kernels(), spec.attr)
    args = spec.args()
    if spec.name not in CONFIG_LISTS:
        wrap(kernel)[spec.grid(spec.consts)](*args, **spec.consts)
        return
    name = spec.name
    if _autotune_enabled(q) and name not in _forced:
        wrap(_tuned(name))[spec.grid](*args, **spec.consts)
        return
    if name in _forced:
        cfg = _forced[name]
    elif kernels_interpreted():
        cfg = INTERPRET_BWD_CONFIG if name == "bwd" else INTERPRET_CONFIG
    else:
        block_d = spec.consts["BLOCK_D"]
        cfg = _default_configs(CONFIG_LISTS[name], block_d, _hint(spec.n_q), _hint(spec.n_kp))[0]
    _run_config(wrap(kernel), spec.grid, cfg, args, spec.consts)


def _launch_all(specs: list[LaunchSpec], q: torch.Tensor, wrap) -> None:
    for spec in specs:
        if wrap is None:
            launch_now(spec, q)
        else:
            launch_wrapped(spec, q, wrap)


# (kernel, BLOCK_D, dtype, buckets) -> the first default config that fitted the GPU
_fallback_cache: dict[tuple, KernelConfig] = {}
# (kernel, dtype, device, buckets, constexprs) -> the config triton.autotune chose
_best_config: dict[tuple, KernelConfig] = {}


def _default_configs(
    cfgs: list[KernelConfig], block_d: int, n_q: int, n_kp: int
) -> list[KernelConfig]:
    """The configs worth trying, in preference order, when autotuning is off."""
    out = [c for c in cfgs if _fits(c.tiles(), block_d, n_q, n_kp)]
    safe = SAFE_BWD_CONFIG if cfgs[0].BLOCK_M2 else SAFE_CONFIG
    return out + [c for c in cfgs if c not in out] + [safe]


def _input_precision(q: torch.Tensor) -> str:
    """fp32 inputs get true fp32 products unless the user allowed TF32 for matmuls."""
    if q.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _strides4(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    """Strides of a [Z, H, N, D] view; a 3-D shared prefix gets batch stride 0."""
    if t is None:
        return (0, 0, 0, 0)
    if t.dim() == 3:
        return (0, *t.stride())
    return tuple(t.stride())


def pointer_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    prefix_index: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    mode: int,
    prefix_lengths: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The input pointers of a call by kernel parameter name. Absent optional inputs get
    ``q`` as a dummy the kernel never reads; the key mask goes in as uint8 (a view)."""
    has_p = mode != PREFIX_NONE
    return {
        "Q": q,
        "K": k,
        "V": v,
        "PK": prefix_k if has_p else q,
        "PV": prefix_v if has_p else q,
        # the kernels read prefix_index[b] at offset b: a strided index is made dense (B ints)
        "PIDX": (prefix_index if prefix_index.is_contiguous() else prefix_index.contiguous())
        if has_p and prefix_index is not None
        else q,
        "KPM": key_padding_mask.view(torch.uint8) if key_padding_mask is not None else q,
        "PLEN": prefix_lengths if has_p and prefix_lengths is not None else q,
    }


def new_seed() -> int:
    """A Philox seed drawn from torch's default CPU generator (so torch.manual_seed
    reproduces dropout). A CPU op: no device synchronization."""
    return int(torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device="cpu").item())


# CUDA's limit on grid axis 1, where every kernel puts (batch row, head) pairs
MAX_GRID_Y = 65535


def _batch_chunks(prob: AttnProblem, wrap) -> list[tuple[slice, AttnProblem]]:
    """Runs of batch rows that one launch can cover: the whole batch (``slice(None)``)
    unless B * H exceeds :data:`MAX_GRID_Y`, then chunks of MAX_GRID_Y // H rows, each
    with its problem sizes. The chunks are views: nothing is copied."""
    if _hint(prob.B) * _hint(prob.H) <= MAX_GRID_Y:
        return [(slice(None), prob)]
    if wrap is not None:
        raise ValueError(
            f"B * H = {_hint(prob.B)} * {_hint(prob.H)} query (row, head) pairs exceed "
            f"{MAX_GRID_Y} under torch.compile; call with a smaller batch"
        )
    step = max(1, MAX_GRID_Y // prob.H)
    per_row = prob.layout == PREFIX_PER_ROW
    return [
        (
            slice(b0, min(prob.B, b0 + step)),
            dataclasses.replace(
                prob,
                B=min(prob.B, b0 + step) - b0,
                T=min(prob.B, b0 + step) - b0 if per_row else prob.T,
            ),
        )
        for b0 in range(0, prob.B, step)
    ]


def _take(t: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """Rows ``rows`` of ``t`` (a view); ``t`` itself for the whole batch or None."""
    return t if t is None or rows == slice(None) else t[rows]


class _Inputs(NamedTuple):
    """The input tensors of one call, or of a run of its batch rows."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    prefix_k: torch.Tensor | None
    prefix_v: torch.Tensor | None
    prefix_index: torch.Tensor | None
    key_padding_mask: torch.Tensor | None
    prefix_lengths: torch.Tensor | None = None  # int64 [T]: entries as prefix_k
    sinks: torch.Tensor | None = None  # [H] attention sinks (whole for every run of rows)

    def rows(self, rows: slice, prob: AttnProblem) -> _Inputs:
        """Batch rows ``rows`` (views; a shared prefix or a bank stays whole)."""
        if rows == slice(None):
            return self
        per_row = prob.layout == PREFIX_PER_ROW
        return _Inputs(
            self.q[rows], self.k[rows], self.v[rows],
            _take(self.prefix_k, rows) if per_row else self.prefix_k,
            _take(self.prefix_v, rows) if per_row else self.prefix_v,
            _take(self.prefix_index, rows), _take(self.key_padding_mask, rows),
            _take(self.prefix_lengths, rows) if per_row else self.prefix_lengths,
            self.sinks,
        )  # fmt: skip


def _chunk_seed(seed: int, chunk: int) -> int:
    """Dropout seed of batch chunk ``chunk``: the kernels number rows from the chunk's
    first row, so each chunk needs its own Philox stream (chunk 0 keeps ``seed``)."""
    return (seed + chunk * 1_000_003) % (2**31 - 1) if chunk else seed


# --------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------


def forward_spec(
    x: _Inputs,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    dropout_p: float,
    seed: int,
    prob: AttnProblem,
) -> LaunchSpec:
    """The ``_attn_fwd`` launch over the rows of ``prob``."""
    Nq, Nk, D = prob.Nq, prob.Nk, prob.D
    mode = prob.prefix_mode
    has_p = mode != PREFIX_NONE
    B, H = prob.B, prob.H
    vals = {
        **pointer_args(*x[:7], mode, x.prefix_lengths),
        "Out": out,
        "LSE": lse,
        **_strides("q", x.q, "zhmd"),
        **_strides("k", x.k, "zhnd"),
        **_strides("v", x.v, "zhnd"),
        **_strides("pk", x.prefix_k if has_p else None, "zhnd"),
        **_strides("pv", x.prefix_v if has_p else None, "zhnd"),
        **_kpm_strides(x.key_padding_mask),
        **_strides("o", out, "zhmd"),
        "H": H,
        "GROUP": prob.group,
        "N_Q": Nq,
        "N_K": Nk,
        "N_P": prob.P if has_p else 0,
        "sm_scale": prob.sm_scale,
        "dropout_p": float(dropout_p),
        "seed": seed,
        "TUNE_NQ": _bucket(Nq),
        "TUNE_NK": _bucket(Nk),
        **feature_scalars(prob),
        "SINKS": x.sinks if x.sinks is not None else x.q,
    }
    consts = dict(
        D=D,
        BLOCK_D=max(16, triton_next_pow2(D)),
        IS_CAUSAL=causal,
        PREFIX_MODE=mode,
        HAS_PLEN=has_p and x.prefix_lengths is not None,
        HAS_KPM=x.key_padding_mask is not None,
        HAS_DROPOUT=dropout_p > 0.0,
        INPUT_PRECISION=_input_precision(x.q),
        HAS_WINDOW=has_window(prob),
        PREFIX_WINDOWED=prob.prefix_windowed,
        HAS_SOFTCAP=prob.softcap > 0.0,
        HAS_SINKS=prob.has_sinks,
    )
    return LaunchSpec(
        "fwd", "_attn_fwd", lambda m: (math.ceil(Nq / m["BLOCK_M"]), B * H),
        Nq, max(Nk, prob.P), vals, consts,
    )  # fmt: skip


def has_window(prob: AttnProblem) -> bool:
    """Whether the sliding window masks a sequence key: W < Nk (a window holding every key
    runs the plain causal kernels)."""
    return 0 < prob.window < prob.Nk


def feature_scalars(prob: AttnProblem) -> dict:
    """The kernels' ``window`` and ``softcap`` runtime arguments (placeholders when off)."""
    return {"window": prob.window, "softcap": prob.softcap or 1.0}


def _kpm_strides(kpm: torch.Tensor | None) -> dict[str, int]:
    s = kpm.stride() if kpm is not None else (0, 0)
    return {"stride_kpmz": s[0], "stride_kpmn": s[1]}


def forward_outputs(q: torch.Tensor, prob: AttnProblem) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh (out [B, H, Nq, D] in q's dtype, lse [B, H, Nq] fp32)."""
    B, H, Nq, D = prob.B, prob.H, prob.Nq, prob.D
    out = torch.empty((B, H, Nq, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    return out, lse


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    prefix_index: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    dropout_p: float,
    seed: int,
    prob: AttnProblem,
    wrap=None,
    prefix_lengths: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``_attn_fwd``; returns (out [B, H, Nq, D] in q's dtype, lse [B, H, Nq] fp32).
    ``prefix_lengths``: int64 [T] visible prefix keys per entry (a ragged bank).

    The general path: the custom ops of ``custom_op.py`` (``wrap`` =
    ``torch.library.wrap_triton``) and batches past the grid limit. Eager calls normally
    go through a cached call plan (``plan.py``), which launches the same spec.
    """
    out, lse = forward_outputs(q, prob)
    if prob.B * prob.H * prob.Nq == 0:
        return out, lse
    x = _Inputs(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, prefix_lengths, sinks)
    specs = [
        forward_spec(
            x.rows(rows, prob),
            _take(out, rows),
            _take(lse, rows),
            causal,
            dropout_p,
            _chunk_seed(seed, i),
            sub,
        )
        for i, (rows, sub) in enumerate(_batch_chunks(prob, wrap))
    ]
    _launch_all(specs, q, wrap)
    return out, lse


# --------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------

# The backward's launch layout below this much work (B * H * Nq * (P + Nk) score elements)
# is the fused one (1-2 launches: the host-bound regime, where a call's launches cost more
# host time than its kernels take on the GPU), above it the split one (4-5 launches, each
# kernel autotuned on its own). An estimate until measured on a GPU: the committed H100
# profile has GPT-2 small's shape (B8 H12 N1024 P64: 1.1e8) host-bound (0.28 ms of GPU
# work against ~1.2 ms of host time per fwd+bwd) and N = 4096 (B4: 8.2e8) GPU-bound.
FUSED_BWD_MAX_WORK = 1 << 28


def _prefix_block_n(P: int) -> int:
    """Prefix keys per prefix program of the fused backward."""
    return min(PREFIX_BLOCK_N, max(16, triton_next_pow2(_hint(P))))


@functools.cache
def _sm_count(device_index: int | None) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _prefix_splits(prob: AttnProblem, q: torch.Tensor, interpreted: bool, fused: bool) -> int:
    """How many query runs the prefix-gradient programs split each row into, so that small
    batches still fill the GPU. Each split adds one fp32 partial per row.

    Split backward: the prefix kernel runs alone, so it should fill the GPU by itself.
    Fused: the prefix programs run beside the dK/dV and dQ programs; one unsplit prefix
    program walks as many queries as the longest dK/dV program, so rows are split only
    when all programs together would not fill the GPU twice.
    """
    if "prefix_splits" in _forced:
        return max(1, min(int(_forced["prefix_splits"]), prob.Nq))
    if interpreted:
        return 1
    n_sm = _sm_count(q.device.index)
    # any split count is correct (a split past the last query block adds zeros): traced
    # sizes are read through their example values
    rows = _hint(prob.B) * _hint(prob.Hkv)
    programs = math.ceil(_hint(prob.P) / 64) * rows
    others = 0
    if fused:
        others = (math.ceil(_hint(prob.Nk) / 64) + math.ceil(_hint(prob.Nq) / 64)) * rows
    want = math.ceil(max(2 * n_sm - others, 0) / max(programs, 1))
    return max(1, min(want, math.ceil(_hint(prob.Nq) / 64), 16))


@dataclass(frozen=True)
class BackwardLayout:
    """How one backward runs: which kernels, and the fp32 workspace they share.

    ``fused``: one ``_attn_bwd`` launch (else the split kernels); ``has_delta``: a
    ``_attn_bwd_preprocess`` pre-pass writes Delta (the fused kernel computes it itself
    from the contiguous output); ``splits``: query runs per prefix-gradient program;
    ``reduce``: a ``_prefix_grad_reduce`` launch sums fp32 partials (else the prefix
    programs write the gradient directly: one partial per entry). The workspace is
    ``[n_delta | partials of prefix_k | partials of prefix_v]``, each part starting at a
    multiple of 16 elements (so every pointer the kernels get is 64-byte aligned).
    """

    fused: bool
    has_delta: bool
    splits: int
    reduce: bool
    n_delta: int
    n_part: int
    ws_numel: int  # n_delta + 2 * n_part


def _round16(n: int) -> int:
    return (n + 15) // 16 * 16


def backward_layout(
    prob: AttnProblem, q: torch.Tensor, need_p: bool, out_contiguous: bool, wrap
) -> BackwardLayout:
    """Choose the backward's launch layout (see :class:`BackwardLayout` and
    :data:`FUSED_BWD_MAX_WORK`)."""
    B, H, Nq, Nk, P = prob.B, prob.H, prob.Nq, prob.Nk, prob.P
    mode = backward_mode()
    if mode == "auto":
        work = _hint(B) * _hint(H) * _hint(Nq) * (_hint(P) + _hint(Nk))
        mode = "fused" if work <= FUSED_BWD_MAX_WORK else "split"
    # the fused kernel puts every program of a (row, kv head) on grid axis 1: with very
    # long sequences even the smallest tiles could exceed its limit, then split it is
    fused = mode == "fused" and (
        math.ceil(_hint(P) / 16) * 16 + 2 * math.ceil(max(_hint(Nq), _hint(Nk)) / 16) <= MAX_GRID_Y
    )
    has_delta = not (fused and out_contiguous)
    splits, reduce, n_part = 1, False, 0
    if need_p and prob.prefix_mode != PREFIX_NONE:
        # each prefix entry read by exactly one row: per-row, or shared with one row
        one_per_entry = prob.layout == PREFIX_PER_ROW or (
            prob.layout == PREFIX_SHARED and _hint(B) == 1
        )
        splits = _prefix_splits(prob, q, kernels_interpreted(), fused)
        if fused and one_per_entry and "prefix_splits" not in _forced:
            splits = 1  # one launch fewer beats more parallel prefix programs here
        reduce = not (one_per_entry and splits == 1)
        if reduce:
            n_part = _round16(_hint(B) * splits * prob.Hkv * _hint(P) * prob.D)
            if n_part >= 2**31:
                raise ValueError(
                    f"prefix gradient partials of {n_part} elements exceed 2^31; "
                    "use a smaller batch per call"
                )
    n_delta = _round16(_hint(B) * _hint(H) * _hint(Nq)) if has_delta else 0
    return BackwardLayout(fused, has_delta, splits, reduce, n_delta, n_part, n_delta + 2 * n_part)


def backward_buffers(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    prob: AttnProblem,
    needs: tuple[bool, bool, bool, bool],
    ws_numel: int,
) -> tuple[torch.Tensor | None, ...]:
    """Fresh (dq, dk, dv, dprefix_k, dprefix_v, workspace): every element of every gradient
    is written by a kernel, except in the degenerate cases (nothing to compute, P == 0,
    Nk == 0), which get zeros."""
    need_q, need_k, need_v, need_p = needs
    trivial = prob.B * prob.H * prob.Nq == 0
    dev = q.device
    alloc = torch.zeros if trivial else torch.empty
    dq = alloc(q.shape, device=dev, dtype=q.dtype) if need_q else None
    dk = dv = None
    if need_k or need_v:
        kv_alloc = torch.zeros if trivial or prob.Nk == 0 else torch.empty
        dk = kv_alloc(k.shape, device=dev, dtype=k.dtype)
        dv = kv_alloc(v.shape, device=dev, dtype=v.dtype)
    dpk = dpv = None
    if need_p and prefix_k is not None:
        palloc = torch.zeros if trivial or prob.prefix_mode == PREFIX_NONE else torch.empty
        dpk = palloc(prefix_k.shape, device=dev, dtype=prefix_k.dtype)
        dpv = palloc(prefix_v.shape, device=dev, dtype=prefix_v.dtype)
    ws = torch.empty(ws_numel, device=dev, dtype=torch.float32) if ws_numel else None
    return dq, dk, dv, dpk, dpv, ws


def backward_specs(
    x: _Inputs,
    do: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grads: tuple[torch.Tensor | None, ...],
    ws: torch.Tensor | None,
    causal: bool,
    dropout_p: float,
    seed: int,
    prob: AttnProblem,
    needs: tuple[bool, bool, bool, bool],
    lay: BackwardLayout,
    chunk: int | None = None,
) -> list[LaunchSpec]:
    """The backward's launches over the rows of ``prob`` in order: Delta, then dK/dV, dQ
    and the prefix partials (split: three kernels; fused: one). ``chunk``: the first row
    when ``prob`` is a chunk of a larger batch; the prefix-gradient reduce runs once for
    the whole batch (:func:`reduce_spec`)."""
    q = x.q
    dq, dk = grads[0], grads[1]
    B, H, Hkv, Nq, Nk, P, D = prob.B, prob.H, prob.Hkv, prob.Nq, prob.Nk, prob.P, prob.D
    mode = prob.prefix_mode
    need_q = needs[0]
    need_kv = (needs[1] or needs[2]) and Nk > 0
    need_p = needs[3] and mode != PREFIX_NONE
    scalars = {
        "H": H, "HKV": Hkv, "GROUP": prob.group, "N_Q": Nq, "N_K": Nk,
        "N_P": P if mode != PREFIX_NONE else 0, "sm_scale": prob.sm_scale,
        "dropout_p": float(dropout_p), "seed": seed, "TUNE_NQ": _bucket(Nq),
        "TUNE_NK": _bucket(Nk), **feature_scalars(prob),
    }  # fmt: skip
    vals = {
        **backward_pointers(x, do, out, lse, grads, ws, prob, needs, lay, chunk),
        **_strides("q", q, "zhmd"), **_strides("k", x.k, "zhnd"), **_strides("v", x.v, "zhnd"),
        **_strides("pk", x.prefix_k if mode != PREFIX_NONE else None, "zhnd"),
        **_strides("pv", x.prefix_v if mode != PREFIX_NONE else None, "zhnd"),
        **_kpm_strides(x.key_padding_mask),
        **_strides("do", do, "zhmd"), **_strides("o", out, "zhmd"),
        **_strides("dq", dq if need_q else None, "zhmd"),
        **_strides("dk", dk if need_kv else None, "zhnd"),
        **scalars,
    }  # fmt: skip
    block_d = max(16, triton_next_pow2(D))
    flags = dict(
        D=D, BLOCK_D=block_d, HAS_DROPOUT=dropout_p > 0.0, INPUT_PRECISION=_input_precision(q),
        HAS_SOFTCAP=prob.softcap > 0.0,
    )  # fmt: skip
    win = dict(HAS_WINDOW=has_window(prob))
    pwin = dict(PREFIX_WINDOWED=prob.prefix_windowed)
    has_kpm = x.key_padding_mask is not None
    has_plen = mode != PREFIX_NONE and x.prefix_lengths is not None
    specs = []
    if lay.has_delta:
        pre_bm = 64 if not kernels_interpreted() else 32
        specs.append(
            LaunchSpec(
                "preprocess",
                "_attn_bwd_preprocess",
                lambda m: (math.ceil(Nq / m["BLOCK_M"]), B * H),
                Nq,
                Nq,
                vals,
                dict(D=D, BLOCK_D=block_d, BLOCK_M=pre_bm),
            )
        )
    if lay.fused:
        n_prefix = math.ceil(P / _prefix_block_n(P)) * lay.splits if need_p else 0
        vals.update(NEED_KV=int(need_kv), NEED_DQ=int(need_q), N_PREFIX_PROGS=n_prefix,
                    N_SPLIT=lay.splits)  # fmt: skip
        specs.append(
            LaunchSpec(
                "bwd",
                "_attn_bwd",
                lambda m: (
                    B * Hkv,
                    n_prefix
                    + (math.ceil(Nk / m["BLOCK_N"]) if need_kv else 0)
                    + (math.ceil(Nq / m["BLOCK_M2"]) if need_q else 0),
                ),
                Nq,
                max(Nk, P),
                vals,
                dict(
                    BLOCK_NP=_prefix_block_n(P),
                    IS_CAUSAL=causal,
                    PREFIX_MODE=mode,
                    HAS_PLEN=has_plen,
                    HAS_KPM=has_kpm,
                    HAS_DELTA=lay.has_delta,
                    **flags,
                    **win,
                    **pwin,
                ),
            )
        )
        return specs
    if need_q:
        specs.append(
            LaunchSpec(
                "dq",
                "_attn_bwd_dq",
                lambda m: (math.ceil(Nq / m["BLOCK_M"]), B * H),
                Nq,
                max(Nk, P),
                vals,
                dict(
                    IS_CAUSAL=causal,
                    PREFIX_MODE=mode,
                    HAS_PLEN=has_plen,
                    HAS_KPM=has_kpm,
                    **flags,
                    **win,
                    **pwin,
                ),
            )
        )
    if need_kv:
        specs.append(
            LaunchSpec(
                "dkdv",
                "_attn_bwd_dkdv",
                lambda m: (math.ceil(Nk / m["BLOCK_N"]), B * Hkv),
                Nq,
                Nk,
                vals,
                dict(IS_CAUSAL=causal, HAS_KPM=has_kpm, **flags, **win),
            )
        )
    if need_p:
        splits = lay.splits
        specs.append(
            LaunchSpec(
                "prefix_dkdv",
                "_attn_bwd_prefix_dkdv",
                lambda m: (math.ceil(P / m["BLOCK_N"]), B * Hkv, splits),
                Nq,
                P,
                vals,
                dict(PREFIX_MODE=mode, HAS_PLEN=has_plen, **flags, **pwin),
            )
        )
    return specs


def backward_pointers(
    x: _Inputs | tuple,
    do: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grads: tuple[torch.Tensor | None, ...],
    ws: torch.Tensor | None,
    prob: AttnProblem,
    needs: tuple[bool, bool, bool, bool],
    lay: BackwardLayout,
    chunk: int | None = None,
) -> dict[str, torch.Tensor]:
    """Every tensor argument of the backward's kernels by parameter name: the inputs, the
    gradients (GPK/GPV: the prefix gradients) and the workspace's parts as views (Delta;
    DPK/DPV: the fp32 prefix partials, or the prefix gradients themselves when each entry
    has one partial). Absent ones get ``q`` (never read). ``chunk``: the first row of a
    batch chunk (the views then start at its rows). ``x``: the inputs in
    :class:`_Inputs` order (7, or 8 with prefix_lengths)."""
    q = x[0]
    dq, dk, dv, dpk, dpv = grads
    mode = prob.prefix_mode
    need_kv = (needs[1] or needs[2]) and prob.Nk > 0
    need_p = needs[3] and mode != PREFIX_NONE
    row0 = chunk or 0
    ptrs = pointer_args(*x[:7], mode, x[7] if len(x) > 7 else None)
    n_delta = lay.n_delta
    ptrs["Delta"] = ws[row0 * prob.H * prob.Nq : n_delta] if lay.has_delta else lse
    if need_p and lay.reduce:
        per_row = lay.splits * prob.Hkv * prob.P * prob.D
        lo_k, lo_v = n_delta + row0 * per_row, n_delta + lay.n_part + row0 * per_row
        ptrs["DPK"], ptrs["DPV"] = (
            ws[lo_k : lo_k + prob.B * per_row],
            ws[lo_v : lo_v + prob.B * per_row],
        )
    else:  # one partial per entry: the prefix programs write the gradient itself
        ptrs["DPK"], ptrs["DPV"] = (dpk, dpv) if need_p else (q, q)
    ptrs["DO"], ptrs["LSE"], ptrs["O"] = do, lse, out
    ptrs["DQ"] = dq if needs[0] else q
    ptrs["DK"], ptrs["DV"] = (dk, dv) if need_kv else (q, q)
    ptrs["GPK"], ptrs["GPV"] = (dpk, dpv) if need_p else (q, q)
    return ptrs


def reduce_spec(
    ptrs: dict[str, torch.Tensor], prob: AttnProblem, lay: BackwardLayout
) -> LaunchSpec:
    """``_prefix_grad_reduce`` over the whole batch's partials (one launch); ``ptrs`` from
    :func:`backward_pointers` for the whole batch."""
    numel = prob.Hkv * prob.P * prob.D
    vals = {
        **ptrs,
        "N_ROWS": prob.B,
        "N_SPLIT": lay.splits,
        "NUMEL": numel,
    }
    T = prob.T
    return LaunchSpec(
        "reduce", "_prefix_grad_reduce", lambda m: (T, math.ceil(numel / m["BLOCK"])),
        prob.Nq, prob.P, vals, dict(PREFIX_MODE=prob.prefix_mode, BLOCK=REDUCE_BLOCK),
    )  # fmt: skip


def attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    prefix_index: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    dropout_p: float,
    seed: int,
    prob: AttnProblem,
    needs: tuple[bool, bool, bool, bool],
    wrap=None,
    prefix_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients (dq, dk, dv, dprefix_k, dprefix_v); ``needs`` = (q, k, v, prefix) flags.

    The general path (custom ops, batches past the grid limit); eager calls normally go
    through a cached call plan (``plan.py``), which launches the same specs.

    Prefix gradients come back in the prefix's own layout: [Hkv, P, D] shared (summed over
    rows), [B, Hkv, P, D] per row, [T, Hkv, P, D] bank (each row added at its index).
    """
    need_p = needs[3] and prefix_k is not None
    needs = (*needs[:3], need_p)
    lay = backward_layout(prob, q, need_p, out.is_contiguous(), wrap)
    dq, dk, dv, dpk, dpv, ws = backward_buffers(
        q, k, v, prefix_k, prefix_v, prob, needs, lay.ws_numel
    )
    if prob.B * prob.H * prob.Nq == 0:
        return dq, dk, dv, dpk, dpv
    x = _Inputs(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, prefix_lengths)
    specs = []
    for i, (rows, sub) in enumerate(_batch_chunks(prob, wrap)):
        chunk = None if rows == slice(None) else rows.start
        specs += backward_specs(
            x.rows(rows, prob), _take(do, rows), _take(out, rows), _take(lse, rows),
            (_take(dq, rows), _take(dk, rows), _take(dv, rows),
             _take(dpk, rows) if prob.layout == PREFIX_PER_ROW else dpk,
             _take(dpv, rows) if prob.layout == PREFIX_PER_ROW else dpv),
            ws, causal, dropout_p, _chunk_seed(seed, i), sub, needs, lay, chunk,
        )  # fmt: skip
    if need_p and lay.reduce and prob.prefix_mode != PREFIX_NONE:
        grads = (dq, dk, dv, dpk, dpv)
        ptrs = backward_pointers(x, do, out, lse, grads, ws, prob, needs, lay)
        specs.append(reduce_spec(ptrs, prob, lay))
    _launch_all(specs, q, wrap)
    return dq, dk, dv, dpk, dpv
