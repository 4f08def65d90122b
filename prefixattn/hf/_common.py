"""Helpers shared by :mod:`prefixattn.hf.prefix_tuning` and :mod:`prefixattn.hf.prompt_tuning`.

Argument checks of the two config dataclasses, their dict round trip, and the readers of
the two on-disk formats (a saved prefixattn artifact, a PEFT adapter directory). Error types
and messages are part of the public behaviour of both modules: keep them as they are.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file
from safetensors.torch import save as _safetensors_bytes

__all__ = [
    "INIT_STRATEGIES",
    "PEFT_WEIGHTS_KEY",
    "TuningConfigBase",
    "is_int",
    "read_artifact",
    "read_peft_dir",
]

INIT_STRATEGIES = ("random", "vocab", "text")
PEFT_WEIGHTS_KEY = "prompt_embeddings"

_C = TypeVar("_C", bound="TuningConfigBase")


def is_int(x: object) -> bool:
    """``x`` is an ``int`` and not a ``bool``."""
    return isinstance(x, int) and not isinstance(x, bool)


class TuningConfigBase:
    """Base of the config dataclasses of :class:`PrefixTuning` and :class:`PromptTuning`.

    A subclass is a dataclass with (at least) the fields ``num_virtual_tokens``, ``init``
    and ``init_text``; it calls :meth:`_check_num_virtual_tokens` and :meth:`_check_init`
    from its ``__post_init__`` and inherits the JSON round trip :meth:`to_dict` /
    :meth:`from_dict`.
    """

    num_virtual_tokens: Any
    init: Any
    init_text: Any

    def _check_num_virtual_tokens(self) -> None:
        """``num_virtual_tokens`` must be an int >= 1, else ``ValueError``."""
        n = self.num_virtual_tokens
        if not is_int(n) or n < 1:
            raise ValueError(f"num_virtual_tokens must be an int >= 1, got {n!r}")

    def _check_chunked_loss(self) -> None:
        """``chunked_loss`` must be a bool, else ``TypeError``."""
        flag = getattr(self, "chunked_loss", False)
        if not isinstance(flag, bool):
            raise TypeError(f"chunked_loss must be a bool, got {type(flag).__name__}")

    def _check_init(self) -> None:
        """``init`` must be one of :data:`INIT_STRATEGIES`, with ``init_text`` iff "text".

        Raises:
            ValueError: unknown ``init``, or ``init_text`` missing for / given without "text".
            TypeError: ``init_text`` is neither a str nor a list of token ids.
        """
        init, init_text = self.init, self.init_text
        if init not in INIT_STRATEGIES:
            raise ValueError(f"init must be one of {INIT_STRATEGIES}, got {init!r}")
        if init == "text" and init_text is None:
            raise ValueError(
                "init='text' needs init_text (a string with a tokenizer, or token ids)"
            )
        if init != "text" and init_text is not None:
            raise ValueError(f"init_text is only used with init='text', got init={init!r}")
        if init_text is not None and not isinstance(init_text, (str, list)):
            raise TypeError(
                f"init_text must be a str or a list of token ids, got {type(init_text).__name__}"
            )

    #: the base model's config, set when a tuner is built on it (not a field: not saved)
    _model_config: Any = None

    def __getattr__(self, name: str) -> Any:
        """Attributes the tuner config does not have come from the base model's config
        (``model_type``, ``pad_token_id``, ...), as ``PeftModel.config`` gives them: HF
        trainers read ``model.config`` of the model they train."""
        cfg = self.__dict__.get("_model_config") or type(self)._model_config
        if name.startswith("__") or cfg is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(cfg, name)

    def get_text_config(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's text config (what ``Trainer`` / TRL read through
        ``model.config``; a ``PeftModel`` answers the same way).

        Raises:
            AttributeError: the config is not attached to a tuner yet.
        """
        if self._model_config is None:
            raise AttributeError(f"this {type(self).__name__} is not attached to a model")
        return self._model_config.get_text_config(*args, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls: type[_C], data: Mapping[str, Any]) -> _C:
        """Build from :meth:`to_dict` output; unknown keys raise ``ValueError``."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}")
        return cls(**dict(data))


def read_artifact(
    path: Path,
    config_name: str,
    weights_name: str,
    fmt: str,
    version: int,
    *,
    writer: str,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read an artifact saved by ``{writer}.save``: its JSON metadata and its tensors.

    Arguments:
        path: the artifact directory.
        config_name, weights_name: the JSON and the safetensors file in it.
        fmt, version: the expected ``format`` and ``version`` entries of the JSON.
        writer: the class whose ``save`` writes the artifact (for the error message).

    Returns:
        ``(meta, tensors)``: the parsed JSON and the tensors of the weights file.

    Raises:
        ValueError: a file is missing, or the JSON has another format or version.
    """
    cfg_file, w_file = path / config_name, path / weights_name
    if not cfg_file.is_file() or not w_file.is_file():
        raise ValueError(
            f"path must be a directory written by {writer}.save ({config_name} and "
            f"{weights_name}), got {str(path)!r}"
        )
    meta = json.loads(cfg_file.read_text())
    if meta.get("format") != fmt:
        raise ValueError(f"{config_name} in path is not a {fmt} file")
    if meta.get("version") != version:
        raise ValueError(f"unsupported {fmt} version {meta.get('version')!r}")
    return meta, load_file(str(w_file))


def read_peft_dir(
    path: Path, check: Callable[[dict[str, Any]], None] | None = None
) -> tuple[dict[str, Any], torch.Tensor]:
    """adapter_config.json and the ``prompt_embeddings`` tensor of a PEFT adapter directory.

    Arguments:
        path: the adapter directory (``adapter_model.safetensors`` or ``.bin`` in it).
        check: called with the adapter config before the weights are read (it raises on an
            adapter of the wrong kind).

    Raises:
        ValueError: a file is missing, or the weights lack ``prompt_embeddings``.
    """
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise ValueError(
            f"adapter must be a PEFT adapter directory with adapter_config.json, got {str(path)!r}"
        )
    pcfg = json.loads(cfg_file.read_text())
    if check is not None:
        check(pcfg)
    st, binf = path / "adapter_model.safetensors", path / "adapter_model.bin"
    if st.is_file():
        tensors = load_file(str(st))
    elif binf.is_file():
        tensors = torch.load(str(binf), map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"adapter directory {str(path)!r} has no adapter_model.safetensors/.bin")
    if PEFT_WEIGHTS_KEY not in tensors:
        raise ValueError(
            f"adapter weights must contain {PEFT_WEIGHTS_KEY!r}, got keys {sorted(tensors)}"
        )
    return pcfg, tensors[PEFT_WEIGHTS_KEY]


def save_tensors(
    tensors: Mapping[str, torch.Tensor], file: Path, metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` to the safetensors ``file`` with an ordinary file's permissions.

    ``safetensors.torch.save_file`` leaves its file mode 0600 whatever the umask; written
    as bytes here, the file gets the same mode as the JSON beside it (0666 minus the umask).
    """
    Path(file).write_bytes(_safetensors_bytes(dict(tensors), metadata=metadata))
