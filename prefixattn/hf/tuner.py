"""What :class:`PrefixTuning` and :class:`PromptTuning` share: :class:`Tuner`.

A tuner wraps a frozen transformers decoder and owns a few trainable tensors. The base
class does everything that does not depend on *where* those tensors enter the model:

- the model check (once, here), freezing, the uninitialised constructor used by ``load``
  and ``from_peft``;
- ``save`` / ``load`` of the tuner's own artifact (a safetensors file + a JSON file with
  ``format``, ``version``, ``model_type`` and the config), PEFT import / export framing;
- ``init_text`` tokenization (:func:`text_ids`), gradient checkpointing, parameter counts;
- the Hugging Face ``Trainer`` hooks (:mod:`prefixattn.hf.trainer_hooks`).

It also holds the position helpers a tuner and a :class:`~prefixattn.TaskBank` use to shift
input positions (:func:`offset_positions`, :class:`PositionOffsetHook`,
:func:`generate_with`): one implementation for a common offset and for per-row offsets.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys
from transformers import PreTrainedModel

from ..losses import check_chunked_loss_support
from ._common import PEFT_WEIGHTS_KEY, TuningConfigBase, is_int, read_peft_dir, save_tensors
from ._compat import cache_arg
from .patching import PrefixProvider, set_prefix

__all__ = [
    "PositionOffsetHook",
    "Tuner",
    "check_model_type",
    "check_peft_config",
    "generate_with",
    "model_device",
    "offset_positions",
    "packed_inputs",
    "text_ids",
]

_T = TypeVar("_T", bound="Tuner")
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
#: the file transformers' Trainer writes a model's ``state_dict()`` to in a checkpoint
TRAINER_WEIGHTS_NAME = "model.safetensors"
#: the ``state_dict()`` entry holding a tuner's JSON metadata (uint8 bytes)
STATE_META_KEY = "prefixattn.meta"


def model_inputs(kwargs: dict[str, Any], **named: Any) -> dict[str, Any]:
    """``kwargs`` plus the explicitly named model inputs that are not None."""
    return {**{k: v for k, v in named.items() if v is not None}, **kwargs}


def meta_tensor(meta: Mapping[str, Any]) -> torch.Tensor:
    """JSON metadata as a uint8 [n] tensor (safetensors files hold only tensors)."""
    raw = json.dumps(meta, sort_keys=True).encode()
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()  # [n]


def read_meta_tensor(t: torch.Tensor) -> dict[str, Any]:
    """The metadata :func:`meta_tensor` stored."""
    return json.loads(bytes(t.to("cpu", torch.uint8).tolist()).decode())


def read_trainer_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """``(meta, tensors)`` of a tuner checkpoint written by transformers' ``Trainer``
    (``model.safetensors`` holding a tuner's ``state_dict()``), or None if ``path`` has none."""
    f = path / TRAINER_WEIGHTS_NAME
    if not f.is_file():
        return None
    tensors = load_file(str(f))
    if STATE_META_KEY not in tensors:
        return None
    return read_meta_tensor(tensors.pop(STATE_META_KEY)), tensors


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def check_model_type(meta: Mapping[str, Any], model: PreTrainedModel, what: str) -> None:
    """Saved ``model_type`` must match ``model``'s (when both are known), else ``ValueError``."""
    saved, have = meta.get("model_type"), getattr(model.config, "model_type", None)
    if saved and have and saved != have:
        raise ValueError(f"{what} was trained on a {saved!r} model, model is {have!r}")


def check_peft_config(pcfg: Mapping[str, Any], peft_type: str) -> None:
    """``pcfg`` is a decoder-only PEFT adapter config of type ``peft_type``, else ``ValueError``."""
    got = str(pcfg.get("peft_type", "")).split(".")[-1]
    if got != peft_type:
        raise ValueError(f"adapter must be a {peft_type} adapter, got peft_type={got!r}")
    if pcfg.get("num_transformer_submodules") not in (None, 1):
        raise ValueError(
            "adapter must be for a decoder-only model (num_transformer_submodules=1), got "
            f"{pcfg.get('num_transformer_submodules')}"
        )


def text_ids(
    init_text: str | Sequence[int] | torch.Tensor, tokenizer: Any
) -> tuple[torch.Tensor, str | list[int]]:
    """Token ids int64 [n] for ``init_text`` and its JSON-able form (stored in the config).

    Raises:
        ValueError: a string without ``tokenizer``, or no token at all.
        TypeError: ``init_text`` is not a str / sequence of ints / 1-D int tensor, or the
            tokenizer is not callable.
    """
    if isinstance(init_text, str):
        if tokenizer is None:
            raise ValueError(
                "init_text given as a string needs tokenizer= (or pass init_text as token ids)"
            )
        if not callable(tokenizer):
            raise TypeError(
                f"tokenizer must be a callable Hugging Face tokenizer, got {type(tokenizer).__name__}"
            )
        ids = list(tokenizer(init_text, add_special_tokens=False)["input_ids"])
        stored: str | list[int] = init_text
    elif isinstance(init_text, torch.Tensor):
        if init_text.dim() != 1 or init_text.dtype not in (torch.int32, torch.int64):
            raise TypeError(
                f"init_text given as a tensor must be 1-D integer token ids, got "
                f"{init_text.dim()}-D {init_text.dtype}"
            )
        ids = init_text.tolist()
        stored = ids
    elif isinstance(init_text, Sequence) and all(is_int(i) for i in init_text):
        ids = list(init_text)
        stored = ids
    else:
        raise TypeError(
            "init_text must be a str, a sequence of int token ids or a 1-D int tensor, got "
            f"{type(init_text).__name__}"
        )
    if len(ids) == 0:
        raise ValueError("init_text must contain at least one token")
    return torch.tensor(ids, dtype=torch.int64), stored


def prepare_init_text(
    init: str, init_text: str | Sequence[int] | torch.Tensor | None, tokenizer: Any
) -> tuple[torch.Tensor | None, str | list[int] | None]:
    """``(ids [n] or None, stored form or None)`` of a constructor's ``init_text``.

    Raises:
        ValueError: ``tokenizer`` without a string ``init_text``, ``init_text`` without
            ``init="text"``.
    """
    if tokenizer is not None and not isinstance(init_text, str):
        raise ValueError(
            "tokenizer is only used to tokenize a string init_text (init='text'); "
            f"got init_text={type(init_text).__name__}"
        )
    if init_text is None:
        return None, None
    if init != "text":
        raise ValueError(f"init_text is only used with init='text', got init={init!r}")
    return text_ids(init_text, tokenizer)


def repeat_to(ids: torch.Tensor, n: int) -> torch.Tensor:
    """``ids`` [m] repeated or cut to exactly ``n`` tokens: [n]."""
    reps = -(-n // ids.numel())
    return ids.repeat(reps)[:n]  # [n]


# ------------------------------------------------------------------------ positions


def packed_inputs(
    kwargs: dict[str, Any], input_ids: torch.Tensor | None
) -> tuple[dict[str, Any], torch.Tensor | None]:
    """``(kwargs, counts)``: ``counts`` int64 [B], the sequences in each row of a packed
    (padding-free) batch, or None for an ordinary batch.

    A batch is packed when it carries ``cu_seq_lens_q`` (transformers' FlashAttention
    kwargs, as ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` and TRL's
    ``padding_free=True`` give them; over the B * N flattened tokens) or when its
    ``position_ids`` restart inside a row with no ``attention_mask`` and no cache. Without
    a cache in ``kwargs``, ``use_cache=False`` is added (unless set): a packed batch is
    never continued, and transformers recognises packed sequences from ``position_ids``
    only without a cache (with one, the rows would attend across sequences).
    """
    ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    if ref is None:
        return kwargs, None
    B, N = int(ref.shape[0]), int(ref.shape[1])
    cu = kwargs.get("cu_seq_lens_q", kwargs.get("cu_seqlens_q"))
    _, past = cache_arg(kwargs)
    if cu is not None:  # sequence s starts at flattened token cu[s]: row cu[s] // N
        rows = cu[:-1].to(torch.int64) // max(N, 1)  # [S]
        counts = torch.bincount(rows.cpu(), minlength=B)[:B]
        return (kwargs if past is not None else {"use_cache": False, **kwargs}), counts
    pos = kwargs.get("position_ids")
    if pos is None or kwargs.get("attention_mask") is not None or past is not None or N < 2:
        return kwargs, None
    counts = (pos.expand(B, -1).diff(dim=-1) != 1).sum(-1).cpu() + 1  # [B]
    if bool((counts == 1).all()):
        return kwargs, None
    return {"use_cache": False, **kwargs}, counts


def offset_positions(
    kwargs: dict[str, Any], input_ids: torch.Tensor | None, offset: int | torch.Tensor
) -> dict[str, Any]:
    """``kwargs`` with ``position_ids`` shifted by ``offset``.

    Arguments:
        kwargs: a model call's keyword arguments (``position_ids``, ``inputs_embeds``, the
            cache, ...). Without ``position_ids`` the model's default is shifted:
            arange(N) + cache length.
        input_ids: the call's input ids [B, N] (or None with ``inputs_embeds``).
        offset: one offset for every row (int), or int64 [B0] per row; a batch of k * B0
            rows (beams / samples, each row repeated consecutively) repeats them.

    Raises:
        ValueError: per-row offsets that do not fit the batch.
    """
    per_row = isinstance(offset, torch.Tensor)
    if not per_row and offset == 0:
        return kwargs
    ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    pos = kwargs.get("position_ids")
    if pos is None:
        if ref is None:
            return kwargs  # the model raises its own error about missing inputs
        _, past = cache_arg(kwargs)  # `cache` or (before transformers 5.2x) `past_key_values`
        past_len = int(past.get_seq_length()) if hasattr(past, "get_seq_length") else 0
        pos = torch.arange(past_len, past_len + ref.shape[1], device=ref.device)[None]  # [1, N]
    if not per_row:
        return {**kwargs, "position_ids": pos + offset}
    B = ref.shape[0] if ref is not None else pos.shape[0]
    n = offset.shape[0]
    if n != B:
        if n == 0 or B % n:
            raise ValueError(f"the batch has {B} rows but the tasks name {n} rows")
        offset = offset.repeat_interleave(B // n)  # [B]
    return {**kwargs, "position_ids": pos + offset.to(pos.device)[:, None]}  # [B, N]


class PositionOffsetHook:
    """Forward pre-hook adding a position offset (int, or int64 [B] per row) to every call."""

    def __init__(self, offset: int | torch.Tensor) -> None:
        self.offset = offset

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        input_ids = args[0] if args else kwargs.get("input_ids")
        return args, offset_positions(kwargs, input_ids, self.offset)


def generate_with(
    model: PreTrainedModel,
    provider: PrefixProvider,
    offset: int | torch.Tensor,
    kwargs: dict[str, Any],
    restore: PrefixProvider | None,
) -> Any:
    """``model.generate(**kwargs)`` with ``provider`` attached and positions shifted by
    ``offset`` (int, or int64 [B] per row); ``restore`` is attached again afterwards."""
    set_prefix(model, provider)
    handle = None
    if isinstance(offset, torch.Tensor) or offset:
        handle = model.register_forward_pre_hook(PositionOffsetHook(offset), with_kwargs=True)
    try:
        return model.generate(**kwargs)
    finally:
        if handle is not None:
            handle.remove()
        set_prefix(model, restore)


# ------------------------------------------------------------------------ the base class


class _Backbone:
    """``tuner.base_model``: calls the base model's backbone with the tuner applied."""

    def __init__(self, tuner: Tuner) -> None:
        self.tuner = tuner

    def __call__(self, input_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        return self.tuner._backbone(input_ids, kwargs)


def _as_dir(path: object) -> Path:
    """``path`` as a created directory; ``TypeError`` for a non-path."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


class Tuner(nn.Module):
    """Base of :class:`~prefixattn.PrefixTuning` and :class:`~prefixattn.PromptTuning`.

    A subclass sets the class attributes (file names, format, PEFT type, config class) and
    implements :meth:`_setup` (build the trainable tensors on a checked, frozen model),
    :meth:`read` (its artifact reader), :meth:`_artifact_tensors` / :meth:`_artifact_meta`
    (what :meth:`save` writes), :meth:`_check_loaded_shape` and :meth:`_set_loaded` (what
    :meth:`load` checks and copies), :meth:`_peft_config` / :meth:`_peft_weights` (what
    :meth:`to_peft` writes).
    """

    CONFIG_NAME: ClassVar[str]
    WEIGHTS_NAME: ClassVar[str]
    FORMAT: ClassVar[str]
    FORMAT_VERSION: ClassVar[int] = 1
    PEFT_TYPE: ClassVar[str]
    config_class: ClassVar[type[TuningConfigBase]]
    #: what the artifact holds, for messages ("prefix", "soft prompt")
    artifact_noun: ClassVar[str]

    config: Any
    model: PreTrainedModel

    # ------------------------------------------------------------------ construction

    @classmethod
    def check_model(cls, model: object) -> PreTrainedModel:
        """``model`` if this tuner can wrap it, else ``TypeError`` / ``ValueError``."""
        if not isinstance(model, PreTrainedModel):
            raise TypeError(
                "model must be a transformers PreTrainedModel (a causal LM), got "
                f"{type(model).__name__}"
            )
        return model

    @classmethod
    def _uninitialized(cls: type[_T], model: PreTrainedModel, config: Any) -> _T:
        """An instance on ``model`` with zero tensors (``load`` / ``from_peft`` fill them)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._attach(model, config)
        return self

    def _attach(self, model: PreTrainedModel, config: Any) -> None:
        """Check and freeze ``model``, then let the subclass build its tensors."""
        model = self.check_model(model)
        if getattr(config, "chunked_loss", False):
            check_chunked_loss_support(model)
        for p in model.parameters():
            p.requires_grad_(False)
        config._model_config = model.config
        self.config = config
        self.model = model
        self._setup()

    def _setup(self) -> None:
        """Build the trainable tensors (zeros) for ``self.model`` / ``self.config``."""
        raise NotImplementedError

    @classmethod
    def from_config(
        cls: type[_T], model: PreTrainedModel, config: Any, tokenizer: Any = None
    ) -> _T:
        """Build from a config object of this tuner (initialised as it says)."""
        if not isinstance(config, cls.config_class):
            raise TypeError(
                f"config must be a {cls.config_class.__name__}, got {type(config).__name__}"
            )
        kwargs = config.to_dict()
        P = kwargs.pop("num_virtual_tokens")
        if isinstance(config.init_text, str):
            kwargs["tokenizer"] = tokenizer
        return cls(model, P, **kwargs)

    # ------------------------------------------------------------------ properties

    @property
    def num_virtual_tokens(self) -> int:
        """P."""
        return self.config.num_virtual_tokens

    def num_trainable_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def trainable_share(self) -> float:
        """Trainable parameters as a fraction of the base model's parameters."""
        base = sum(p.numel() for p in self.model.parameters())
        return self.num_trainable_parameters() / max(base, 1)

    # ------------------------------------------------------------------ Trainer glue

    def _own_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The tuner's own parameters (not the frozen base model's), by state-dict name."""
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("model.")]

    def _meta(self) -> dict[str, Any]:
        """The JSON metadata :meth:`save` writes (format, version, sizes, model type, config)."""
        return {
            "format": self.FORMAT,
            "version": self.FORMAT_VERSION,
            **self._artifact_meta(),
            "model_type": getattr(self.model.config, "model_type", None),
            "config": self.config.to_dict(),
        }

    def state_dict(  # type: ignore[override]
        self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False
    ) -> dict[str, Any]:
        """The trainable tensors only (and the metadata), not the frozen base model.

        This is what ``transformers.Trainer`` writes to ``model.safetensors`` in each
        checkpoint (a few KB instead of the base model), what ``resume_from_checkpoint`` and
        ``load_best_model_at_end`` load back through :meth:`load_state_dict`, and what
        :meth:`load` reads from a checkpoint directory. The entry ``"prefixattn.meta"``
        (uint8 JSON) carries the config.
        """
        if args:  # torch's deprecated positional (destination, prefix, keep_vars)
            raise TypeError("state_dict takes keyword arguments only")
        out = destination if destination is not None else OrderedDict()
        for name, p in self._own_parameters():
            out[prefix + name] = p if keep_vars else p.detach()
        out[prefix + STATE_META_KEY] = meta_tensor(self._meta())
        return out

    def load_state_dict(  # type: ignore[override]
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> _IncompatibleKeys:
        """Load what :meth:`state_dict` returned (a full ``nn.Module`` state dict with the
        base model's ``model.*`` entries loads as ``nn.Module.load_state_dict`` would).

        Raises:
            ValueError: the metadata names another tuner format, or a tensor has another
                shape than this tuner's.
            RuntimeError: ``strict`` and missing or unexpected entries.
        """
        sd = dict(state_dict)
        meta = sd.pop(STATE_META_KEY, None)
        if meta is not None:
            fmt = read_meta_tensor(meta).get("format")
            if fmt != self.FORMAT:
                raise ValueError(f"state_dict holds a {fmt!r} tuner, this is a {self.FORMAT!r}")
        if any(k.startswith("model.") for k in sd):
            return super().load_state_dict(sd, strict=strict, assign=assign)
        own = dict(self._own_parameters())
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__}: missing keys "
                f"{missing}, unexpected keys {unexpected}"
            )
        with torch.no_grad():
            for name in sorted(set(own) & set(sd)):
                value = sd[name]
                if tuple(value.shape) != tuple(own[name].shape):
                    raise ValueError(
                        f"state_dict[{name!r}] has shape {tuple(value.shape)}, this tuner's "
                        f"{name} has {tuple(own[name].shape)}"
                    )
                own[name].copy_(value)
        return _IncompatibleKeys(missing, unexpected)

    # ------------------------------------------------------------------ running

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the model with the tuner: same arguments and outputs as ``model(...)``.

        The common inputs are named so that ``transformers.Trainer`` keeps those dataset
        columns; ``**kwargs`` takes anything else the model takes (``past_key_values``,
        ``use_cache``, ``return_dict``, ``num_items_in_batch``, ...). See the subclass's
        :meth:`_forward` for what it does to the call.
        """
        kwargs = model_inputs(kwargs, attention_mask=attention_mask, labels=labels,
                              position_ids=position_ids, inputs_embeds=inputs_embeds)  # fmt: skip
        return self._forward(input_ids, kwargs)

    def _forward(self, input_ids: torch.Tensor | None, kwargs: dict[str, Any]) -> Any:
        raise NotImplementedError

    # what HF trainers (Trainer, TRL) look up on a model, answered by the base model

    @property
    def generation_config(self) -> Any:
        """The base model's generation config."""
        return getattr(self.model, "generation_config", None)

    def get_input_embeddings(self) -> nn.Module:
        """The base model's input embeddings."""
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        """The base model's LM head."""
        return self.model.get_output_embeddings()

    def add_model_tags(self, tags: list[str] | str) -> None:
        """Tag the base model (what TRL's trainers call)."""
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(tags)

    @property
    def base_model(self) -> Any:
        """The backbone with this tuner applied: ``tuner.base_model(input_ids=...)``
        returns the base model's backbone output (``last_hidden_state`` [B, N, hidden]
        for the N input positions). TRL's fused LM-head loss and
        :func:`prefixattn.losses.causal_lm_loss` read hidden states through it."""
        return _Backbone(self)

    def _backbone(self, input_ids: torch.Tensor | None, kwargs: dict[str, Any]) -> Any:
        """``model.base_model(...)`` with this tuner applied (see :attr:`base_model`)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ checkpointing

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None, **extra: Any
    ) -> None:
        """Turn on gradient (activation) checkpointing of the base model; the tuner trains.

        Calls ``model.activation_checkpointing_enable`` (transformers >= 5.23) or
        ``model.gradient_checkpointing_enable``; ``extra`` (``every_n_layers``, ``offload``
        on transformers >= 5.23) is passed on. The default, non-reentrant checkpointing
        needs nothing else; with ``{"use_reentrant": True}`` the input embeddings are made to
        require grad so that the frozen model still backpropagates to the tuner.
        Checkpointing is active in train mode only (transformers' rule).
        """
        model = self.model
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs=gradient_checkpointing_kwargs, **extra
            )
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=gradient_checkpointing_kwargs, **extra
            )
        if (gradient_checkpointing_kwargs or {}).get("use_reentrant", False):
            model.enable_input_require_grads()

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict[str, Any] | None = None, **extra: Any
    ) -> None:
        """transformers >= 5.23's name of :meth:`gradient_checkpointing_enable` (what its
        ``Trainer`` calls for ``gradient_checkpointing=True``)."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, **extra)

    def gradient_checkpointing_disable(self) -> None:
        """Turn gradient checkpointing of the base model off again."""
        model = self.model
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()

    activation_checkpointing_disable = gradient_checkpointing_disable

    @property
    def is_activation_checkpointing(self) -> bool:
        """Whether the base model checkpoints activations (what ``Trainer`` asks)."""
        model = self.model
        if hasattr(type(model), "is_activation_checkpointing"):  # transformers >= 5.23
            return bool(model.is_activation_checkpointing)
        return bool(getattr(model, "is_gradient_checkpointing", False))

    is_gradient_checkpointing = is_activation_checkpointing

    # ------------------------------------------------------------------ files

    @classmethod
    def read(cls, path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, Any]]:
        """``(tensor, meta)`` of an artifact written by :meth:`save`."""
        raise NotImplementedError

    def _artifact_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _artifact_meta(self) -> dict[str, Any]:
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> Path:
        """Write the trained tensors and the config to directory ``path`` (created if needed).

        Returns:
            ``path`` as a ``Path``.
        """
        path = _as_dir(path)
        tensors = self._artifact_tensors()
        save_tensors(tensors, path / self.WEIGHTS_NAME, metadata={"format": self.FORMAT})
        (path / self.CONFIG_NAME).write_text(json.dumps(self._meta(), indent=2) + "\n")
        return path

    @classmethod
    def _load_config(cls, meta: Mapping[str, Any], **overrides: Any) -> Any:
        """The config of a loaded artifact (``overrides`` replace saved fields)."""
        cfg = dict(meta["config"])
        cfg.update({k: v for k, v in overrides.items() if v is not None})
        return cls.config_class.from_dict(cfg)

    @classmethod
    def _check_loaded_shape(
        cls, tensor: torch.Tensor, model: PreTrainedModel, config: Any, where: str
    ) -> None:
        raise NotImplementedError

    def _set_loaded(self, tensor: torch.Tensor) -> None:
        raise NotImplementedError

    @classmethod
    def _load(cls: type[_T], path: str | os.PathLike, model: object, **overrides: Any) -> _T:
        """:meth:`load`'s body: read, check (model, model type, shapes), build, copy.

        ``path`` may also be a ``transformers.Trainer`` checkpoint of this tuner (its
        ``model.safetensors`` holds :meth:`state_dict`): the trained tensors are restored
        as they were (a reparameterized prefix keeps its MLP).
        """
        if isinstance(path, (str, os.PathLike)) and not (Path(path) / cls.CONFIG_NAME).exists():
            ckpt = read_trainer_checkpoint(Path(path))
            if ckpt is not None:
                return cls._from_state(ckpt[0], ckpt[1], model, str(path), **overrides)
        tensor, meta = cls.read(path)
        model = cls.check_model(model)
        where = f"the {cls.artifact_noun} in {str(path)!r}"
        check_model_type(meta, model, where)
        config = cls._load_config(meta, **overrides)
        cls._check_loaded_shape(tensor, model, config, where)
        self = cls._uninitialized(model, config)
        with torch.no_grad():
            self._set_loaded(tensor)
        return self

    @classmethod
    def _trained_config(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        """A saved config dict for a tuner whose tensors are loaded (no init to run)."""
        return {**cfg, "init": "random", "init_text": None}

    @classmethod
    def _from_state(
        cls: type[_T],
        meta: Mapping[str, Any],
        tensors: Mapping[str, torch.Tensor],
        model: object,
        where: str,
        **overrides: Any,
    ) -> _T:
        """A tuner rebuilt from :meth:`state_dict` output (a Trainer checkpoint)."""
        if meta.get("format") != cls.FORMAT:
            raise ValueError(
                f"{where} holds a {meta.get('format')!r} checkpoint, not a {cls.FORMAT!r} one"
            )
        model = cls.check_model(model)
        check_model_type(meta, model, f"the {cls.artifact_noun} in {where!r}")
        cfg = cls._trained_config(dict(meta["config"]))
        cfg.update({k: v for k, v in overrides.items() if v is not None})
        self = cls._uninitialized(model, cls.config_class.from_dict(cfg))
        self.load_state_dict(tensors)
        return self

    # ------------------------------------------------------------------ PEFT

    @classmethod
    def _peft_source(
        cls, adapter: object, model: object
    ) -> tuple[dict[str, Any], torch.Tensor, nn.Module | None, PreTrainedModel]:
        """``(adapter config, prompt_embeddings, live encoder or None, checked model)``.

        Raises:
            ValueError: ``model`` missing for a directory, an adapter of another type.
            TypeError: ``adapter`` is neither a directory nor a ``PeftModel``.
        """
        if isinstance(adapter, (str, os.PathLike)):
            if model is None:
                raise ValueError("model is required when adapter is a directory")
            pcfg, weights = read_peft_dir(
                Path(adapter), lambda c: check_peft_config(c, cls.PEFT_TYPE)
            )
            encoder = None
        elif isinstance(adapter, nn.Module) and hasattr(adapter, "active_peft_config"):
            pcfg = adapter.active_peft_config.to_dict()
            check_peft_config(pcfg, cls.PEFT_TYPE)
            encoder = adapter.prompt_encoder[adapter.active_adapter]
            if model is None:
                model = adapter.get_base_model()
            weights = encoder.embedding.weight.detach()
        else:
            raise TypeError(
                "adapter must be a PEFT adapter directory or a peft.PeftModel, got "
                f"{type(adapter).__name__}"
            )
        return pcfg, weights, encoder, cls.check_model(model)

    def _peft_config(self) -> Any:
        raise NotImplementedError

    def _peft_weights(self) -> torch.Tensor:
        raise NotImplementedError

    def _write_peft(self, path: str | os.PathLike) -> Path:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` to ``path``."""
        path = _as_dir(path)
        self._peft_config().save_pretrained(str(path))
        weight = self._peft_weights().detach().to("cpu", torch.float32).contiguous()
        save_tensors({PEFT_WEIGHTS_KEY: weight}, path / PEFT_WEIGHTS_FILE)
        return path

    def _peft_common(self) -> dict[str, Any]:
        """PEFT config fields every exported adapter has."""
        return dict(
            task_type="CAUSAL_LM",
            num_virtual_tokens=self.num_virtual_tokens,
            num_transformer_submodules=1,
            inference_mode=True,
            base_model_name_or_path=getattr(self.model, "name_or_path", None) or None,
        )
