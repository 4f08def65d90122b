"""``torch.autograd.Function`` around a call plan's Triton launches."""

from __future__ import annotations

from typing import Any

import torch

from .args import new_seed
from .call import N_TENSORS, AttentionCall, new_call
from .plan import CallPlan


class PrefixAttentionFunction(torch.autograd.Function):
    """Forward saves (the call's tensors, out, lse, dropout seed); backward recomputes the
    probabilities from lse, and regenerates the dropout mask from the seed. Both run
    through the call's :class:`~prefixattn.ops.plan.CallPlan`.

    ``apply(q, k, v, prefix_k, prefix_v, call, plan[, sinks])``: the differentiable
    tensors are passed on their own (autograd tracks arguments), and are the call's;
    ``sinks`` only when the call has them (its gradient is :func:`sink_grad`)."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        prefix_k: torch.Tensor | None,
        prefix_v: torch.Tensor | None,
        call: AttentionCall,
        plan: CallPlan,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        seed = new_seed() if plan.dropout else 0
        out, lse, aligned = plan.forward(call, seed)
        ctx.save_for_backward(*call[:N_TENSORS], out, lse)
        # aligned: the inputs' alignment, for the backward's direct launches (same tensors)
        ctx.scalars, ctx.seed, ctx.plan, ctx.aligned = call[N_TENSORS:], seed, plan, aligned
        return out

    @staticmethod
    def backward(ctx: Any, do: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        *inputs, out, lse = ctx.saved_tensors
        call = new_call(AttentionCall, (*inputs, *ctx.scalars))
        n = ctx.needs_input_grad
        dq, dk, dv, dpk, dpv = ctx.plan.backward(
            call, do, out, lse, ctx.seed, (n[0], n[1], n[2], n[3] or n[4]), ctx.aligned
        )
        return (
            dq,
            dk if n[1] else None,
            dv if n[2] else None,
            dpk if n[3] else None,
            dpv if n[4] else None,
            None,
            None,
            # (a call without sinks passes 7 inputs: a trailing None is allowed)
            sink_grad(call.sinks, lse, out, do) if call.sinks is not None and n[7] else None,
        )


def sink_grad(
    sinks: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, do: torch.Tensor
) -> torch.Tensor:
    """The gradient of attention sinks [H]: a sink's logit has no value, so its dP is 0 and
    dsink[h] = -sum_{b, i} p_sink[b, h, i] * Delta[b, h, i], with p_sink = exp(sink[h] -
    lse) and Delta = rowsum(dO * O) (lse: the forward's log2 log-sum-exp [B, H, Nq], the
    sink included). A fixed-order reduction in fp32: bitwise reproducible."""
    delta = (do.float() * out.float()).sum(-1)  # [B, H, Nq]
    p_sink = torch.exp2(sinks.float()[None, :, None] * 1.4426950408889634 - lse)  # [B, H, Nq]
    return (-(p_sink * delta).sum((0, 2))).to(sinks.dtype)


# torch.autograd.Function.apply (Python) binds default arguments and unwraps dead
# functorch wrappers on every call; neither applies here (no defaults; functorch
# transforms are checked), so eager calls go to the C implementation directly.
_c_apply = torch._C._FunctionBase.__dict__["apply"]


def apply_function(fn: type[torch.autograd.Function], *args: Any) -> torch.Tensor:
    """``fn.apply(*args)`` without the Python wrapper's per-call work, when no functorch
    transform is active (else the normal ``apply``)."""
    if torch._C._are_functorch_transforms_active():
        return fn.apply(*args)
    return _c_apply.__get__(None, fn)(*args)
