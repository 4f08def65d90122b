"""Attention sinks and logit soft-capping for the ``"sdpa"`` backend, without the score
matrix: which path a call takes (:func:`feature_path`, logged once per path) and the two
exact paths that replace the materialising reference.

``sdpa.py`` prepares q [B, H, Nq, D], k, v [B, Hkv, Nk', D] (the prefix already in front,
Nk' = P + Nk) and either a boolean mask [B|1, 1, Nq, Nk'] or ``is_causal``; it then calls
:func:`feature_attention` instead of ``F.scaled_dot_product_attention``.

Sinks (one logit ``t_h`` per head in the denominator, no value), on the CPU: PyTorch's
fused flash kernel returns the log-sum-exp ``lse`` of each query's visible logits with
its output; the sink is then an exact rescaling::

    p_j = exp(s_j) / (exp(lse) + exp(t))      out' = out * sigmoid(lse - t)

and the backward is the flash backward fed the sink's output ``out'`` and log-sum-exp
``lse' = logaddexp(lse, t)`` (its ``P = exp(s - lse')`` and ``Delta = rowsum(dO' * out')``
are then the sinked ones), plus ``dt = -sum_{b,i} sigmoid(t - lse) * Delta``.

Soft-capping (``s -> C * tanh(s / C)``; with or without sinks), and sinks off the CPU:
an exact chunked path (:class:`ChunkedAttention`): query blocks of ``bq`` rows
(:data:`BLOCK_ELEMS` scores a block), each block's [B, H, bq, hi] scores in float32 and
its softmax over the whole key row at once; a causal block reads only keys [0, hi), the
ones its last row sees (hi = i1 + Nk' - Nq, bottom-right). Peak memory is a few buffers
of one block's scores, not [B, H, Nq, Nk']; the backward recomputes each block from the
saved log-sum-exp, as flash attention does::

                 keys 0 ........ hi       Nk'
    rows i0:i1  [ ######## visible ### | skipped ]   scores [B, H, bq, hi]

Dropout with soft-capping or sinks still runs the reference path (the materialising
one); :func:`feature_path` says so and a one-time warning names the reason.
"""

from __future__ import annotations

import logging
import warnings

import torch

logger = logging.getLogger("prefixattn")

PATH_FUSED = "fused SDPA"
PATH_SINK = "flash+lse sink rescale"
PATH_CHUNKED = "chunked exact (query blocks)"
PATH_REFERENCE = "reference (materializes [B, H, Nq, P + Nk] scores)"

# the query rows of one block: a block's float32 scores are B * H * BLOCK_ELEMS / Nk' rows
BLOCK_ELEMS = 1 << 22  # score elements per block (16 MiB of float32); >= 16 rows
_seen: set[str] = set()


def flash_lse_available() -> bool:
    """Whether this torch has the CPU flash kernel that returns the log-sum-exp."""
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def feature_path(softcap: bool, sinks: bool, dropout: bool, device_type: str) -> str:
    """The path of an ``sdpa``-backend call with these features (one of the PATH_* names,
    with the reason for a materialising one). The one decision :func:`sdpa_prefix_attention`
    and ``prefixattn info`` both use."""
    if not softcap and not sinks:
        return PATH_FUSED
    if dropout:
        return PATH_REFERENCE + ": dropout with soft-capping or sinks"
    if sinks and not softcap and device_type == "cpu" and flash_lse_available():
        return PATH_SINK
    return PATH_CHUNKED


def describe_paths(device_type: str) -> list[tuple[str, str]]:
    """(features, path) for every combination of soft-capping, sinks and dropout of an
    ``sdpa``-backend call on ``device_type``: what ``prefixattn info`` prints."""
    rows = []
    for softcap, sinks in ((False, False), (False, True), (True, False), (True, True)):
        name = "+".join(n for n, on in (("softcap", softcap), ("sinks", sinks)) if on)
        rows.append((name or "plain", feature_path(softcap, sinks, False, device_type)))
    rows.append(("softcap|sinks with dropout", feature_path(True, True, True, device_type)))
    return rows


def note_path(path: str) -> None:
    """Log ``"sdpa path: <path>"`` at DEBUG once per distinct path (a set lookup per call);
    a materialising path also warns once."""
    if path in _seen:
        return
    _seen.add(path)
    logger.debug("sdpa path: %s", path)
    if path.startswith(PATH_REFERENCE):
        warnings.warn(f"prefixattn sdpa backend: {path}", RuntimeWarning, stacklevel=3)


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """bool mask (True = visible) -> additive mask in ``dtype`` (the CPU kernel's form)."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, float("-inf")
    )


class FlashSinkAttention(torch.autograd.Function):
    """Sinks on the CPU's flash kernel: forward ``out * sigmoid(lse - t)``, backward the
    flash backward on (out', lse') plus the sink's gradient (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, mask, is_causal: bool, scale: float):  # type: ignore[override]
        fmask = _float_mask(mask, q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=fmask, scale=scale
        )  # out [B, H, Nq, D], lse float32 [B, H, Nq]
        t = sinks.to(torch.float32).reshape(1, -1, 1)  # [1, H, 1]
        out_s = (out.float() * torch.sigmoid(lse - t)[..., None]).to(q.dtype)
        lse_s = torch.logaddexp(lse, t)  # [B, H, Nq]: the sinked softmax's denominator
        ctx.save_for_backward(q, k, v, out_s, lse_s, t, fmask)
        ctx.is_causal, ctx.scale, ctx.sink_dtype = is_causal, scale, sinks.dtype
        return out_s

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, out_s, lse_s, t, fmask = ctx.saved_tensors
        dout = dout.contiguous()
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out_s, lse_s, 0.0, ctx.is_causal, attn_mask=fmask, scale=ctx.scale
        )
        dsink = None
        if ctx.needs_input_grad[3]:
            delta = (dout.float() * out_s.float()).sum(-1)  # [B, H, Nq]
            dsink = -(torch.exp(t - lse_s) * delta).sum(dim=(0, 2)).to(ctx.sink_dtype)
        return dq, dk, dv, dsink, None, None, None


def _block_rows(B: int, H: int, Nk: int, Nq: int) -> int:
    """Query rows per block: BLOCK_ELEMS score elements, a multiple of 16, at most Nq."""
    rows = max(16, (BLOCK_ELEMS // max(1, B * H * Nk)) // 16 * 16)
    return min(rows, Nq)


def _block_keys(i1: int, Nq: int, Nk: int, causal: bool) -> int:
    """Keys [0, hi) query rows < i1 can see: causal (bottom-right) stops at i1 - 1 + Nk - Nq."""
    return min(Nk, max(1, i1 + Nk - Nq)) if causal else Nk


def _block_logits(qb: torch.Tensor, k: torch.Tensor, hi: int, a: float, softcap: float):
    """One block's logits divided by ``softcap`` (or by 1), unmasked: float32
    [B, Hkv, G, bq, hi] = tanh(a * q k^T) (a = scale / C) or ``a * q k^T`` (a = scale).
    ``qb`` float32 [B, Hkv, G, bq, D], ``k`` float32 [B, Hkv, Nk, D]."""
    B, Hkv, G, bq, D = qb.shape
    qs = (qb * a).reshape(B, Hkv, G * bq, D)  # the scale on bq * D values, not bq * hi
    x = torch.matmul(qs, k[:, :, :hi].transpose(-1, -2)).reshape(B, Hkv, G, bq, hi)
    return x.tanh_() if softcap else x


def _mask_block(x, mask, is_causal, i0, i1, hi, Nq, Nk):
    """Set the invisible logits of a block to -inf, in place: ``mask`` bool [B|1, 1, Nq, Nk]
    sliced, or (no mask, ``is_causal``) the block's diagonal band only."""
    if mask is not None:
        x.masked_fill_(~mask[:, :, i0:i1, :hi][:, :, None], float("-inf"))  # [B|1, 1, 1, bq, hi]
    elif is_causal:
        lo = max(0, i0 + Nk - Nq + 1)  # the first key some row of the block does not see
        if lo < hi:
            i = torch.arange(i0, i1, device=x.device)[:, None]
            j = torch.arange(lo, hi, device=x.device)[None, :]
            bias = torch.zeros(j.shape[-1], dtype=x.dtype, device=x.device).expand(i1 - i0, -1)
            bias = bias.masked_fill(j > i + (Nk - Nq), float("-inf"))  # [bq, hi - lo]
            x[..., lo:hi] += bias
    return x


class ChunkedAttention(torch.autograd.Function):
    """Exact attention over query blocks with soft-capping and/or sinks (differentiable).

    Inputs: q [B, H, Nq, D], k, v [B, Hkv, Nk, D], sinks [H] or None, mask bool
    [B|1, 1, Nq, Nk] or None, is_causal (bottom-right; only with mask None), causal (the
    call is causal: a block reads keys up to its last row's, whatever the mask), scale,
    softcap (0 = none). Scores in float32. Saves q, k, v, out and lse [B, H, Nq]."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, mask, is_causal, causal, scale, softcap):  # type: ignore[override]
        B, H, Nq, D = q.shape
        Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
        G = H // Hkv
        kf, vf = k.float(), v.float()
        mult = softcap or 1.0  # logit = mult * x
        a = scale / mult
        t = None if sinks is None else sinks.float().reshape(1, Hkv, G, 1, 1)
        out = torch.empty(B, Hkv, G, Nq, Dv, dtype=q.dtype, device=q.device)
        lse = torch.empty(B, Hkv, G, Nq, dtype=torch.float32, device=q.device)
        step = _block_rows(B, H, Nk, Nq)
        for i0 in range(0, Nq, step):
            i1 = min(Nq, i0 + step)
            bq = i1 - i0
            hi = _block_keys(i1, Nq, Nk, causal or is_causal)
            qb = q[:, :, i0:i1].float().reshape(B, Hkv, G, bq, D)
            x = _block_logits(qb, kf, hi, a, softcap)
            x = _mask_block(x, mask, is_causal, i0, i1, hi, Nq, Nk)
            m = x.amax(dim=-1, keepdim=True) * mult  # [B, Hkv, G, bq, 1]
            if t is not None:
                m = torch.maximum(m, t)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            e = torch.add(-m, x, alpha=mult, out=x).exp_()  # exp(logit - m), in place
            den = e.sum(dim=-1, keepdim=True)
            if t is not None:
                den = den + torch.exp(t - m)
            o = torch.matmul(e.reshape(B, Hkv, G * bq, hi), vf[:, :, :hi]).reshape(
                B, Hkv, G, bq, Dv
            )
            out[:, :, :, i0:i1] = o.div_(torch.where(den > 0, den, torch.ones_like(den)))
            lse[:, :, :, i0:i1] = (m + torch.log(den)).squeeze(-1)  # -inf: a row sees nothing
        ctx.save_for_backward(q, k, v, sinks, mask, out, lse)
        ctx.flags = (is_causal, causal, scale, softcap)
        return out.reshape(B, H, Nq, Dv)

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, sinks, mask, out, lse = ctx.saved_tensors
        is_causal, causal, scale, softcap = ctx.flags
        B, H, Nq, D = q.shape
        Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
        G = H // Hkv
        mult = softcap or 1.0
        a = scale / mult
        kf, vf = k.float(), v.float()
        do = dout.float().reshape(B, Hkv, G, Nq, Dv)
        delta = (do * out.float()).sum(-1)  # [B, Hkv, G, Nq]: rowsum(dO * O)
        # a row that sees nothing: lse = -inf; +inf makes its probabilities exp(-inf) = 0
        lse = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))
        one = torch.ones((), device=q.device)
        dq = torch.empty(B, Hkv, G, Nq, D, dtype=torch.float32, device=q.device)
        dk = torch.zeros(B, Hkv, Nk, D, dtype=torch.float32, device=q.device)
        dv = torch.zeros(B, Hkv, Nk, Dv, dtype=torch.float32, device=q.device)
        step = _block_rows(B, H, Nk, Nq)
        for i0 in range(0, Nq, step):
            i1 = min(Nq, i0 + step)
            bq = i1 - i0
            hi = _block_keys(i1, Nq, Nk, causal or is_causal)
            qb = q[:, :, i0:i1].float().reshape(B, Hkv, G, bq, D)
            x = _block_logits(qb, kf, hi, a, softcap)
            # d(C tanh(a s)) / ds = scale * (1 - tanh^2), from the unmasked (finite) tanh
            g = torch.addcmul(one, x, x, value=-1.0) if softcap else None
            x = _mask_block(x, mask, is_causal, i0, i1, hi, Nq, Nk)
            p = torch.add(-lse[:, :, :, i0:i1, None], x, alpha=mult, out=x).exp_()
            p2 = p.reshape(B, Hkv, G * bq, hi)  # the probabilities [B, Hkv, G*bq, hi]
            dob = do[:, :, :, i0:i1].reshape(B, Hkv, G * bq, Dv)
            dv[:, :, :hi] += torch.matmul(p2.transpose(-1, -2), dob)
            dp = torch.matmul(dob, vf[:, :, :hi].transpose(-1, -2)).reshape(B, Hkv, G, bq, hi)
            ds = p.mul_(dp.sub_(delta[:, :, :, i0:i1, None]))  # dL / d logit
            if g is not None:
                ds = ds.mul_(g)
            ds2 = ds.reshape(B, Hkv, G * bq, hi)
            dq[:, :, :, i0:i1] = torch.matmul(ds2, kf[:, :, :hi]).reshape(B, Hkv, G, bq, D)
            dk[:, :, :hi] += torch.matmul(ds2.transpose(-1, -2), qb.reshape(B, Hkv, G * bq, D))
        dsink = None
        if sinks is not None and ctx.needs_input_grad[3]:
            t = sinks.float().reshape(1, Hkv, G, 1)
            dsink = -(torch.exp(t - lse) * delta).sum(dim=(0, 3)).reshape(H).to(sinks.dtype)
        return (
            dq.mul_(scale).reshape(B, H, Nq, D).to(q.dtype),
            dk.mul_(scale).to(k.dtype),
            dv.to(v.dtype),
            dsink,
            None,
            None,
            None,
            None,
            None,
        )


def feature_attention(
    path: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor | None,
    softcap: float,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    causal: bool = False,
    **_sdpa_kw: object,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=..., is_causal=..., scale=...)``
    with ``sinks`` [H] and/or soft-capping ``softcap`` on ``path`` (:func:`feature_path`;
    not the reference one). q [B, H, Nq, D], k, v [B, Hkv, Nk, D]; ``attn_mask`` bool
    [B|1, 1, Nq, Nk] (True = visible) or None; ``is_causal`` top-left (square calls only,
    as SDPA); ``causal``: the call is causal (bottom-right), so a block of the chunked
    path skips the keys right of its last row even under a mask. Dropout and ``enable_gqa`` are the caller's SDPA keywords: dropout never
    reaches here, GQA is native to both paths. Returns [B, H, Nq, D] in q's dtype."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if path == PATH_SINK:
        return FlashSinkAttention.apply(q, k, v, sinks, attn_mask, is_causal, scale)
    if path != PATH_CHUNKED:
        raise ValueError(f"feature_attention: no such path {path!r}")
    return ChunkedAttention.apply(
        q, k, v, sinks, attn_mask, is_causal, causal, float(scale), float(softcap or 0.0)
    )


__all__ = [
    "PATH_CHUNKED",
    "PATH_FUSED",
    "PATH_REFERENCE",
    "PATH_SINK",
    "ChunkedAttention",
    "FlashSinkAttention",
    "describe_paths",
    "feature_attention",
    "feature_path",
    "flash_lse_available",
    "note_path",
]
