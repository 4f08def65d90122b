"""Triton kernels of prefixattn (``@triton.jit`` functions only; launchers live in
``prefixattn.ops.forward`` and ``prefixattn.ops.backward``).

Import this module lazily: Triton decides at decoration time whether a kernel is compiled
or interpreted (``TRITON_INTERPRET=1``), so ``prefixattn`` imports it on the first call.
"""

from .prefix_attention_bwd import (
    BWD_DKDV,
    BWD_DQ,
    BWD_FUSED,
    BWD_PREFIX,
    _attn_bwd,
    _attn_bwd_preprocess,
    _prefix_grad_reduce,
)
from .prefix_attention_fwd import _attn_fwd

# the split backward's three launches: ``_attn_bwd`` with KIND = BWD_DKDV, BWD_DQ,
# BWD_PREFIX (one kernel, one parameter list; the names keep launches apart in logs)
_attn_bwd_dkdv = _attn_bwd_dq = _attn_bwd_prefix_dkdv = _attn_bwd

__all__ = [
    "BWD_DKDV",
    "BWD_DQ",
    "BWD_FUSED",
    "BWD_PREFIX",
    "_attn_bwd",
    "_attn_bwd_dkdv",
    "_attn_bwd_dq",
    "_attn_bwd_prefix_dkdv",
    "_attn_bwd_preprocess",
    "_attn_fwd",
    "_prefix_grad_reduce",
]
