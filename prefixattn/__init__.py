"""prefixattn: fused Triton attention for prefix tuning and prompt tuning.

The kernel API (:func:`prefix_attention`) needs only torch and triton. The Hugging Face
glue (``patch``, ``unpatch``, ``PrefixTuning``, ``PromptTuning``, ...) is imported on first
use and needs the ``hf`` extra (transformers, peft, safetensors).
"""

from __future__ import annotations

import importlib
from typing import Any

from ._runtime import prefer_passive_omp_wait

# before anything imports torch: OpenMP threads that sleep when idle (prefixattn._runtime)
prefer_passive_omp_wait()

from .ops.attention import prefix_attention  # noqa: E402  (imports torch)

__version__ = "0.1.0"

# name -> module that defines it (imported lazily: transformers is an optional extra)
_LAZY = {
    "patch": "prefixattn.hf.patching",
    "unpatch": "prefixattn.hf.patching",
    "PrefixTuning": "prefixattn.hf.prefix_tuning",
    "PrefixTuningConfig": "prefixattn.hf.prefix_tuning",
    "PromptTuning": "prefixattn.hf.prompt_tuning",
    "PromptTuningConfig": "prefixattn.hf.prompt_tuning",
    "TaskBank": "prefixattn.hf.bank",
    "MultiTaskPrefixTuning": "prefixattn.hf.multitask",
    "MultiTaskPrefixTuningConfig": "prefixattn.hf.multitask",
    "causal_lm_loss": "prefixattn.losses",
}

__all__ = ["__version__", "prefix_attention", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prefixattn' has no attribute {name!r}")
