"""Forward kernel of prefix attention (FlashAttention-2 style, fp32 online softmax).

Notation (shapes as the launcher passes them; any strides):
    Q   [B, H,   Nq, D]      K, V  [B, Hkv, Nk, D]      GROUP = H // Hkv
    PK, PV: the prefix, read from its own buffer through PREFIX_MODE:
        1 shared   [Hkv, P, D]      (entry 0 for every row; its batch stride is 0)
        2 per-row  [B, Hkv, P, D]   (entry b for row b)
        3 bank     [T, Hkv, P, D]   (entry PIDX[b] for row b, read inside the kernel)
    PLEN [T] int64 (only with HAS_PLEN): row b sees only the first min(P, PLEN[entry])
        prefix keys of its entry (a ragged bank); dropout columns still count all P
    KPM [B, Nk] uint8, 1 = real key (only with HAS_KPM)
    A KV-cache pool (as flash_attn_with_kvcache): K, V [S, Hkv, Nk, D] slots; CBI [B]
        (only with HAS_CBI): row b reads slot CBI[b] (else slot b); CSL [B] (only with
        HAS_CSL): row b sees keys [0, CSL[b]) of its slot, its causal band aligned to
        CSL[b] (else to Nk). Read in place: no gather, no mask.
    A paged KV cache (as flash_attn_with_kvcache's block_table; PAGE_SIZE > 0): K, V are
        the block pool [num_blocks, Hkv, PAGE_SIZE, D]; BT [B, max_blocks] int32/int64:
        row b's key j is in block BT[b, j // PAGE_SIZE] at offset j % PAGE_SIZE; Nk =
        max_blocks * PAGE_SIZE logical keys, CSL[b] of them real. Read in place: a key
        tile inside one page (PAGE_SIZE >= BLOCK_N, both powers of two, tiles start at
        multiples of BLOCK_N) loads one page id; a tile spanning pages (PAGE_SIZE <
        BLOCK_N) loads one per key. Only the entries of keys < CSL[b] are read.
    Out [B, H, Nq, D]; LSE [B, H, Nq] fp32, log2-domain logsumexp (+inf for an empty row)

Query i of a row sees every prefix key, and sequence key j iff j <= i + (Nk - Nq) when
IS_CAUSAL (bottom-right alignment), and KPM[b, j] when HAS_KPM. With HAS_WINDOW (causal
only) it also needs j > i + (Nk - Nq) - window: the query's last ``window`` positions,
FlashAttention's window_size=(window - 1, 0); key blocks wholly outside that band are
never visited. Prefix keys stay visible to every query, unless PREFIX_WINDOWED: then
prefix key c of a row that sees P_row of them sits at position c - P_row and leaves the
window like a cache entry (c > i + (Nk - Nq) + P_row - window).

HAS_SOFTCAP: each logit s = sm_scale * q.k becomes softcap * tanh(s / softcap) (Gemma-2).
HAS_SINKS: SINKS [H] fp32 holds one more logit per head in the softmax denominator, with
no value (gpt-oss); the LSE includes it, so a row is never empty. With dropout, kept
probabilities are scaled by 1 / (1 - dropout_p); the keep mask of element (b, h, i, c),
c the column in [0, P + Nk) (prefix columns first), is ``rand(seed, row*(P+Nk) + c) >= p``
with row = (b*H + h)*Nq + i, so the backward regenerates it exactly.
"""

import triton
import triton.language as tl

PREFIX_NONE: tl.constexpr = tl.constexpr(0)
PREFIX_SHARED: tl.constexpr = tl.constexpr(1)
PREFIX_PER_ROW: tl.constexpr = tl.constexpr(2)
PREFIX_BANK: tl.constexpr = tl.constexpr(3)


@triton.jit
def _prefix_entry(PIDX, off_b, PREFIX_MODE: tl.constexpr):
    """Which prefix entry row ``off_b`` reads (int64): 0, b, or PIDX[b]."""
    if PREFIX_MODE == PREFIX_BANK:
        entry = tl.load(PIDX + off_b).to(tl.int64)
    elif PREFIX_MODE == PREFIX_PER_ROW:
        entry = off_b.to(tl.int64)
    else:
        entry = off_b.to(tl.int64) * 0
    return entry


@triton.jit
def _prefix_len(PLEN, entry, N_P, HAS_PLEN: tl.constexpr):
    """How many prefix keys a row of ``entry`` sees: min(P, PLEN[entry]) or all P."""
    if HAS_PLEN:  # noqa: SIM108 (a constexpr branch: only one side is compiled)
        n_p = tl.minimum(tl.load(PLEN + entry).to(tl.int32), N_P)
    else:
        n_p = N_P
    return n_p


@triton.jit
def _tanh(x):
    """tanh in fp32 from exp2 (portable across Triton versions): sign(x) (1 - e) / (1 + e),
    e = exp(-2|x|), never overflowing."""
    e = tl.exp2(tl.abs(x) * -2.88539008178)  # exp(-2|x|)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _score_scale(sm_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """The factor applied to q.k before :func:`_logits`: sm_scale / softcap under
    soft-capping (the tanh's argument), else sm_scale * log2(e) (the log2-domain logit)."""
    if HAS_SOFTCAP:  # noqa: SIM108 (a constexpr branch: only one side is compiled)
        scale = sm_scale / softcap
    else:
        scale = sm_scale * 1.44269504089
    return scale


@triton.jit
def _logits(qk, qk_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """(log2-domain logits, t) of raw dot products ``qk``; with HAS_SOFTCAP
    t = tanh(sm_scale * qk / softcap) and the logit is softcap * t * log2(e) (the backward
    needs t for the chain rule's 1 - t^2), else t is the logit itself (unused)."""
    if HAS_SOFTCAP:
        t = _tanh(qk * qk_scale)
        s = t * (softcap * 1.44269504089)
    else:
        s = qk * qk_scale
        t = s
    return s, t


@triton.jit
def _dropout_keep(seed, drop_rows, cols, dropout_p):
    """Keep mask [BLOCK_M, BLOCK_N]: drop_rows int64 [BLOCK_M] = row*(P+Nk), cols int32."""
    offs = drop_rows[:, None] + cols[None, :]
    return tl.rand(seed, offs) >= dropout_p


@triton.jit
def _page_rows(
    BT,
    stride_btn,
    start_n,
    cols,
    n_valid,
    stride_kz,
    stride_kn,
    stride_vz,
    stride_vn,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):
    """Offsets int64 [BLOCK_N, 1] of keys ``cols`` in a block pool K and V: key j is at
    block BT[j // PAGE_SIZE], offset j % PAGE_SIZE. A tile within one page (PAGE_SIZE >=
    BLOCK_N: ``start_n`` is a multiple of BLOCK_N) loads one id; otherwise one per key,
    only for keys < n_valid (a row's table past its last needed block is never read)."""
    if PAGE_SIZE >= BLOCK_N:
        page = tl.load(BT + (start_n // PAGE_SIZE) * stride_btn).to(tl.int64)
        off = (cols % PAGE_SIZE).to(tl.int64)[:, None]
        k_rows = page * stride_kz + off * stride_kn
        v_rows = page * stride_vz + off * stride_vn
    else:
        page = tl.load(BT + (cols // PAGE_SIZE) * stride_btn, mask=cols < n_valid, other=0)
        page = page.to(tl.int64)[:, None]
        off = (cols % PAGE_SIZE).to(tl.int64)[:, None]
        k_rows = page * stride_kz + off * stride_kn
        v_rows = page * stride_vz + off * stride_vn
    return k_rows, v_rows


@triton.jit
def _attn_fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    K,
    V,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    KPM,
    stride_kpmn,
    BT,
    stride_btn,
    stride_kz,
    stride_vz,
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
    PAGE_SIZE: tl.constexpr = 0,
):
    """One stage of the key loop: key blocks [lo, hi) of one source (prefix or sequence).

    K, V point at key 0 of this (row, kv head); with PAGE_SIZE > 0 (a paged cache) at
    block 0 of this kv head, and BT at the row's block table (:func:`_page_rows`). Scores are in the log2 domain
    (:func:`_logits`). A fully masked row keeps m_i = -inf and l_i = 0; ``m_safe`` keeps
    exp2 away from (-inf) - (-inf). MASK_WINDOW drops keys with
    col <= row + causal_off - window (left of the sliding window).
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_ok = d_ok[None, :]
        if MASK_BOUNDS:
            kv_ok = kv_ok & (cols[:, None] < n_valid)
        if PAGE_SIZE > 0:
            k_rows, v_rows = _page_rows(
                BT, stride_btn, start_n, cols, n_valid, stride_kz, stride_kn, stride_vz,
                stride_vn, BLOCK_N, PAGE_SIZE,
            )  # fmt: skip
        else:
            rows = cols[:, None].to(tl.int64)
            k_rows = rows * stride_kn
            v_rows = rows * stride_vn
        k = tl.load(
            K + k_rows + offs_d[None, :] * stride_kd,
            mask=kv_ok,
            other=0.0,
        )
        qk, _ = _logits(
            tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION), qk_scale, softcap,
            HAS_SOFTCAP,
        )  # fmt: skip
        if MASK_BOUNDS:
            qk = tl.where(cols[None, :] < n_valid, qk, float("-inf"))
        if MASK_CAUSAL:
            qk = tl.where(cols[None, :] <= offs_m[:, None] + causal_off, qk, float("-inf"))
        if MASK_WINDOW:
            qk = tl.where(cols[None, :] > offs_m[:, None] + causal_off - window, qk, float("-inf"))
        if HAS_KPM:
            real = tl.load(KPM + cols * stride_kpmn, mask=cols < n_valid, other=0)
            qk = tl.where(real[None, :] != 0, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, drop_rows, col_base + cols, dropout_p)
            p = tl.where(keep, p, 0.0)
        v = tl.load(
            V + v_rows + offs_d[None, :] * stride_vd,
            mask=kv_ok,
            other=0.0,
        )
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _causal_bounds(
    start_m, causal_off, N_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr
):
    """(full_hi, hi) of query rows [start_m, start_m + BLOCK_M): key blocks below full_hi
    are visible to every row (causally), keys at or past hi to none."""
    if IS_CAUSAL:
        # keys [0, start_m + off] are visible to every row of the block
        full_hi = tl.maximum(start_m + causal_off + 1, 0)
        full_hi = (full_hi // BLOCK_N) * BLOCK_N
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + causal_off, 0), N_K)
    else:
        full_hi = (N_K // BLOCK_N) * BLOCK_N
        hi = N_K
    return full_hi, hi


@triton.jit
def _window_bounds(
    start_m,
    causal_off,
    window,
    full_hi,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    """(lo, full_lo) of query rows [start_m, start_m + BLOCK_M) under a sliding window:
    key blocks start at lo (the block of the first row's first key in its window); from
    full_lo on, every row's window covers the key (full_lo <= full_hi). Without a window
    both are 0."""
    if HAS_WINDOW:
        lo = (tl.maximum(start_m + causal_off - window + 1, 0) // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(start_m + BLOCK_M + causal_off - window, 0), BLOCK_N) * BLOCK_N
        full_lo = tl.minimum(tl.maximum(full_lo, lo), tl.maximum(full_hi, lo))
    else:
        lo = 0
        full_lo = 0
    return lo, full_lo


@triton.jit(do_not_specialize=["seed"])
def _attn_fwd(
    Q,
    K,
    V,
    PK,
    PV,
    PIDX,
    PLEN,
    KPM,
    CSL,
    CBI,
    BT,
    SINKS,
    Out,
    LSE,
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
    stride_btz,
    stride_btn,
    stride_oz,
    stride_oh,
    stride_om,
    stride_od,
    H,
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
    HAS_CSL: tl.constexpr,
    HAS_CBI: tl.constexpr,
    HAS_WINDOW: tl.constexpr = False,
    PREFIX_WINDOWED: tl.constexpr = False,
    HAS_SOFTCAP: tl.constexpr = False,
    HAS_SINKS: tl.constexpr = False,
    PAGE_SIZE: tl.constexpr = 0,
):
    """Prefix-aware attention forward.

    Grid: (cdiv(Nq, BLOCK_M), B * H). One program computes BLOCK_M query rows of one
    (batch row b, head h): O = softmax(s) V over the P prefix keys then the Nk sequence
    keys, s = sm_scale * q k^T, and the log2-domain logsumexp of each row.

    Key loop, in stages:
      1. prefix blocks [0, P) through PK/PV of entry ``_prefix_entry(b)``; only the tail
         past P is masked (no causal mask on prefix keys; PREFIX_WINDOWED starts at the
         first block in the window and masks its left edge);
      2. with HAS_WINDOW, the blocks on the window's left edge (window mask);
      3. off-band sequence blocks: every row of the block sees every key, no mask;
      4. on-band blocks: the causal band (and the Nk bound, and the window) is masked.
         Blocks above the band, and left of the window, are never visited.

    TUNE_NQ / TUNE_NK are power-of-two buckets of Nq / Nk: autotune keys only, unused.
    """
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    off_hk = off_h // GROUP
    b64 = off_b.to(tl.int64)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N_Q
    d_ok = offs_d < D

    q_ptrs = (
        Q + b64 * stride_qz + off_h.to(tl.int64) * stride_qh
        + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd
    )  # fmt: skip
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)

    qk_scale = _score_scale(sm_scale, softcap, HAS_SOFTCAP)
    if HAS_SINKS:
        # the sink starts the online softmax: exp2(m - m) = 1 in the denominator, no value
        m_i = (
            tl.zeros([BLOCK_M], dtype=tl.float32)
            + tl.load(SINKS + off_h).to(tl.float32) * 1.44269504089
        )
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    n_tot = N_P + N_K
    drop_rows = (off_bh.to(tl.int64) * N_Q + offs_m) * n_tot
    # this row's keys: all Nk of batch entry b, or (a KV-cache pool) CSL[b] of slot CBI[b]
    if HAS_CSL:  # noqa: SIM108 (a constexpr branch: only one side is compiled)
        n_k = tl.load(CSL + off_b).to(tl.int32)
    else:
        n_k = N_K
    if HAS_CBI:
        kv_b = tl.load(CBI + off_b).to(tl.int64)
    elif PAGE_SIZE > 0:  # a paged cache: the block is per key tile (_page_rows)
        kv_b = b64 * 0
    else:
        kv_b = b64
    bt_row = BT + b64 * stride_btz
    causal_off = n_k - N_Q

    # -- stage 1: prefix keys, read from their own buffer -------------------------------
    if PREFIX_MODE != PREFIX_NONE:
        entry = _prefix_entry(PIDX, off_b, PREFIX_MODE)
        P_row = _prefix_len(PLEN, entry, N_P, HAS_PLEN)  # keys [0, P_row) are visible
        pk = PK + entry * stride_pkz + off_hk.to(tl.int64) * stride_pkh
        pv = PV + entry * stride_pvz + off_hk.to(tl.int64) * stride_pvh
        p_lo = 0
        if PREFIX_WINDOWED:
            # prefix key c sits at position c - P_row: the first one in the window
            p_lo = (tl.maximum(start_m + causal_off + P_row - window + 1, 0) // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, pk, pv, stride_pkn, stride_pkd, stride_pvn, stride_pvd,
            KPM, stride_kpmn, BT, 0, 0, 0, p_lo, P_row, P_row, causal_off + P_row, offs_m, qk_scale,
            seed, drop_rows, 0, dropout_p, window, softcap,
            D, BLOCK_D, BLOCK_N, True, False, False, HAS_DROPOUT, INPUT_PRECISION,
            PREFIX_WINDOWED, HAS_SOFTCAP,
        )  # fmt: skip

    # -- stages 2 and 3: sequence keys ---------------------------------------------------
    k_base = K + kv_b * stride_kz + off_hk.to(tl.int64) * stride_kh
    v_base = V + kv_b * stride_vz + off_hk.to(tl.int64) * stride_vh
    kpm_base = KPM + b64 * stride_kpmz
    full_hi, hi = _causal_bounds(start_m, causal_off, n_k, BLOCK_M, BLOCK_N, IS_CAUSAL)
    lo, full_lo = _window_bounds(start_m, causal_off, window, full_hi, BLOCK_M, BLOCK_N, HAS_WINDOW)
    if HAS_WINDOW:  # the window's left edge: some rows of the block no longer see these
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
            kpm_base, stride_kpmn, bt_row, stride_btn, stride_kz, stride_vz, lo, full_lo, n_k,
            causal_off, offs_m, qk_scale,
            seed, drop_rows, N_P, dropout_p, window, softcap,
            D, BLOCK_D, BLOCK_N, False, False, HAS_KPM, HAS_DROPOUT, INPUT_PRECISION,
            True, HAS_SOFTCAP, PAGE_SIZE,
        )  # fmt: skip
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        kpm_base, stride_kpmn, bt_row, stride_btn, stride_kz, stride_vz, full_lo, full_hi, n_k,
        causal_off, offs_m, qk_scale,
        seed, drop_rows, N_P, dropout_p, window, softcap,
        D, BLOCK_D, BLOCK_N, False, False, HAS_KPM, HAS_DROPOUT, INPUT_PRECISION,
        False, HAS_SOFTCAP, PAGE_SIZE,
    )  # fmt: skip
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        kpm_base, stride_kpmn, bt_row, stride_btn, stride_kz, stride_vz,
        tl.maximum(full_hi, full_lo), hi, n_k, causal_off, offs_m, qk_scale, seed, drop_rows, N_P, dropout_p, window, softcap,
        D, BLOCK_D, BLOCK_N, True, IS_CAUSAL, HAS_KPM, HAS_DROPOUT, INPUT_PRECISION,
        HAS_WINDOW, HAS_SOFTCAP, PAGE_SIZE,
    )  # fmt: skip

    # -- epilogue: normalise; a row that saw nothing writes zeros and lse = +inf ---------
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    lse = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))
    tl.store(LSE + off_bh.to(tl.int64) * N_Q + offs_m, lse, mask=m_ok)
    o_base = Out + b64 * stride_oz + off_h.to(tl.int64) * stride_oh
    o_ptrs = o_base + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
