"""One call of :func:`prefixattn.prefix_attention`, as one object: :class:`AttentionCall`.

``prefix_attention`` builds it once per call; every layer below takes it (validation, the
call plan and its key, the launchers, the autograd function, the ``torch.compile`` custom
ops, the ``sdpa`` and ``reference`` backends) instead of the inputs one by one.

Adding an input
    1. a field here (tensors before ``causal``: :data:`N_TENSORS` counts them, and the
       autograd function saves exactly those), with a default if it is optional;
    2. ``prefix_attention``'s parameter (``attention.py``) and its place in the call;
    3. its checks in ``validation.validate`` (and in the plan key in ``plan.lookup_plan``,
       if it changes what a plan sets up: a shape, a dtype, a flag);
    4. its use where it matters: a kernel argument (``args.pointer_args`` for a tensor,
       ``forward.forward_spec`` / ``backward.backward_specs`` for a scalar or constexpr),
       the math of ``reference.py`` and ``sdpa.py``; a tensor with one entry per batch
       row is also cut in :meth:`AttentionCall.rows` (batches past the grid limit);
    5. for ``torch.compile``: nothing for a tensor field (the custom ops' schemas are
       built from the fields); a scalar field gets its schema type in
       ``custom_op.OP_SCALARS`` and its value in ``custom_op.op_args``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch


class AttentionCall(NamedTuple):
    """The inputs of one call (immutable). Tensors first, then the scalars.

    ``backend`` is resolved (``"triton"``, ``"sdpa"`` or ``"reference"``; ``"auto"`` never
    reaches a layer below ``prefix_attention``, except a bad value that validation names).
    ``sm_scale`` is as given (``None``: 1 / sqrt(D)); the validated scale is the plan's
    ``AttnProblem.sm_scale``. ``settings``: the :class:`~prefixattn.ops.settings.Settings`
    active when the call was made.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    prefix_k: torch.Tensor | None = None
    prefix_v: torch.Tensor | None = None
    prefix_index: torch.Tensor | None = None
    prefix_lengths: torch.Tensor | None = None
    key_padding_mask: torch.Tensor | None = None
    sinks: torch.Tensor | None = None  # [H] attention sinks (one logit per query head)
    causal: bool = True
    sm_scale: float | None = None
    dropout_p: float = 0.0
    window: int | None = None  # sliding window: sequence keys a query sees
    softcap: float | None = None  # logit soft-capping C: s -> C * tanh(s / C)
    prefix_window: str = "all"  # what a windowed query sees of the prefix: "all" | "sliding"
    backend: str = "triton"
    settings: Any = None  # Settings (typed loosely: settings.py sits beside this module)
    # a KV-cache pool (as flash_attn_with_kvcache): k, v are [S, Hkv, Nmax, D] slots; row b
    # reads slot cache_batch_idx[b] (None: slot b) up to key cache_seqlens[b] (None: all
    # Nmax), causal aligned to its own length. Inference only (no autograd, no dropout,
    # no torch.compile); not among the N_TENSORS an autograd call saves.
    cache_seqlens: torch.Tensor | None = None
    cache_batch_idx: torch.Tensor | None = None
    # a paged KV cache (as flash_attn_with_kvcache's block_table): k, v are the block pool
    # [num_blocks, Hkv, block_size, D]; row b's key j lives in block block_table[b, j //
    # block_size] at offset j % block_size. int32 [B, max_blocks]; needs cache_seqlens.
    block_table: torch.Tensor | None = None

    @property
    def has_cache(self) -> bool:
        """Whether the call reads a KV-cache pool (cache_seqlens, cache_batch_idx or
        block_table)."""
        return (
            self.cache_seqlens is not None
            or self.cache_batch_idx is not None
            or self.block_table is not None
        )

    def rows(self, rows: slice, per_row: bool) -> AttentionCall:
        """Batch rows ``rows`` of the call (views; a shared prefix or a bank stays whole,
        a per-row prefix and its lengths are cut with the rows)."""
        if rows == slice(None):
            return self
        # k, v are the slot pool or the block pool: kept whole
        pool = self.cache_batch_idx is not None or self.block_table is not None
        return self._replace(
            q=self.q[rows],
            k=self.k if pool else self.k[rows],
            v=self.v if pool else self.v[rows],
            prefix_k=take(self.prefix_k, rows) if per_row else self.prefix_k,
            prefix_v=take(self.prefix_v, rows) if per_row else self.prefix_v,
            prefix_index=take(self.prefix_index, rows),
            prefix_lengths=take(self.prefix_lengths, rows) if per_row else self.prefix_lengths,
            key_padding_mask=take(self.key_padding_mask, rows),
            cache_seqlens=take(self.cache_seqlens, rows),
            cache_batch_idx=take(self.cache_batch_idx, rows),
            block_table=take(self.block_table, rows),
        )


# the tensor fields come first: call[:N_TENSORS] are the tensors (or None)
N_TENSORS = AttentionCall._fields.index("causal")
TENSOR_FIELDS = AttentionCall._fields[:N_TENSORS]
# builds a call without the generated __new__'s Python frame (the per-call host path):
# ``new_call(AttentionCall, (q, k, ...))`` with every field given, in order
new_call = tuple.__new__


def take(t: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """Rows ``rows`` of ``t`` (a view); ``t`` itself for the whole batch or None."""
    return t if t is None or rows == slice(None) else t[rows]


__all__ = ["N_TENSORS", "TENSOR_FIELDS", "AttentionCall", "new_call", "take"]
