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
saved log-sum-exp, as flash attention does. Under a mask a block reads only the keys
[lo, hi) some of its rows see (a sliding window's block skips the keys left of the band;
a block whose rows see nothing is skipped), and only a block that crosses the causal
diagonal (or a partly visible mask) is filled::

                 keys 0 .. lo ........ hi       Nk'
    rows i0:i1  [ skipped | ### visible ## | skipped ]   scores [B, H, bq, hi - lo]

Per element the block costs one sigmoid and one exp2 (soft-capping as ``2 C sigmoid(2 s /
C) - C`` in base 2: PyTorch's CPU ``tanh`` and ``exp`` are several times slower than
``sigmoid`` and ``exp2``) and, the capped logits being bounded by C, no row max; the
backward reuses the sigmoid for ``tanh' = 4 sig (1 - sig)`` (see :class:`_Plan`).

The block GEMMs' dtype for bf16 / fp16 inputs on the CPU (:func:`block_gemm_dtype`,
``Settings.cpu_block_gemm`` / ``PREFIXATTN_CPU_BLOCK_GEMM``): by default float32 operands
(upcast), except where the CPU has bf16 (fp16) matrix instructions (AVX512-BF16 / AMX,
:data:`CPU_FAST_GEMM_DTYPES`): there P V, P^T dO, dS K and dS^T Q run on input-dtype
operands, as PyTorch's fused bf16 flash kernel runs its GEMMs, with per-block results
summed in float32; q k^T and dO V^T stay float32 on every host. On an AVX2-only CPU
PyTorch's bf16 GEMMs are a scalar fallback (4-60x slower than float32, measured), so
they are never chosen there; the speed on a bf16-capable host is not measured. The
path's name says which (``PATH_CHUNKED_BF16`` / ``PATH_CHUNKED_FP16``).

Dropout with soft-capping or sinks still runs the reference path (the materialising
one); :func:`feature_path` says so and a one-time warning names the reason.
"""

from __future__ import annotations

import logging
import math
import platform
import warnings

import torch

from .settings import CPU_BLOCK_GEMM_MODES, current_settings

logger = logging.getLogger("prefixattn")

PATH_FUSED = "fused SDPA"
PATH_SINK = "flash+lse sink rescale"
PATH_CHUNKED = "chunked exact (query blocks)"  # every block GEMM in float32
# the same with the P V, P^T dO, dS K and dS^T Q GEMMs on bf16 / fp16 operands (CPU only;
# see :func:`block_gemm_dtype`)
PATH_CHUNKED_BF16 = "chunked exact (query blocks, bf16 GEMMs)"
PATH_CHUNKED_FP16 = "chunked exact (query blocks, fp16 GEMMs)"
_CHUNKED_GEMM = {
    PATH_CHUNKED: None,
    PATH_CHUNKED_BF16: torch.bfloat16,
    PATH_CHUNKED_FP16: torch.float16,
}
PATH_REFERENCE = "reference (materializes [B, H, Nq, P + Nk] scores)"
# a paged CPU call (block_table, cu_seqlens_q): one call of the path above per row group
PATH_PAGED_ROWS = "paged rows grouped by query count (CPU)"

# the query rows of one block: a block's float32 scores are B * H * BLOCK_ELEMS / Nk' rows
BLOCK_ELEMS = 1 << 22  # score elements per block (16 MiB of float32); >= 16 rows
_seen: set[str] = set()


def flash_lse_available() -> bool:
    """Whether this torch has the CPU flash kernel that returns the log-sum-exp."""
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _cpu_fast_gemm_dtypes() -> frozenset[torch.dtype]:
    """The half-precision dtypes whose CPU GEMMs PyTorch runs on matrix / dot-product
    instructions here: bf16 where oneDNN supports it and the CPU has AVX512-BF16 or
    AMX-BF16 (x86) or is an ARM64 whose oneDNN check passes (that check is the CPU's BF16
    extension); fp16 where oneDNN supports it and the CPU has AVX512-FP16 or AMX-FP16.
    oneDNN's x86 check alone (``_is_mkldnn_bf16_supported``: ISA >= AVX512-core) also
    passes on AVX512 CPUs without the BF16 extension, where bf16 is emulated. On an
    AVX2-only x86 (this project's CI host: PyTorch's bf16 GEMMs ran 4-60x slower than
    float32 there) the set is empty.

    Read once at import (``torch.cpu.get_capabilities``, torch >= 2.13; older torch:
    ``torch.cpu._is_avx512_bf16_supported`` and friends). A torch without these probes
    counts as having no fast half-precision GEMMs (float32 blocks, today's choice);
    ``prefixattn info`` names the path either way."""
    caps: dict[str, object] = {}
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        caps = dict(get())
    else:  # torch < 2.13
        for key, probe in (
            ("avx512_bf16", "_is_avx512_bf16_supported"),
            ("amx_bf16", "_is_amx_tile_supported"),
            ("amx_fp16", "_is_amx_fp16_supported"),
        ):
            fn = getattr(torch.cpu, probe, None)
            caps[key] = bool(fn()) if fn is not None else False

    def onednn(name: str) -> bool:
        try:
            return bool(getattr(torch.ops.mkldnn, name)())
        except (AttributeError, RuntimeError):  # no oneDNN in this build
            return False

    arm = platform.machine().lower() in ("aarch64", "arm64")
    out = set()
    if onednn("_is_mkldnn_bf16_supported") and (
        arm or caps.get("avx512_bf16") or caps.get("amx_bf16")
    ):
        out.add(torch.bfloat16)
    if onednn("_is_mkldnn_fp16_supported") and (caps.get("avx512_fp16") or caps.get("amx_fp16")):
        out.add(torch.float16)
    return frozenset(out)


# the dtypes whose block GEMMs "auto" runs in the input dtype on this host
CPU_FAST_GEMM_DTYPES = _cpu_fast_gemm_dtypes()


def block_gemm_dtype(dtype: torch.dtype | None, device_type: str, mode: str) -> torch.dtype | None:
    """The dtype of the chunked path's P V / P^T dO / dS K / dS^T Q block GEMMs for inputs
    of ``dtype`` on ``device_type`` under ``mode`` (``Settings.cpu_block_gemm``), or None:
    float32 (float64 for float64 inputs), every GEMM on upcast operands.

    Only bf16 / fp16 inputs on the CPU take half-precision GEMMs: ``"input"`` always,
    ``"auto"`` where :data:`CPU_FAST_GEMM_DTYPES` holds the dtype, ``"float32"`` never.
    q k^T (the scores, before the soft-cap) and dO V^T (dP, before dP - Delta) stay float32
    whatever the mode, as in PyTorch's fused flash kernel. Off the CPU: always None."""
    if mode not in CPU_BLOCK_GEMM_MODES:
        raise ValueError(f"cpu_block_gemm must be one of {CPU_BLOCK_GEMM_MODES}, got {mode!r}")
    if device_type != "cpu" or dtype not in (torch.bfloat16, torch.float16) or mode == "float32":
        return None
    if mode == "input" or dtype in CPU_FAST_GEMM_DTYPES:
        return dtype
    return None


def feature_path(
    softcap: bool,
    sinks: bool,
    dropout: bool,
    device_type: str,
    dtype: torch.dtype | None = None,
    block_gemm: str | None = None,
) -> str:
    """The path of an ``sdpa``-backend call with these features (one of the PATH_* names,
    with the reason for a materialising one). The one decision :func:`sdpa_prefix_attention`
    and ``prefixattn info`` both use. ``dtype``: the inputs' (None: float32), which with
    ``block_gemm`` (``Settings.cpu_block_gemm``; None: the current settings') picks the
    chunked path's GEMM dtype (:func:`block_gemm_dtype`: ``PATH_CHUNKED_BF16`` /
    ``PATH_CHUNKED_FP16`` instead of ``PATH_CHUNKED``)."""
    if not softcap and not sinks:
        return PATH_FUSED
    if dropout:
        return PATH_REFERENCE + ": dropout with soft-capping or sinks"
    if sinks and not softcap and device_type == "cpu" and flash_lse_available():
        return PATH_SINK
    if block_gemm is None:
        block_gemm = current_settings().cpu_block_gemm
    gemm = block_gemm_dtype(dtype, device_type, block_gemm)
    if gemm is None:
        return PATH_CHUNKED
    return PATH_CHUNKED_BF16 if gemm == torch.bfloat16 else PATH_CHUNKED_FP16


def describe_paths(device_type: str, dtype: torch.dtype | None = None) -> list[tuple[str, str]]:
    """(features, path) for every combination of soft-capping, sinks and dropout of an
    ``sdpa``-backend call on ``device_type`` with inputs of ``dtype`` (None: float32),
    under the current settings: what ``prefixattn info`` prints."""
    rows = []
    for softcap, sinks in ((False, False), (False, True), (True, False), (True, True)):
        name = "+".join(n for n, on in (("softcap", softcap), ("sinks", sinks)) if on)
        rows.append((name or "plain", feature_path(softcap, sinks, False, device_type, dtype)))
    rows.append(("softcap|sinks with dropout", feature_path(True, True, True, device_type, dtype)))
    return rows


def note_path(path: str) -> None:
    """Log ``"sdpa path: <path>"`` at DEBUG once per distinct path (a set lookup per call);
    a materialising path also warns once. Nothing while ``torch.compile`` traces (a
    logging call breaks the graph): the first eager call says it. ``is_compiling`` is
    asked first: reading ``_seen`` while tracing would guard the graph on its contents
    (an eager call noting a path later would then ask for a recompile)."""
    if torch.compiler.is_compiling() or path in _seen:
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
        t = sinks.to(lse.dtype).reshape(1, -1, 1)  # [1, H, 1]
        out_s = (out.to(lse.dtype) * torch.sigmoid(lse - t)[..., None]).to(q.dtype)
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
            delta = (dout.to(lse_s.dtype) * out_s.to(lse_s.dtype)).sum(-1)  # [B, H, Nq]
            dsink = -(torch.exp(t - lse_s) * delta).sum(dim=(0, 2)).to(ctx.sink_dtype)
        return dq, dk, dv, dsink, None, None, None


def _block_rows(B: int, H: int, Nk: int, Nq: int) -> int:
    """Query rows per block: BLOCK_ELEMS score elements, a multiple of 16, at most Nq."""
    rows = max(16, (BLOCK_ELEMS // max(1, B * H * Nk)) // 16 * 16)
    return min(rows, Nq)


def _block_keys(i1: int, Nq: int, Nk: int, causal: bool) -> int:
    """Keys [0, hi) query rows < i1 can see: causal (bottom-right) stops at i1 - 1 + Nk - Nq."""
    return min(Nk, max(1, i1 + Nk - Nq)) if causal else Nk


def _key_span(mask, i0, i1, hi):
    """The keys [lo, hi') some row of block [i0, i1) sees under ``mask`` (bool
    [B|1, 1, Nq, Nk]), within [0, hi): a sliding window's block skips the keys left of
    it; ``None`` when the block sees no key at all (every row masked: the block is skipped).
    Also whether every key of the span is visible to every row (then no fill is needed).
    Traced (``torch.compile``): every key [0, hi), masked (the span depends on the mask's
    values: a graph break, or an error under ``fullgraph=True``)."""
    if torch.compiler.is_compiling():
        return 0, hi, False
    mb = mask[:, :, i0:i1, :hi]  # [B|1, 1, bq, hi]
    cols = mb.any(dim=2).any(dim=0).view(-1)  # [hi]
    nz = cols.nonzero()
    if nz.numel() == 0:
        return None
    lo, hi = int(nz[0]), int(nz[-1]) + 1
    return lo, hi, bool(mb[..., lo:hi].all())


def _mask_block(x, mask, is_causal, i0, i1, lo, hi, Nq, Nk, fill):
    """Set the invisible entries of block rows [i0, i1) x keys [lo, hi) to ``fill``, in
    place: ``mask`` bool [B|1, 1, Nq, Nk] sliced, or (no mask, ``is_causal``) the block's
    diagonal band only (the keys past the block's first row's last key)::

        keys lo ..... c0 ...... hi        c0 = i0 + Nk - Nq + 1
        row i0  [ ###### | . . . . ]       only [c0, hi) is filled, from a bq x (hi - c0)
        row i1-1[ ###### | # # # # ]       band (# visible)
    """
    if mask is not None:
        x.masked_fill_(~mask[:, :, i0:i1, lo:hi][:, :, None], fill)  # [B|1, 1, 1, bq, w]
    elif is_causal:
        c0 = max(lo, i0 + Nk - Nq + 1)  # the first key some row of the block does not see
        if c0 < hi:
            i = torch.arange(i0, i1, device=x.device)[:, None]
            j = torch.arange(c0, hi, device=x.device)[None, :]
            x[..., c0 - lo :].masked_fill_(j > i + (Nk - Nq), fill)  # band [bq, hi - c0]
    return x


_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
# soft-capped logits lie in [-C, C]: exp(logit) needs no row max while C + ln(Nk) stays
# well inside float32's exponent range (exp(88) overflows, exp(-87) is still normal)
_FIXED_SHIFT_MAX = 80.0


class _Plan:
    """The per-call constants of the chunked path, in the base-2 domain (``z = log2(e) *
    logit``; ``exp2`` is several times cheaper than ``exp`` on the CPU, ``sigmoid`` than
    ``tanh``). Soft-capping: ``C tanh(scale s / C) = 2 C sigmoid(2 scale s / C) - C``, so
    the block holds ``sig = sigmoid(qs k^T)`` with q scaled by ``2 scale / C`` and
    ``z = k1 * sig - C log2(e)``, ``k1 = 2 C log2(e)``; ``d logit / ds = 4 scale
    sig (1 - sig)``. Without it the block holds ``z`` itself (q scaled by ``scale log2(e)``)."""

    def __init__(self, q, k, sinks, scale: float, softcap: float, gemm=None):
        B, H, Nq, D = q.shape
        self.B, self.H, self.Nq, self.D = B, H, Nq, D
        self.Hkv, self.Nk = k.shape[1], k.shape[2]
        self.G = H // self.Hkv
        self.softcap = softcap
        # scores and accumulators: float32 (float64 for float64 inputs)
        self.cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        self.qscale = 2.0 * scale / softcap if softcap else scale * _LOG2E
        self.gscale = 4.0 * scale if softcap else scale  # d logit / ds = gscale * g
        self.k1 = 2.0 * softcap * _LOG2E
        self.t2 = (
            None
            if sinks is None
            else sinks.to(self.cdt).reshape(1, self.Hkv, self.G, 1, 1) * _LOG2E
        )
        self.fixed = bool(softcap) and softcap + math.log(self.Nk + 1) <= _FIXED_SHIFT_MAX
        self.step = _block_rows(B, H, self.Nk, Nq)
        n = B * H * self.step
        self.qbuf = torch.empty(n * D, dtype=self.cdt, device=q.device)
        self.sbuf = torch.empty(n * self.Nk, dtype=self.cdt, device=q.device)
        # one block's P (then dS) rounded to gdt: the half-precision GEMMs' operand
        self.gbuf = None if gemm is None else torch.empty(n * self.Nk, dtype=gemm, device=q.device)

    def blocks(self, mask, is_causal: bool, causal: bool):
        """(i0, i1, lo, hi, full): each query block's rows and its key span [lo, hi)
        (causal: keys past the last row's skipped; a mask: keys no row sees skipped, a
        block that sees nothing skipped), ``full``: no entry of the span needs masking."""
        for i0 in range(0, self.Nq, self.step):
            i1 = min(self.Nq, i0 + self.step)
            hi = _block_keys(i1, self.Nq, self.Nk, causal or is_causal)
            lo, full = 0, mask is None and not (is_causal and i0 + self.Nk - self.Nq + 1 < hi)
            if mask is not None:
                span = _key_span(mask, i0, i1, hi)
                if span is None:
                    continue
                lo, hi, full = span
            yield i0, i1, lo, hi, full

    def scores(self, q, kf, i0, i1, lo, hi):
        """The block's [B, Hkv, G * bq, hi - lo] float32 ``sig`` (or ``z``) in ``sbuf`` and
        its scaled query rows [B, Hkv, G * bq, D] in ``qbuf``."""
        B, Hkv, G, D, bq = self.B, self.Hkv, self.G, self.D, i1 - i0
        qs = self.qbuf[: B * self.H * bq * D].view(B, self.H, bq, D)
        qs.copy_(q[:, :, i0:i1]).mul_(self.qscale)
        qs = qs.view(B, Hkv, G * bq, D)  # heads h = kv * G + g, contiguous
        x = self.sbuf[: B * self.H * bq * (hi - lo)].view(B, Hkv, G * bq, hi - lo)
        torch.matmul(qs, kf[:, :, lo:hi].transpose(-1, -2), out=x)
        return (x.sigmoid_() if self.softcap else x), qs


class ChunkedAttention(torch.autograd.Function):
    """Exact attention over query blocks with soft-capping and/or sinks (differentiable).

    Inputs: q [B, H, Nq, D], k, v [B, Hkv, Nk, D], sinks [H] or None, mask bool
    [B|1, 1, Nq, Nk] or None, is_causal (bottom-right; only with mask None), causal (the
    call is causal: a block reads keys up to its last row's, whatever the mask), scale,
    softcap (0 = none), gemm (None, or bf16 / fp16: see below). Scores in float32 (float64
    for float64 inputs), in the base-2 domain (:class:`_Plan`); per block the forward runs
    one matmul, sigmoid, one scaled add, exp2, a row sum and one matmul (soft-capped logits
    are bounded, so no row max). Saves q, k, v, out and lse [B, H, Nq].

    ``gemm`` None: every GEMM on float32 operands (upcast). ``gemm`` bf16 / fp16 (the
    inputs' dtype): the GEMMs whose output is summed or rounded anyway take ``gemm``
    operands, as PyTorch's fused flash kernel does: the forward's P V (P normalised first,
    so in [0, 1] also for fp16), and dV += P^T dO, dQ = dS K, dK += dS^T Q in the backward
    (a block's product comes back in ``gemm``, is added into the float32 dK, dV and
    written into the float32 dQ). q k^T and dO V^T stay float32 (the scores before the
    soft-cap; dP before dP - Delta, a cancellation)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, mask, is_causal, causal, scale, softcap, gemm=None):  # type: ignore[override]
        pl = _Plan(q, k, sinks, scale, softcap, gemm)
        B, Hkv, G, Nq, Dv = pl.B, pl.Hkv, pl.G, pl.Nq, v.shape[-1]
        kf = k.to(pl.cdt)
        vf = v.to(pl.cdt if gemm is None else gemm)  # the P V GEMM's operand
        out = torch.zeros(B, Hkv, G, Nq, Dv, dtype=q.dtype, device=q.device)
        # a skipped block's rows see no key: lse = the sink's logit (its softmax is the sink
        # alone), or -inf without sinks
        lse = torch.full((B, Hkv, G, Nq), float("-inf"), dtype=pl.cdt, device=q.device)
        if sinks is not None:
            lse.copy_(sinks.to(pl.cdt).reshape(1, Hkv, G, 1).expand_as(lse))
        m2 = None  # fixed shift (log2 domain): 0, or the sink's logit where it is larger
        if pl.fixed:
            m2 = (
                torch.zeros((), dtype=pl.cdt, device=q.device)
                if pl.t2 is None
                else pl.t2.clamp(min=0.0)
            )
        for i0, i1, lo, hi, full in pl.blocks(mask, is_causal, causal):
            bq, w = i1 - i0, hi - lo
            x, _ = pl.scores(q, kf, i0, i1, lo, hi)
            x5 = x.view(B, Hkv, G, bq, w)
            if not full:
                _mask_block(x5, mask, is_causal, i0, i1, lo, hi, Nq, pl.Nk, float("-inf"))
            if pl.fixed:
                m = m2
                e = torch.add(-(softcap * _LOG2E) - m2, x5, alpha=pl.k1, out=x5)
            else:
                if softcap:  # z = k1 * sig - C log2(e), then the row max
                    x5.mul_(pl.k1).sub_(softcap * _LOG2E)
                m = x5.amax(dim=-1, keepdim=True)  # [B, Hkv, G, bq, 1]
                if pl.t2 is not None:
                    m = torch.maximum(m, pl.t2)
                m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
                e = x5.sub_(m)
            e = e.exp2_()
            den = e.sum(dim=-1, keepdim=True)  # [B, Hkv, G, bq, 1]
            if pl.t2 is not None:
                den = den + torch.exp2(pl.t2 - m)
            den1 = torch.where(den > 0, den, torch.ones_like(den))
            if gemm is None:
                o = torch.matmul(x, vf[:, :, lo:hi]).view(B, Hkv, G, bq, Dv)
                out[:, :, :, i0:i1] = o.div_(den1)
            else:  # P = e / den rounded once to gemm, then one gemm GEMM
                pg = pl.gbuf[: x.numel()].view(B, Hkv, G, bq, w)
                torch.div(e, den1, out=pg)
                o = torch.matmul(pg.view(B, Hkv, G * bq, w), vf[:, :, lo:hi])
                out[:, :, :, i0:i1] = o.view(B, Hkv, G, bq, Dv)
            lse[:, :, :, i0:i1] = ((m + torch.log2(den)) * _LN2).squeeze(-1)  # -inf: sees nothing
        ctx.save_for_backward(q, k, v, sinks, mask, out, lse)
        ctx.flags = (is_causal, causal, scale, softcap, gemm)
        return out.view(B, pl.H, Nq, Dv)

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, sinks, mask, out, lse = ctx.saved_tensors
        is_causal, causal, scale, softcap, gemm = ctx.flags
        pl = _Plan(q, k, sinks, scale, softcap, gemm)
        B, Hkv, G, Nq, Nk, D, Dv = pl.B, pl.Hkv, pl.G, pl.Nq, pl.Nk, pl.D, v.shape[-1]
        kf, vf = k.to(pl.cdt), v.to(pl.cdt)
        do = dout.to(pl.cdt).reshape(B, Hkv, G, Nq, Dv)
        if gemm is not None:  # the half-precision GEMMs' other operands
            dog = dout.to(gemm).reshape(B, Hkv, G, Nq, Dv)
            kg3 = k.to(gemm).reshape(B * Hkv, Nk, D)
        delta = (do * out.to(pl.cdt)).sum(-1)  # [B, Hkv, G, Nq]: rowsum(dO * O)
        # a row that sees nothing: lse = -inf; +inf makes its probabilities exp(-inf) = 0
        lse2 = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))
        lse2 = lse2.mul_(_LOG2E).add_(softcap * _LOG2E)  # log2 p = z - lse2 (+ C log2 e)
        dq = torch.zeros(B, Hkv, G, Nq, D, dtype=pl.cdt, device=q.device)
        dk = torch.zeros(B, Hkv, Nk, D, dtype=pl.cdt, device=q.device)
        dv = torch.zeros(B, Hkv, Nk, Dv, dtype=pl.cdt, device=q.device)
        BH = B * Hkv
        kf3, vf3 = kf.reshape(BH, Nk, D), vf.reshape(BH, Nk, Dv)
        gb = pl.gbuf
        dk3, dv3 = dk.view(BH, Nk, D), dv.view(BH, Nk, Dv)
        n = pl.sbuf.numel()
        pbuf = torch.empty(n, dtype=pl.cdt, device=q.device)
        dpbuf = torch.empty(n, dtype=pl.cdt, device=q.device)
        for i0, i1, lo, hi, full in pl.blocks(mask, is_causal, causal):
            bq, w = i1 - i0, hi - lo
            x, qs = pl.scores(q, kf, i0, i1, lo, hi)  # sig (soft-capping) or z
            x5 = x.view(B, Hkv, G, bq, w)
            p = pbuf[: x.numel()].view(B, Hkv, G, bq, w)
            r = lse2[:, :, :, i0:i1, None]  # [B, Hkv, G, bq, 1]
            if softcap:
                torch.add(-r, x5, alpha=pl.k1, out=p)
                x.addcmul_(x, x, value=-1.0)  # g = sig (1 - sig): d logit / ds = 4 scale g
            else:
                torch.sub(x5, r, out=p)
            p = p.exp2_()
            if not full:
                _mask_block(p, mask, is_causal, i0, i1, lo, hi, Nq, Nk, 0.0)
            # [B * Hkv, ...] 3-D views: dk, dv accumulate in place (baddbmm_), no
            # [hi - lo, D] temporary a block
            p3 = p.view(BH, G * bq, w)  # the probabilities
            dob = do[:, :, :, i0:i1].reshape(BH, G * bq, Dv)
            if gemm is None:
                dv3[:, lo:hi].baddbmm_(p3.transpose(-1, -2), dob)
            else:
                pg = gb[: x.numel()].view(BH, G * bq, w).copy_(p3)
                dobg = dog[:, :, :, i0:i1].reshape(BH, G * bq, Dv)
                dv3[:, lo:hi].add_(torch.bmm(pg.transpose(-1, -2), dobg))
            dp = dpbuf[: x.numel()].view(BH, G * bq, w)
            torch.bmm(dob, vf3[:, lo:hi].transpose(-1, -2), out=dp)
            dp5 = dp.view(B, Hkv, G, bq, w)
            ds = dp5.sub_(delta[:, :, :, i0:i1, None]).mul_(p)  # dL / d logit
            if softcap:
                ds.mul_(x5)
            if gemm is None:
                dq[:, :, :, i0:i1] = torch.bmm(dp, kf3[:, lo:hi]).view(B, Hkv, G, bq, D)
                dk3[:, lo:hi].baddbmm_(dp.transpose(-1, -2), qs.view(BH, G * bq, D))
            else:  # dS rounded to gemm; q unscaled (exact in gemm): dk's factor is gscale
                dsg = gb[: x.numel()].view(BH, G * bq, w).copy_(dp)
                dq[:, :, :, i0:i1] = torch.bmm(dsg, kg3[:, lo:hi]).view(B, Hkv, G, bq, D)
                qg = q[:, :, i0:i1].to(gemm).reshape(BH, G * bq, D)
                dk3[:, lo:hi].add_(torch.bmm(dsg.transpose(-1, -2), qg))
        dsink = None
        if sinks is not None and ctx.needs_input_grad[3]:
            t = sinks.to(pl.cdt).reshape(1, Hkv, G, 1)
            dsink = -(torch.exp(t - lse) * delta).sum(dim=(0, 3)).reshape(pl.H).to(sinks.dtype)
        return (
            dq.mul_(pl.gscale).view(B, pl.H, Nq, D).to(q.dtype),
            dk.mul_(pl.gscale / (pl.qscale if gemm is None else 1.0)).to(k.dtype),
            dv.to(v.dtype),
            dsink,
            None,
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
    if path not in _CHUNKED_GEMM:
        raise ValueError(f"feature_attention: no such path {path!r}")
    gemm = _CHUNKED_GEMM[path]
    if gemm is not None and not (q.dtype == k.dtype == v.dtype == gemm):
        raise ValueError(
            f"feature_attention: path {path!r} needs q, k, v in {gemm}, got "
            f"{q.dtype}, {k.dtype}, {v.dtype}"
        )
    return ChunkedAttention.apply(
        q, k, v, sinks, attn_mask, is_causal, causal, float(scale), float(softcap or 0.0), gemm
    )


__all__ = [
    "CPU_FAST_GEMM_DTYPES",
    "PATH_CHUNKED",
    "PATH_CHUNKED_BF16",
    "PATH_CHUNKED_FP16",
    "PATH_FUSED",
    "PATH_PAGED_ROWS",
    "PATH_REFERENCE",
    "PATH_SINK",
    "ChunkedAttention",
    "FlashSinkAttention",
    "block_gemm_dtype",
    "describe_paths",
    "feature_attention",
    "feature_path",
    "flash_lse_available",
    "note_path",
]
