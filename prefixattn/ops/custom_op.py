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
tensors, then ``causal``, ``sm_scale``, ``dropout_p``), ``prefix_lengths`` included, then
the seed: ``fwd(*fields, seed)``, ``bwd(do, out, lse, *fields, seed, need_q, need_k,
need_v, need_prefix)``. The schemas are built from the call's fields (a new field is a new
op argument with no edit here); an op body turns them back into a call (:func:`op_call`)
for the launchers, and the compiled entry point flattens a call into them
(:func:`op_args`).

Validation while compiling: shapes, dtypes, devices and flags are checked at trace time
exactly as in eager mode. The range check of ``prefix_index`` (eager: a host sync and a
Python branch on the values) becomes ``torch._assert_async`` in the graph: no sync; on
CPU an out-of-range index raises ``RuntimeError``, on CUDA it is a device-side assert
(the CUDA context is lost, as for any device assert).
"""

import inspect
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor
from torch.library import custom_op, triton_op, wrap_triton

from .amp import register_lower_precision_autocast
from .backward import attention_backward
from .call import N_TENSORS, TENSOR_FIELDS, AttentionCall
from .forward import attention_forward
from .kernels import source
from .sdpa import torch_backend
from .settings import current_settings
from .validation import AttnProblem, check_kernel_dtype, validate

__all__ = [
    "OP_FIELDS",
    "OP_SCALARS",
    "bwd",
    "bwd_seeded",
    "fwd",
    "fwd_seeded",
    "op_args",
    "op_call",
    "traced_prefix_attention",
]

_SEED_HIGH = 2**31 - 1  # seeds in [0, 2^31 - 1), like args.new_seed


def op_call(*fields: Any) -> tuple[AttentionCall, AttnProblem]:
    """The call of an op's leading arguments (:data:`OP_FIELDS`) on the Triton backend
    with the current settings, and its problem (shape checks only: no device sync)."""
    kw = dict(zip(OP_FIELDS, fields))
    call = AttentionCall(**kw, backend="triton", settings=current_settings())
    return call, validate(call, check_values=False)


def op_args(call: AttentionCall, prob: AttnProblem) -> tuple:
    """A call as the ops' leading arguments (:data:`OP_FIELDS`: the validated softmax
    scale, a float dropout probability)."""
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


# The ops' signatures, from the call's fields: a tensor field is an optional tensor
# argument of every op (q, k, v required); a scalar field needs its type here and its
# (validated) value in :func:`op_args`.
OP_SCALARS: dict[str, type] = {"causal": bool, "sm_scale": float, "dropout_p": float}
OP_FIELDS = (*TENSOR_FIELDS, *OP_SCALARS)
_NEEDS = ("need_q", "need_k", "need_v", "need_prefix")
_GRADS = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def _signed(fn: Any, params: list[tuple[str, Any]], returns: Any) -> Any:
    """``fn`` (which takes ``*args``) with the signature ``params`` -> ``returns``: what
    ``torch.library`` reads to build an op's schema."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    fn.__signature__ = inspect.Signature(
        [inspect.Parameter(n, kind, annotation=t) for n, t in params], return_annotation=returns
    )
    return fn


def _fields_params() -> list[tuple[str, Any]]:
    tensors = [(n, Tensor if n in ("q", "k", "v") else Tensor | None) for n in TENSOR_FIELDS]
    return tensors + list(OP_SCALARS.items())


def _fwd_signed(fn: Any, seed: type) -> Any:
    return _signed(fn, [*_fields_params(), ("seed", seed)], tuple[Tensor, Tensor])


def _bwd_signed(fn: Any, seed: type) -> Any:
    outs = [("do", Tensor), ("out", Tensor), ("lse", Tensor)]
    needs = [(n, bool) for n in _NEEDS]
    return _signed(fn, [*outs, *_fields_params(), ("seed", seed), *needs], _GRADS)


def _split_fwd(args: tuple) -> tuple[tuple, Any]:
    """A forward op's arguments: (the call's fields, seed)."""
    return args[:-1], args[-1]


def _split_bwd(args: tuple) -> tuple[Tensor, Tensor, Tensor, tuple, Any, tuple]:
    """A backward op's arguments: (do, out, lse, the call's fields, seed, needs)."""
    do, out, lse, *rest = args
    return do, out, lse, tuple(rest[:-5]), rest[-5], tuple(rest[-4:])


def _fake_fwd(*args: Any) -> tuple[Tensor, Tensor]:
    """Shapes of :func:`attention_forward`'s results: out like q (contiguous), lse fp32."""
    q = args[0]
    B, H, Nq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, Nq), dtype=torch.float32)


def _fake_bwd(*args: Any) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Shapes of the backward ops' results: like :func:`attention_backward`'s, empty where
    not computed."""
    _, _, _, fields, _, (need_q, need_k, need_v, need_p) = _split_bwd(args)
    q, k, v, prefix_k, prefix_v = fields[:5]
    kv = need_k or need_v
    has_p = need_p and prefix_k is not None
    return (
        q.new_empty(q.shape) if need_q else _empty_grad(q),
        k.new_empty(k.shape) if kv else _empty_grad(q),
        v.new_empty(v.shape) if kv else _empty_grad(q),
        prefix_k.new_empty(prefix_k.shape) if has_p else _empty_grad(q),
        prefix_v.new_empty(prefix_v.shape) if has_p else _empty_grad(q),
    )


def _seed_int(seed: Any) -> Any:
    """The Philox seed as the kernels take it: a ``_seeded`` op's int64 tensor read on the
    host (an opaque op's body runs on real data), a traced op's int as it is."""
    return int(seed) if isinstance(seed, Tensor) else seed


def _forward(args: tuple, wrap: Any = None) -> tuple[Tensor, Tensor]:
    fields, seed = _split_fwd(args)
    call, prob = op_call(*fields)
    return attention_forward(call, prob, _seed_int(seed), wrap)


def _backward_op(args: tuple, wrap: Any = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    do, out, lse, fields, seed, needs = _split_bwd(args)
    call, prob = op_call(*fields)
    grads = attention_backward(call, prob, do, out, lse, _seed_int(seed), needs, wrap)
    return _grads(grads, call.q)


# --------------------------------------------------------------------------------------
# opaque ops (dropout under compile; everything under the Triton interpreter)
# --------------------------------------------------------------------------------------


def _fwd_seeded(*args: Any) -> tuple[Tensor, Tensor]:
    """Forward kernel: ``(out [B, H, Nq, D], lse [B, H, Nq] float32)``; ``seed`` is an
    int64 tensor with one element (the Philox seed)."""
    return _forward(args)


def _bwd_seeded(*args: Any) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward kernels: ``(dq, dk, dv, dprefix_k, dprefix_v)``; a gradient that is not
    needed (or a missing prefix's) is an empty tensor."""
    return _backward_op(args)


fwd_seeded = custom_op("prefixattn::fwd_seeded", _fwd_signed(_fwd_seeded, Tensor), mutates_args=())
fwd_seeded.register_fake(_fake_fwd)
bwd_seeded = custom_op("prefixattn::bwd_seeded", _bwd_signed(_bwd_seeded, Tensor), mutates_args=())
bwd_seeded.register_fake(_fake_bwd)


# --------------------------------------------------------------------------------------
# traceable ops (triton_op + wrap_triton)
# --------------------------------------------------------------------------------------


def _interpreted() -> bool:
    """Whether the current settings' kernels are interpreted (then they cannot be traced:
    the traceable ops run them through the opaque ones)."""
    return source(current_settings()).interpreted()


def _seed_tensor(seed: int) -> Tensor:
    return torch.full((1,), seed, dtype=torch.int64)


def _fwd(*args: Any) -> tuple[Tensor, Tensor]:
    """Forward kernel (``seed``: the Philox seed, used when ``dropout_p > 0``):
    ``(out [B, H, Nq, D], lse [B, H, Nq] float32)``."""
    if _interpreted():  # interpreted kernels cannot be traced: run them opaquely
        return torch.ops.prefixattn.fwd_seeded(*args[:-1], _seed_tensor(args[-1]))
    return _forward(args, wrap_triton)


def _bwd(*args: Any) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward kernels: ``(dq, dk, dv, dprefix_k, dprefix_v)``; a gradient that is not
    needed (or a missing prefix's) is an empty tensor."""
    if _interpreted():
        seed_at = len(args) - 5
        seed = _seed_tensor(args[seed_at])
        return torch.ops.prefixattn.bwd_seeded(*args[:seed_at], seed, *args[seed_at + 1 :])
    return _backward_op(args, wrap_triton)


fwd = triton_op("prefixattn::fwd", _fwd_signed(_fwd, int), mutates_args=())
# The fake implementation triton_op registers is the body; this one only allocates
# (cheaper for shape propagation, and valid for interpreted kernels too). Inductor still
# traces the body through wrap_triton.
fwd.register_fake(_fake_fwd)
bwd = triton_op("prefixattn::bwd", _bwd_signed(_bwd, int), mutates_args=())
bwd.register_fake(_fake_bwd)


# --------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------

_N_OP_INPUTS = len(OP_FIELDS) + 1  # the call's fields, seed


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    """Save what backward needs; the seed is a tensor for the ``_seeded`` ops."""
    *fields, seed = inputs
    out, lse = output
    seed_t = seed if isinstance(seed, Tensor) else None
    ctx.save_for_backward(*fields[:N_TENSORS], out, lse, seed_t)
    ctx.scalars = tuple(fields[N_TENSORS:])
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
    grads = op(do, out, lse, *tensors, *ctx.scalars, seed, *needs)
    wanted = tuple(g if n[i] else None for i, g in enumerate(grads))
    return wanted + (None,) * (_N_OP_INPUTS - len(wanted))


fwd.register_autograd(_backward, setup_context=_setup_context)
fwd_seeded.register_autograd(_backward, setup_context=_setup_context)

# autocast: SDPA's policy (cast q, k, v, prefix_k, prefix_v to the region's dtype, run with
# autocast off; see .amp), so a graph traced under autocast has the casts eager mode makes.
# The backward ops need no rule: their inputs are the forward's (already cast) tensors.
_AUTOCAST_LIB = torch.library.Library("prefixattn", "FRAGMENT")
for _name in ("fwd", "fwd_seeded"):
    register_lower_precision_autocast(_AUTOCAST_LIB, _name, TENSOR_FIELDS.index("prefix_v") + 1)


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
    if call.has_cache and call.backend == "triton":
        raise ValueError(
            "cache_seqlens / cache_batch_idx / block_table / cu_seqlens_q (a KV-cache pool) "
            "are not supported under torch.compile on backend='triton' (CUDA graphs capture "
            "it eagerly); backend='sdpa' / 'reference' trace it"
        )
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
    if prob.window or prob.softcap or prob.has_sinks:
        raise NotImplementedError(
            "window / softcap / sinks under torch.compile run on backend='sdpa' or "
            "'reference'; the compiled Triton custom ops do not take them yet"
        )
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
