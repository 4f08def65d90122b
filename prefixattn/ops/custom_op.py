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

Every op takes the call's fields in :class:`~prefixattn.ops.call.AttentionCall` order (its
tensors, then ``causal``, ``sm_scale``, ``dropout_p``), ``prefix_lengths`` included: an op
body turns them back into a call (:func:`op_call`) for the launchers, and the compiled
entry point flattens a call into them (:func:`op_args`).

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

from .backward import attention_backward
from .call import N_TENSORS, AttentionCall
from .forward import attention_forward
from .kernels import source
from .sdpa import torch_backend
from .settings import current_settings
from .validation import AttnProblem, check_kernel_dtype, validate

__all__ = [
    "bwd",
    "bwd_seeded",
    "fwd",
    "fwd_seeded",
    "op_args",
    "op_call",
    "traced_prefix_attention",
]

_SEED_HIGH = 2**31 - 1  # seeds in [0, 2^31 - 1), like args.new_seed
Opt = Tensor | None


def op_call(*fields: Any) -> tuple[AttentionCall, AttnProblem]:
    """The call of an op's leading arguments (the call's tensors, causal, sm_scale,
    dropout_p) on the Triton backend with the current settings, and its problem (shape
    checks only: no device sync)."""
    call = AttentionCall(*fields, backend="triton", settings=current_settings())
    return call, validate(call, check_values=False)


def op_args(call: AttentionCall, prob: AttnProblem) -> tuple:
    """A call as the ops' leading arguments (the validated softmax scale, a float
    dropout probability)."""
    return (*call[:N_TENSORS], call.causal, prob.sm_scale, float(call.dropout_p))


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


def _fake_fwd(q: Tensor, *args: Any) -> tuple[Tensor, Tensor]:
    """Shapes of :func:`attention_forward`'s results: out like q (contiguous), lse fp32."""
    B, H, Nq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, Nq), dtype=torch.float32)


def _forward(fields: tuple, seed: int, wrap: Any = None) -> tuple[Tensor, Tensor]:
    call, prob = op_call(*fields)
    return attention_forward(call, prob, seed, wrap)


def _backward_op(
    do: Tensor, fields: tuple, out: Tensor, lse: Tensor, seed: int, needs: tuple, wrap: Any = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    call, prob = op_call(*fields)
    return _grads(attention_backward(call, prob, do, out, lse, seed, needs, wrap), call.q)


# --------------------------------------------------------------------------------------
# opaque ops (dropout under compile; everything under the Triton interpreter)
# --------------------------------------------------------------------------------------


@custom_op("prefixattn::fwd_seeded", mutates_args=())
def fwd_seeded(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Opt, prefix_v: Opt, prefix_index: Opt,
    prefix_lengths: Opt, key_padding_mask: Opt, causal: bool, sm_scale: float,
    dropout_p: float, seed: Tensor,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Forward kernel; ``seed``: int64 tensor with one element (the Philox seed).

    Returns ``(out [B, H, Nq, D], lse [B, H, Nq] float32)``.
    """
    fields = (q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask)
    return _forward((*fields, causal, sm_scale, dropout_p), int(seed))


fwd_seeded.register_fake(_fake_fwd)


@custom_op("prefixattn::bwd_seeded", mutates_args=())
def bwd_seeded(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Opt, prefix_v: Opt,
    prefix_index: Opt, prefix_lengths: Opt, key_padding_mask: Opt, out: Tensor, lse: Tensor,
    causal: bool, sm_scale: float, dropout_p: float, seed: Tensor,
    need_q: bool, need_k: bool, need_v: bool, need_prefix: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Backward kernels: ``(dq, dk, dv, dprefix_k, dprefix_v)``; a gradient that is not
    needed (or a missing prefix's) is an empty tensor."""
    fields = (q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask)
    needs = (need_q, need_k, need_v, need_prefix)
    return _backward_op(do, (*fields, causal, sm_scale, dropout_p), out, lse, int(seed), needs)


bwd_seeded.register_fake(_fake_bwd)


# --------------------------------------------------------------------------------------
# traceable ops (triton_op + wrap_triton)
# --------------------------------------------------------------------------------------


def _interpreted() -> bool:
    """Whether the current settings' kernels are interpreted (then they cannot be traced:
    the traceable ops run them through the opaque ones)."""
    return source(current_settings()).interpreted()


@triton_op("prefixattn::fwd", mutates_args=())
def fwd(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Opt, prefix_v: Opt, prefix_index: Opt,
    prefix_lengths: Opt, key_padding_mask: Opt, causal: bool, sm_scale: float,
    dropout_p: float, seed: int,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Forward kernel (``seed``: the Philox seed, used when ``dropout_p > 0``).

    Returns ``(out [B, H, Nq, D], lse [B, H, Nq] float32)``.
    """
    fields = (q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask,
              causal, sm_scale, dropout_p)  # fmt: skip
    if _interpreted():  # interpreted kernels cannot be traced: run them opaquely
        return torch.ops.prefixattn.fwd_seeded(*fields, torch.full((1,), seed, dtype=torch.int64))
    return _forward(fields, seed, wrap_triton)


# The fake implementation triton_op registers is the body above; this one only allocates
# (cheaper for shape propagation, and valid for interpreted kernels too). Inductor still
# traces the body through wrap_triton.
fwd.register_fake(_fake_fwd)


@triton_op("prefixattn::bwd", mutates_args=())
def bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Opt, prefix_v: Opt,
    prefix_index: Opt, prefix_lengths: Opt, key_padding_mask: Opt, out: Tensor, lse: Tensor,
    causal: bool, sm_scale: float, dropout_p: float, seed: int,
    need_q: bool, need_k: bool, need_v: bool, need_prefix: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Backward kernels: ``(dq, dk, dv, dprefix_k, dprefix_v)``; a gradient that is not
    needed (or a missing prefix's) is an empty tensor."""
    fields = (q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask)
    needs = (need_q, need_k, need_v, need_prefix)
    scalars = (causal, sm_scale, dropout_p)
    if _interpreted():
        seed_t = torch.full((1,), seed, dtype=torch.int64)
        return torch.ops.prefixattn.bwd_seeded(do, *fields, out, lse, *scalars, seed_t, *needs)
    return _backward_op(do, (*fields, *scalars), out, lse, seed, needs, wrap_triton)


bwd.register_fake(_fake_bwd)


# --------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------

_N_OP_INPUTS = N_TENSORS + 4  # the call's tensors, causal, sm_scale, dropout_p, seed


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    """Save what backward needs; the seed is a tensor for the ``_seeded`` ops."""
    *tensors, causal, sm_scale, dropout_p, seed = inputs
    out, lse = output
    seed_t = seed if isinstance(seed, Tensor) else None
    ctx.save_for_backward(*tensors, out, lse, seed_t)
    ctx.scalars = (causal, sm_scale, dropout_p)
    ctx.seed = None if seed_t is not None else seed


def _backward(ctx: Any, do: Tensor, dlse: Tensor | None) -> tuple[Tensor | None, ...]:
    """Gradients of the forward ops' inputs through the matching backward op (``lse`` is
    not differentiable: ``dlse`` is ignored)."""
    *tensors, out, lse, seed_t = ctx.saved_tensors
    n = ctx.needs_input_grad
    needs = (n[0], n[1], n[2], n[3] or n[4])
    if seed_t is not None:
        op, seed = torch.ops.prefixattn.bwd_seeded, seed_t
    else:
        op, seed = torch.ops.prefixattn.bwd, ctx.seed
    dq, dk, dv, dpk, dpv = op(do, *tensors, out, lse, *ctx.scalars, seed, *needs)
    grads = (dq, dk, dv, dpk, dpv)
    return tuple(g if n[i] else None for i, g in enumerate(grads)) + (None,) * (_N_OP_INPUTS - 5)


fwd.register_autograd(_backward, setup_context=_setup_context)
fwd_seeded.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------
# the compiled-mode entry point
# --------------------------------------------------------------------------------------


@torch.compiler.assume_constant_result
def _triton_device_problem(device: torch.device, dtype: torch.dtype) -> str:
    """Why ``backend='triton'`` cannot run on ``device``/``dtype`` ('' if it can).

    Evaluated once at trace time (it reads the settings and imports the kernels).
    """
    settings = current_settings()
    try:  # a duck-typed q
        source(settings).check_device(SimpleNamespace(device=device, dtype=dtype), settings)
    except (TypeError, ValueError) as err:
        return str(err)
    return ""


def traced_prefix_attention(call: AttentionCall) -> Tensor:
    """:func:`prefixattn.prefix_attention` while ``torch.compile`` traces it.

    Same call, checks and results as the eager function, written so that Dynamo traces
    it without graph breaks: no host sync (the ``prefix_index`` / ``prefix_lengths``
    range checks are in-graph ``torch._assert_async``), the Triton path through the
    custom ops above, the reference path as plain tensor ops (Inductor fuses it), the
    sdpa path as SDPA.
    """
    prob = validate(call, check_values=False)
    q, prefix_index, prefix_lengths = call.q, call.prefix_index, call.prefix_lengths
    if prefix_index is not None and prob.B > 0:
        # the eager range check syncs with the device; this one runs in the graph
        in_range = ((prefix_index >= 0) & (prefix_index < prob.T)).all()
        torch._assert_async(in_range, "prefix_index values must be in [0, T) (T bank entries)")
    if prefix_lengths is not None and prob.T > 0:
        in_range = ((prefix_lengths >= 0) & (prefix_lengths <= prob.P)).all()
        torch._assert_async(in_range, "prefix_lengths values must be in [0, P]")
    if call.backend != "triton":
        return torch_backend(call, prob)
    if q.device.type == "cuda":
        check_kernel_dtype(q)
    else:  # CPU: only under TRITON_INTERPRET=1, decided once at trace time
        problem = _triton_device_problem(q.device, q.dtype)
        if problem:
            raise ValueError(problem)
    args = op_args(call, prob)
    if args[-1] > 0.0:
        # a fresh seed per call, drawn inside the graph (from the CPU generator, as eager)
        seed = torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64)
        return torch.ops.prefixattn.fwd_seeded(*args, seed)[0]
    return torch.ops.prefixattn.fwd(*args, 0)[0]
