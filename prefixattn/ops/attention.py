"""The public kernel entry point, :func:`prefix_attention`."""

from __future__ import annotations

import torch

from .amp import any_autocast, autocast_cast, autocast_dtype, autocast_off
from .args import new_seed
from .autograd import PrefixAttentionFunction, apply_function
from .call import AttentionCall, new_call
from .plan import lookup_plan
from .sdpa import torch_backend
from .settings import ACTIVE
from .validation import check_no_grad, resolve_backend
from .varlen import check_packed, log_path, packed_layout, repack, unpack

_grad_enabled = torch.is_grad_enabled
_apply = apply_function
_is_compiling = torch.compiler.is_compiling


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    *,
    prefix_index: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = True,
    sm_scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
    prefix_lengths: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    prefix_window: str = "all",
    cache_seqlens: torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Attention over a prefix of P virtual keys plus the sequence keys, fused.

    The prefix K/V is read from its own buffer inside the kernel: no concatenation with
    K/V and no per-row copy of a shared prefix, in forward or backward.

    Arguments:
        q: [B, H, Nq, D] queries.
        k, v: [B, Hkv, Nk, D] sequence keys and values; H % Hkv == 0 (GQA / MQA: query
            head h reads kv head h // (H // Hkv)).
        prefix_k, prefix_v: the prefix, one of
            [Hkv, P, D]     one prefix shared by every row (never expanded or copied);
            [B, Hkv, P, D]  one prefix per row;
            [T, Hkv, P, D]  a bank of T prefixes, with ``prefix_index``.
            ``None`` or P == 0 is plain attention.
        prefix_index: int64 [B]; row b uses bank entry ``prefix_index[b]``.
        prefix_lengths: int64 [T], a ragged bank: row b sees only the first
            ``prefix_lengths[prefix_index[b]]`` prefix keys of its entry (each length in
            [0, P]; keys past it get no probability and zero gradient). Also taken by the
            per-row layout (T = B: row b sees ``prefix_lengths[b]`` keys); not by a shared
            prefix. ``None``: every row sees all P keys.
        key_padding_mask: bool [B, Nk], True = real token. Masks sequence keys only.
        causal: causal mask on the sequence keys, aligned bottom-right.
        sm_scale: softmax scale, default 1 / sqrt(D).
        dropout_p: attention dropout probability (Philox; backward regenerates the mask).
        cache_seqlens: int32/int64 [B], attention over a KV-cache pool (as FlashAttention's
            ``flash_attn_with_kvcache``): row b sees sequence keys [0, cache_seqlens[b])
            of its slot, causal aligned to that length (query i sees key j iff
            j <= i + cache_seqlens[b] - Nq); each in [0, Nmax]. k, v are then the pool
            [S, Hkv, Nmax, D], read in place (no gather, no mask built) by the Triton
            kernel. Inference only: an error if gradients are asked (or dropout, or
            under torch.compile).
        cache_batch_idx: int32/int64 [B], row b reads slot ``cache_batch_idx[b]`` of the
            pool (in [0, S); repeated and out-of-order slots are fine). None: slot b.
        block_table: int32 [B, max_blocks], a paged KV cache (as ``flash_attn_with_kvcache``'s
            ``block_table``, vLLM's paged attention): k, v are then the block pool
            [num_blocks, Hkv, block_size, D] (block_size a power of two >= 16), and row b's
            sequence key j lives in block ``block_table[b, j // block_size]`` at offset
            ``j % block_size``. ``cache_seqlens`` is required (in [0, max_blocks *
            block_size]; the mask is the one above, over the row's logical keys [0,
            cache_seqlens[b])); entries past a row's last needed block are never read
            (any value, e.g. -1). Blocks may be shared between rows (prefix caching) and
            in any order; a ``key_padding_mask`` is [B, max_blocks * block_size] over the
            logical keys. Not with ``cache_batch_idx``. The Triton kernel reads the pages
            in place (the torch backends gather them). Inference only, as ``cache_seqlens``::

                block_size = 4, block_table[b] = [5, 2, 7, -1], cache_seqlens[b] = 10
                logical keys  0 1 2 3 | 4 5 6 7 | 8 9 . .  | (ignored)
                block pool    block 5 | block 2 | block 7  | -1: never read
                k[5, :, 0:4]  = keys 0..3, k[2, :, 0:4] = keys 4..7, k[7, :, 0:2] = keys 8, 9

        cu_seqlens_q: int32/int64 [B + 1], packed rows (as ``flash_attn_varlen_func``'s
            ``cu_seqlens_q``; continuous batching of prefill chunks and decode steps in one
            call): q is [1, H, total_q, D] and row b's q_len_b = cu_seqlens_q[b + 1] -
            cu_seqlens_q[b] queries are ``q[:, :, cu_seqlens_q[b]:cu_seqlens_q[b + 1]]``
            (cu_seqlens_q[0] = 0, non-decreasing, cu_seqlens_q[B] = total_q; a row may have
            none). Needs ``cache_seqlens``: query i of row b sits at position
            cache_seqlens[b] - q_len_b + i of its keys (its own last q_len_b keys, the
            mask above per row). Works with each kind of keys: [B, Hkv, Nk, D], a slot
            pool (``cache_batch_idx``) or pages (``block_table``). Returns [1, H, total_q,
            D]. Inference only, as ``cache_seqlens``. The torch backends unpack the rows
            (one host sync for the longest row); the Triton kernel reads them in place::

                cu_seqlens_q = [0, 1, 4, 6], cache_seqlens = [9, 3, 20]
                q tokens   0 | 1 2 3 | 4 5
                row        0 | 1     | 2
                position   8 | 0 1 2 | 18 19    (queries see keys <= their position)
        cu_seqlens: int32/int64 [S + 1], packed training sequences (padding-free, as
            ``flash_attn_varlen_func``'s ``cu_seqlens_q`` = ``cu_seqlens_k``): q is
            [1, H, total, D] and k, v [1, Hkv, total, D], sequence s holds tokens
            ``cu_seqlens[s]:cu_seqlens[s + 1]`` of q AND of k/v (cu_seqlens[0] = 0,
            non-decreasing, cu_seqlens[S] = total). Each sequence attends (causally,
            window and all) to its own tokens only, plus its prefix: a shared prefix for
            every sequence, a bank with ``prefix_index`` [S] (one entry per SEQUENCE), a
            per-sequence prefix [S, Hkv, P, D]; ``prefix_lengths`` as for rows. Returns
            [1, H, total, D]. With gradients, on every backend (the "varlen-unpack"
            path: q, k, v are scattered into a padded [S, H, L, D] batch, never the
            prefix; see :mod:`prefixattn.ops.varlen`). Not with ``key_padding_mask`` or
            the cache fields (``cu_seqlens_q``, inference over a cache, is a different
            input)::

                cu_seqlens = [0, 3, 5], P = 2
                          prefix | keys 0 1 2 3 4
                query 0    x x   |      x . . | . .
                query 1    x x   |      x x . | . .
                query 2    x x   |      x x x | . .
                query 3    x x   |      . . . | x .
                query 4    x x   |      . . . | x x

        max_seqlen: the longest sequence of ``cu_seqlens`` (None: computed, one host sync).
        backend: "auto" (Triton on CUDA, "sdpa" elsewhere), "triton" (CUDA, or CPU under
            TRITON_INTERPRET=1), "sdpa" (PyTorch's fused scaled_dot_product_attention on
            the concatenated prefix + keys: any device and dtype) or "reference" (the
            exact, materialising pure-PyTorch path the tests compare against).

    Returns:
        [B, H, Nq, D] in the dtype of q (under ``torch.autocast``: the autocast dtype).

    Mixed precision: under ``torch.autocast`` (enabled for q's device type) the call
    follows SDPA's autocast policy: q, k, v, prefix_k and prefix_v are cast to the
    autocast dtype (float64 excepted), and the attention runs on them with autocast off
    (see :mod:`prefixattn.ops.amp`). Float32 prefix parameters get float32 gradients
    through the cast. Outside autocast, q, k, v and the prefix must share one dtype.

    The mask, for P = 3, Nq = 4, Nk = 6 (e.g. 2 cached + 4 new tokens): every query sees
    every prefix key; query i sees sequence key j iff j <= i + (Nk - Nq)::

                  prefix  | sequence keys
                  0 1 2   | 0 1 2 3 4 5
        query 0   x x x   | x x x . . .
        query 1   x x x   | x x x x . .
        query 2   x x x   | x x x x x .
        query 3   x x x   | x x x x x x

    With Nq = 1 (decoding with a KV cache) the query sees the whole cache. A row with
    nothing to attend to (P == 0, or a prefix length of 0, with every sequence key
    masked) outputs zeros and gets zero gradients. Gradients flow to q, k, v, prefix_k and prefix_v: a shared prefix gets the
    sum over rows, a bank each row's gradient added at its index, bitwise reproducibly.

    Under ``torch.compile`` the call is traced into the graph without a graph break (the
    Triton kernels through the ``prefixattn::fwd`` / ``prefixattn::bwd`` custom ops, see
    :mod:`prefixattn.ops.custom_op`); the range of ``prefix_index`` is then checked on the
    device (``torch._assert_async``) instead of on the host.

    Raises:
        TypeError, ValueError: on bad input, naming the argument and what was expected.
    """
    if cu_seqlens is not None:  # packed sequences: the padded call, see ops/varlen.py
        has_cache = any(t is not None for t in (cache_seqlens, cache_batch_idx, block_table,
                                                cu_seqlens_q))  # fmt: skip
        check_packed(q, k, v, cu_seqlens, max_seqlen, prefix_index, key_padding_mask, has_cache)
        total = q.shape[2]
        dest, S, L = packed_layout(cu_seqlens, total, max_seqlen)
        log_path(S, L, total)
        kpm = None
        if not causal:  # causal rows never see their padding keys (Nq == Nk, left-aligned)
            kpm = (
                torch.arange(L, device=q.device)[None] < (cu_seqlens[1:] - cu_seqlens[:-1])[:, None]
            )
        out = prefix_attention(
            unpack(q, dest, S, L), unpack(k, dest, S, L), unpack(v, dest, S, L), prefix_k,
            prefix_v, prefix_index=prefix_index, key_padding_mask=kpm, causal=causal,
            sm_scale=sm_scale, dropout_p=dropout_p, backend=backend,
            prefix_lengths=prefix_lengths, window=window, softcap=softcap, sinks=sinks,
            prefix_window=prefix_window,
        )  # fmt: skip  # [S, H, L, D]
        return repack(out, dest)  # [1, H, total, D]
    # SDPA's autocast policy: cast, then run with autocast off (one C check when off). The
    # call below is built once, from the cast tensors, so every input reaches it either way
    cast_to = autocast_dtype(q) if any_autocast() else None
    if cast_to is not None:
        dev = q.device.type
        q, k, v, prefix_k, prefix_v = (
            autocast_cast(t, dev, cast_to) for t in (q, k, v, prefix_k, prefix_v)
        )
    # "auto" is resolved here, on the (cast) q: the kernel's dtypes decide
    resolved = backend if backend != "auto" else resolve_backend(backend, q)
    if _is_compiling():
        # imported here: registering the ops imports parts of torch._inductor (~1 s), a
        # cost only compiling callers should pay. The call by keyword: Dynamo traces the
        # NamedTuple's own constructor.
        from .custom_op import traced_prefix_attention

        traced = AttentionCall(
            q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v, prefix_index=prefix_index,
            prefix_lengths=prefix_lengths, key_padding_mask=key_padding_mask, sinks=sinks,
            causal=causal, sm_scale=sm_scale, dropout_p=dropout_p, window=window,
            softcap=softcap, prefix_window=prefix_window, backend=resolved,
            settings=ACTIVE.settings, cache_seqlens=cache_seqlens,
            cache_batch_idx=cache_batch_idx, block_table=block_table, cu_seqlens_q=cu_seqlens_q,
        )  # fmt: skip
        if cast_to is None:
            return traced_prefix_attention(traced)
        with autocast_off(q.device.type):  # Dynamo traces a with-statement only
            return traced_prefix_attention(traced)
    # the call, once: every layer below takes it (call.py)
    call = new_call(
        AttentionCall,
        (q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, sinks,
         causal, sm_scale, dropout_p, window, softcap, prefix_window, resolved, ACTIVE.settings,
         cache_seqlens, cache_batch_idx, block_table, cu_seqlens_q),
    )  # fmt: skip
    # eager: autocast off around the dispatch below without a with-block's extra frame on
    # the (hot) path without autocast
    off = None
    if cast_to is not None:
        off = autocast_off(q.device.type)
        off.__enter__()
    try:
        if (
            cache_seqlens is not None
            or cache_batch_idx is not None
            or block_table is not None
            or cu_seqlens_q is not None
        ) and _grad_enabled():
            check_no_grad(call)
        # the call's plan: validated and set up once per signature (plan.py)
        plan = lookup_plan(call)
        if plan.backend == "triton":
            if _grad_enabled() and (
                q.requires_grad
                or k.requires_grad
                or v.requires_grad
                or (prefix_k is not None and (prefix_k.requires_grad or prefix_v.requires_grad))
                or (sinks is not None and sinks.requires_grad)
            ):
                if sinks is not None:  # the sinks' gradient too
                    return _apply(
                        PrefixAttentionFunction, q, k, v, prefix_k, prefix_v, call, plan, sinks
                    )
                return _apply(PrefixAttentionFunction, q, k, v, prefix_k, prefix_v, call, plan)
            # inference (decoding): no graph to record, so skip autograd.Function's host cost
            return plan.forward(call, new_seed() if plan.dropout else 0)[0]
        return torch_backend(call, plan.prob)
    finally:
        if off is not None:
            off.__exit__(None, None, None)
