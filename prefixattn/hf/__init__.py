"""Hugging Face glue: patch transformers models, prefix tuning, multi-task prefix banks.

Needs the ``hf`` extra (transformers >= 5.10, peft, safetensors). Names are imported on
first use, so ``import prefixattn.hf`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> module that defines it
_LAZY = {
    "patch": "prefixattn.hf.patching",
    "unpatch": "prefixattn.hf.patching",
    "is_patched": "prefixattn.hf.patching",
    "set_prefix": "prefixattn.hf.patching",
    "get_prefix": "prefixattn.hf.patching",
    "PrefixProvider": "prefixattn.hf.patching",
    "StaticPrefix": "prefixattn.hf.patching",
    "PrefixTuning": "prefixattn.hf.prefix_tuning",
    "PrefixTuningConfig": "prefixattn.hf.prefix_tuning",
    "TaskBank": "prefixattn.hf.bank",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prefixattn.hf' has no attribute {name!r}")
