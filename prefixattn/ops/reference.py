"""Pure-PyTorch prefix attention: the CPU path and the semantics the kernel must match.

It computes scores against the prefix keys and the sequence keys separately (the prefix is
never concatenated with K/V; only the two score blocks are joined for one softmax), in
float32 for half-precision inputs. Autograd gives all five gradients. It is exact but
materialises the [B, H, Nq, P + Nk] score matrix, so it is for CPU work and for checking.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .call import N_TENSORS, AttentionCall
from .validation import PREFIX_BANK, PREFIX_NONE, AttnProblem, needed_blocks


def visible_mask(
    Nq: int,
    Nk: int,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    device: torch.device,
    window: int = 0,
    seqlens: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Which sequence keys each query sees: bool [B or 1, Nq, Nk], or None for all.

    Causal is aligned bottom-right: query i sees key j iff j <= i + (Nk - Nq); a sliding
    ``window`` W > 0 also needs j > i + (Nk - Nq) - W. ``seqlens`` int [B] (a KV-cache
    pool's ``cache_seqlens``): row b sees keys j < seqlens[b], its causal band (and
    window) aligned to seqlens[b] instead of Nk.
    """
    mask = None
    i = torch.arange(Nq, device=device)[:, None]
    j = torch.arange(Nk, device=device)[None, :]
    if seqlens is not None:
        n = seqlens.to(torch.int64)[:, None, None]  # [B, 1, 1]
        mask = j[None] < n  # [B, 1, Nk]
        if causal:
            last = i[None] + (n - Nq)  # [B, Nq, 1]: the last key each query sees
            mask = mask & (j[None] <= last)  # [B, Nq, Nk]
            if window:
                mask = mask & (j[None] > last - window)
    elif causal:
        mask = j <= i + (Nk - Nq)  # [Nq, Nk]
        if window:
            mask = mask & (j > i + (Nk - Nq) - window)
        mask = mask[None]  # [1, Nq, Nk]
    if key_padding_mask is not None:
        kpm = key_padding_mask[:, None, :]  # [B, 1, Nk]
        mask = kpm if mask is None else mask & kpm
    return mask


def prefix_visible(
    prefix_lengths: torch.Tensor, prefix_index: torch.Tensor | None, P: int
) -> torch.Tensor:
    """Which prefix keys each row sees: bool [B, P], key c visible iff c < its entry's length.

    ``prefix_lengths`` is int64 [T]; row b reads entry ``prefix_index[b]`` (bank) or b
    (per-row layout, ``prefix_index`` None).
    """
    rows = prefix_lengths if prefix_index is None else prefix_lengths[prefix_index]  # [B]
    return torch.arange(P, device=rows.device)[None, :] < rows[:, None]  # [B, P]


def gather_pages(
    pool: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor
) -> torch.Tensor:
    """A paged cache's rows made contiguous: pool [num_blocks, Hkv, block_size, D] ->
    [B, Hkv, max_blocks * block_size, D], row b's key j from block ``block_table[b, j //
    block_size]``. Entries past a row's last needed block read block 0 (masked anyway by
    ``cache_seqlens``), whatever they hold."""
    pages = gathered_blocks(pool, block_table, cache_seqlens)  # [B, M, Hkv, bs, D]
    B, M, Hkv, bs, D = pages.shape
    return pages.transpose(1, 2).reshape(B, Hkv, M * bs, D)  # [B, Hkv, M * bs, D]


def gathered_blocks(
    pool: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor
) -> torch.Tensor:
    """The rows' blocks, gathered whole: [B, M, Hkv, block_size, D] (contiguous copies of
    Hkv * block_size * D values each: a gather along a strided dim is several times slower
    on the CPU). Entries past a row's last needed block read block 0."""
    NB, Hkv, bs, D = pool.shape
    B, M = block_table.shape
    if NB == 0:  # no blocks at all (every row is empty): zeros of the row shape
        return pool.new_zeros(B, M, Hkv, bs, D)
    need = needed_blocks(block_table, cache_seqlens, bs)  # [B, M]
    ids = torch.where(need, block_table.to(torch.int64), 0)  # [B, M]
    return pool.index_select(0, ids.reshape(-1)).view(B, M, Hkv, bs, D)


def trim_pages(call: AttentionCall) -> AttentionCall:
    """A paged call on the CPU cut to the blocks its longest row needs: ``block_table``
    [B, M] -> [B, m] (and ``key_padding_mask`` to m * block_size keys), m = cdiv(max
    cache_seqlens, block_size). The torch backends gather (copy) every block a table
    names and attend to all of them: an engine's table is as wide as ``max_model_len``,
    its rows mostly much shorter. The call itself, unchanged, off the CPU (reading the
    lengths would be a device sync), under ``torch.compile`` (reading them would break the
    graph: the compiled engine step buckets the table's width instead) or when nothing can
    be cut."""
    bt, csl = call.block_table, call.cache_seqlens
    if bt is None or bt.device.type != "cpu" or csl is None or csl.numel() == 0:
        return call
    if torch.compiler.is_compiling():  # a traced step: its table width is its shape bucket
        return call
    bs, M = call.k.shape[2], bt.shape[1]
    m = max(1, -(-int(csl.max()) // bs))
    if m >= M:
        return call
    kpm = call.key_padding_mask
    return call._replace(
        block_table=bt[:, :m], key_padding_mask=None if kpm is None else kpm[:, : m * bs]
    )


def pool_rows(call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, v) [B, Hkv, Nk, D] of the call's rows: a KV-cache pool's slots gathered by
    ``cache_batch_idx``, or a paged cache's blocks by ``block_table`` (Nk = max_blocks *
    block_size; these torch backends copy; the Triton kernel reads in place)."""
    bt = call.block_table
    if bt is not None:
        csl = call.cache_seqlens
        return gather_pages(call.k, bt, csl), gather_pages(call.v, bt, csl)
    idx = call.cache_batch_idx
    if idx is None:
        return call.k, call.v
    idx = idx.to(torch.int64)
    return call.k.index_select(0, idx), call.v.index_select(0, idx)  # [B, Hkv, Nk, D]


def varlen_padded(call: AttentionCall) -> tuple[AttentionCall, torch.Tensor, torch.Tensor]:
    """Packed rows (``cu_seqlens_q``) as a padded call the other paths take: (the call with
    q [B, H, max_q, D] and no ``cu_seqlens_q``, row [total_q], col [total_q]). Row b's
    queries go to the *last* q_len_b places of its padded row, so the cache mode's
    alignment (query i at cache_seqlens[b] - max_q + i) puts them at their positions; the
    padding queries before them are computed and dropped. Query token t is at
    (row[t], col[t]). One host sync (the longest row): these are the CPU/reference paths."""
    q, cu = call.q, call.cu_seqlens_q.to(torch.int64)
    H, total, D = q.shape[1], q.shape[2], q.shape[3]
    lens = cu[1:] - cu[:-1]  # [B]
    B = lens.shape[0]
    max_q = int(lens.max()) if B else 0
    row = torch.repeat_interleave(torch.arange(B, device=q.device), lens, output_size=total)
    col = (max_q - lens)[row] + torch.arange(total, device=q.device) - cu[row]  # [total_q]
    qp = q.new_zeros(B, H, max_q, D)
    qp[row, :, col] = q[0].transpose(0, 1)  # [total_q, H, D] into [B, H, max_q, D]
    return call._replace(q=qp, cu_seqlens_q=None), row, col


def varlen_unpad(out: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """The padded output [B, H, max_q, D] back to the packed [1, H, total_q, D]."""
    return out[row, :, col].transpose(0, 1)[None]  # [total_q, H, D] -> [1, H, total_q, D]


def prefix_window_visible(
    Nq: int,
    Nk: int,
    P: int,
    window: int,
    prefix_lengths: torch.Tensor | None,
    prefix_index: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """``prefix_window="sliding"``: which prefix keys are still in each query's window,
    bool [B|1, Nq, P]. Prefix key c of a row that sees L of them sits at position c - L;
    query i (position i + Nk - Nq) sees it iff c - L > i + Nk - Nq - window."""
    pos = torch.arange(Nq, device=device)[None, :, None] + (Nk - Nq)  # [1, Nq, 1]
    c = torch.arange(P, device=device)[None, None, :]  # [1, 1, P]
    L = torch.full((1, 1, 1), P, device=device)
    if prefix_lengths is not None:
        rows = prefix_lengths if prefix_index is None else prefix_lengths[prefix_index]
        L = rows.to(device)[:, None, None]  # [B, 1, 1]
    return c - L > pos - window


def scaled_logits(s: torch.Tensor, prob: AttnProblem) -> torch.Tensor:
    """Raw scores q k^T -> logits: times ``prob.sm_scale``, then soft-capped
    (``C * tanh(s / C)``) when ``prob.softcap`` is set."""
    s = s * prob.sm_scale
    return prob.softcap * torch.tanh(s / prob.softcap) if prob.softcap else s


def safe_softmax(
    scores: torch.Tensor, sink: torch.Tensor | None = None, dropout_p: float = 0.0
) -> torch.Tensor:
    """Softmax over the last dim that gives an all-zero row (and zero gradients) where
    every score is -inf; ``sink``: one more logit per row (broadcast against
    ``scores[..., :1]``, e.g. [1, Hkv, G, 1, 1] for head h = hk * G + g) that takes
    probability and outputs nothing; ``dropout_p``: attention dropout on the result."""
    row_max = scores.amax(dim=-1, keepdim=True)
    if sink is not None:
        row_max = torch.maximum(row_max, sink)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(scores - row_max.detach())
    denom = e.sum(dim=-1, keepdim=True)
    if sink is not None:
        denom = denom + torch.exp(sink - row_max.detach())
    probs = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return probs


def reference_prefix_attention(call: AttentionCall, prob: AttnProblem) -> torch.Tensor:
    """Prefix attention in plain PyTorch ops (differentiable). ``call`` already validated
    (``prob``: its sizes and softmax scale).

    ``prefix_lengths`` (int64 [T], bank or per-row layouts): row b sees only the first
    ``prefix_lengths[entry(b)]`` prefix keys; the others are masked like padding.
    ``prob.window`` / ``prob.prefix_windowed`` (sliding window), ``prob.softcap``
    (logits C * tanh(s / C), before masking) and ``sinks`` [H] (one more logit per head
    in the denominator, no value) as :func:`prefixattn.prefix_attention` describes.
    """
    q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, sinks = call[
        :N_TENSORS
    ]
    k, v = pool_rows(call)
    causal, dropout_p = call.causal, float(call.dropout_p)
    B, H, Hkv, Nq, Nk, D = prob.B, prob.H, prob.Hkv, prob.Nq, prob.Nk, prob.D
    G = prob.group
    cdt = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qf = q.to(cdt).reshape(B, Hkv, G * Nq, D)  # [B, Hkv, G*Nq, D]: a GQA group shares K/V
    kf, vf = k.to(cdt), v.to(cdt)  # [B, Hkv, Nk, D]

    s_seq = scaled_logits(torch.matmul(qf, kf.transpose(-1, -2)).view(B, Hkv, G, Nq, Nk), prob)
    mask = visible_mask(Nq, Nk, causal, key_padding_mask, q.device, prob.window, call.cache_seqlens)
    if mask is not None:
        s_seq = s_seq.masked_fill(~mask[:, None, None], float("-inf"))  # [B|1, 1, 1, Nq, Nk]

    P = prob.P
    if prob.layout != PREFIX_NONE:  # P may be 0: the empty prefix still gets (empty) grads
        pk, pv = prefix_k.to(cdt), prefix_v.to(cdt)
        if prob.layout == PREFIX_BANK:
            pk, pv = pk[prefix_index], pv[prefix_index]  # [B, Hkv, P, D]
        # shared [Hkv, P, D] broadcasts over the batch; per-row/bank are [B, Hkv, P, D]
        s_pre = scaled_logits(torch.matmul(qf, pk.transpose(-1, -2)).view(B, Hkv, G, Nq, P), prob)
        if prefix_lengths is not None:
            s_pre = s_pre.masked_fill(
                ~prefix_visible(prefix_lengths, prefix_index, P)[:, None, None, None, :],
                float("-inf"),
            )  # [B, 1, 1, 1, P]: the row's invisible prefix keys
        if prob.prefix_windowed:
            pvis = prefix_window_visible(
                Nq, Nk, P, prob.window, prefix_lengths, prefix_index, q.device
            )  # [B|1, Nq, P]
            s_pre = s_pre.masked_fill(~pvis[:, None, None], float("-inf"))
        scores = torch.cat([s_pre, s_seq], dim=-1)  # [B, Hkv, G, Nq, P+Nk]
    else:
        scores = s_seq

    sink = None if sinks is None else sinks.to(cdt).view(1, Hkv, G, 1, 1)
    probs = safe_softmax(scores, sink, dropout_p)

    p_seq = probs[..., P:].reshape(B, Hkv, G * Nq, Nk)
    out = torch.matmul(p_seq, vf)  # [B, Hkv, G*Nq, D]
    if prob.layout != PREFIX_NONE:
        p_pre = probs[..., :P].reshape(B, Hkv, G * Nq, P)
        out = out + torch.matmul(p_pre, pv)
    return out.view(B, H, Nq, D).to(q.dtype)
