"""The ``sdpa`` backend's CPU path for a paged call (``block_table``), packed rows
(``cu_seqlens_q``) or not: rows grouped by their number of queries, one SDPA call per
group, the gather indices and masks computed once for every layer that shares them.

A serving step packs rows of different lengths into one call (decode rows with one query
each, prefill chunks with many)::

    cu_seqlens_q = [0, 1, 2, 3, 203]      rows 0-2 decode (1 query), row 3 a 200-token chunk
    group nq=1: rows [0, 1, 2], queries q[:, :, 0:3]   -> one SDPA call [3, H, 1, D]
    group nq=200: row [3], queries q[:, :, 3:203]      -> one SDPA call [1, H, 200, D]

Padding every row to the longest (what the generic varlen path of ``reference.py`` does)
would give each decode row 200 queries. A group's keys are one buffer [Bg, Hkv, P + m *
block_size, D]: each row's prefix (its bank entry, a shared or per-row prefix), then its
first m blocks gathered whole (m = the blocks the group's longest row needs); its mask
[Bg, 1, nq, P + m * block_size] hides the prefix keys past a row's ``prefix_lengths``, the
blocks past its ``cache_seqlens`` and what causality (aligned to the row's own length) and
the layer's window hide.

**Once per step, not per layer.** The groups, the block ids to gather and the masks depend
only on ``block_table`` / ``cache_seqlens`` / ``cu_seqlens_q`` (and, for the masks, on P,
the window and the prefix lengths), which every layer of a model's forward receives as the
same tensors. :func:`paged_rows` keeps the layout of the last tensors it saw (held, and
compared by identity and version: an in-place change makes a new layout), so a forward of
L layers computes it once and L - 1 layers reuse it. Inference tensors (no version
counter) get a new layout on every call.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .call import AttentionCall
from .validation import PREFIX_BANK, PREFIX_NONE, PREFIX_SHARED, AttnProblem

__all__ = ["PagedRows", "RowGroup", "paged_rows", "paged_sdpa_attention"]


@dataclass
class RowGroup:
    """Rows of a paged call with the same number of queries ``nq``.

    Attributes:
        rows: int64 [Bg], the rows of the call (in the call's order).
        nq: queries per row.
        q_span: (start, stop) of the group's queries in the packed q when they are
            consecutive there in row-major order (rows one after another), else None.
        tokens: int64 [Bg * nq], the group's packed query tokens (row-major), when
            ``q_span`` is None; None for an unpacked call (q [B, H, nq, D]).
        m: blocks gathered per row (the blocks its longest row needs, at least 1).
        block_ids: int64 [Bg * m], the pool blocks to gather (entries a row does not need:
            block 0, masked).
        seqlens: int64 [Bg], each row's keys (``cache_seqlens``).
        masks: (P, window, causal) -> (the prefix lengths and index tensors it was built
            for, with their versions; mask bool [Bg, 1, nq, P + m * bs]; whether some
            query sees no key).
    """

    rows: torch.Tensor
    nq: int
    q_span: tuple[int, int] | None
    tokens: torch.Tensor | None
    m: int
    block_ids: torch.Tensor
    seqlens: torch.Tensor
    masks: dict = field(default_factory=dict)
    entries: tuple | None = None  # (the index tensors, the rows' bank entries int64 [Bg])
    scratch: dict = field(default_factory=dict)  # the key / value buffers (see _keys)


@dataclass
class PagedRows:
    """The row layout of one paged call: its groups (see :class:`RowGroup`)."""

    B: int
    total_q: int  # queries of the packed call (B * Nq unpacked)
    block_size: int
    packed: bool  # cu_seqlens_q given: q is [1, H, total_q, D]
    groups: list[RowGroup]


_LOCK = threading.Lock()
# (tensors held, their versions, the geometry) -> layout: the last call's
_LAST: list[tuple[tuple, tuple, tuple, PagedRows]] = []


def _version(t: torch.Tensor | None) -> int | None:
    return None if t is None else t._version


def paged_rows(call: AttentionCall) -> PagedRows:
    """The row layout of a paged CPU call (cached for the same ``block_table``,
    ``cache_seqlens`` and ``cu_seqlens_q`` tensors, unchanged since: see the module doc).

    One host read of the lengths per layout (these are CPU tensors: no device sync)."""
    bt, csl, cu = call.block_table, call.cache_seqlens, call.cu_seqlens_q
    held = (bt, csl, cu)
    inference = any(t is not None and t.is_inference() for t in held)
    geometry = (call.k.shape[2], call.q.shape[2], call.q.shape[0])
    if not inference:
        versions = tuple(_version(t) for t in held)
        last = _LAST[0] if _LAST else None
        if (
            last is not None
            and all(a is b for a, b in zip(last[0], held))
            and last[1] == versions
            and last[2] == geometry
        ):
            return last[3]
    rows = _build(call)
    if not inference:
        with _LOCK:
            _LAST[:] = [(held, versions, geometry, rows)]
    return rows


def _build(call: AttentionCall) -> PagedRows:
    bt, csl, cu = call.block_table, call.cache_seqlens, call.cu_seqlens_q
    bs = call.k.shape[2]
    B = bt.shape[0]
    seqlens = csl.to(torch.int64).tolist()  # [B]
    if cu is not None:
        starts = cu.to(torch.int64).tolist()  # [B + 1]
        lens = [starts[b + 1] - starts[b] for b in range(B)]
        total = starts[B]
    else:
        nq = call.q.shape[2]
        lens, starts, total = [nq] * B, [b * nq for b in range(B + 1)], B * nq
    by_len: dict[int, list[int]] = {}
    for b, n in enumerate(lens):
        if n > 0:  # a row without queries outputs nothing
            by_len.setdefault(n, []).append(b)
    reads = [-(-n // bs) for n in seqlens]  # [B] the blocks each row reads (0: no key)
    need_blocks = [max(1, n) for n in reads]  # what its group gathers for it, at least 1
    table = bt.to(torch.int64)
    groups = []
    for nq, same in by_len.items():
        for rows in _split(same, need_blocks, nq):
            m = max(need_blocks[b] for b in rows)
            idx = torch.tensor(rows, dtype=torch.int64)
            sub = table.index_select(0, idx)[:, :m]  # [Bg, m]
            need = torch.arange(m)[None, :] < torch.tensor([reads[b] for b in rows])[:, None]
            ids = torch.where(need, sub, 0).reshape(-1)  # [Bg * m]; entries not read: block 0
            consecutive = all(starts[b] == starts[rows[0]] + i * nq for i, b in enumerate(rows))
            span = (starts[rows[0]], starts[rows[0]] + len(rows) * nq) if consecutive else None
            tokens = None
            if span is None:
                tokens = torch.tensor(
                    [starts[b] + i for b in rows for i in range(nq)], dtype=torch.int64
                )
            seq = torch.tensor([seqlens[b] for b in rows])
            groups.append(RowGroup(idx, nq, span, tokens, m, ids, seq))
    return PagedRows(B, total, bs, cu is not None, groups)


# the fixed cost of one more group (its ~15 tensor ops and an SDPA call), in units of
# one row's block of keys (gathered twice, attended by the row's queries): see _split
GROUP_COST = 12


def _split(rows: list[int], need: list[int], nq: int) -> list[list[int]]:
    """``rows`` (all with ``nq`` queries) cut into groups of similar length: every row of
    a group gathers and attends to as many blocks as its longest row, so one group of
    rows of 2 and 20 blocks does 2 x 20 blocks of work. Rows sorted by the blocks they
    need, then cut where it pays (dynamic programming over the sorted order: minimise
    sum over groups of rows x longest x (nq + 1) + GROUP_COST). One group when the rows
    are alike; within a group the rows keep the call's order."""
    if len(rows) == 1:
        return [rows]
    order = sorted(rows, key=lambda b: need[b])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[i]: cost of the first i sorted rows
    cut = [0] * (n + 1)
    for i in range(1, n + 1):
        longest = need[order[i - 1]]  # the longest of any group ending at row i - 1
        for j in range(i):
            c = best[j] + (i - j) * longest * (nq + 1) + GROUP_COST
            if c < best[i]:
                best[i], cut[i] = c, j
    out, i = [], n
    while i > 0:
        out.append(sorted(order[cut[i] : i]))  # the call's order inside a group
        i = cut[i]
    return out[::-1]


def _group_mask(
    g: RowGroup, bs: int, P: int, window: int, causal: bool, plen: torch.Tensor | None
) -> tuple[torch.Tensor, bool]:
    """(bool [Bg, 1, nq, P + m * bs], whether some query sees no key). ``plen`` int64
    [Bg]: the prefix keys each row sees (None: all P)."""
    N = g.m * bs
    nq = g.nq
    i = torch.arange(nq)[None, :, None]  # [1, nq, 1]
    j = torch.arange(N)[None, None, :]  # [1, 1, N]
    n = g.seqlens[:, None, None]  # [Bg, 1, 1]
    seq = j < n  # [Bg, 1, N]
    if causal:
        last = i + (n - nq)  # [Bg, nq, 1]: the last key each query sees
        seq = seq & (j <= last)
        if window:
            seq = seq & (j > last - window)
    Bg = g.rows.shape[0]
    seq = seq.expand(Bg, nq, N)
    if P:
        pre = torch.ones(Bg, nq, P, dtype=torch.bool)
        if plen is not None:
            pre = (torch.arange(P)[None, :] < plen[:, None])[:, None, :].expand(Bg, nq, P)
        seq = torch.cat([pre, seq], dim=-1)
    mask = seq[:, None]  # [Bg, 1, nq, P + N]
    return mask, not bool(mask.any(dim=-1).all())


def _keys(
    pool: torch.Tensor, prefix: torch.Tensor | None, g: RowGroup, bs: int, P: int, which: str
) -> torch.Tensor:
    """The group's keys (or values): [Bg, Hkv, P + m * bs, D], its rows' prefixes then
    their blocks (gathered whole, copied once into place). The buffers are the group's,
    reused by every layer (layers run one after another; the attention's output never
    aliases them; paged calls are inference only)."""
    Hkv, D = pool.shape[1], pool.shape[3]
    Bg = g.rows.shape[0]
    key = (which, pool.dtype, P if prefix is not None else -1)
    bufs = g.scratch.get(key)
    if bufs is None:
        tmp = pool.new_empty(Bg * g.m, Hkv, bs, D)
        out = None if prefix is None else pool.new_empty(Bg, Hkv, P + g.m * bs, D)
        bufs = g.scratch[key] = (tmp, out)
    tmp, out = bufs
    torch.index_select(pool, 0, g.block_ids, out=tmp)
    pages = tmp.view(Bg, g.m, Hkv, bs, D)
    if out is None:
        return pages.transpose(1, 2).reshape(Bg, Hkv, g.m * bs, D)
    out[:, :, :P] = prefix
    out[:, :, P:].view(Bg, Hkv, g.m, bs, D).copy_(pages.transpose(1, 2))
    return out


def paged_sdpa_attention(
    call: AttentionCall,
    prob: AttnProblem,
    attend: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """A paged call (``block_table``; packed with ``cu_seqlens_q`` or not; no
    ``key_padding_mask``, no dropout: inference) through ``attend`` (SDPA or a feature path
    with SDPA's signature), one call per row group. Returns the call's output shape:
    [1, H, total_q, D] packed, else [B, H, Nq, D]."""
    layout = paged_rows(call)
    q, bs, P = call.q, layout.block_size, prob.P
    H, D = prob.H, prob.D
    kw: dict = {"scale": prob.sm_scale}
    if prob.Hkv != H:
        kw["enable_gqa"] = True  # query head h reads kv head h // (H // Hkv)
    pidx, plens = call.prefix_index, call.prefix_lengths
    mask_key = (P, prob.window, bool(call.causal))
    # the masks also depend on the prefix lengths' tensors: held with the mask, compared
    # by identity and version
    lengths_of = (plens, _version(plens), pidx, _version(pidx))
    ragged = prob.layout != PREFIX_NONE and P > 0 and plens is not None
    groups = layout.groups
    # one group holding every query in order: its output is the call's (no copy)
    whole = len(groups) == 1 and (not layout.packed or groups[0].q_span == (0, layout.total_q))
    out = None
    if not whole:
        out = q.new_zeros(1, H, layout.total_q, D) if layout.packed else q.new_zeros(q.shape)
    for g in groups:
        Bg, nq = g.rows.shape[0], g.nq
        # the group's queries [Bg, H, nq, D]
        if not layout.packed:
            qg = q if Bg == layout.B else q.index_select(0, g.rows)
        elif g.q_span is not None:
            a, b = g.q_span
            qg = q[0, :, a:b].view(H, Bg, nq, D).transpose(0, 1)
        else:
            qg = q[0].index_select(1, g.tokens).view(H, Bg, nq, D).transpose(0, 1)
        pk = pv = None
        if prob.layout != PREFIX_NONE and P > 0:
            if prob.layout == PREFIX_SHARED:
                pk = call.prefix_k[None].expand(Bg, -1, -1, -1)
                pv = call.prefix_v[None].expand(Bg, -1, -1, -1)
            else:  # a bank (entries by prefix_index) or per-row prefixes
                rows = g.rows
                if prob.layout == PREFIX_BANK:
                    if g.entries is None or not _same(g.entries[0], lengths_of):
                        g.entries = (lengths_of, pidx.index_select(0, g.rows))
                    rows = g.entries[1]  # [Bg] the rows' bank entries
                pk = call.prefix_k.index_select(0, rows)  # [Bg, Hkv, P, D]
                pv = call.prefix_v.index_select(0, rows)
        k = _keys(call.k, pk, g, bs, P, "k")
        v = _keys(call.v, pv, g, bs, P, "v")
        hit = g.masks.get(mask_key)
        if hit is None or not _same(hit[0], lengths_of):
            plen = None
            if ragged:  # [Bg] the prefix keys each row sees
                plen = plens if pidx is None else plens.index_select(0, pidx)
                plen = plen.index_select(0, g.rows)
            built = _group_mask(g, bs, P, prob.window, call.causal, plen)
            hit = g.masks[mask_key] = (lengths_of, *built)
        _, mask, empty = hit
        if empty:  # a query that sees nothing: every key (finite), then output zeros
            seen = mask.any(dim=-1, keepdim=True)
            og = attend(qg, k, v, attn_mask=mask | ~seen, **kw).masked_fill(~seen, 0.0)
        else:
            og = attend(qg, k, v, attn_mask=mask, **kw)  # [Bg, H, nq, D]
        if whole:
            return og.transpose(0, 1).reshape(1, H, Bg * nq, D) if layout.packed else og
        if not layout.packed:
            out.index_copy_(0, g.rows, og)
        elif g.q_span is not None:
            a, b = g.q_span
            out[0, :, a:b].view(H, Bg, nq, D).copy_(og.transpose(0, 1))
        else:
            out[0].index_copy_(1, g.tokens, og.transpose(0, 1).reshape(H, Bg * nq, D))
    return out  # zeros where a row has no query


def _same(a: tuple, b: tuple) -> bool:
    """(tensor, version, tensor, version) tuples: the same tensors, unchanged."""
    return a[0] is b[0] and a[1] == b[1] and a[2] is b[2] and a[3] == b[3]
