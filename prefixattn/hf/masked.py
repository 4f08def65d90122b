"""Prefix attention under an explicit 4-D mask: the exact path for custom attention masks.

transformers hands a model's attention a user's 4-D mask as it is (``create_causal_mask``
returns a 4-D mask untouched): a bool visibility mask or a float additive mask
``[B|1, 1|H, Nq, Nk]`` over the sequence keys (a shared-prefix tree, a packed batch's
block diagonal, a static cache's mask while ``torch.compile`` traces). The fused kernel
computes only "bottom-right causal + key padding (+ a window)"; :mod:`.patching` sends
every other mask here.

The math is :func:`prefixattn.prefix_attention`'s, with the mask in place of the causal
band: scores in float32 (float64 stays float64), soft-capping before the mask, a float
mask added to the scores (as transformers' eager and SDPA paths add it), a bool mask
selecting keys; every prefix key is visible to every query (a ragged bank's
``prefix_lengths`` hide a row's keys past its length), since the mask is over the
sequence keys only. With a sliding window and ``prefix_window="sliding"`` prefix key c
(of a row that sees L of them) sits at slot position c - L and query i at the position
of its last visible sequence key. A query that sees nothing outputs zeros (the kernel's
convention). It materialises the ``[B, H, Nq, P + Nk]`` scores: an exact path, not a
fast one (``patching`` logs when it is taken).
"""

from __future__ import annotations

import torch

from ..ops.reference import safe_softmax


def _row_prefix(prefix: torch.Tensor, index: torch.Tensor | None, B: int) -> torch.Tensor:
    """Any prefix layout -> [B|1, Hkv, P, D] (a shared prefix broadcasts, never copied)."""
    if prefix.dim() == 3:
        return prefix[None]  # [1, Hkv, P, D]
    if index is not None:
        return prefix[index]  # bank [T, Hkv, P, D] -> [B, Hkv, P, D]
    return prefix  # per row [B, Hkv, P, D]


def masked_prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    *,
    prefix_index: torch.Tensor | None = None,
    prefix_lengths: torch.Tensor | None = None,
    sm_scale: float | None = None,
    dropout_p: float = 0.0,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    window: int | None = None,
    prefix_window: str = "all",
) -> torch.Tensor:
    """Attention over a prefix plus the sequence keys, the sequence part under ``mask``.

    Arguments:
        q: [B, H, Nq, D]; k, v: [B, Hkv, Nk, D] (H % Hkv == 0).
        mask: [B|1, 1|H, Nq, Nk], bool (True = visible) or float (added to the scores).
        prefix_k, prefix_v, prefix_index, prefix_lengths: as
            :func:`prefixattn.prefix_attention` (shared, per-row or bank layouts).
        sm_scale: softmax scale (None: 1 / sqrt(D)); dropout_p: attention dropout.
        softcap: logits s -> softcap * tanh(s / softcap) before the mask.
        sinks: [H] attention sinks (a logit per head in the denominator, no value).
        window, prefix_window: only for what a query sees of the prefix
            (``prefix_window="sliding"``); the mask alone decides the sequence keys.

    Returns:
        [B, H, Nq, D] in the dtype of q (differentiable in every input).
    """
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = H // Hkv
    cdt = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    scale = 1.0 / D**0.5 if sm_scale is None else float(sm_scale)
    qf = q.to(cdt).view(B, Hkv, G, Nq, D)  # query head h = hk * G + g reads kv head hk
    kf, vf = k.to(cdt)[:, :, None], v.to(cdt)[:, :, None]  # [B, Hkv, 1, Nk, D]

    def logits(s: torch.Tensor) -> torch.Tensor:
        s = s * scale
        return softcap * torch.tanh(s / softcap) if softcap else s

    m = mask.view(mask.shape[0], *((Hkv, G) if mask.shape[1] == H else (1, 1)), Nq, Nk)
    s_seq = logits(torch.matmul(qf, kf.transpose(-1, -2)))  # [B, Hkv, G, Nq, Nk]
    if m.dtype == torch.bool:
        vis = m
        s_seq = s_seq.masked_fill(~vis, float("-inf"))
    else:
        s_seq = s_seq + m.to(cdt)
        vis = m > torch.finfo(m.dtype).min / 2  # what a float mask leaves visible
    P = 0
    if prefix_k is not None and prefix_v is not None and prefix_k.shape[-2] > 0:
        pk = _row_prefix(prefix_k, prefix_index, B).to(cdt)[:, :, None]  # [B|1, Hkv, 1, P, D]
        pv = _row_prefix(prefix_v, prefix_index, B).to(cdt)[:, :, None]
        P = pk.shape[-2]
        s_pre = logits(torch.matmul(qf, pk.transpose(-1, -2)))  # [B, Hkv, G, Nq, P]
        c = torch.arange(P, device=q.device)
        L = torch.full((1,), P, device=q.device)  # [B|1]: prefix keys each row sees
        if prefix_lengths is not None:
            L = prefix_lengths if prefix_index is None else prefix_lengths[prefix_index]
            L = L.to(q.device)
        pvis = c[None, :] < L[:, None]  # [B|1, P]
        pvis = pvis[:, None, None, None, :]  # [B|1, 1, 1, 1, P]
        if window is not None and prefix_window == "sliding":
            # query i sits at its last visible sequence key (default i + Nk - Nq)
            j = torch.arange(Nk, device=q.device)
            last = torch.where(vis, j, -1).amax(dim=-1, keepdim=True)  # [., ., ., Nq, 1]
            default = torch.arange(Nq, device=q.device)[:, None] + (Nk - Nq)
            pos = torch.where(last >= 0, last, default)
            Lr = L.view(-1, 1, 1, 1, 1)
            pvis = pvis & (c - Lr > pos - window)  # [B|1, ., ., Nq, P]
        s_pre = s_pre.masked_fill(~pvis, float("-inf"))
        scores = torch.cat([s_pre.expand(*s_seq.shape[:-1], P), s_seq], dim=-1)
    else:
        scores = s_seq
    # softmax with an all-zero row (and zero gradients) where nothing is visible
    sink = None if sinks is None else sinks.to(cdt).view(1, Hkv, G, 1, 1)
    probs = safe_softmax(scores, sink, dropout_p)
    out = torch.matmul(probs[..., P:], vf)  # [B, Hkv, G, Nq, D]
    if P:
        out = out + torch.matmul(probs[..., :P], pv)
    return out.reshape(B, H, Nq, D).to(q.dtype)


__all__ = ["masked_prefix_attention"]
