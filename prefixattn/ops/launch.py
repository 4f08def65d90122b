"""Launchers of the Triton kernels: device checks, block choice, allocation, grids.

Inputs arrive validated (``validation.validate``). Nothing here copies K, V or the prefix:
every tensor goes to the kernels with its own strides. On CUDA the block sizes, warps and
stages come from ``triton.autotune`` over a short per-kernel list, keyed on the head dim,
the flags and power-of-two buckets of Nq and Nk (so a growing KV cache does not re-tune
every step); ``PREFIXATTN_AUTOTUNE=0`` uses the first config of each list instead. Under
``TRITON_INTERPRET=1`` one small fixed config runs.

``wrap`` (``attention_forward`` / ``attention_backward``): the custom ops of
``custom_op.py`` pass ``torch.library.wrap_triton`` so that ``torch.compile`` sees every
launch; the sizes may then be ``torch.SymInt`` (dynamic shapes), which the heuristics here
read through their example value (:func:`_hint`) instead of guarding on them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from triton.runtime.errors import OutOfResources

from .validation import (
    PREFIX_NONE,
    PREFIX_PER_ROW,
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
BACKWARD_MODES = ("split", "fused")
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
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(saved)


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
    """``PREFIXATTN_BWD``: ``split`` (default: dK/dV, dQ and the prefix partials in three
    launches, each autotuned on its own) or ``fused`` (the three in one launch of
    ``_attn_bwd``: fewer host launches; not yet the default, as it has not been measured
    on a GPU against the split kernels)."""
    mode = os.environ.get("PREFIXATTN_BWD", "split").strip().lower()
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

    common = ["TUNE_NQ", "TUNE_NK", "D", "HAS_DROPOUT"]
    key = (
        common
        + {
            "fwd": ["IS_CAUSAL", "PREFIX_MODE", "HAS_KPM"],
            "dkdv": ["IS_CAUSAL", "HAS_KPM"],
            "dq": ["IS_CAUSAL", "PREFIX_MODE", "HAS_KPM"],
            "prefix_dkdv": ["PREFIX_MODE"],
            "bwd": ["IS_CAUSAL", "PREFIX_MODE", "HAS_KPM"],
        }[name]
    )
    return triton.autotune(
        configs=configs, key=key, prune_configs_by={"early_config_prune": prune}
    )(kernel)


def _run_config(kernel, grid_fn, cfg: KernelConfig, args: tuple, kwargs: dict) -> None:
    """Launch ``kernel`` with one explicit config."""
    tiles = cfg.tiles()
    kernel[grid_fn(tiles)](
        *args, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **tiles, **kwargs
    )


def _launch(
    name: str, kernel, grid_fn, q: torch.Tensor, n_q: int, n_kp: int, *args, **kwargs
) -> None:
    """Launch ``kernel`` autotuned on CUDA, or with one fixed config otherwise.

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
            if cfg is not None:
                _best_config[key] = KernelConfig.from_triton(cfg)
            return
        _run_config(kernel, grid_fn, best, args, kwargs)
        return
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
        return


def _launcher(wrap):  # -> _launch or a partial of _launch_wrapped
    """:func:`_launch`, or with ``wrap`` (e.g. ``torch.library.wrap_triton``) the same
    launch with the kernel wrapped (:func:`_launch_wrapped`). The eager path keeps calling
    ``_launch`` itself: no extra work per call."""
    return _launch if wrap is None else functools.partial(_launch_wrapped, wrap=wrap)


def _launch_wrapped(
    name: str, kernel, grid_fn, q: torch.Tensor, n_q, n_kp, *args, wrap, **kwargs
) -> None:
    """:func:`_launch` when it is traced: ``wrap`` is applied to the kernel, or to its
    ``triton.autotune`` wrapper, before the launch.

    Nothing runs here at trace time, so there is no config cache and no OutOfResources
    fallback: on CUDA the ``triton.autotune`` wrapper goes to the compiler, which tunes it
    (with the same pruning); otherwise the first fitting config (or the forced one) is used.
    """
    if _autotune_enabled(q) and name not in _forced:
        wrap(_tuned(name))[grid_fn](*args, **kwargs)
        return
    if name in _forced:
        cfg = _forced[name]
    elif kernels_interpreted():
        cfg = INTERPRET_BWD_CONFIG if name == "bwd" else INTERPRET_CONFIG
    else:
        cfgs = CONFIG_LISTS[name]
        cfg = _default_configs(cfgs, kwargs["BLOCK_D"], _hint(n_q), _hint(n_kp))[0]
    _run_config(wrap(kernel), grid_fn, cfg, args, kwargs)


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


def _prefix_args(
    q: torch.Tensor,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    prefix_index: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    prefix_lengths: torch.Tensor | None = None,
):
    """Pointers for optional inputs: absent ones get a dummy tensor the kernel never reads.

    Returns ``(pk, pv, pidx, plen, kpm, kpm_strides)``; ``plen`` is the ``PLEN`` pointer
    (``HAS_PLEN`` = ``prefix_lengths is not None`` for a kernel that reads the prefix).
    """
    pk = prefix_k if prefix_k is not None else q
    pv = prefix_v if prefix_v is not None else q
    pidx = prefix_index if prefix_index is not None else q
    plen = prefix_lengths if prefix_lengths is not None else q
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(torch.uint8)
        kpm_strides = kpm.stride()
    else:
        kpm, kpm_strides = q, (0, 0)
    return pk, pv, pidx, plen, kpm, kpm_strides


def new_seed() -> int:
    """A Philox seed drawn from torch's default CPU generator (so torch.manual_seed
    reproduces dropout)."""
    return int(torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64).item())


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``_attn_fwd``; returns (out [B, H, Nq, D] in q's dtype, lse [B, H, Nq] fp32).

    ``wrap``: applied to every kernel before its launch (``torch.library.wrap_triton`` in
    the custom ops); ``None`` launches directly. ``prefix_lengths``: int64 [T] visible
    prefix keys per entry (bank / per-row layouts), or None for all P.
    """
    B, H, Nq, D = prob.B, prob.H, prob.Nq, prob.D
    out = torch.empty((B, H, Nq, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    if B * H * Nq == 0:
        return out, lse
    x = _Inputs(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, prefix_lengths)
    for i, (rows, sub) in enumerate(_batch_chunks(prob, wrap)):
        _forward_launch(
            x.rows(rows, prob), _take(out, rows), _take(lse, rows),
            causal, dropout_p, _chunk_seed(seed, i), sub, wrap,
        )  # fmt: skip
    return out, lse


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
        )  # fmt: skip


def _chunk_seed(seed: int, chunk: int) -> int:
    """Dropout seed of batch chunk ``chunk``: the kernels number rows from the chunk's
    first row, so each chunk needs its own Philox stream (chunk 0 keeps ``seed``)."""
    return (seed + chunk * 1_000_003) % (2**31 - 1) if chunk else seed


def _forward_launch(
    x: _Inputs,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    dropout_p: float,
    seed: int,
    prob: AttnProblem,
    wrap,
) -> None:
    """One ``_attn_fwd`` launch over the rows of ``prob``."""
    q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, prefix_lengths = x
    B, H, Nq, Nk, P, D = prob.B, prob.H, prob.Nq, prob.Nk, prob.P, prob.D
    mode = prob.prefix_mode
    if mode == PREFIX_NONE:
        prefix_k = prefix_v = prefix_index = prefix_lengths = None
    pk, pv, pidx, plen, kpm, kpm_strides = _prefix_args(
        q, prefix_k, prefix_v, prefix_index, key_padding_mask, prefix_lengths
    )
    block_d = max(16, triton_next_pow2(D))
    _launcher(wrap)(
        "fwd",
        _kernels()._attn_fwd,
        lambda m: (math.ceil(Nq / m["BLOCK_M"]), B * H),
        q,
        Nq,
        max(Nk, P),
        q, k, v, pk, pv, pidx, plen, kpm, out, lse,
        *q.stride(), *k.stride(), *v.stride(),
        *_strides4(prefix_k if mode != PREFIX_NONE else None),
        *_strides4(prefix_v if mode != PREFIX_NONE else None),
        *kpm_strides, *out.stride(),
        H, prob.group, Nq, Nk, P if mode != PREFIX_NONE else 0,
        prob.sm_scale, float(dropout_p), seed, _bucket(Nq), _bucket(Nk),
        D=D,
        BLOCK_D=block_d,
        IS_CAUSAL=causal,
        PREFIX_MODE=mode,
        HAS_PLEN=prefix_lengths is not None,
        HAS_KPM=key_padding_mask is not None,
        HAS_DROPOUT=dropout_p > 0.0,
        INPUT_PRECISION=_input_precision(q),
    )  # fmt: skip


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

    ``wrap``: as in :func:`attention_forward`.

    Prefix gradients come back in the prefix's own layout: [Hkv, P, D] shared (summed over
    rows), [B, Hkv, P, D] per row, [T, Hkv, P, D] bank (each row added at its index).
    """
    B, H, Hkv, Nq, Nk, P, D = prob.B, prob.H, prob.Hkv, prob.Nq, prob.Nk, prob.P, prob.D
    mode = prob.prefix_mode
    need_q, need_k, need_v, need_p = needs
    need_p = need_p and prefix_k is not None

    # every element of every gradient is written by a kernel, except in the degenerate
    # cases (nothing to compute, P == 0, Nk == 0), which get zeros
    trivial = B * H * Nq == 0
    alloc = torch.zeros if trivial else torch.empty
    dq = alloc(q.shape, device=q.device, dtype=q.dtype) if need_q else None
    dk = dv = None
    if need_k or need_v:
        kv_alloc = torch.zeros if trivial or Nk == 0 else torch.empty
        dk = kv_alloc(k.shape, device=q.device, dtype=k.dtype)
        dv = kv_alloc(v.shape, device=q.device, dtype=v.dtype)
    dpk = dpv = None
    if need_p:
        palloc = torch.zeros if trivial or mode == PREFIX_NONE else torch.empty
        dpk = palloc(prefix_k.shape, device=q.device, dtype=prefix_k.dtype)
        dpv = palloc(prefix_v.shape, device=q.device, dtype=prefix_v.dtype)
    if mode == PREFIX_NONE:
        prefix_k = prefix_v = prefix_index = prefix_lengths = None
        need_p = False
    if trivial:
        return dq, dk, dv, dpk, dpv
    need_kv = (need_k or need_v) and Nk > 0
    # the fused kernel puts every program of a (row, kv head) on grid axis 1: with very
    # long sequences even the smallest tiles could exceed its limit, then split it is
    fused = backward_mode() == "fused" and (
        math.ceil(_hint(P) / 16) * 16 + 2 * math.ceil(max(_hint(Nq), _hint(Nk)) / 16) <= MAX_GRID_Y
    )
    part_k = part_v = None
    splits = 1
    if need_p:
        splits = _prefix_splits(prob, q, kernels_interpreted(), fused)
        # one buffer for both partials: [2, B * splits, Hkv, P, D] fp32
        parts = torch.empty((2, B * splits, Hkv, P, D), device=q.device, dtype=torch.float32)
        if parts[0].numel() >= 2**31:
            raise ValueError(
                f"prefix gradient partials of {parts[0].numel()} elements exceed 2^31; "
                "use a smaller batch per call"
            )
        part_k, part_v = parts[0], parts[1]

    delta = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    x = _Inputs(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, prefix_lengths)
    for i, (rows, sub) in enumerate(_batch_chunks(prob, wrap)):
        # the partials of row b are rows [b * splits, (b + 1) * splits) of part_k / part_v
        prow = rows if rows == slice(None) else slice(rows.start * splits, rows.stop * splits)
        _backward_launches(
            x.rows(rows, prob), _take(do, rows),
            _take(out, rows), _take(lse, rows), _take(delta, rows),
            _take(dq, rows), _take(dk, rows), _take(dv, rows),
            _take(part_k, prow), _take(part_v, prow),
            causal, dropout_p, _chunk_seed(seed, i), sub,
            need_q, need_kv, need_p, splits, fused, wrap,
        )  # fmt: skip
    if need_p:
        ks = _kernels()
        pidx = prefix_index if prefix_index is not None else q
        numel = Hkv * P * D
        reduce = ks._prefix_grad_reduce if wrap is None else wrap(ks._prefix_grad_reduce)
        reduce[(prob.T, math.ceil(numel / REDUCE_BLOCK))](
            part_k, part_v, pidx, dpk, dpv, B, splits, numel,
            PREFIX_MODE=mode, BLOCK=REDUCE_BLOCK,
        )  # fmt: skip
    return dq, dk, dv, dpk, dpv


def _backward_launches(
    x: _Inputs,
    do: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    dq: torch.Tensor | None,
    dk: torch.Tensor | None,
    dv: torch.Tensor | None,
    part_k: torch.Tensor | None,
    part_v: torch.Tensor | None,
    causal: bool,
    dropout_p: float,
    seed: int,
    prob: AttnProblem,
    need_q: bool,
    need_kv: bool,
    need_p: bool,
    splits: int,
    fused: bool,
    wrap,
) -> None:
    """The backward's launches over the rows of ``prob``, up to the prefix partials:
    Delta, then dK/dV, dQ and the partials (split: three kernels; fused: one)."""
    q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, prefix_lengths = x
    ks = _kernels()
    B, H, Hkv, Nq, Nk, P, D = prob.B, prob.H, prob.Hkv, prob.Nq, prob.Nk, prob.P, prob.D
    mode = prob.prefix_mode
    block_d = max(16, triton_next_pow2(D))
    flags = dict(
        D=D,
        BLOCK_D=block_d,
        HAS_DROPOUT=dropout_p > 0.0,
        INPUT_PRECISION=_input_precision(q),
    )
    has_kpm = key_padding_mask is not None
    has_plen = prefix_lengths is not None
    pk, pv, pidx, plen, kpm, kpm_strides = _prefix_args(
        q, prefix_k, prefix_v, prefix_index, key_padding_mask, prefix_lengths
    )
    pk_strides = _strides4(prefix_k)
    pv_strides = _strides4(prefix_v)
    n_p = P if mode != PREFIX_NONE else 0
    scalars = (prob.sm_scale, float(dropout_p), seed, _bucket(Nq), _bucket(Nk))
    launch = _launcher(wrap)
    pre_bm = 64 if not kernels_interpreted() else 32
    preprocess = ks._attn_bwd_preprocess if wrap is None else wrap(ks._attn_bwd_preprocess)
    preprocess[(math.ceil(Nq / pre_bm), B * H)](
        out, do, delta, *out.stride(), *do.stride(), H, Nq,
        D=D, BLOCK_D=block_d, BLOCK_M=pre_bm,
    )  # fmt: skip

    if fused:
        n_prefix = math.ceil(P / _prefix_block_n(P)) * splits if need_p else 0
        dkv_strides = dk.stride() if need_kv else (0, 0, 0, 0)
        launch(
            "bwd", ks._attn_bwd,
            lambda m: (
                B * Hkv,
                n_prefix
                + (math.ceil(Nk / m["BLOCK_N"]) if need_kv else 0)
                + (math.ceil(Nq / m["BLOCK_M2"]) if need_q else 0),
            ),
            q, Nq, max(Nk, P),
            q, k, v, pk, pv, pidx, plen, kpm, do, lse, delta,
            dq if need_q else q, dk if need_kv else q, dv if need_kv else q,
            part_k if need_p else q, part_v if need_p else q,
            *q.stride(), *k.stride(), *v.stride(), *pk_strides, *pv_strides, *kpm_strides,
            *do.stride(), *(dq.stride() if need_q else (0, 0, 0, 0)), *dkv_strides,
            H, Hkv, prob.group, Nq, Nk, n_p, *scalars,
            int(need_kv), int(need_q), n_prefix, splits,
            BLOCK_NP=_prefix_block_n(P), IS_CAUSAL=causal, PREFIX_MODE=mode,
            HAS_PLEN=has_plen, HAS_KPM=has_kpm,
            **flags,
        )  # fmt: skip
    else:
        if need_q:
            launch(
                "dq", ks._attn_bwd_dq, lambda m: (math.ceil(Nq / m["BLOCK_M"]), B * H),
                q, Nq, max(Nk, P),
                q, k, v, pk, pv, pidx, plen, kpm, do, lse, delta, dq,
                *q.stride(), *k.stride(), *v.stride(), *pk_strides, *pv_strides,
                *kpm_strides, *do.stride(), *dq.stride(),
                H, prob.group, Nq, Nk, n_p, *scalars,
                IS_CAUSAL=causal, PREFIX_MODE=mode, HAS_PLEN=has_plen, HAS_KPM=has_kpm,
                **flags,
            )  # fmt: skip
        if need_kv:
            launch(
                "dkdv", ks._attn_bwd_dkdv, lambda m: (math.ceil(Nk / m["BLOCK_N"]), B * Hkv),
                q, Nq, Nk,
                q, k, v, do, lse, delta, kpm, dk, dv,
                *q.stride(), *k.stride(), *v.stride(), *do.stride(), *kpm_strides,
                *dk.stride(),
                H, Hkv, prob.group, Nq, Nk, n_p, *scalars,
                IS_CAUSAL=causal, HAS_KPM=has_kpm, **flags,
            )  # fmt: skip
        if need_p:
            launch(
                "prefix_dkdv", ks._attn_bwd_prefix_dkdv,
                lambda m: (math.ceil(P / m["BLOCK_N"]), B * Hkv, splits), q, Nq, P,
                q, pk, pv, pidx, plen, do, lse, delta, part_k, part_v,
                *q.stride(), *pk_strides, *pv_strides, *do.stride(),
                H, Hkv, prob.group, Nq, Nk, P, *scalars,
                PREFIX_MODE=mode, HAS_PLEN=has_plen, **flags,
            )  # fmt: skip
