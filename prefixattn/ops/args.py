"""Kernel arguments of a call, by parameter name, and how a batch is cut into grids.

Nothing here copies K, V or the prefix: every tensor goes to the kernels with its own
strides; absent optional inputs get ``q`` as a dummy pointer the kernel never reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .call import AttentionCall
from .kernels import block_d, bucket, hint, input_precision
from .settings import Settings
from .validation import PREFIX_NONE, PREFIX_PER_ROW, AttnProblem


def strides4(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    """Strides of a [Z, H, N, D] view; a 3-D shared prefix gets batch stride 0."""
    if t is None:
        return (0, 0, 0, 0)
    if t.dim() == 3:
        return (0, *t.stride())
    return tuple(t.stride())


def strides(prefix: str, t: torch.Tensor | None, dims: str) -> dict[str, int]:
    """``{"stride_<prefix><dim>": ...}`` of a [Z, H, N, D] view (see :func:`strides4`)."""
    return dict(zip([f"stride_{prefix}{d}" for d in dims], strides4(t)))


def pointer_args(call: AttentionCall, mode: int) -> dict[str, torch.Tensor]:
    """The input pointers of a call by kernel parameter name (``mode``: the problem's
    ``prefix_mode``). Absent optional inputs get ``q`` as a dummy the kernel never reads;
    the key mask goes in as uint8 (a view)."""
    q, pidx, plen, kpm = call.q, call.prefix_index, call.prefix_lengths, call.key_padding_mask
    sinks = call.sinks
    has_p = mode != PREFIX_NONE
    return {
        "Q": q,
        "K": call.k,
        "V": call.v,
        "PK": call.prefix_k if has_p else q,
        "PV": call.prefix_v if has_p else q,
        # the kernels read prefix_index[b] at offset b: a strided index is made dense (B ints)
        "PIDX": (pidx if pidx.is_contiguous() else pidx.contiguous())
        if has_p and pidx is not None
        else q,
        "KPM": kpm.view(torch.uint8) if kpm is not None else q,
        "PLEN": plen if has_p and plen is not None else q,
        "CSL": call.cache_seqlens if call.cache_seqlens is not None else q,
        "CBI": call.cache_batch_idx if call.cache_batch_idx is not None else q,
        "BT": call.block_table if call.block_table is not None else q,
        # the forward reads sinks[h] at offset h: a strided vector is made dense (H floats)
        "SINKS": q if sinks is None else sinks if sinks.is_contiguous() else sinks.contiguous(),
    }


def input_args(call: AttentionCall, prob: AttnProblem) -> dict:
    """Every argument the forward and backward kernels share: the input pointers and
    strides, the sizes and the scalars (``seed`` is added per launch)."""
    has_p = prob.prefix_mode != PREFIX_NONE
    kpm = call.key_padding_mask
    ks = kpm.stride() if kpm is not None else (0, 0)
    bts = call.block_table.stride() if call.block_table is not None else (0, 0)
    return {
        **pointer_args(call, prob.prefix_mode),
        **strides("q", call.q, "zhmd"),
        **strides("k", call.k, "zhnd"),
        **strides("v", call.v, "zhnd"),
        **strides("pk", call.prefix_k if has_p else None, "zhnd"),
        **strides("pv", call.prefix_v if has_p else None, "zhnd"),
        "stride_kpmz": ks[0],
        "stride_kpmn": ks[1],
        "stride_btz": bts[0],
        "stride_btn": bts[1],
        "H": prob.H,
        "HKV": prob.Hkv,
        "GROUP": prob.group,
        "N_Q": prob.Nq,
        "N_K": prob.Nk,
        "N_P": prob.P if has_p else 0,
        "sm_scale": prob.sm_scale,
        "dropout_p": float(call.dropout_p),
        "TUNE_NQ": bucket(prob.Nq),
        "TUNE_NK": bucket(prob.Nk),
        "window": prob.window,
        "softcap": prob.softcap or 1.0,  # a placeholder when off (HAS_SOFTCAP False)
    }


def input_flags(call: AttentionCall, prob: AttnProblem) -> dict:
    """The constexprs every kernel of a call may take (each kernel's spec keeps its own)."""
    has_p = prob.prefix_mode != PREFIX_NONE
    return dict(
        D=prob.D,
        BLOCK_D=block_d(prob.D),
        IS_CAUSAL=call.causal,
        PREFIX_MODE=prob.prefix_mode,
        HAS_PLEN=has_p and call.prefix_lengths is not None,
        HAS_KPM=call.key_padding_mask is not None,
        HAS_CSL=call.cache_seqlens is not None,
        HAS_CBI=call.cache_batch_idx is not None,
        HAS_DROPOUT=call.dropout_p > 0.0,
        INPUT_PRECISION=input_precision(call.q),
        # a window holding every key (W >= Nk) runs the plain causal variant
        HAS_WINDOW=0 < prob.window < prob.Nk,
        PREFIX_WINDOWED=prob.prefix_windowed,
        HAS_SOFTCAP=prob.softcap > 0.0,
        HAS_SINKS=prob.has_sinks,
        # a paged KV cache: the block size (k is the block pool), 0 = not paged
        PAGE_SIZE=call.k.shape[2] if call.block_table is not None else 0,
    )


def pick(d: dict, *names: str) -> dict:
    """The entries ``names`` of ``d``."""
    return {n: d[n] for n in names}


def new_seed() -> int:
    """A Philox seed drawn from torch's default CPU generator (so torch.manual_seed
    reproduces dropout). A CPU op: no device synchronization."""
    return int(torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device="cpu").item())


def batch_chunks(
    prob: AttnProblem, settings: Settings, wrap: Callable | None
) -> list[tuple[slice, AttnProblem]]:
    """Runs of batch rows that one launch can cover: the whole batch (``slice(None)``)
    unless B * H exceeds ``settings.max_grid_y`` (CUDA's grid-axis limit), then chunks of
    max_grid_y // H rows, each with its problem sizes. The chunks are views of the inputs:
    nothing is copied."""
    limit = settings.max_grid_y
    if hint(prob.B) * hint(prob.H) <= limit:
        return [(slice(None), prob)]
    if wrap is not None:
        raise ValueError(
            f"B * H = {hint(prob.B)} * {hint(prob.H)} query (row, head) pairs exceed "
            f"{limit} under torch.compile; call with a smaller batch"
        )
    step = max(1, limit // prob.H)
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


def chunk_seed(seed: int, chunk: int) -> int:
    """Dropout seed of batch chunk ``chunk``: the kernels number rows from the chunk's
    first row, so each chunk needs its own Philox stream (chunk 0 keeps ``seed``)."""
    return (seed + chunk * 1_000_003) % (2**31 - 1) if chunk else seed


__all__ = [
    "batch_chunks",
    "chunk_seed",
    "input_args",
    "input_flags",
    "new_seed",
    "pick",
    "pointer_args",
    "strides",
    "strides4",
]
