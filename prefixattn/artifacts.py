"""Recognise and load a saved tuner: prefixattn prefix / soft prompt, or a PEFT adapter."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

PREFIX = "prefix"
PROMPT = "prompt"
TRAIN_INFO = "prefixattn_train.json"  # written next to the artifact by ``prefixattn train``


def artifact_kind(path: str | os.PathLike) -> tuple[str, str]:
    """``(method, source)`` of a saved tuner directory.

    ``method`` is ``"prefix"`` or ``"prompt"``; ``source`` is ``"prefixattn"`` (written by
    ``PrefixTuning.save`` / ``PromptTuning.save``) or ``"peft"`` (a PEFT ``PREFIX_TUNING``
    / ``PROMPT_TUNING`` adapter directory).

    Raises:
        ValueError: ``path`` is none of those.
    """
    from .hf.prefix_tuning import CONFIG_NAME as PREFIX_CONFIG
    from .hf.prompt_tuning import CONFIG_NAME as PROMPT_CONFIG

    p = Path(path)
    if (p / PREFIX_CONFIG).is_file():
        return PREFIX, "prefixattn"
    if (p / PROMPT_CONFIG).is_file():
        return PROMPT, "prefixattn"
    peft_cfg = p / "adapter_config.json"
    if peft_cfg.is_file():
        kind = str(json.loads(peft_cfg.read_text()).get("peft_type", "")).split(".")[-1]
        if kind == "PREFIX_TUNING":
            return PREFIX, "peft"
        if kind == "PROMPT_TUNING":
            return PROMPT, "peft"
        raise ValueError(
            f"artifact: PEFT adapter type {kind!r} in {str(p)!r} is not supported "
            "(expected PREFIX_TUNING or PROMPT_TUNING)"
        )
    raise ValueError(
        f"artifact: expected a directory written by PrefixTuning.save / PromptTuning.save "
        f"or a PEFT prefix/prompt-tuning adapter, got {str(p)!r}"
    )


def load_artifact(path: str | os.PathLike, model: Any, *, backend: str = "auto") -> Any:
    """Load the tuner saved in ``path`` onto ``model``.

    Returns:
        a :class:`~prefixattn.PrefixTuning` or :class:`~prefixattn.PromptTuning`.

    Raises:
        ValueError: ``path`` is not a saved tuner, or it does not fit ``model``.
    """
    from .hf.prefix_tuning import PrefixTuning
    from .hf.prompt_tuning import PromptTuning

    method, source = artifact_kind(path)
    if method == PREFIX:
        if source == "peft":
            return PrefixTuning.from_peft(path, model, backend=backend)
        return PrefixTuning.load(path, model, backend=backend)
    if source == "peft":
        return PromptTuning.from_peft(path, model)
    return PromptTuning.load(path, model)


def read_train_info(path: str | os.PathLike) -> dict[str, Any]:
    """The ``prefixattn_train.json`` that ``prefixattn train`` wrote (``{}`` if none)."""
    f = Path(path) / TRAIN_INFO
    if not f.is_file():
        return {}
    data = json.loads(f.read_text())
    return data if isinstance(data, dict) else {}


def artifact_bytes(path: str | os.PathLike) -> int:
    """Total size of the files in directory ``path``."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
