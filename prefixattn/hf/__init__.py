"""Hugging Face glue: patch transformers models, prefix tuning, multi-task prefix banks.

Needs the ``hf`` extra (transformers >= 5.10, peft, safetensors). Names are imported on
first use, so ``import prefixattn.hf`` stays cheap.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

# one clear message for every module below (they import transformers at the top)
if importlib.util.find_spec("transformers") is None:  # pragma: no cover - needs the extra
    raise ImportError(
        "prefixattn.hf needs transformers>=5.10: install the 'hf' extra (pip install 'prefixattn[hf]')"
    )

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
    "LayerPrefix": "prefixattn.hf.patching",
    "Tuner": "prefixattn.hf.tuner",
    "MultiTaskPrefixTuning": "prefixattn.hf.multitask",
    "MultiTaskPrefixTuningConfig": "prefixattn.hf.multitask",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prefixattn.hf' has no attribute {name!r}")
