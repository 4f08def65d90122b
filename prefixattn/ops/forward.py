"""The forward kernel's launch: :func:`forward_spec` (what a call plan caches) and
:func:`attention_forward` (the general path: ``torch.compile``'s custom ops and batches
past the grid limit, which launches the same specs)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .args import batch_chunks, chunk_seed, input_args, input_flags, strides
from .call import AttentionCall, take
from .kernels import LaunchSpec, launch_all
from .validation import PREFIX_PER_ROW, AttnProblem


def forward_spec(
    call: AttentionCall, out: torch.Tensor, lse: torch.Tensor, seed: int, prob: AttnProblem
) -> LaunchSpec:
    """The ``_attn_fwd`` launch over the rows of ``prob`` (``call``: those rows)."""
    Nq, B, H = prob.Nq, prob.B, prob.H
    vals = {**input_args(call, prob), "Out": out, "LSE": lse, "seed": seed}
    vals.update(strides("o", out, "zhmd"))
    return LaunchSpec(
        "fwd", "_attn_fwd", lambda m: (math.ceil(Nq / m["BLOCK_M"]), B * H),
        Nq, max(prob.Nk, prob.P), vals, input_flags(call, prob), call.settings,
    )  # fmt: skip


def forward_outputs(q: torch.Tensor, prob: AttnProblem) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh (out [B, H, Nq, D] in q's dtype, lse [B, H, Nq] fp32)."""
    B, H, Nq, D = prob.B, prob.H, prob.Nq, prob.D
    if prob.varlen:  # packed rows: [1, H, total_q, D]
        B = 1
    out = torch.empty((B, H, Nq, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    return out, lse


def attention_forward(
    call: AttentionCall, prob: AttnProblem, seed: int, wrap: Callable | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``_attn_fwd``; returns (out [B, H, Nq, D] in q's dtype, lse [B, H, Nq] fp32).

    ``wrap``: ``torch.library.wrap_triton`` while ``torch.compile`` traces (custom ops).
    Eager calls normally go through a cached call plan (``plan.py``), which launches the
    same spec.
    """
    q = call.q
    out, lse = forward_outputs(q, prob)
    if prob.B * prob.H * prob.Nq == 0:
        return out, lse
    per_row = prob.layout == PREFIX_PER_ROW  # the prefix is cut with the rows
    specs = [
        forward_spec(call.rows(rows, per_row), take(out, rows), take(lse, rows),
                     chunk_seed(seed, i), sub)
        for i, (rows, sub) in enumerate(batch_chunks(prob, call.settings, wrap))
    ]  # fmt: skip
    launch_all(specs, q, wrap)
    return out, lse


__all__ = ["attention_forward", "forward_outputs", "forward_spec"]
