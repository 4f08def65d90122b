"""Prefix attention on PyTorch's fused ``scaled_dot_product_attention``: the ``"sdpa"``
backend, what ``backend="auto"`` runs off CUDA.

It puts each row's prefix in front of its keys and values (``torch.cat``: a fallback may
copy the prefix; the Triton kernel never does) and calls SDPA, which on the CPU is a fused
flash-style kernel (no [B, H, Nq, P + Nk] score matrix in memory) and on other devices
whatever PyTorch has there. Every other rule of :func:`prefixattn.prefix_attention` holds:

* the mask: every prefix key is visible, sequence keys are causal aligned bottom-right
  and removed by ``key_padding_mask``. No mask when every key is visible (not causal, or
  a decode step ``Nq == 1``), SDPA's ``is_causal`` for square plain attention, otherwise
  one boolean mask [B|1, 1, Nq, P + Nk] (:func:`prefix_visibility_mask`; what
  ``causal_lower_right(Nq, P + Nk)`` materialises on the CPU, so the call costs what the
  ``torch.cat`` + SDPA path it replaces costs, in time and memory). Measured and not
  kept: prepending ``P + Nk - Nq`` unused query rows to use ``is_causal`` (faster on the
  CPU only past ~1k keys, and it keeps a larger q and output for the backward);
* gradients: autograd through ``expand`` sums a shared prefix's gradient over the rows,
  through ``bank[prefix_index]`` adds each row's gradient at its index (both in a fixed
  order: bitwise reproducible);
* a row that sees nothing (only possible with P == 0) outputs zeros with zero gradients:
  it is given every key (so no kernel can produce NaN) and its output is zeroed (so its
  gradients are exactly zero). This costs nothing when no row can be empty;
* GQA through ``enable_gqa=True`` (no ``repeat_interleave`` of K/V here: SDPA maps the
  head groups itself);
* dropout through SDPA's own ``dropout_p`` (``torch.manual_seed`` reproduces it);
* a sliding window through the boolean mask (sequence keys left of the window, and with
  ``prefix_window="sliding"`` the prefix keys out of it, are masked);
* logit soft-capping and attention sinks, which SDPA cannot express, take the same K/V
  and mask to :mod:`~prefixattn.ops.sdpa_features` (no score matrix): sinks on the CPU
  are an exact rescaling of the flash kernel's output by its log-sum-exp; soft-capping
  (and sinks elsewhere) an exact chunked path over query blocks (bf16 / fp16 inputs on a
  CPU with bf16 / fp16 matrix instructions: its P V, dS K, ... GEMMs in that dtype,
  ``Settings.cpu_block_gemm``). Only dropout with
  either still runs the materialising reference path, with a one-time warning. The path
  a call takes is logged once per path (``logging.getLogger("prefixattn")``, DEBUG) and
  listed by ``prefixattn info``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import paged_decode
from .call import N_TENSORS, AttentionCall
from .paged_rows import paged_sdpa_attention
from .reference import (
    gathered_blocks,
    pool_rows,
    prefix_visible,
    prefix_window_visible,
    reference_prefix_attention,
    trim_pages,
    varlen_padded,
    varlen_unpad,
    visible_mask,
)
from .sdpa_features import (
    PATH_FUSED,
    PATH_PAGED_ROWS,
    PATH_REFERENCE,
    feature_attention,
    feature_path,
    note_path,
)
from .settings import current_settings
from .validation import PREFIX_BANK, PREFIX_NONE, PREFIX_SHARED, AttnProblem, validate


def prefix_visibility_mask(
    Nq: int,
    Nk: int,
    P: int,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    device: torch.device,
    prefix_visible: torch.Tensor | None = None,
    window: int = 0,
    prefix_window: torch.Tensor | None = None,
    seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which of the P prefix + Nk sequence keys each query sees: bool [B|1, 1, Nq, P + Nk].

    Arguments:
        Nq, Nk, P: query, sequence-key and prefix lengths.
        causal: bottom-right causal on the sequence keys (query i sees key j iff
            j <= i + (Nk - Nq)).
        key_padding_mask: bool [B, Nk], True = real token, or None.
        device: where to build the mask.
        prefix_visible: bool [B, P], which prefix keys each row sees, or None for all of
            them (a per-row prefix length L becomes ``arange(P) < L[:, None]``).
        window: sliding window on the sequence keys (0 = none).
        prefix_window: bool [B|1, Nq, P], the prefix keys still in each query's window
            (``prefix_window="sliding"``), or None.
        seqlens: int [B], a KV-cache pool's per-row key lengths (see
            :func:`~prefixattn.ops.reference.visible_mask`), or None.

    Returns:
        bool [B, 1, Nq, P + Nk] if anything depends on the row, else [1, 1, Nq, P + Nk]
        (broadcast over batch and heads by SDPA).
    """
    seq = visible_mask(Nq, Nk, causal, key_padding_mask, device, window, seqlens)  # [B|1, Nq, Nk]
    if seq is None:
        seq = torch.ones(1, Nq, Nk, dtype=torch.bool, device=device)
    if prefix_visible is None:
        pre = torch.ones(1, 1, P, dtype=torch.bool, device=device)  # [1, 1, P]
    else:
        pre = prefix_visible[:, None, :]  # [B, 1, P]
    if prefix_window is not None:
        pre = pre & prefix_window  # [B|1, Nq, P]
    rows = max(seq.shape[0], pre.shape[0])
    pre = pre.expand(rows, Nq, P)  # [B|1, Nq, P]
    seq = seq.expand(rows, Nq, Nk)  # [B|1, Nq, Nk]
    return torch.cat([pre, seq], dim=-1)[:, None]  # [B|1, 1, Nq, P + Nk]


def _row_prefix(
    prefix: torch.Tensor, prefix_index: torch.Tensor | None, B: int, layout: int
) -> torch.Tensor:
    """Any prefix layout -> [B, Hkv, P, D]: a shared prefix expanded (a view; autograd
    sums its gradient over the rows), a bank gathered (autograd adds at the index)."""
    if layout == PREFIX_SHARED:
        return prefix.unsqueeze(0).expand(B, -1, -1, -1)  # [Hkv, P, D] -> [B, Hkv, P, D]
    if layout == PREFIX_BANK:
        return prefix[prefix_index]  # [T, Hkv, P, D] -> [B, Hkv, P, D]
    return prefix  # per row: already [B, Hkv, P, D]


def _prefix_and_pages(pre: torch.Tensor, pool: torch.Tensor, call: AttentionCall) -> torch.Tensor:
    """A paged call's keys (or values) after the rows' prefixes, in one buffer [B, Hkv,
    P + M * block_size, D]: the blocks gathered whole, then copied once into place (a
    concatenation would copy the gathered keys a second time). Inference only (paged
    calls refuse gradients), so the buffer is written in place."""
    pages = gathered_blocks(pool, call.block_table, call.cache_seqlens)  # [B, M, Hkv, bs, D]
    B, M, Hkv, bs, D = pages.shape
    P = pre.shape[2]
    out = pool.new_empty(B, Hkv, P + M * bs, D)
    out[:, :, :P] = pre
    out[:, :, P:].view(B, Hkv, M, bs, D).copy_(pages.transpose(1, 2))
    return out


def _attention_path(call: AttentionCall, prob: AttnProblem) -> Callable[..., torch.Tensor] | None:
    """The SDPA-shaped function this call runs (:func:`~.sdpa_features.feature_path`,
    logged once per path): ``F.scaled_dot_product_attention``, a sink/soft-capping path
    that needs no score matrix, or None for the reference path (dropout with soft-capping
    or sinks: warned once)."""
    sinks, softcap = call.sinks, prob.softcap
    if not softcap and sinks is None:
        note_path(PATH_FUSED)
        return F.scaled_dot_product_attention
    settings = call.settings if call.settings is not None else current_settings()
    path = feature_path(
        bool(softcap), sinks is not None, float(call.dropout_p) > 0, call.q.device.type,
        call.q.dtype, settings.cpu_block_gemm,
    )  # fmt: skip
    note_path(path)
    if path.startswith(PATH_REFERENCE):
        return None
    return functools.partial(
        feature_attention, path, sinks=sinks, softcap=softcap, causal=call.causal
    )


def sdpa_prefix_attention(call: AttentionCall, prob: AttnProblem) -> torch.Tensor:
    """Prefix attention through ``F.scaled_dot_product_attention`` (differentiable).

    Arguments (already validated, see :func:`prefixattn.prefix_attention`):
        call: the inputs. ``prefix_lengths`` (a ragged bank, or per-row lengths): row b
            sees only the first ``prefix_lengths[entry]`` prefix keys; the rest are
            masked, so a row can then be empty with P > 0 too. Dropout is SDPA's own.
        prob: the sizes and softmax scale from :func:`~prefixattn.ops.validation.validate`.
        sinks: [H] attention sinks, or None. Sinks and ``prob.softcap`` run the paths
            of :mod:`~prefixattn.ops.sdpa_features` (the reference path with dropout);
            ``prob.window`` is a mask here.

    Returns:
        [B, H, Nq, D] in the dtype of q.
    """
    attend = _attention_path(call, prob)
    if attend is None:
        return reference_prefix_attention(call, prob)
    q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, _sinks = call[
        :N_TENSORS
    ]
    seqlens = call.cache_seqlens
    causal, dropout_p = call.causal, float(call.dropout_p)
    B, H, Hkv, Nq, Nk, P = prob.B, prob.H, prob.Hkv, prob.Nq, prob.Nk, prob.P
    if prob.layout == PREFIX_NONE:
        k, v = pool_rows(call)  # [B, Hkv, Nk, D]
    else:  # P may be 0: the empty prefix still gets (empty) grads
        pk = _row_prefix(prefix_k, prefix_index, B, prob.layout)  # [B, Hkv, P, D]
        pv = _row_prefix(prefix_v, prefix_index, B, prob.layout)
        if call.block_table is not None:  # pages: one buffer, no concatenation
            k = _prefix_and_pages(pk, call.k, call)  # [B, Hkv, P + Nk, D]
            v = _prefix_and_pages(pv, call.v, call)
        else:
            k, v = pool_rows(call)  # [B, Hkv, Nk, D]
            k = torch.cat([pk, k], dim=2)  # [B, Hkv, P + Nk, D]
            v = torch.cat([pv, v], dim=2)
    kw: dict = {"dropout_p": dropout_p, "scale": prob.sm_scale}
    if Hkv != H:
        kw["enable_gqa"] = True  # query head h reads kv head h // (H // Hkv)

    vis = None  # bool [B, P]: which prefix keys each row sees (a ragged bank)
    if prefix_lengths is not None and prob.layout != PREFIX_NONE and P > 0:
        vis = prefix_visible(prefix_lengths, prefix_index, P)
    window = prob.window if prob.window and (prob.window < Nk or prob.prefix_windowed) else 0
    plain = vis is None and key_padding_mask is None and not window and seqlens is None
    if plain and (not causal or Nq == 1):
        # every query sees every key (Nq == 1 with causal: a decode step sees the cache)
        return attend(q, k, v, **kw)
    if plain and causal and Nq == Nk and P == 0:
        return attend(q, k, v, is_causal=True, **kw)

    pwin = None  # bool [B|1, Nq, P]: prefix keys still in the window (prefix_window="sliding")
    if prob.prefix_windowed and P > 0:
        pwin = prefix_window_visible(Nq, Nk, P, window, prefix_lengths, prefix_index, q.device)
    mask = prefix_visibility_mask(
        Nq, Nk, P, causal, key_padding_mask, q.device, vis, window, pwin, seqlens
    )  # fmt: skip
    if vis is None and (
        (P > 0 and pwin is None) or (key_padding_mask is None and seqlens is None and Nq <= Nk)
    ):
        # every row sees some key
        return attend(q, k, v, attn_mask=mask, **kw)
    # a row may see nothing (P == 0 or a prefix length of 0, with padding or Nq > Nk).
    # Give it every key (a finite softmax in any kernel), then zero its output (its
    # gradients are then exactly zero).
    seen = mask.any(dim=-1, keepdim=True)  # [B|1, 1, Nq, 1]
    out = attend(q, k, v, attn_mask=mask | ~seen, **kw)
    return out.masked_fill(~seen, 0.0)


def torch_backend(call: AttentionCall, prob: AttnProblem) -> torch.Tensor:
    """The ``"sdpa"`` or ``"reference"`` backend (``call.backend``) on a validated call:
    the one route to either, eager or traced.

    A paged ``"sdpa"`` call on the CPU (``block_table``, packed rows or not, no
    ``key_padding_mask``) takes :func:`~.paged_rows.paged_sdpa_attention` (rows grouped
    by their number of queries, the gather indices and masks computed once per step);
    other packed calls are padded to their longest row, other paged calls cut to the
    blocks their longest row needs. Traced (``torch.compile``), a paged CPU decode call
    takes :func:`~.paged_decode.paged_decode_attention` (reductions that read the pages in
    place); other traced paged calls gather their blocks for SDPA."""
    if (
        call.block_table is not None
        and call.backend == "sdpa"
        and call.q.device.type == "cpu"
        and call.key_padding_mask is None
        and not torch.compiler.is_compiling()
    ):
        attend = _attention_path(call, prob)
        if attend is not None:  # None: the reference path (dropout: refused when paged)
            note_path(PATH_PAGED_ROWS)
            return paged_sdpa_attention(call, prob, attend)
    if (
        call.backend == "sdpa"
        and torch.compiler.is_compiling()
        and paged_decode.applies(call, prob)
    ):
        # a traced CPU decode step: reductions Inductor fuses, reading the pages in place
        return paged_decode.paged_decode_attention(call, prob)
    if call.cu_seqlens_q is not None:  # packed rows: padded, run, packed again
        padded, row, col = varlen_padded(call)
        out = torch_backend(padded, validate(padded, check_values=False))
        return varlen_unpad(out, row, col)
    if call.block_table is not None:  # pages on the CPU: only the blocks the rows need
        trimmed = trim_pages(call)
        if trimmed is not call:  # a subset of what was validated: only Nk changes
            nk = trimmed.block_table.shape[1] * call.k.shape[2]
            return torch_backend(trimmed, dataclasses.replace(prob, Nk=nk))
    if call.backend == "sdpa":
        return sdpa_prefix_attention(call, prob)
    return reference_prefix_attention(call, prob)
