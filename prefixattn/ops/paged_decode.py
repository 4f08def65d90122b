"""A traced paged decode step on the CPU: one query per row, the keys read from the pool's
pages and the prefix from its own buffer, as reductions Inductor fuses into one loop nest.

Under ``torch.compile`` a paged ``sdpa`` call otherwise gathers every block a row's table
names into a [B, Hkv, P + M * block_size, D] copy (and the prefix in front of it), builds
a mask, and calls SDPA: per layer a gather kernel with the block-table arithmetic per
element, a copy, then SDPA's own dispatch. A decode step (``Nq == 1``) is small work
(B x H x (P + N) x D multiply-adds twice), so written as element-wise products and sums
instead of matrix products::

    s[b, h, j] = scale * sum_d q[b, h, d] * K_b[j, d]          K_b[j] = pool[bt[b, j // bs], hk, j % bs]
    p[b, h, :] = softmax(s[b, h, :] masked to the keys row b sees)
    o[b, h, d] = sum_j p[b, h, j] * V_b[j, d]                  (hk = h // (H // Hkv))

Inductor emits it as one C++ kernel whose loads index the pool (and the bank) directly:
no gathered copy, no mask tensor, no SDPA call (the block id is read once per block and
the inner loop over ``d`` is vectorised). Keys past a row's ``cache_seqlens`` (and
entries of its table past the blocks it reads: block 0 is read instead, whatever the
table holds there) are masked; prefix keys follow ``prefix_lengths``. The sums run in
float32 (bf16 / fp16 inputs are upcast, the output cast back, as :mod:`.reference`;
float64 stays float64); values equal the other paths within rounding (a sum's order
differs).

q is computed into a buffer before the loops (an ``as_strided`` onto itself, see the code):
a pointwise q, e.g. fresh out of a rotary embedding, would otherwise be recomputed for
every key it meets.

What it takes: a paged call (``block_table``) with one query per row, unpacked (no
``cu_seqlens_q``), no ``key_padding_mask``, no dropout (``prefix_window="sliding"`` is
refused with a KV cache by validation); any prefix layout (shared, per row, bank, ragged
by ``prefix_lengths``), GQA, a causal ``window``, ``softcap`` and ``sinks``. :func:`applies`
says whether a call is one; the others keep the gather + SDPA path. Inference only: paged calls refuse gradients.
"""

from __future__ import annotations

import torch

from .call import AttentionCall
from .reference import prefix_visible, safe_softmax, scaled_logits, visible_mask
from .validation import PREFIX_BANK, PREFIX_NONE, PREFIX_SHARED, AttnProblem, needed_blocks

__all__ = ["applies", "paged_decode_attention"]


def applies(call: AttentionCall, prob: AttnProblem) -> bool:
    """Whether :func:`paged_decode_attention` takes this validated call (see the module doc)."""
    return (
        call.block_table is not None
        and call.cu_seqlens_q is None
        and call.key_padding_mask is None
        and prob.Nq == 1
        and float(call.dropout_p) == 0.0
        and call.q.device.type == "cpu"
    )


def paged_decode_attention(call: AttentionCall, prob: AttnProblem) -> torch.Tensor:
    """A paged decode call (:func:`applies`) as fused reductions: [B, H, 1, D] in q's dtype."""
    q, pool_k, pool_v = call.q, call.k, call.v
    B, H, Hkv, D, P, G = prob.B, prob.H, prob.Hkv, prob.D, prob.P, prob.group
    bs = pool_k.shape[2]
    bt, seqlens = call.block_table, call.cache_seqlens
    M = bt.shape[1]
    f32 = torch.promote_types(q.dtype, torch.float32)  # the sums' dtype (float64 stays)
    qg = q.reshape(B, Hkv, G, D).to(f32)  # [B, H, 1, D] -> [B, Hkv, G, D]
    # A view of itself (nothing eagerly), but Inductor computes an as_strided's input into
    # a buffer first: q once per step, not once per key it meets. Without it a rotary
    # embedding's q (cos, sin and all) is recomputed inside the score loop: measured
    # 0.67 vs 0.29 ms per call (SmolLM2's decode shapes, 8 rows of 128 keys).
    qg = qg.as_strided(qg.shape, qg.stride())

    # the blocks each row reads; entries past them read block 0 (masked below)
    blocks = torch.where(needed_blocks(bt, seqlens, bs), bt.to(torch.int64), 0)  # [B, M]
    kc = pool_k[blocks].to(f32)  # [B, M, Hkv, bs, D]: an indexed load, fused (never copied)
    s_seq = (qg[:, None, :, :, None, :] * kc[:, :, :, None, :, :]).sum(-1)  # [B, M, Hkv, G, bs]
    s_seq = s_seq.permute(0, 2, 3, 1, 4).reshape(B, Hkv, G, M * bs)  # [B, Hkv, G, N]
    s_seq = scaled_logits(s_seq, prob)
    # [B, 1, N]: keys before cache_seqlens (and inside the window), the query at its end
    seen = visible_mask(1, M * bs, call.causal, None, q.device, prob.window, seqlens)
    s_seq = s_seq.masked_fill(~seen[:, None], float("-inf"))

    prefix = prob.layout != PREFIX_NONE and P > 0
    if prefix:
        pk, pv = call.prefix_k, call.prefix_v
        if prob.layout == PREFIX_SHARED:
            pk, pv = pk[None], pv[None]  # [Hkv, P, D] -> [1, Hkv, P, D] (broadcast)
        elif prob.layout == PREFIX_BANK:
            pk, pv = pk[call.prefix_index], pv[call.prefix_index]  # [B, Hkv, P, D], fused
        s_pre = (qg[:, :, :, None, :] * pk.to(f32)[:, :, None]).sum(-1)  # [B, Hkv, G, P]
        s_pre = scaled_logits(s_pre, prob)
        if call.prefix_lengths is not None:
            vis = prefix_visible(call.prefix_lengths, call.prefix_index, P)  # [B, P]
            s_pre = s_pre.masked_fill(~vis[:, None, None, :], float("-inf"))
        scores = torch.cat([s_pre, s_seq], dim=-1)  # [B, Hkv, G, P + N]
    else:
        scores = s_seq
    sink = None if call.sinks is None else call.sinks.to(f32).view(1, Hkv, G, 1)
    probs = safe_softmax(scores, sink)  # [B, Hkv, G, P + N]; a row that sees nothing: 0

    p_seq = probs[..., P:].reshape(B, Hkv, G, M, bs)  # [B, Hkv, G, N] -> [B, Hkv, G, M, bs]
    vc = pool_v[blocks].to(f32)  # [B, M, Hkv, bs, D]
    p_seq = p_seq.permute(0, 3, 1, 2, 4)[..., None]  # [B, M, Hkv, G, bs, 1]
    out = (p_seq * vc[:, :, :, None]).sum((1, 4))  # [B, Hkv, G, D]
    if prefix:
        p_pre = probs[..., :P, None]  # [B, Hkv, G, P, 1]
        out = out + (p_pre * pv.to(f32)[:, :, None]).sum(-2)  # [B, Hkv, G, D]
    return out.reshape(B, H, 1, D).to(q.dtype)  # [B, Hkv, G, D] -> [B, H, 1, D]
