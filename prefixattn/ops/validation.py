"""Input checking for :func:`prefixattn.prefix_attention`.

Every rule of the public contract that can be checked on the host lives here, so the
reference path and the Triton path accept and refuse exactly the same inputs. Errors are
``TypeError`` (wrong Python type or dtype) or ``ValueError`` (wrong shape, value, device)
and always name the argument and what was expected.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .call import N_TENSORS, AttentionCall

BACKENDS = ("auto", "triton", "sdpa", "reference")
#: What a sliding-window query sees of the prefix (see prefix_attention).
PREFIX_WINDOWS = ("all", "sliding")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The reference path also takes float64 (useful for gradcheck); the kernel does not.
REFERENCE_DTYPES = (*KERNEL_DTYPES, torch.float64)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256

# Prefix layouts, also the kernel's PREFIX_MODE constexpr values.
PREFIX_NONE, PREFIX_SHARED, PREFIX_PER_ROW, PREFIX_BANK = 0, 1, 2, 3
PREFIX_MODE_NAMES = {
    PREFIX_NONE: "none",
    PREFIX_SHARED: "shared",
    PREFIX_PER_ROW: "per-row",
    PREFIX_BANK: "bank",
}


@dataclass(frozen=True)
class AttnProblem:
    """The sizes of one validated call. ``P == 0`` means no prefix."""

    B: int
    H: int
    Hkv: int
    Nq: int
    Nk: int
    P: int
    D: int
    T: int  # number of prefix entries: 1 shared, B per-row, bank size for a bank
    prefix_mode: int  # what the kernel runs: PREFIX_NONE when there is no prefix or P == 0
    layout: int  # the prefix tensors' layout (shared / per-row / bank), even when P == 0
    sm_scale: float
    window: int = 0  # sliding window (sequence keys a query sees), 0 = none
    softcap: float = 0.0  # logit soft-capping C (C * tanh(s / C)), 0 = none
    has_sinks: bool = False  # attention sinks [H] in the softmax denominator
    prefix_windowed: bool = False  # prefix keys leave the window ("sliding"), with a prefix

    @property
    def group(self) -> int:
        return self.H // self.Hkv


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _check_tensor(name: str, t: object, ndim: int | tuple[int, ...], layout: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if t.dim() not in dims:
        raise ValueError(f"{name} must have shape {layout}, got {t.dim()}-D tensor {_shape(t)}")
    return t


def _check_float_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")


def _assert_values(t: torch.Tensor, ok: torch.Tensor, msg: str) -> None:
    """``torch._assert_async(ok, msg)``: no host-device sync. On CPU the assertion fails
    at once and becomes a ValueError naming the values' range; on a GPU it is a
    device-side assert (the error surfaces at the next sync, and the CUDA context is
    lost, as for any device assert), so a call never waits for the GPU and can be
    captured in a CUDA graph."""
    try:
        torch._assert_async(ok, msg)
    except RuntimeError:  # CPU: the check ran now
        lo, hi = torch.aminmax(t)
        raise ValueError(f"{msg}, got values in [{int(lo)}, {int(hi)}]") from None


def check_index_range(prefix_index: torch.Tensor, T: int) -> None:
    """Check 0 <= prefix_index < T without a host-device sync (see :func:`_assert_values`)."""
    ok = torch.logical_and(prefix_index >= 0, prefix_index < T).all()
    _assert_values(
        prefix_index, ok, f"prefix_index values must be in [0, T) with T={T} bank entries"
    )


def check_lengths_range(prefix_lengths: torch.Tensor, P: int) -> None:
    """Check 0 <= prefix_lengths <= P without a host-device sync."""
    msg = f"prefix_lengths values must be in [0, P] with P={P} (the prefix length of prefix_k)"
    _assert_values(
        prefix_lengths, torch.logical_and(prefix_lengths >= 0, prefix_lengths <= P).all(), msg
    )


def check_int64_vector(
    name: str, t: object, size: int, dim: str, device: torch.device, what: str = ""
) -> torch.Tensor:
    """Check that input ``name`` is an int64 tensor of shape [``dim``] = [``size``] on
    ``device`` (``what``: what the dimension counts, for the message)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(
            f"{name} must be an int64 torch.Tensor of shape [{dim}], got {type(t).__name__}"
        )
    if t.dtype != torch.int64:
        raise TypeError(f"{name} must have dtype torch.int64, got {t.dtype}")
    if tuple(t.shape) != (size,):
        what = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape [{dim}]=[{size}]{what}, got {_shape(t)}")
    if t.device != device:
        raise ValueError(f"{name} must be on the device of q ({device}), got {t.device}")
    return t


def check_prefix_lengths(
    prefix_lengths: object,
    prob: AttnProblem,
    device: torch.device,
    check_values: bool = True,
) -> None:
    """Check ``prefix_lengths`` against a validated problem (see :func:`validate`).

    It is an int64 [T] tensor on the device of q, one visible prefix length per entry of a
    bank (T bank entries, with ``prefix_index``) or of a per-row prefix (T = B), each in
    [0, P]. A shared prefix [Hkv, P, D] and no prefix take no lengths.
    """
    if prob.layout == PREFIX_NONE:
        raise ValueError("prefix_lengths was given without prefix_k/prefix_v")
    if prob.layout == PREFIX_SHARED:
        raise ValueError(
            "prefix_lengths needs a bank [T, Hkv, P, D] with prefix_index or a per-row prefix "
            "[B, Hkv, P, D]; prefix_k is a shared prefix [Hkv, P, D] (slice it to the length "
            "you want instead)"
        )
    what = "T bank entries" if prob.layout == PREFIX_BANK else "B rows of the per-row prefix"
    check_int64_vector("prefix_lengths", prefix_lengths, prob.T, "T", device, what)
    if check_values and prob.T > 0:
        check_lengths_range(prefix_lengths, prob.P)


def validate(call: AttentionCall, check_values: bool = True) -> AttnProblem:
    """Check every input of ``call`` against the contract; return the problem sizes.

    ``check_values=False`` skips the range checks of ``prefix_index`` and
    ``prefix_lengths`` (traced calls check them in the graph instead).
    """
    q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, sinks = call[
        :N_TENSORS
    ]
    causal, sm_scale, dropout_p, backend = call.causal, call.sm_scale, call.dropout_p, call.backend
    check_index_values = check_values
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _check_tensor("q", q, 4, "[B, H, Nq, D]")
    _check_tensor("k", k, 4, "[B, Hkv, Nk, D]")
    _check_tensor("v", v, 4, "[B, Hkv, Nk, D]")
    _check_float_dtype("q", q, REFERENCE_DTYPES)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")
    B, H, Nq, D = q.shape
    Bk, Hkv, Nk, Dk = k.shape
    if call.block_table is not None:  # a paged cache: Nk counts each row's logical keys
        Nk = check_block_table(call, B)
    elif Bk != B and call.cache_batch_idx is None:
        pool = " (a KV-cache pool of other than B slots needs cache_batch_idx)"
        raise ValueError(
            f"k must have batch size B={B} (from q), got k of shape {_shape(k)}"
            + (pool if call.cache_seqlens is not None else "")
        )
    if Dk != D:
        raise ValueError(f"k must have head dim D={D} (from q), got k of shape {_shape(k)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the shape of k {_shape(k)}, got {_shape(v)}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(
            f"the number of query heads H={H} (q) must be a multiple of the number of "
            f"key/value heads Hkv={Hkv} (k, v)"
        )
    if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        raise ValueError(
            f"head dim D of q/k/v must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got D={D}"
        )

    # --- prefix -------------------------------------------------------------------
    if (prefix_k is None) != (prefix_v is None):
        missing = "prefix_v" if prefix_v is None else "prefix_k"
        raise ValueError(f"{missing} must be given together with the other prefix tensor")
    P, T, mode = 0, 0, PREFIX_NONE
    if prefix_k is not None:
        layouts = "[Hkv, P, D] (shared), [B, Hkv, P, D] (per row) or [T, Hkv, P, D] (bank)"
        _check_tensor("prefix_k", prefix_k, (3, 4), layouts)
        _check_tensor("prefix_v", prefix_v, (3, 4), layouts)
        for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
            if t.dtype != q.dtype:
                raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
            if t.device != q.device:
                raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")
        if tuple(prefix_v.shape) != tuple(prefix_k.shape):
            raise ValueError(
                f"prefix_v must have the shape of prefix_k {_shape(prefix_k)}, "
                f"got {_shape(prefix_v)}"
            )
        ph, P, pd = prefix_k.shape[-3:]
        if ph != Hkv or pd != D:
            raise ValueError(
                f"prefix_k must have Hkv={Hkv} heads and head dim D={D} in its last three "
                f"dims [.., Hkv, P, D], got {_shape(prefix_k)}"
            )
        if prefix_k.dim() == 3:
            if prefix_index is not None:
                raise ValueError(
                    "prefix_index selects entries of a bank prefix [T, Hkv, P, D]; "
                    f"prefix_k is a shared prefix {_shape(prefix_k)}"
                )
            mode, T = PREFIX_SHARED, 1
        elif prefix_index is None:
            if prefix_k.shape[0] != B:
                raise ValueError(
                    f"prefix_k of shape [B, Hkv, P, D] must have B={B} rows (from q), got "
                    f"{_shape(prefix_k)}; for a bank of T prefixes pass prefix_index"
                )
            mode, T = PREFIX_PER_ROW, B
        else:
            mode, T = PREFIX_BANK, prefix_k.shape[0]
            if T == 0:
                raise ValueError("prefix_k bank [T, Hkv, P, D] must have T >= 1 entries")
    if prefix_index is not None:
        if prefix_k is None:
            raise ValueError("prefix_index was given without prefix_k/prefix_v")
        check_int64_vector("prefix_index", prefix_index, B, "B", q.device)
        if check_index_values and B > 0:
            check_index_range(prefix_index, T)
    layout = mode
    if P == 0:
        mode = PREFIX_NONE

    # --- mask, flags, scalars --------------------------------------------------------
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(
                f"key_padding_mask must be a bool torch.Tensor of shape [B, Nk], got "
                f"{type(key_padding_mask).__name__}"
            )
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(
                f"key_padding_mask must have dtype torch.bool (True = real token), got "
                f"{key_padding_mask.dtype}; convert with .bool()"
            )
        if tuple(key_padding_mask.shape) != (B, Nk):
            raise ValueError(
                f"key_padding_mask must have shape [B, Nk]=[{B}, {Nk}], got "
                f"{_shape(key_padding_mask)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(
                f"key_padding_mask must be on the device of q ({q.device}), got "
                f"{key_padding_mask.device}"
            )
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if sm_scale is None:
        scale = 1.0 / math.sqrt(D)
    else:
        if isinstance(sm_scale, bool) or not isinstance(sm_scale, numbers.Real):
            raise TypeError(f"sm_scale must be a float or None, got {type(sm_scale).__name__}")
        scale = float(sm_scale)
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"sm_scale must be a finite positive float, got {sm_scale!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")

    window, softcap = check_features(call)
    prob = AttnProblem(
        B=B,
        H=H,
        Hkv=Hkv,
        Nq=Nq,
        Nk=Nk,
        P=P,
        D=D,
        T=T,
        prefix_mode=mode,
        layout=layout,
        sm_scale=scale,
        window=window,
        softcap=softcap,
        has_sinks=sinks is not None,
        prefix_windowed=window > 0 and call.prefix_window == "sliding" and mode != PREFIX_NONE,
    )
    if prefix_lengths is not None:
        check_prefix_lengths(prefix_lengths, prob, q.device, check_index_values)
    if call.has_cache:
        check_cache(call, prob, check_index_values)
    return prob


def _check_range(t: torch.Tensor, lo: int, hi: int, msg: str) -> None:
    """Check lo <= t <= hi without a host-device sync (see :func:`check_index_range`)."""
    ok = torch.logical_and(t >= lo, t <= hi).all()
    try:
        torch._assert_async(ok, msg)
    except RuntimeError:  # CPU: the check ran now
        a, b = torch.aminmax(t)
        raise ValueError(f"{msg}, got values in [{int(a)}, {int(b)}]") from None


def check_cache_values(call: AttentionCall, Nk: int, S: int) -> None:
    """The ranges of ``cache_seqlens`` ([0, Nk]), ``cache_batch_idx`` ([0, S)) and of the
    ``block_table`` entries a row reads ([0, num_blocks), S = num_blocks): every call (they
    change every decoding step), without a host-device sync."""
    csl, cbi = call.cache_seqlens, call.cache_batch_idx
    if csl is not None and csl.numel():
        _check_range(csl, 0, Nk, f"cache_seqlens values must be in [0, Nmax] with Nmax={Nk}")
    if cbi is not None and cbi.numel():
        _check_range(cbi, 0, S - 1, f"cache_batch_idx values must be in [0, S) with S={S} slots")
    bt = call.block_table
    if bt is not None and csl is not None and bt.numel():
        check_block_table_values(bt, csl, call.k.shape[2], S)


def needed_blocks(block_table: torch.Tensor, cache_seqlens: torch.Tensor, block_size: int):
    """bool [B, max_blocks]: the entries of ``block_table`` row b reads (its first
    cdiv(cache_seqlens[b], block_size) blocks); the others may hold anything."""
    n = (cache_seqlens.to(torch.int64) + block_size - 1) // block_size  # [B]
    return torch.arange(block_table.shape[1], device=block_table.device)[None, :] < n[:, None]


def check_block_table_values(
    block_table: torch.Tensor, cache_seqlens: torch.Tensor, block_size: int, num_blocks: int
) -> None:
    """Check that every block a row reads is in [0, num_blocks) (see :func:`_assert_values`:
    no host-device sync on a GPU)."""
    need = needed_blocks(block_table, cache_seqlens, block_size)
    ok = torch.logical_or(
        torch.logical_and(block_table >= 0, block_table < num_blocks), ~need
    ).all()
    msg = (
        f"block_table values of the blocks a row reads (j < cdiv(cache_seqlens[b], "
        f"block_size={block_size})) must be in [0, num_blocks) with num_blocks={num_blocks}"
    )
    try:
        torch._assert_async(ok, msg)
    except RuntimeError:  # CPU: the check ran now
        used = block_table[need]
        raise ValueError(f"{msg}, got values in [{int(used.min())}, {int(used.max())}]") from None


def check_block_table(call: AttentionCall, B: int) -> int:
    """Check ``block_table`` (and what it needs: ``cache_seqlens``, no ``cache_batch_idx``,
    a block pool [num_blocks, Hkv, block_size, D] with block_size a power of two >= 16);
    returns the logical keys per row, max_blocks * block_size."""
    bt, k = call.block_table, call.k
    if not isinstance(bt, torch.Tensor):
        raise TypeError(
            f"block_table must be an int32 torch.Tensor of shape [B, max_blocks], got "
            f"{type(bt).__name__}"
        )
    if bt.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"block_table must have dtype torch.int32 (or int64), got {bt.dtype}")
    if bt.dim() != 2 or bt.shape[0] != B:
        raise ValueError(
            f"block_table must have shape [B, max_blocks] with B={B}, got {_shape(bt)}"
        )
    if bt.device != call.q.device:
        raise ValueError(
            f"block_table must be on the device of q ({call.q.device}), got {bt.device}"
        )
    if call.cache_seqlens is None:
        raise ValueError(
            "block_table (a paged KV cache) needs cache_seqlens: the keys row b sees, [0, "
            "cache_seqlens[b])"
        )
    if call.cache_batch_idx is not None:
        raise ValueError(
            "cache_batch_idx cannot be combined with block_table: the block table already "
            "says where each row's keys are"
        )
    block_size = k.shape[2]
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(
            f"k, v with block_table are the block pool [num_blocks, Hkv, block_size, D] with "
            f"block_size a power of two >= 16, got k of shape {_shape(k)}"
        )
    return bt.shape[1] * block_size


def check_no_grad(call: AttentionCall) -> None:
    """A KV-cache call is inference only: refuse inputs that require grad."""
    grads = [n for n in ("q", "k", "v", "prefix_k", "prefix_v")
             if isinstance(getattr(call, n), torch.Tensor) and getattr(call, n).requires_grad]  # fmt: skip
    if grads:
        raise ValueError(
            f"cache_seqlens / cache_batch_idx / block_table (a KV-cache pool) are for inference: "
            f"{', '.join(grads)} require grad; call under torch.no_grad()"
        )


def check_cache(call: AttentionCall, prob: AttnProblem, check_values: bool = True) -> None:
    """Check ``cache_seqlens`` / ``cache_batch_idx`` of a validated call (see
    :func:`prefixattn.prefix_attention`)."""
    B, S = prob.B, call.k.shape[0]
    for name in ("cache_seqlens", "cache_batch_idx"):
        t = getattr(call, name)
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"{name} must be an int32 or int64 torch.Tensor of shape [B], got "
                f"{type(t).__name__}"
            )
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must have dtype torch.int32 or torch.int64, got {t.dtype}")
        if tuple(t.shape) != (B,):
            raise ValueError(f"{name} must have shape [B]=[{B}], got {_shape(t)}")
        if t.device != call.q.device:
            raise ValueError(f"{name} must be on the device of q ({call.q.device}), got {t.device}")
    if float(call.dropout_p) > 0.0:
        raise ValueError(
            "dropout_p must be 0 with cache_seqlens / cache_batch_idx / block_table (a "
            f"KV-cache pool is for inference), got {call.dropout_p!r}"
        )
    if prob.prefix_windowed:
        raise ValueError(
            "prefix_window='sliding' is not supported with cache_seqlens / cache_batch_idx / "
            "block_table (a KV-cache pool); use prefix_window='all'"
        )
    if check_values:
        check_cache_values(call, prob.Nk, S)


def check_features(call: AttentionCall) -> tuple[int, float]:
    """Check the sliding window, soft-capping, sinks and prefix-window inputs of ``call``;
    returns (window or 0, softcap or 0.0)."""
    window, softcap, sinks, prefix_window = (
        call.window,
        call.softcap,
        call.sinks,
        call.prefix_window,
    )
    if prefix_window not in PREFIX_WINDOWS:
        raise ValueError(f"prefix_window must be one of {PREFIX_WINDOWS}, got {prefix_window!r}")
    w = 0
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, numbers.Integral):
            raise TypeError(f"window must be an int >= 1 or None, got {type(window).__name__}")
        if window < 1:
            raise ValueError(f"window must be an int >= 1 (keys a query sees), got {window!r}")
        if not call.causal:
            raise ValueError("window (a causal sliding window) needs causal=True")
        w = int(window)
    cap = 0.0
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
            raise TypeError(f"softcap must be a float > 0 or None, got {type(softcap).__name__}")
        cap = float(softcap)
        if not math.isfinite(cap) or cap <= 0:
            raise ValueError(f"softcap must be a finite float > 0, got {softcap!r}")
    if sinks is not None:
        q = call.q
        if not isinstance(sinks, torch.Tensor):
            raise TypeError(
                f"sinks must be a float torch.Tensor of shape [H] or None, got "
                f"{type(sinks).__name__}"
            )
        _check_float_dtype("sinks", sinks, REFERENCE_DTYPES)
        H = q.shape[1]
        if tuple(sinks.shape) != (H,):
            raise ValueError(
                f"sinks must have shape [H]=[{H}] (one per query head), got {_shape(sinks)}"
            )
        if sinks.device != q.device:
            raise ValueError(f"sinks must be on the device of q ({q.device}), got {sinks.device}")
    return w, cap


def check_kernel_dtype(q: torch.Tensor) -> None:
    """The Triton kernel takes float16, bfloat16 and float32."""
    _check_float_dtype("q", q, KERNEL_DTYPES)


def auto_backend(device: torch.device, dtype: torch.dtype) -> str:
    """What ``backend="auto"`` runs for tensors on ``device`` of ``dtype``: ``"triton"`` for
    CUDA tensors of a kernel dtype, ``"sdpa"`` (PyTorch's fused attention) everywhere else."""
    return "triton" if device.type == "cuda" and dtype in KERNEL_DTYPES else "sdpa"


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """``"auto"``: the Triton kernel for CUDA tensors of a kernel dtype, else ``"sdpa"``;
    any other value as given (validation names a bad one, or a q that is not a tensor)."""
    if backend == "auto" and isinstance(q, torch.Tensor):
        return auto_backend(q.device, q.dtype)
    return backend
