"""``torch.autograd.Function`` around the Triton launchers."""

from __future__ import annotations

from typing import Any

import torch

from .launch import attention_backward, attention_forward, new_seed
from .validation import AttnProblem


class PrefixAttentionFunction(torch.autograd.Function):
    """Forward saves (q, k, v, prefix, out, lse, dropout seed); backward recomputes the
    probabilities from lse, and regenerates the dropout mask from the seed."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        prefix_k: torch.Tensor | None,
        prefix_v: torch.Tensor | None,
        prefix_index: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        causal: bool,
        dropout_p: float,
        prob: AttnProblem,
        prefix_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        seed = new_seed() if dropout_p > 0.0 else 0
        out, lse = attention_forward(
            q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask,
            causal, dropout_p, seed, prob, prefix_lengths=prefix_lengths,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse)
        ctx.prefix_lengths = prefix_lengths  # int64 [T], never differentiated
        ctx.causal, ctx.dropout_p, ctx.seed, ctx.prob = causal, dropout_p, seed, prob
        return out

    @staticmethod
    def backward(ctx: Any, do: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, prefix_k, prefix_v, prefix_index, kpm, out, lse = ctx.saved_tensors
        n = ctx.needs_input_grad
        dq, dk, dv, dpk, dpv = attention_backward(
            do, q, k, v, prefix_k, prefix_v, prefix_index, kpm, out, lse,
            ctx.causal, ctx.dropout_p, ctx.seed, ctx.prob,
            needs=(n[0], n[1], n[2], n[3] or n[4]), prefix_lengths=ctx.prefix_lengths,
        )  # fmt: skip
        return (
            dq,
            dk if n[1] else None,
            dv if n[2] else None,
            dpk if n[3] else None,
            dpv if n[4] else None,
            None, None, None, None, None, None,
        )  # fmt: skip
