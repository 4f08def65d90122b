"""Backward kernels of prefix attention.

With P = softmax(s) (rows over the prefix and sequence columns), Z the dropout keep mask
scaled by 1/(1-p) (all ones without dropout), O = (P*Z) V and dO the output gradient:

    Delta_i = rowsum(dO_i * O_i)
    dV_j    = sum_i (P*Z)_ij dO_i
    dP_ij   = (dO_i . V_j) Z_ij
    dS_ij   = P_ij (dP_ij - Delta_i)
    dQ_i    = sm_scale * sum_j dS_ij K_j          dK_j = sm_scale * sum_i dS_ij Q_i

P is recomputed from the forward's log2 logsumexp (LSE, +inf for an empty row, so P = 0
and every gradient of that row is 0). Soft-capping (HAS_SOFTCAP, logit c = C tanh(s / C))
multiplies dS by dc/ds = 1 - tanh^2(s / C). Sinks need nothing here: the LSE includes the
sink, so P is right, and a sink has no value, so Delta and dS are unchanged; the sink's own
gradient, dsink[h] = -sum_{b,i} exp(sink[h] - lse[b,h,i]) Delta[b,h,i], is a reduction
the autograd function computes from LSE, O and dO. The sliding window (HAS_WINDOW,
PREFIX_WINDOWED) masks and bounds the loops exactly as in the forward.

What one program computes (``@triton.jit`` helpers, inlined where they are called):

    _bwd_dkdv_program       dK, dV of one sequence key block of one (b, kv head), walking
                            the GQA group's heads and only the query blocks that see the
                            key block (on-band masked, then off-band unmasked)
    _bwd_dq_program         dQ of one query block of one (b, h): prefix, then sequence
    _bwd_prefix_program     fp32 partial dK, dV of one prefix block for one row and one
                            run ("split") of its queries

Kernels, in launch order. The split backward (large problems, GPU-bound):

    _attn_bwd_preprocess    Delta, one program per (query block, b*h)
    _attn_bwd (KIND=BWD_DKDV)     one _bwd_dkdv_program per program   (each of the three
    _attn_bwd (KIND=BWD_DQ)       one _bwd_dq_program per program      autotuned on its
    _attn_bwd (KIND=BWD_PREFIX)   one _bwd_prefix_program per program  own)
    _prefix_grad_reduce     sums the partials of the rows that use each prefix entry, in
                            a fixed order: bitwise reproducible, no atomics

(``csrc_triton`` also names the three split launches ``_attn_bwd_dkdv``, ``_attn_bwd_dq``
and ``_attn_bwd_prefix_dkdv``: the same kernel, one parameter list.)

The fused backward (small problems, where the host's launches cost more than the GPU's
work): ``_attn_bwd`` (KIND=BWD_FUSED) runs all three kinds of program in one launch and,
without HAS_DELTA, each program computes the Delta it needs from O and dO itself (no
pre-pass); then ``_prefix_grad_reduce``, unless each prefix entry has exactly one partial
(a per-row prefix in one query split), which the prefix programs then write directly as
the gradient. A backward is 1 or 2 launches.
"""

import triton
import triton.language as tl

from .prefix_attention_fwd import (
    PREFIX_BANK,
    PREFIX_PER_ROW,
    _causal_bounds,
    _dropout_keep,
    _logits,
    _prefix_entry,
    _prefix_len,
    _score_scale,
    _window_bounds,
)

# What one launch of ``_attn_bwd`` runs (its KIND constexpr): the fused backward, or one
# of the split backward's three kernels
BWD_FUSED: tl.constexpr = tl.constexpr(0)
BWD_DKDV: tl.constexpr = tl.constexpr(1)
BWD_DQ: tl.constexpr = tl.constexpr(2)
BWD_PREFIX: tl.constexpr = tl.constexpr(3)


@triton.jit
def _row_delta(Delta, O, do, offs_m, offs_d, m_ok, d_ok, D: tl.constexpr, HAS_DELTA: tl.constexpr):
    """Delta of query rows ``offs_m`` [BLOCK_M] fp32: read from the pre-pass's Delta, or
    (HAS_DELTA False) computed as rowsum(dO * O) from the loaded dO tile [BLOCK_M, BLOCK_D]
    and O, a contiguous [Nq, D] output of one (b, h), which saves the pre-pass's launch."""
    if HAS_DELTA:
        delta = tl.load(Delta + offs_m, mask=m_ok, other=0.0)
    else:
        o = tl.load(
            O + offs_m[:, None].to(tl.int64) * D + offs_d[None, :],
            mask=m_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    return delta


@triton.jit
def _attn_bwd_preprocess(
    O,
    DO,
    Delta,
    stride_oz,
    stride_oh,
    stride_om,
    stride_od,
    stride_doz,
    stride_doh,
    stride_dom,
    stride_dod,
    H,
    N_Q,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Delta[b, h, i] = sum_d O[b, h, i, d] * dO[b, h, i, d] in fp32.

    Grid: (cdiv(Nq, BLOCK_M), B * H); one program does BLOCK_M rows of one (b, h).
    """
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    msk = (offs_m[:, None] < N_Q) & (offs_d[None, :] < D)
    rows = offs_m[:, None].to(tl.int64)
    o = tl.load(
        O + off_b * stride_oz + off_h * stride_oh + rows * stride_om + offs_d[None, :] * stride_od,
        mask=msk,
        other=0.0,
    ).to(tl.float32)
    do = tl.load(
        DO
        + off_b * stride_doz
        + off_h * stride_doh
        + rows * stride_dom
        + offs_d[None, :] * stride_dod,
        mask=msk,
        other=0.0,
    ).to(tl.float32)
    tl.store(Delta + off_bh.to(tl.int64) * N_Q + offs_m, tl.sum(o * do, 1), mask=offs_m < N_Q)


@triton.jit
def _attn_bwd_kv_inner(
    dk,
    dv,
    k,
    v,
    Q,
    DO,
    LSE,
    Delta,
    O,
    stride_qm,
    stride_qd,
    stride_dom,
    stride_dod,
    lo,
    hi,
    cols,
    key_real,
    N_Q,
    causal_off,
    qk_scale,
    seed,
    drop_base,
    n_tot,
    col_base,
    dropout_p,
    window,
    softcap,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    MASK_CAUSAL: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    MASK_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """Accumulate dK, dV [BLOCK_N, BLOCK_D] of one key block over query blocks [lo, hi).

    Works in the transposed orientation (as the Triton tutorial does): q is loaded as
    q^T [BLOCK_D, BLOCK_M] and the score tile is s^T = k q^T [BLOCK_N, BLOCK_M], so no
    computed tile is ever transposed before a dot. Q, DO point at query 0 of this (b, h);
    LSE, Delta at this (b, h)'s row vector. Out-of-range query rows load q = dO = 0 and
    LSE = +inf, so they contribute nothing. Without HAS_DELTA (fused backward), Delta_i =
    rowsum(dO_i * O_i) is computed here from O, this (b, h)'s contiguous [Nq, D] output.
    """
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        m_ok = offs_m < N_Q
        rows = offs_m.to(tl.int64)
        qT = tl.load(
            Q + rows[None, :] * stride_qm + offs_d[:, None] * stride_qd,
            mask=m_ok[None, :] & d_ok[:, None],
            other=0.0,
        )  # [BLOCK_D, BLOCK_M]
        do = tl.load(
            DO + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod,
            mask=m_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_D]
        lse = tl.load(LSE + offs_m, mask=m_ok, other=float("inf"))
        delta = _row_delta(Delta, O, do, offs_m, offs_d, m_ok, d_ok, D, HAS_DELTA)
        sT, tT = _logits(
            tl.dot(k, qT, input_precision=INPUT_PRECISION), qk_scale, softcap, HAS_SOFTCAP
        )  # [N, M]
        pT = tl.exp2(sT - lse[None, :])
        if MASK_CAUSAL:
            pT = tl.where(cols[:, None] <= offs_m[None, :] + causal_off, pT, 0.0)
        if MASK_WINDOW:
            pT = tl.where(cols[:, None] > offs_m[None, :] + causal_off - window, pT, 0.0)
        if HAS_KEY_MASK:
            pT = tl.where(key_real[:, None], pT, 0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)  # [N, M]
        if HAS_DROPOUT:
            keep = (
                tl.rand(seed, (drop_base + rows)[None, :] * n_tot + (col_base + cols)[:, None])
                >= dropout_p
            )
            inv_keep = 1.0 / (1.0 - dropout_p)
            pzT = tl.where(keep, pT * inv_keep, 0.0)
            dpT = tl.where(keep, dpT * inv_keep, 0.0)
        else:
            pzT = pT
        dv = tl.dot(pzT.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        if HAS_SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=INPUT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_program(
    start_n,
    off_b,
    off_hk,
    q,
    k,
    v,
    do,
    kpm,
    dk,
    DV,
    LSE,
    Delta,
    O,
    sizes,
    scalars,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """dK, dV of sequence keys [start_n, start_n + BLOCK_N) of kv head ``off_hk`` of row
    ``off_b``, summed over the GROUP query heads that share it and every query that sees
    them: with causal alignment, query i sees key j iff i >= j - (Nk - Nq), so the walk
    starts at the first such query block, masks the on-band blocks and runs the rest
    unmasked; with HAS_WINDOW the walk stops after the last query whose window still
    holds a key of the block (masking the queries on the window's edge). DK and DV share
    strides (both are allocated contiguous [B, Hkv, Nk, D]).
    Tensor arguments are bundles (see :func:`_attn_bwd`).
    """
    Q, stride_qz, stride_qh, stride_qm, stride_qd = q
    K, stride_kz, stride_kh, stride_kn, stride_kd = k
    V, stride_vz, stride_vh, stride_vn, stride_vd = v
    DO, stride_doz, stride_doh, stride_dom, stride_dod = do
    KPM, stride_kpmz, stride_kpmn = kpm
    DK, stride_dkz, stride_dkh, stride_dkn, stride_dkd = dk
    H, _, GROUP, N_Q, N_K, N_P = sizes  # HKV: not read here
    sm_scale, dropout_p, seed, window, softcap = scalars
    b64 = off_b.to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < N_K
    ld = n_ok[:, None] & (offs_d[None, :] < D)
    rows_n = offs_n[:, None].to(tl.int64)
    k = tl.load(
        K + b64 * stride_kz + off_hk.to(tl.int64) * stride_kh + rows_n * stride_kn
        + offs_d[None, :] * stride_kd,
        mask=ld, other=0.0,
    )  # fmt: skip
    v = tl.load(
        V + b64 * stride_vz + off_hk.to(tl.int64) * stride_vh + rows_n * stride_vn
        + offs_d[None, :] * stride_vd,
        mask=ld, other=0.0,
    )  # fmt: skip
    key_real = n_ok
    if HAS_KPM:
        real = tl.load(KPM + b64 * stride_kpmz + offs_n * stride_kpmn, mask=n_ok, other=0)
        key_real = real != 0

    causal_off = N_K - N_Q
    if IS_CAUSAL:
        first = tl.maximum(start_n - causal_off, 0)  # first query that sees key start_n
        band_lo = (first // BLOCK_M) * BLOCK_M
        # from this query on, every key of the block is visible
        full = tl.maximum(start_n + BLOCK_N - 1 - causal_off, 0)
        q_end = ((N_Q + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
        band_hi = tl.minimum(((full + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, q_end)
        band_hi = tl.maximum(band_hi, band_lo)
    else:
        band_lo = 0
        band_hi = 0
    if HAS_WINDOW:
        # queries before w_full see every key of the block inside their window, queries
        # from w_end on see none of them
        q_end = ((N_Q + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
        w_full = (tl.maximum(start_n - causal_off + window, 0) // BLOCK_M) * BLOCK_M
        w_full = tl.minimum(tl.maximum(w_full, band_hi), q_end)
        w_end = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_off + window, 0), BLOCK_M)
        w_end = tl.maximum(tl.minimum(w_end * BLOCK_M, q_end), w_full)
    else:
        w_full = N_Q
        w_end = N_Q

    qk_scale = _score_scale(sm_scale, softcap, HAS_SOFTCAP)
    n_tot = N_P + N_K
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(GROUP):
        off_h = off_hk * GROUP + g
        off_bh = off_b * H + off_h
        q_ptr = Q + b64 * stride_qz + off_h.to(tl.int64) * stride_qh
        do_ptr = DO + b64 * stride_doz + off_h.to(tl.int64) * stride_doh
        lse_ptr = LSE + off_bh.to(tl.int64) * N_Q
        delta_ptr = Delta + off_bh.to(tl.int64) * N_Q
        o_ptr = O + off_bh.to(tl.int64) * N_Q * D
        drop_base = off_bh.to(tl.int64) * N_Q
        if IS_CAUSAL:
            dk, dv = _attn_bwd_kv_inner(
                dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, o_ptr,
                stride_qm, stride_qd, stride_dom, stride_dod,
                band_lo, band_hi, offs_n, key_real, N_Q, causal_off, qk_scale,
                seed, drop_base, n_tot, N_P, dropout_p, window, softcap,
                D, BLOCK_D, BLOCK_M, True, HAS_KPM, HAS_DROPOUT, INPUT_PRECISION, HAS_DELTA,
                HAS_WINDOW, HAS_SOFTCAP,
            )  # fmt: skip
        dk, dv = _attn_bwd_kv_inner(
            dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, o_ptr,
            stride_qm, stride_qd, stride_dom, stride_dod,
            band_hi, w_full, offs_n, key_real, N_Q, causal_off, qk_scale,
            seed, drop_base, n_tot, N_P, dropout_p, window, softcap,
            D, BLOCK_D, BLOCK_M, False, HAS_KPM, HAS_DROPOUT, INPUT_PRECISION, HAS_DELTA,
            False, HAS_SOFTCAP,
        )  # fmt: skip
        if HAS_WINDOW:  # the queries on the window's edge
            dk, dv = _attn_bwd_kv_inner(
                dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, o_ptr,
                stride_qm, stride_qd, stride_dom, stride_dod,
                w_full, w_end, offs_n, key_real, N_Q, causal_off, qk_scale,
                seed, drop_base, n_tot, N_P, dropout_p, window, softcap,
                D, BLOCK_D, BLOCK_M, False, HAS_KPM, HAS_DROPOUT, INPUT_PRECISION, HAS_DELTA,
                True, HAS_SOFTCAP,
            )  # fmt: skip

    dk = dk * sm_scale
    out_off = b64 * stride_dkz + off_hk.to(tl.int64) * stride_dkh + rows_n * stride_dkn
    out_off = out_off + offs_d[None, :] * stride_dkd
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=ld)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=ld)


@triton.jit
def _attn_bwd_dq_inner(
    dq,
    q,
    do,
    lse,
    delta,
    K,
    V,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    KPM,
    stride_kpmn,
    lo,
    hi,
    n_valid,
    causal_off,
    offs_m,
    qk_scale,
    seed,
    drop_rows,
    col_base,
    dropout_p,
    window,
    softcap,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_BOUNDS: tl.constexpr,
    MASK_CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    MASK_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """Accumulate dQ [BLOCK_M, BLOCK_D] (without sm_scale) over key blocks [lo, hi)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_ok = d_ok[None, :]
        if MASK_BOUNDS:
            kv_ok = kv_ok & (cols[:, None] < n_valid)
        k = tl.load(
            K + cols[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kd,
            mask=kv_ok,
            other=0.0,
        )
        v = tl.load(
            V + cols[:, None].to(tl.int64) * stride_vn + offs_d[None, :] * stride_vd,
            mask=kv_ok,
            other=0.0,
        )
        qk, t = _logits(
            tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION), qk_scale, softcap,
            HAS_SOFTCAP,
        )  # fmt: skip
        p = tl.exp2(qk - lse[:, None])
        if MASK_BOUNDS:
            p = tl.where(cols[None, :] < n_valid, p, 0.0)
        if MASK_CAUSAL:
            p = tl.where(cols[None, :] <= offs_m[:, None] + causal_off, p, 0.0)
        if MASK_WINDOW:
            p = tl.where(cols[None, :] > offs_m[:, None] + causal_off - window, p, 0.0)
        if HAS_KPM:
            real = tl.load(KPM + cols * stride_kpmn, mask=cols < n_valid, other=0)
            p = tl.where(real[None, :] != 0, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, drop_rows, col_base + cols, dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_program(
    start_m,
    off_b,
    off_h,
    q,
    k,
    v,
    pk,
    pv,
    PIDX,
    PLEN,
    kpm,
    do,
    LSE,
    Delta,
    O,
    dq_out,
    sizes,
    scalars,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    PREFIX_MODE: tl.constexpr,
    HAS_PLEN: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    PREFIX_WINDOWED: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """dQ of queries [start_m, start_m + BLOCK_M) of query head ``off_h`` of row
    ``off_b``: the same key stages as the forward (prefix, off-band, on-band). Tensor
    arguments are bundles (see :func:`_attn_bwd`)."""
    Q, stride_qz, stride_qh, stride_qm, stride_qd = q
    K, stride_kz, stride_kh, stride_kn, stride_kd = k
    V, stride_vz, stride_vh, stride_vn, stride_vd = v
    PK, stride_pkz, stride_pkh, stride_pkn, stride_pkd = pk
    PV, stride_pvz, stride_pvh, stride_pvn, stride_pvd = pv
    KPM, stride_kpmz, stride_kpmn = kpm
    DO, stride_doz, stride_doh, stride_dom, stride_dod = do
    DQ, stride_dqz, stride_dqh, stride_dqm, stride_dqd = dq_out
    H, _, GROUP, N_Q, N_K, N_P = sizes  # HKV: not read here
    sm_scale, dropout_p, seed, window, softcap = scalars
    off_hk = off_h // GROUP
    off_bh = off_b * H + off_h
    b64 = off_b.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N_Q
    ld = m_ok[:, None] & (offs_d[None, :] < D)
    rows = offs_m[:, None].to(tl.int64)
    q = tl.load(
        Q + b64 * stride_qz + off_h.to(tl.int64) * stride_qh + rows * stride_qm
        + offs_d[None, :] * stride_qd,
        mask=ld, other=0.0,
    )  # fmt: skip
    do = tl.load(
        DO + b64 * stride_doz + off_h.to(tl.int64) * stride_doh + rows * stride_dom
        + offs_d[None, :] * stride_dod,
        mask=ld, other=0.0,
    )  # fmt: skip
    lse = tl.load(LSE + off_bh.to(tl.int64) * N_Q + offs_m, mask=m_ok, other=float("inf"))
    delta = _row_delta(
        Delta + off_bh.to(tl.int64) * N_Q, O + off_bh.to(tl.int64) * N_Q * D, do,
        offs_m, offs_d, m_ok, offs_d < D, D, HAS_DELTA,
    )  # fmt: skip

    qk_scale = _score_scale(sm_scale, softcap, HAS_SOFTCAP)
    n_tot = N_P + N_K
    drop_rows = (off_bh.to(tl.int64) * N_Q + offs_m) * n_tot
    causal_off = N_K - N_Q
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if PREFIX_MODE != 0:
        entry = _prefix_entry(PIDX, off_b, PREFIX_MODE)
        P_row = _prefix_len(PLEN, entry, N_P, HAS_PLEN)  # keys [0, P_row) are visible
        pk = PK + entry * stride_pkz + off_hk.to(tl.int64) * stride_pkh
        pv = PV + entry * stride_pvz + off_hk.to(tl.int64) * stride_pvh
        p_lo = 0
        if PREFIX_WINDOWED:  # prefix key c sits at position c - P_row (see the forward)
            p_lo = (tl.maximum(start_m + causal_off + P_row - window + 1, 0) // BLOCK_N) * BLOCK_N
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse, delta, pk, pv, stride_pkn, stride_pkd, stride_pvn, stride_pvd,
            KPM, stride_kpmn, p_lo, P_row, P_row, causal_off + P_row, offs_m, qk_scale,
            seed, drop_rows, 0, dropout_p, window, softcap,
            D, BLOCK_D, BLOCK_N, True, False, False, HAS_DROPOUT, INPUT_PRECISION,
            PREFIX_WINDOWED, HAS_SOFTCAP,
        )  # fmt: skip
    k_base = K + b64 * stride_kz + off_hk.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vz + off_hk.to(tl.int64) * stride_vh
    kpm_base = KPM + b64 * stride_kpmz
    full_hi, hi = _causal_bounds(start_m, causal_off, N_K, BLOCK_M, BLOCK_N, IS_CAUSAL)
    lo, full_lo = _window_bounds(start_m, causal_off, window, full_hi, BLOCK_M, BLOCK_N, HAS_WINDOW)
    if HAS_WINDOW:  # the window's left edge
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
            kpm_base, stride_kpmn, lo, full_lo, N_K, causal_off, offs_m, qk_scale,
            seed, drop_rows, N_P, dropout_p, window, softcap,
            D, BLOCK_D, BLOCK_N, False, False, HAS_KPM, HAS_DROPOUT, INPUT_PRECISION,
            True, HAS_SOFTCAP,
        )  # fmt: skip
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        kpm_base, stride_kpmn, full_lo, full_hi, N_K, causal_off, offs_m, qk_scale,
        seed, drop_rows, N_P, dropout_p, window, softcap,
        D, BLOCK_D, BLOCK_N, False, False, HAS_KPM, HAS_DROPOUT, INPUT_PRECISION,
        False, HAS_SOFTCAP,
    )  # fmt: skip
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        kpm_base, stride_kpmn, full_hi, hi, N_K, causal_off, offs_m, qk_scale,
        seed, drop_rows, N_P, dropout_p, window, softcap,
        D, BLOCK_D, BLOCK_N, True, IS_CAUSAL, HAS_KPM, HAS_DROPOUT, INPUT_PRECISION,
        HAS_WINDOW, HAS_SOFTCAP,
    )  # fmt: skip
    dq = dq * sm_scale
    dq_ptrs = (
        DQ + b64 * stride_dqz + off_h.to(tl.int64) * stride_dqh + rows * stride_dqm
        + offs_d[None, :] * stride_dqd
    )  # fmt: skip
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=ld)


@triton.jit
def _bwd_prefix_program(
    start_n,
    off_b,
    off_hk,
    split,
    n_split,
    q,
    pk,
    pv,
    PIDX,
    PLEN,
    do,
    LSE,
    Delta,
    O,
    DPK,
    DPV,
    sizes,
    scalars,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PREFIX_MODE: tl.constexpr,
    HAS_PLEN: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    PREFIX_WINDOWED: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """fp32 partial dK, dV of prefix keys [start_n, start_n + BLOCK_N) of the entry row
    ``off_b`` reads, kv head ``off_hk``: the sum over the GROUP heads of that kv head and
    the ``split``-th of ``n_split`` equal runs of query blocks of row b (no causal mask:
    every query sees every prefix key, unless PREFIX_WINDOWED: then the walk stops after
    the last query whose window holds a key of the block). Written to DPK/DPV[(b * n_split + split), hk,
    start_n:start_n+BLOCK_N, :], contiguous [B * n_split, Hkv, P, D], in DPK's dtype; no
    two programs write the same element, so nothing is atomic. With n_split = 1 and one row
    per entry (a per-row prefix) that is the prefix gradient itself, and the launcher
    passes the gradient tensors as DPK/DPV. Tensor arguments are bundles (see
    :func:`_attn_bwd`).
    """
    Q, stride_qz, stride_qh, stride_qm, stride_qd = q
    PK, stride_pkz, stride_pkh, stride_pkn, stride_pkd = pk
    PV, stride_pvz, stride_pvh, stride_pvn, stride_pvd = pv
    DO, stride_doz, stride_doh, stride_dom, stride_dod = do
    H, HKV, GROUP, N_Q, N_K, N_P = sizes
    sm_scale, dropout_p, seed, window, softcap = scalars
    b64 = off_b.to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    ld = (offs_n[:, None] < N_P) & (offs_d[None, :] < D)
    entry = _prefix_entry(PIDX, off_b, PREFIX_MODE)
    P_row = _prefix_len(PLEN, entry, N_P, HAS_PLEN)  # keys [0, P_row) are visible
    vis = offs_n < P_row  # invisible keys get zero partials (written, masked by ld)
    rows_n = offs_n[:, None].to(tl.int64)
    k = tl.load(
        PK + entry * stride_pkz + off_hk.to(tl.int64) * stride_pkh + rows_n * stride_pkn
        + offs_d[None, :] * stride_pkd,
        mask=ld & vis[:, None], other=0.0,
    )  # fmt: skip
    v = tl.load(
        PV + entry * stride_pvz + off_hk.to(tl.int64) * stride_pvh + rows_n * stride_pvn
        + offs_d[None, :] * stride_pvd,
        mask=ld & vis[:, None], other=0.0,
    )  # fmt: skip
    q_per_split = tl.cdiv(tl.cdiv(N_Q, BLOCK_M), n_split) * BLOCK_M
    q_lo = split * q_per_split
    q_hi = tl.minimum(q_lo + q_per_split, N_Q)
    q_stop = q_hi
    p_off = N_K - N_Q + P_row  # PREFIX_WINDOWED: query i sees key c iff c > i + p_off - window
    if PREFIX_WINDOWED:
        q_stop = tl.maximum(tl.minimum(q_hi, start_n + BLOCK_N - 1 - p_off + window), q_lo)
    qk_scale = _score_scale(sm_scale, softcap, HAS_SOFTCAP)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(GROUP):
        off_h = off_hk * GROUP + g
        off_bh = off_b * H + off_h
        dk, dv = _attn_bwd_kv_inner(
            dk, dv, k, v,
            Q + b64 * stride_qz + off_h.to(tl.int64) * stride_qh,
            DO + b64 * stride_doz + off_h.to(tl.int64) * stride_doh,
            LSE + off_bh.to(tl.int64) * N_Q, Delta + off_bh.to(tl.int64) * N_Q,
            O + off_bh.to(tl.int64) * N_Q * D,
            stride_qm, stride_qd, stride_dom, stride_dod,
            q_lo, q_stop, offs_n, vis, q_hi, p_off, qk_scale,
            seed, off_bh.to(tl.int64) * N_Q, N_P + N_K, 0, dropout_p, window, softcap,
            D, BLOCK_D, BLOCK_M, False, HAS_PLEN, HAS_DROPOUT, INPUT_PRECISION, HAS_DELTA,
            PREFIX_WINDOWED, HAS_SOFTCAP,
        )  # fmt: skip
    dk = dk * sm_scale
    part = (b64 * n_split + split) * HKV + off_hk
    out_off = (part * N_P + rows_n) * D + offs_d[None, :]
    tl.store(DPK + out_off, dk.to(DPK.dtype.element_ty), mask=ld)
    tl.store(DPV + out_off, dv.to(DPV.dtype.element_ty), mask=ld)


@triton.jit(do_not_specialize=["seed"])
def _attn_bwd(
    Q,
    K,
    V,
    PK,
    PV,
    PIDX,
    PLEN,
    KPM,
    DO,
    LSE,
    Delta,
    O,
    DQ,
    DK,
    DV,
    DPK,
    DPV,
    stride_qz,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kz,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vz,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_pkz,
    stride_pkh,
    stride_pkn,
    stride_pkd,
    stride_pvz,
    stride_pvh,
    stride_pvn,
    stride_pvd,
    stride_kpmz,
    stride_kpmn,
    stride_doz,
    stride_doh,
    stride_dom,
    stride_dod,
    stride_dqz,
    stride_dqh,
    stride_dqm,
    stride_dqd,
    stride_dkz,
    stride_dkh,
    stride_dkn,
    stride_dkd,
    H,
    HKV,
    GROUP,
    N_Q,
    N_K,
    N_P,
    sm_scale,
    dropout_p,
    seed,
    window,
    softcap,
    TUNE_NQ,
    TUNE_NK,
    NEED_KV,
    NEED_DQ,
    N_PREFIX_PROGS,
    N_SPLIT,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M2: tl.constexpr,
    BLOCK_N2: tl.constexpr,
    BLOCK_NP: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    PREFIX_MODE: tl.constexpr,
    HAS_PLEN: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    KIND: tl.constexpr,
    HAS_WINDOW: tl.constexpr = False,
    PREFIX_WINDOWED: tl.constexpr = False,
    HAS_SOFTCAP: tl.constexpr = False,
):
    """Every backward program but Delta's pre-pass and the prefix reduce: the fused
    backward (``KIND`` = BWD_FUSED, one launch) and the split backward's three kernels
    (BWD_DKDV, BWD_DQ, BWD_PREFIX, each its own launch and autotuned config), so that
    one parameter list serves them all.

    The programs take *bundles*: a tensor's pointer with its strides over [Z, H, N, D]
    (``q = (Q, stride_qz, stride_qh, stride_qm, stride_qd)``; the key mask
    ``(KPM, stride_kpmz, stride_kpmn)``), ``sizes = (H, HKV, GROUP, N_Q, N_K, N_P)`` and
    ``scalars = (sm_scale, dropout_p, seed, window, softcap)``. Grids, by KIND:

    BWD_DKDV (cdiv(Nk, BLOCK_N), B * Hkv): program (n, b*Hkv + hk) is
        :func:`_bwd_dkdv_program` for key block n of kv head hk of row b.
    BWD_DQ (cdiv(Nq, BLOCK_M), B * H): program (m, b*H + h) is :func:`_bwd_dq_program`
        for query block m of head h of row b.
    BWD_PREFIX (cdiv(P, BLOCK_N), B * Hkv, S): program (n, b*Hkv + hk, s) is
        :func:`_bwd_prefix_program` for prefix block n, kv head hk, row b, query split s.
    BWD_FUSED (B * Hkv, N_PREFIX_PROGS + n_kv + n_dq), n_kv = NEED_KV * cdiv(Nk,
        BLOCK_N), n_dq = NEED_DQ * cdiv(Nq, BLOCK_M2). Program (b*Hkv + hk, j) is, by j:

        [0, N_PREFIX_PROGS)       prefix partials: block j // N_SPLIT (BLOCK_NP keys),
                                  split j % N_SPLIT, query tiles of BLOCK_M
        [.., + n_kv)              dK, dV of sequence key block j - N_PREFIX_PROGS
                                  (BLOCK_N keys, query tiles of BLOCK_M)
        [.., + n_dq)              dQ of one query block (BLOCK_M2 queries, key tiles of
                                  BLOCK_N2) for each of the GROUP heads of kv head hk

    The fused programs are the split kernels' (same math, still no atomics); one launch
    instead of four saves host time, and the three kinds run side by side on the GPU.
    Without HAS_DELTA every program computes Delta = rowsum(dO * O) of the query rows it
    loads from O (the forward's output, contiguous [B, H, Nq, D]) instead of reading a
    pre-pass's (the split kinds always have one). Long programs come first: prefix
    programs walk every query (of their split), key block 0 is seen by every query, and
    dQ runs from the last query block (which sees the most keys) down. NEED_KV, NEED_DQ,
    N_PREFIX_PROGS, N_SPLIT and BLOCK_M2, BLOCK_N2, BLOCK_NP are the fused kind's only.
    """
    q = (Q, stride_qz, stride_qh, stride_qm, stride_qd)
    k = (K, stride_kz, stride_kh, stride_kn, stride_kd)
    v = (V, stride_vz, stride_vh, stride_vn, stride_vd)
    pk = (PK, stride_pkz, stride_pkh, stride_pkn, stride_pkd)
    pv = (PV, stride_pvz, stride_pvh, stride_pvn, stride_pvd)
    kpm = (KPM, stride_kpmz, stride_kpmn)
    do = (DO, stride_doz, stride_doh, stride_dom, stride_dod)
    dq = (DQ, stride_dqz, stride_dqh, stride_dqm, stride_dqd)
    dk = (DK, stride_dkz, stride_dkh, stride_dkn, stride_dkd)
    sizes = (H, HKV, GROUP, N_Q, N_K, N_P)
    scalars = (sm_scale, dropout_p, seed, window, softcap)
    if KIND == BWD_DQ:
        off_bh = tl.program_id(1)
        _bwd_dq_program(
            tl.program_id(0) * BLOCK_M, off_bh // H, off_bh % H,
            q, k, v, pk, pv, PIDX, PLEN, kpm, do, LSE, Delta, O, dq, sizes, scalars,
            D, BLOCK_D, BLOCK_M, BLOCK_N, IS_CAUSAL, PREFIX_MODE, HAS_PLEN, HAS_KPM,
            HAS_DROPOUT, INPUT_PRECISION, HAS_DELTA, HAS_WINDOW, PREFIX_WINDOWED, HAS_SOFTCAP,
        )  # fmt: skip
    elif KIND == BWD_DKDV:
        off_bhk = tl.program_id(1)
        _bwd_dkdv_program(
            tl.program_id(0) * BLOCK_N, off_bhk // HKV, off_bhk % HKV,
            q, k, v, do, kpm, dk, DV, LSE, Delta, O, sizes, scalars,
            D, BLOCK_D, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_KPM, HAS_DROPOUT, INPUT_PRECISION,
            HAS_DELTA, HAS_WINDOW, HAS_SOFTCAP,
        )  # fmt: skip
    elif KIND == BWD_PREFIX:
        off_bhk = tl.program_id(1)
        _bwd_prefix_program(
            tl.program_id(0) * BLOCK_N, off_bhk // HKV, off_bhk % HKV,
            tl.program_id(2), tl.num_programs(2),
            q, pk, pv, PIDX, PLEN, do, LSE, Delta, O, DPK, DPV, sizes, scalars,
            D, BLOCK_D, BLOCK_M, BLOCK_N, PREFIX_MODE, HAS_PLEN, HAS_DROPOUT, INPUT_PRECISION,
            HAS_DELTA, PREFIX_WINDOWED, HAS_SOFTCAP,
        )  # fmt: skip
    else:  # BWD_FUSED (KIND is a constexpr: only one branch is compiled)
        off_bhk = tl.program_id(0)
        off_b = off_bhk // HKV
        off_hk = off_bhk % HKV
        j = tl.program_id(1)
        n_kv = NEED_KV * tl.cdiv(N_K, BLOCK_N)
        if j < N_PREFIX_PROGS:
            if PREFIX_MODE != 0:
                _bwd_prefix_program(
                    (j // N_SPLIT) * BLOCK_NP, off_b, off_hk, j % N_SPLIT, N_SPLIT,
                    q, pk, pv, PIDX, PLEN, do, LSE, Delta, O, DPK, DPV, sizes, scalars,
                    D, BLOCK_D, BLOCK_M, BLOCK_NP, PREFIX_MODE, HAS_PLEN, HAS_DROPOUT, INPUT_PRECISION,
                    HAS_DELTA, PREFIX_WINDOWED, HAS_SOFTCAP,
                )  # fmt: skip
        elif j < N_PREFIX_PROGS + n_kv:
            _bwd_dkdv_program(
                (j - N_PREFIX_PROGS) * BLOCK_N, off_b, off_hk,
                q, k, v, do, kpm, dk, DV, LSE, Delta, O, sizes, scalars,
                D, BLOCK_D, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_KPM, HAS_DROPOUT, INPUT_PRECISION,
                HAS_DELTA, HAS_WINDOW, HAS_SOFTCAP,
            )  # fmt: skip
        else:
            n_dq = NEED_DQ * tl.cdiv(N_Q, BLOCK_M2)
            start_m = (N_PREFIX_PROGS + n_kv + n_dq - 1 - j) * BLOCK_M2
            for g in range(GROUP):
                _bwd_dq_program(
                    start_m, off_b, off_hk * GROUP + g,
                    q, k, v, pk, pv, PIDX, PLEN, kpm, do, LSE, Delta, O, dq, sizes, scalars,
                    D, BLOCK_D, BLOCK_M2, BLOCK_N2, IS_CAUSAL, PREFIX_MODE, HAS_PLEN, HAS_KPM,
                    HAS_DROPOUT, INPUT_PRECISION, HAS_DELTA, HAS_WINDOW, PREFIX_WINDOWED, HAS_SOFTCAP,
                )  # fmt: skip


@triton.jit
def _prefix_grad_reduce(
    DPK,
    DPV,
    PIDX,
    GPK,
    GPV,
    N_ROWS,
    N_SPLIT,
    NUMEL,
    PREFIX_MODE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Prefix gradient of one entry: the sum of the partials of the rows that read it.

    Grid: (n_entries, cdiv(NUMEL, BLOCK)), NUMEL = Hkv * P * D. Program (z, c) walks the
    partials [N_ROWS * N_SPLIT, NUMEL] in order and adds those whose row reads entry z
    (shared: every row; per-row: row z; bank: rows with PIDX[b] == z), then writes
    GPK/GPV[z, c*BLOCK : (c+1)*BLOCK] (contiguous) in the prefix dtype. The fixed order
    makes the result bitwise identical from run to run.
    """
    z = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < NUMEL
    acc_k = tl.zeros([BLOCK], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK], dtype=tl.float32)
    if PREFIX_MODE == PREFIX_PER_ROW:
        row_lo = z
        row_hi = z + 1
    else:
        row_lo = 0
        row_hi = N_ROWS
    for b in range(row_lo, row_hi):
        take = ok
        if PREFIX_MODE == PREFIX_BANK:
            # a vector load of one address (the interpreter cannot mask with a scalar)
            take = ok & (tl.load(PIDX + b + offs * 0) == z)
        for s in range(N_SPLIT):
            part = (b * N_SPLIT + s) * NUMEL
            acc_k += tl.load(DPK + part + offs, mask=take, other=0.0)
            acc_v += tl.load(DPV + part + offs, mask=take, other=0.0)
    tl.store(GPK + z * NUMEL + offs, acc_k.to(GPK.dtype.element_ty), mask=ok)
    tl.store(GPV + z * NUMEL + offs, acc_v.to(GPV.dtype.element_ty), mask=ok)
