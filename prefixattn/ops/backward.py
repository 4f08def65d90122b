"""The backward's launches: its layout (:class:`BackwardLayout`: which kernels, the fp32
workspace), its buffers, pointers and specs, and :func:`attention_backward` (the general
path: custom ops, batches past the grid limit; call plans launch the same specs).

Two layouts (``Settings.backward``, ``PREFIXATTN_BWD``): ``fused`` (one ``_attn_bwd``
launch computing dK/dV, dQ and the prefix partials, Delta in the kernel) and ``split``
(a Delta pre-pass, then dK/dV, dQ and the prefix partials in three launches, each
autotuned on its own); ``auto`` takes the fused one up to ``FUSED_BWD_MAX_WORK``. Then
``_prefix_grad_reduce`` sums the fp32 partials when an entry has several.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .args import batch_chunks, chunk_seed, input_args, input_flags, pick, pointer_args, strides
from .call import AttentionCall, take
from .kernels import BWD_KINDS, LaunchSpec, hint, launch_all, next_pow2, source
from .settings import FUSED_BWD_MAX_WORK, PREFIX_BLOCK_N, REDUCE_BLOCK
from .validation import PREFIX_NONE, PREFIX_PER_ROW, PREFIX_SHARED, AttnProblem

Needs = tuple[bool, bool, bool, bool]  # gradients wanted: (q, k, v, prefix)
# (dO, out, lse, (dq, dk, dv, dprefix_k, dprefix_v), workspace): the backward's tensors
# besides the call's inputs; a gradient not wanted is None
Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple, torch.Tensor | None]


def outputs_rows(t: Outputs, rows: slice, per_row: bool) -> Outputs:
    """Batch rows ``rows`` of the backward's tensors (views); a shared or bank prefix
    gradient, and the workspace, stay whole."""
    if rows == slice(None):
        return t
    do, out, lse, (dq, dk, dv, dpk, dpv), ws = t
    grads = (take(dq, rows), take(dk, rows), take(dv, rows),
             take(dpk, rows) if per_row else dpk, take(dpv, rows) if per_row else dpv)  # fmt: skip
    return take(do, rows), take(out, rows), take(lse, rows), grads, ws


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


def prefix_block_n(P: int) -> int:
    """Prefix keys per prefix program of the fused backward."""
    return min(PREFIX_BLOCK_N, max(16, next_pow2(hint(P))))


def prefix_splits(call: AttentionCall, prob: AttnProblem, fused: bool) -> int:
    """How many query runs the prefix-gradient programs split each row into, so that small
    batches still fill the GPU. Each split adds one fp32 partial per row.

    Split backward: the prefix kernel runs alone, so it should fill the GPU by itself.
    Fused: the prefix programs run beside the dK/dV and dQ programs; one unsplit prefix
    program walks as many queries as the longest dK/dV program, so rows are split only
    when all programs together would not fill the GPU twice.
    """
    settings = call.settings
    if settings.prefix_splits is not None:
        return max(1, min(int(settings.prefix_splits), prob.Nq))
    src = source(settings)
    if src.interpreted():
        return 1
    n_sm = src.sm_count(call.q.device.index)
    # any split count is correct (a split past the last query block adds zeros): traced
    # sizes are read through their example values
    rows = hint(prob.B) * hint(prob.Hkv)
    programs = math.ceil(hint(prob.P) / 64) * rows
    others = 0
    if fused:
        others = (math.ceil(hint(prob.Nk) / 64) + math.ceil(hint(prob.Nq) / 64)) * rows
    want = math.ceil(max(2 * n_sm - others, 0) / max(programs, 1))
    return max(1, min(want, math.ceil(hint(prob.Nq) / 64), 16))


def _round16(n: int) -> int:
    return (n + 15) // 16 * 16


def backward_layout(
    call: AttentionCall, prob: AttnProblem, need_p: bool, out_contiguous: bool
) -> BackwardLayout:
    """Choose the backward's launch layout (see :class:`BackwardLayout`)."""
    B, H, Nq, Nk, P = prob.B, prob.H, prob.Nq, prob.Nk, prob.P
    mode = call.settings.backward
    if mode == "auto":
        work = hint(B) * hint(H) * hint(Nq) * (hint(P) + hint(Nk))
        mode = "fused" if work <= FUSED_BWD_MAX_WORK else "split"
    # the fused kernel puts every program of a (row, kv head) on grid axis 1: with very
    # long sequences even the smallest tiles could exceed its limit, then split it is
    programs = math.ceil(hint(P) / 16) * 16 + 2 * math.ceil(max(hint(Nq), hint(Nk)) / 16)
    fused = mode == "fused" and programs <= call.settings.max_grid_y
    has_delta = not (fused and out_contiguous)
    splits, reduce, n_part = 1, False, 0
    if need_p and prob.prefix_mode != PREFIX_NONE:
        # each prefix entry read by exactly one row: per-row, or shared with one row
        one_per_entry = prob.layout == PREFIX_PER_ROW or (
            prob.layout == PREFIX_SHARED and hint(B) == 1
        )
        splits = prefix_splits(call, prob, fused)
        if fused and one_per_entry and call.settings.prefix_splits is None:
            splits = 1  # one launch fewer beats more parallel prefix programs here
        reduce = not (one_per_entry and splits == 1)
        if reduce:
            n_part = _round16(hint(B) * splits * prob.Hkv * hint(P) * prob.D)
            if n_part >= 2**31:
                raise ValueError(
                    f"prefix gradient partials of {n_part} elements exceed 2^31; "
                    "use a smaller batch per call"
                )
    n_delta = _round16(hint(B) * hint(H) * hint(Nq)) if has_delta else 0
    return BackwardLayout(fused, has_delta, splits, reduce, n_delta, n_part, n_delta + 2 * n_part)


def backward_buffers(
    call: AttentionCall, prob: AttnProblem, needs: Needs, ws_numel: int
) -> tuple[torch.Tensor | None, ...]:
    """Fresh (dq, dk, dv, dprefix_k, dprefix_v, workspace): every element of every gradient
    is written by a kernel, except in the degenerate cases (nothing to compute, P == 0,
    Nk == 0), which get zeros."""
    q, k, v, prefix_k, prefix_v = call[:5]
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


def backward_pointers(
    call: AttentionCall,
    t: Outputs,
    prob: AttnProblem,
    needs: Needs,
    lay: BackwardLayout,
    chunk: int | None = None,
) -> dict[str, torch.Tensor]:
    """Every tensor argument of the backward's kernels by parameter name: the inputs, the
    gradients (GPK/GPV: the prefix gradients) and the workspace's parts as views (Delta;
    DPK/DPV: the fp32 prefix partials, or the prefix gradients themselves when each entry
    has one partial). Absent ones get ``q`` (never read). ``chunk``: the first row of a
    batch chunk (the views then start at its rows)."""
    q = call.q
    do, out, lse, (dq, dk, dv, dpk, dpv), ws = t
    mode = prob.prefix_mode
    need_kv = (needs[1] or needs[2]) and prob.Nk > 0
    need_p = needs[3] and mode != PREFIX_NONE
    row0 = chunk or 0
    ptrs = pointer_args(call, mode)
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


def backward_specs(
    call: AttentionCall,
    t: Outputs,
    seed: int,
    prob: AttnProblem,
    needs: Needs,
    lay: BackwardLayout,
    chunk: int | None = None,
) -> list[LaunchSpec]:
    """The backward's launches over the rows of ``prob`` (``call``, ``t``: those rows) in
    order: Delta, then dK/dV, dQ and the prefix partials (split: three kernels; fused:
    one). ``chunk``: the first row when ``prob`` is a chunk of a larger batch; the
    prefix-gradient reduce runs once for the whole batch (:func:`reduce_spec`)."""
    do, out, _, (dq, dk, *_), _ = t
    B, H, Hkv, Nq, Nk, P = prob.B, prob.H, prob.Hkv, prob.Nq, prob.Nk, prob.P
    need_q = needs[0]
    need_kv = (needs[1] or needs[2]) and Nk > 0
    need_p = needs[3] and prob.prefix_mode != PREFIX_NONE
    vals = {
        **input_args(call, prob), **backward_pointers(call, t, prob, needs, lay, chunk),
        **strides("do", do, "zhmd"), **strides("o", out, "zhmd"),
        **strides("dq", dq if need_q else None, "zhmd"),
        **strides("dk", dk if need_kv else None, "zhnd"), "seed": seed,
    }  # fmt: skip
    flags = input_flags(call, prob)
    common = pick(flags, "D", "BLOCK_D", "HAS_DROPOUT", "INPUT_PRECISION", "HAS_SOFTCAP")
    settings = call.settings

    def spec(name: str, attr: str, grid: Callable, n_kp: int, consts: dict) -> LaunchSpec:
        return LaunchSpec(name, attr, grid, Nq, n_kp, vals, consts, settings)

    specs = []
    if lay.has_delta:
        pre_bm = 64 if not source(settings).interpreted() else 32
        consts = {**pick(flags, "D", "BLOCK_D"), "BLOCK_M": pre_bm}
        grid = lambda m: (math.ceil(Nq / m["BLOCK_M"]), B * H)  # noqa: E731
        specs.append(spec("preprocess", "_attn_bwd_preprocess", grid, Nq, consts))
    if lay.fused:
        n_prefix = math.ceil(P / prefix_block_n(P)) * lay.splits if need_p else 0
        vals.update(NEED_KV=int(need_kv), NEED_DQ=int(need_q), N_PREFIX_PROGS=n_prefix,
                    N_SPLIT=lay.splits)  # fmt: skip
        consts = {
            "BLOCK_NP": prefix_block_n(P),
            **pick(flags, "IS_CAUSAL", "PREFIX_MODE", "HAS_PLEN", "HAS_KPM"),
            **pick(flags, "HAS_WINDOW", "PREFIX_WINDOWED"),
            "HAS_DELTA": lay.has_delta,
            **common,
            "KIND": BWD_KINDS["bwd"],
        }
        grid = lambda m: (  # noqa: E731
            B * Hkv,
            n_prefix
            + (math.ceil(Nk / m["BLOCK_N"]) if need_kv else 0)
            + (math.ceil(Nq / m["BLOCK_M2"]) if need_q else 0),
        )
        specs.append(spec("bwd", "_attn_bwd", grid, max(Nk, P), consts))
        return specs
    # the split kernels are _attn_bwd too (KIND): the fused kind's own arguments get fixed
    # placeholders, and so do the flags a kind does not read (no needless compiles)
    vals.update(NEED_KV=0, NEED_DQ=0, N_PREFIX_PROGS=0, N_SPLIT=1)
    split = {**common, "BLOCK_M2": 0, "BLOCK_N2": 0, "BLOCK_NP": 16, "HAS_DELTA": True}
    unread = {"IS_CAUSAL": False, "PREFIX_MODE": 0, "HAS_PLEN": False, "HAS_KPM": False,
              "HAS_WINDOW": False, "PREFIX_WINDOWED": False}  # fmt: skip

    def split_consts(name: str, *read: str) -> dict:
        return {**unread, **pick(flags, *read), **split, "KIND": BWD_KINDS[name]}

    if need_q:
        consts = split_consts(
            "dq", "IS_CAUSAL", "PREFIX_MODE", "HAS_PLEN", "HAS_KPM", "HAS_WINDOW", "PREFIX_WINDOWED"
        )
        grid = lambda m: (math.ceil(Nq / m["BLOCK_M"]), B * H)  # noqa: E731
        specs.append(spec("dq", "_attn_bwd_dq", grid, max(Nk, P), consts))
    if need_kv:
        consts = split_consts("dkdv", "IS_CAUSAL", "HAS_KPM", "HAS_WINDOW")
        grid = lambda m: (math.ceil(Nk / m["BLOCK_N"]), B * Hkv)  # noqa: E731
        specs.append(spec("dkdv", "_attn_bwd_dkdv", grid, Nk, consts))
    if need_p:
        splits = lay.splits
        consts = split_consts("prefix_dkdv", "PREFIX_MODE", "HAS_PLEN", "PREFIX_WINDOWED")
        grid = lambda m: (math.ceil(P / m["BLOCK_N"]), B * Hkv, splits)  # noqa: E731
        specs.append(spec("prefix_dkdv", "_attn_bwd_prefix_dkdv", grid, P, consts))
    return specs


def reduce_spec(
    ptrs: dict[str, torch.Tensor], prob: AttnProblem, lay: BackwardLayout, call: AttentionCall
) -> LaunchSpec:
    """``_prefix_grad_reduce`` over the whole batch's partials (one launch); ``ptrs`` from
    :func:`backward_pointers` for the whole batch."""
    numel = prob.Hkv * prob.P * prob.D
    vals = {**ptrs, "N_ROWS": prob.B, "N_SPLIT": lay.splits, "NUMEL": numel}
    T = prob.T
    return LaunchSpec(
        "reduce", "_prefix_grad_reduce", lambda m: (T, math.ceil(numel / m["BLOCK"])),
        prob.Nq, prob.P, vals, dict(PREFIX_MODE=prob.prefix_mode, BLOCK=REDUCE_BLOCK),
        call.settings,
    )  # fmt: skip


def attention_backward(
    call: AttentionCall,
    prob: AttnProblem,
    do: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    seed: int,
    needs: Needs,
    wrap: Callable | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients (dq, dk, dv, dprefix_k, dprefix_v); ``needs`` = (q, k, v, prefix) flags.

    The general path (custom ops, batches past the grid limit); eager calls normally go
    through a cached call plan (``plan.py``), which launches the same specs.

    Prefix gradients come back in the prefix's own layout: [Hkv, P, D] shared (summed over
    rows), [B, Hkv, P, D] per row, [T, Hkv, P, D] bank (each row added at its index).
    """
    need_p = needs[3] and call.prefix_k is not None
    needs = (*needs[:3], need_p)
    lay = backward_layout(call, prob, need_p, out.is_contiguous())
    *grads, ws = backward_buffers(call, prob, needs, lay.ws_numel)
    if prob.B * prob.H * prob.Nq == 0:
        return tuple(grads)
    t = (do, out, lse, tuple(grads), ws)
    per_row = prob.layout == PREFIX_PER_ROW
    specs = []
    for i, (rows, sub) in enumerate(batch_chunks(prob, call.settings, wrap)):
        chunk = None if rows == slice(None) else rows.start
        specs += backward_specs(
            call.rows(rows, per_row), outputs_rows(t, rows, per_row), chunk_seed(seed, i), sub, needs,
            lay, chunk,
        )  # fmt: skip
    if need_p and lay.reduce and prob.prefix_mode != PREFIX_NONE:
        specs.append(reduce_spec(backward_pointers(call, t, prob, needs, lay), prob, lay, call))
    launch_all(specs, call.q, wrap)
    return tuple(grads)


__all__ = [
    "BackwardLayout",
    "Outputs",
    "attention_backward",
    "backward_buffers",
    "backward_layout",
    "backward_pointers",
    "backward_specs",
    "outputs_rows",
    "prefix_block_n",
    "prefix_splits",
    "reduce_spec",
]
