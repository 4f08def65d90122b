"""The kernel as PyTorch custom operators, so that ``torch.compile`` traces through it.

Eager calls of :func:`prefixattn.prefix_attention` never come here: they keep the plain
``torch.autograd.Function`` of :mod:`.autograd` (a custom op costs dispatcher and Python
work on every call). Inside ``torch.compile`` (``torch.compiler.is_compiling()``) the public
function calls :func:`traced_prefix_attention`, which uses these operators:

``prefixattn::fwd`` / ``prefixattn::bwd``
    ``torch.library.triton_op``: the launchers of :mod:`.launch` with every kernel wrapped in
    ``torch.library.wrap_triton``, so the compiler sees the Triton kernels themselves
    (Inductor schedules, autotunes and can CUDA-graph them; ``triton.autotune`` configs and
    their pruning go to Inductor's autotuner). ``fwd`` has an autograd formula that calls
    ``bwd``; both have a fake (meta) implementation. Used for calls without dropout.

``prefixattn::fwd_seeded`` / ``prefixattn::bwd_seeded``
    ``torch.library.custom_op``: the same launchers, opaque to the compiler, with the
    dropout seed as an int64 tensor. A traced graph cannot turn a random tensor into the
    Python int the kernels take, so calls *with* dropout use these (the seed is drawn in
    the graph with ``torch.randint``; backward regenerates the mask from the same seed).
    Under ``TRITON_INTERPRET=1`` the kernels are Python functions that need real data, so
    ``fwd``/``bwd`` route to these as well: that is how the compiled Triton path is tested
    on CPU.

Validation while compiling: shapes, dtypes, devices and flags are checked at trace time
exactly as in eager mode. The range check of ``prefix_index`` (eager: a host sync and a
Python branch on the values) becomes ``torch._assert_async`` in the graph: no sync; on
CPU an out-of-range index raises ``RuntimeError``, on CUDA it is a device-side assert
(the CUDA context is lost, as for any device assert).
"""

from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor
from torch.library import custom_op, triton_op, wrap_triton

from .attention import resolve_backend
from .launch import (
    attention_backward,
    attention_forward,
    check_triton_device,
    kernels_interpreted,
)
from .reference import reference_prefix_attention
from .sdpa import sdpa_prefix_attention
from .validation import AttnProblem, check_kernel_dtype, validate

__all__ = [
    "bwd",
    "bwd_seeded",
    "fwd",
    "fwd_seeded",
    "traced_prefix_attention",
]

_SEED_HIGH = 2**31 - 1  # seeds in [0, 2^31 - 1), like launch.new_seed


def _problem(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor | None,
    prefix_v: Tensor | None,
    prefix_index: Tensor | None,
    key_padding_mask: Tensor | None,
    causal: bool,
    sm_scale: float,
    dropout_p: float,
) -> AttnProblem:
    """The :class:`AttnProblem` of an op call (shape checks only: no device sync)."""
    return validate(
        q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask,
        causal, sm_scale, dropout_p, "triton", check_index_values=False,
    )  # fmt: skip


def _empty_grad(t: Tensor) -> Tensor:
    """Placeholder for a gradient that is not computed (ops cannot return None)."""
    return t.new_empty((0,))


def _grads(
    grads: tuple[Tensor | None, ...], q: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`attention_backward`'s gradients with placeholders for the ``None`` ones."""
    dq, dk, dv, dpk, dpv = (g if g is not None else _empty_grad(q) for g in grads)
    return dq, dk, dv, dpk, dpv


def _fake_bwd(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor | None,
    prefix_v: Tensor | None,
    *args: Any,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Shapes of the backward ops' results (the last four arguments are the need flags):
    like :func:`attention_backward`'s, empty where not computed."""
    need_q, need_k, need_v, need_p = args[-4:]
    kv = need_k or need_v
    has_p = need_p and prefix_k is not None
    return (
        q.new_empty(q.shape) if need_q else _empty_grad(q),
        k.new_empty(k.shape) if kv else _empty_grad(q),
        v.new_empty(v.shape) if kv else _empty_grad(q),
        prefix_k.new_empty(prefix_k.shape) if has_p else _empty_grad(q),
        prefix_v.new_empty(prefix_v.shape) if has_p else _empty_grad(q),
    )


def _fake_fwd(q: Tensor) -> tuple[Tensor, Tensor]:
    """Shapes of :func:`attention_forward`'s results: out like q (contiguous), lse fp32."""
    B, H, Nq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, Nq), dtype=torch.float32)


# --------------------------------------------------------------------------------------
# opaque ops (dropout under compile; everything under the Triton interpreter)
# --------------------------------------------------------------------------------------


@custom_op("prefixattn::fwd_seeded", mutates_args=())
def fwd_seeded(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor | None,
    prefix_v: Tensor | None,
    prefix_index: Tensor | None,
    key_padding_mask: Tensor | None,
    causal: bool,
    sm_scale: float,
    dropout_p: float,
    seed: Tensor,
) -> tuple[Tensor, Tensor]:
    """Forward kernel; ``seed``: int64 tensor with one element (the Philox seed).

    Returns ``(out [B, H, Nq, D], lse [B, H, Nq] float32)``.
    """
    prob = _problem(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask,
                    causal, sm_scale, dropout_p)  # fmt: skip
    return attention_forward(
        q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask,
        causal, dropout_p, int(seed), prob,
    )  # fmt: skip


@fwd_seeded.register_fake
def _fwd_seeded_fake(q: Tensor, *args: Any) -> tuple[Tensor, Tensor]:
    return _fake_fwd(q)


@custom_op("prefixattn::bwd_seeded", mutates_args=())
def bwd_seeded(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor | None,
    prefix_v: Tensor | None,
    prefix_index: Tensor | None,
    key_padding_mask: Tensor | None,
    out: Tensor,
    lse: Tensor,
    causal: bool,
    sm_scale: float,
    dropout_p: float,
    seed: Tensor,
    need_q: bool,
    need_k: bool,
    need_v: bool,
    need_prefix: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward kernels: ``(dq, dk, dv, dprefix_k, dprefix_v)``; a gradient that is not
    needed (or a missing prefix's) is an empty tensor."""
    prob = _problem(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask,
                    causal, sm_scale, dropout_p)  # fmt: skip
    grads = attention_backward(
        do, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse,
        causal, dropout_p, int(seed), prob, needs=(need_q, need_k, need_v, need_prefix),
    )  # fmt: skip
    return _grads(grads, q)


@bwd_seeded.register_fake
def _bwd_seeded_fake(*args: Any) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _fake_bwd(*args)


# --------------------------------------------------------------------------------------
# traceable ops (triton_op + wrap_triton)
# --------------------------------------------------------------------------------------


@triton_op("prefixattn::fwd", mutates_args=())
def fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor | None,
    prefix_v: Tensor | None,
    prefix_index: Tensor | None,
    key_padding_mask: Tensor | None,
    causal: bool,
    sm_scale: float,
    dropout_p: float,
    seed: int,
) -> tuple[Tensor, Tensor]:
    """Forward kernel (``seed``: the Philox seed, used when ``dropout_p > 0``).

    Returns ``(out [B, H, Nq, D], lse [B, H, Nq] float32)``.
    """
    if kernels_interpreted():  # interpreted kernels cannot be traced: run them opaquely
        seed_t = torch.full((1,), seed, dtype=torch.int64)
        return torch.ops.prefixattn.fwd_seeded(
            q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask,
            causal, sm_scale, dropout_p, seed_t,
        )  # fmt: skip
    prob = _problem(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask,
                    causal, sm_scale, dropout_p)  # fmt: skip
    return attention_forward(
        q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask,
        causal, dropout_p, seed, prob, wrap=wrap_triton,
    )  # fmt: skip


# The fake implementation triton_op registers is the body above; this one only allocates
# (cheaper for shape propagation, and valid for interpreted kernels too). Inductor still
# traces the body through wrap_triton.
@fwd.register_fake
def _fwd_fake(q: Tensor, *args: Any) -> tuple[Tensor, Tensor]:
    return _fake_fwd(q)


@triton_op("prefixattn::bwd", mutates_args=())
def bwd(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor | None,
    prefix_v: Tensor | None,
    prefix_index: Tensor | None,
    key_padding_mask: Tensor | None,
    out: Tensor,
    lse: Tensor,
    causal: bool,
    sm_scale: float,
    dropout_p: float,
    seed: int,
    need_q: bool,
    need_k: bool,
    need_v: bool,
    need_prefix: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward kernels: ``(dq, dk, dv, dprefix_k, dprefix_v)``; a gradient that is not
    needed (or a missing prefix's) is an empty tensor."""
    if kernels_interpreted():
        seed_t = torch.full((1,), seed, dtype=torch.int64)
        return torch.ops.prefixattn.bwd_seeded(
            do, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse,
            causal, sm_scale, dropout_p, seed_t, need_q, need_k, need_v, need_prefix,
        )  # fmt: skip
    prob = _problem(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask,
                    causal, sm_scale, dropout_p)  # fmt: skip
    grads = attention_backward(
        do, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse,
        causal, dropout_p, seed, prob, needs=(need_q, need_k, need_v, need_prefix),
        wrap=wrap_triton,
    )  # fmt: skip
    return _grads(grads, q)


@bwd.register_fake
def _bwd_fake(*args: Any) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _fake_bwd(*args)


# --------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    """Save what backward needs; the seed is a tensor for the ``_seeded`` ops."""
    q, k, v, pk, pv, pidx, kpm, causal, sm_scale, dropout_p, seed = inputs
    out, lse = output
    seed_t = seed if isinstance(seed, Tensor) else None
    ctx.save_for_backward(q, k, v, pk, pv, pidx, kpm, out, lse, seed_t)
    ctx.causal, ctx.sm_scale, ctx.dropout_p = causal, sm_scale, dropout_p
    ctx.seed = None if seed_t is not None else seed


def _backward(ctx: Any, do: Tensor, dlse: Tensor | None) -> tuple[Tensor | None, ...]:
    """Gradients of the forward ops' inputs through the matching backward op (``lse`` is
    not differentiable: ``dlse`` is ignored)."""
    q, k, v, pk, pv, pidx, kpm, out, lse, seed_t = ctx.saved_tensors
    n = ctx.needs_input_grad
    needs = (n[0], n[1], n[2], n[3] or n[4])
    if seed_t is not None:
        op, seed = torch.ops.prefixattn.bwd_seeded, seed_t
    else:
        op, seed = torch.ops.prefixattn.bwd, ctx.seed
    dq, dk, dv, dpk, dpv = op(
        do, q, k, v, pk, pv, pidx, kpm, out, lse,
        ctx.causal, ctx.sm_scale, ctx.dropout_p, seed, *needs,
    )  # fmt: skip
    return (
        dq if n[0] else None,
        dk if n[1] else None,
        dv if n[2] else None,
        dpk if n[3] else None,
        dpv if n[4] else None,
        None, None, None, None, None, None,
    )  # fmt: skip


fwd.register_autograd(_backward, setup_context=_setup_context)
fwd_seeded.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------
# the compiled-mode entry point
# --------------------------------------------------------------------------------------


@torch.compiler.assume_constant_result
def _triton_device_problem(device: torch.device, dtype: torch.dtype) -> str:
    """Why ``backend='triton'`` cannot run on ``device``/``dtype`` ('' if it can).

    Evaluated once at trace time (it reads the environment and imports the kernels).
    """
    try:
        check_triton_device(SimpleNamespace(device=device, dtype=dtype))  # duck-typed q
    except (TypeError, ValueError) as err:
        return str(err)
    return ""


def traced_prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor | None,
    prefix_v: Tensor | None,
    prefix_index: Tensor | None,
    key_padding_mask: Tensor | None,
    causal: bool,
    sm_scale: float | None,
    dropout_p: float,
    backend: str,
    prefix_lengths: Tensor | None = None,
) -> Tensor:
    """:func:`prefixattn.prefix_attention` while ``torch.compile`` traces it.

    Same arguments, checks and results as the eager function, written so that Dynamo
    traces it without graph breaks: no host sync (the ``prefix_index`` range check is an
    in-graph ``torch._assert_async``), the Triton path through the custom ops above, the
    reference path as plain tensor ops (Inductor fuses it), the sdpa path as SDPA.

    ``prefix_lengths`` (a ragged bank) is traced on the reference and sdpa paths; the
    Triton custom ops do not take it yet, so a compiled Triton call with it raises
    ``ValueError``.
    """
    prob = validate(
        q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask,
        causal, sm_scale, dropout_p, backend, check_index_values=False,
        prefix_lengths=prefix_lengths,
    )  # fmt: skip
    dropout_p = float(dropout_p)
    if prefix_index is not None and prob.B > 0:
        # the eager range check syncs with the device; this one runs in the graph
        in_range = ((prefix_index >= 0) & (prefix_index < prob.T)).all()
        torch._assert_async(in_range, "prefix_index values must be in [0, T) (T bank entries)")
    if prefix_lengths is not None and prob.T > 0:
        in_range = ((prefix_lengths >= 0) & (prefix_lengths <= prob.P)).all()
        torch._assert_async(in_range, "prefix_lengths values must be in [0, P]")
    resolved = resolve_backend(backend, q)
    if resolved == "sdpa":
        return sdpa_prefix_attention(
            q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask,
            causal, dropout_p, prob, prefix_lengths,
        )  # fmt: skip
    if resolved != "triton":
        return reference_prefix_attention(
            q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, causal, dropout_p, prob,
            prefix_lengths,
        )  # fmt: skip
    if prefix_lengths is not None:
        raise ValueError(
            "prefix_lengths is not supported on the Triton path under torch.compile yet "
            "(the prefixattn::fwd/bwd custom ops do not take it); call prefix_attention "
            "eagerly (torch.compiler.disable) or use backend='reference'"
        )
    if q.device.type == "cuda":
        check_kernel_dtype(q)
    else:  # CPU: only under TRITON_INTERPRET=1, decided once at trace time
        problem = _triton_device_problem(q.device, q.dtype)
        if problem:
            raise ValueError(problem)
    if dropout_p > 0.0:
        # a fresh seed per call, drawn inside the graph (from the CPU generator, as eager)
        seed = torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64)
        out, _ = torch.ops.prefixattn.fwd_seeded(
            q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask,
            causal, prob.sm_scale, dropout_p, seed,
        )  # fmt: skip
        return out
    out, _ = torch.ops.prefixattn.fwd(
        q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask,
        causal, prob.sm_scale, dropout_p, 0,
    )  # fmt: skip
    return out
