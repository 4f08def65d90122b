"""An independent float64 reference for prefix attention, written for the tests.

It is the naive concat path (the definition the kernel must reproduce): expand the prefix
to every row, concatenate it with K/V, build the full boolean mask, softmax, matmul. It
shares no code with prefixattn.
"""

from __future__ import annotations

import math

import torch


def expand_prefix(
    prefix: torch.Tensor | None, index: torch.Tensor | None, B: int
) -> torch.Tensor | None:
    """Any prefix layout -> [B, Hkv, P, D]."""
    if prefix is None:
        return None
    if prefix.dim() == 3:
        return prefix.unsqueeze(0).expand(B, *prefix.shape)
    if index is not None:
        return prefix[index]
    return prefix


def attention64(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    prefix_index: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = True,
    sm_scale: float | None = None,
    keep: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    prefix_lengths: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    prefix_window: str = "all",
) -> torch.Tensor:
    """float64 attention; ``keep`` [B, H, Nq, P + Nk] bool is an explicit dropout mask.

    ``prefix_lengths`` int64 [T]: row b sees prefix keys c < prefix_lengths[entry of b]
    (entry = prefix_index[b] for a bank, b for a per-row prefix).

    ``window`` W (causal only): query i, at sequence position i + Nk - Nq, sees sequence
    key j iff position - W < j <= position. Prefix keys: ``prefix_window="all"`` every
    query sees all of them; ``"sliding"`` prefix key c of a row whose prefix has L visible
    keys sits at position c - L (the L positions before sequence key 0, as if it were in
    the KV cache) and is seen iff position - W < c - L.

    ``softcap`` C: every logit s (after the scale) becomes C * tanh(s / C) before masking.
    ``sinks`` [H]: one more logit per head in the softmax denominator, with no value.
    """
    q, k, v = q.double(), k.double(), v.double()
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    pk = expand_prefix(prefix_k, prefix_index, B)
    pv = expand_prefix(prefix_v, prefix_index, B)
    P = 0 if pk is None else pk.shape[2]
    if P:
        k = torch.cat([pk.double(), k], dim=2)
        v = torch.cat([pv.double(), v], dim=2)
    g = H // Hkv
    k = k.repeat_interleave(g, dim=1)  # [B, H, P+Nk, D]
    v = v.repeat_interleave(g, dim=1)
    scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    vis = torch.ones(B, 1, Nq, P + Nk, dtype=torch.bool, device=q.device)
    pos = torch.arange(Nq, device=q.device)[:, None] + (Nk - Nq)  # [Nq, 1] query positions
    if causal:
        j = torch.arange(Nk, device=q.device)[None, :]
        vis[:, :, :, P:] = j <= pos
        if window is not None:
            vis[:, :, :, P:] &= j > pos - window
    if key_padding_mask is not None:
        vis[:, :, :, P:] &= key_padding_mask[:, None, None, :].to(q.device)
    if prefix_lengths is not None and P:
        entry = prefix_index.tolist() if prefix_index is not None else list(range(B))
        for b in range(B):
            vis[b, :, :, int(prefix_lengths[entry[b]]) : P] = False
    if window is not None and prefix_window == "sliding" and P:
        for b in range(B):
            L = P
            if prefix_lengths is not None:
                L = int(prefix_lengths[prefix_index[b] if prefix_index is not None else b])
            c = torch.arange(P, device=q.device)[None, :]
            vis[b, 0, :, :P] &= c - L > pos - window
    s = s.masked_fill(~vis, float("-inf"))
    if sinks is not None:  # the sink: one more column per head, always visible, no value
        col = sinks.double().to(q.device).view(1, H, 1, 1).expand(B, H, Nq, 1)
        p = torch.softmax(torch.cat([s, col], dim=-1), dim=-1)[..., :-1]
    else:
        any_vis = vis.any(dim=-1, keepdim=True)
        s = torch.where(any_vis, s, torch.zeros_like(s))
        p = torch.softmax(s, dim=-1) * any_vis  # rows with nothing visible -> 0
    if keep is not None:
        p = p * keep.double() / (1.0 - dropout_p)
    return torch.einsum("bhij,bhjd->bhid", p, v)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / max(||b||, tiny) in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))
