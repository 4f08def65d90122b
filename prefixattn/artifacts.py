"""Recognise and load a saved tuner: prefixattn prefix / soft prompt, or a PEFT adapter.

The formats themselves (recognising and reading them) live in the task store,
:mod:`prefixattn.hf.task_store`, below the tuners, the bank and the server; this module
re-exports them and adds :func:`load_artifact`, which builds a tuner object on a model.
"""

from __future__ import annotations

import os
from typing import Any

from .hf.prefix_tuning import PrefixTuning
from .hf.prompt_tuning import PromptTuning
from .hf.task_store import (
    PREFIX,
    PROMPT,
    TRAIN_INFO,
    artifact_bytes,
    artifact_kind,
    read_task,
    read_train_info,
)

__all__ = [
    "PREFIX",
    "PROMPT",
    "TRAIN_INFO",
    "artifact_bytes",
    "artifact_kind",
    "load_artifact",
    "read_task",
    "read_train_info",
]


def load_artifact(path: str | os.PathLike, model: Any, *, backend: str = "auto") -> Any:
    """Load the tuner saved in ``path`` onto ``model``.

    Returns:
        a :class:`~prefixattn.PrefixTuning` or :class:`~prefixattn.PromptTuning`.

    Raises:
        ValueError: ``path`` is not a saved tuner, or it does not fit ``model``.
    """
    method, source = artifact_kind(path)
    if method == PREFIX:
        if source == "peft":
            return PrefixTuning.from_peft(path, model, backend=backend)
        return PrefixTuning.load(path, model, backend=backend)
    if source == "peft":
        return PromptTuning.from_peft(path, model)
    return PromptTuning.load(path, model)
