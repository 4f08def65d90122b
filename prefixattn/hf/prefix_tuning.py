"""Prefix tuning (Li & Liang, 2021) of a frozen transformers decoder on the prefixattn kernel.

Every attention layer gets P trainable virtual keys and values. They never enter the KV
cache or the input sequence: the patched attention function (:mod:`prefixattn.hf.patching`)
passes them to :func:`prefixattn.prefix_attention`, which reads them from their own buffer.
Because the prefix is not smuggled in through ``past_key_values`` (PEFT's approach),
gradient checkpointing, KV-cache generation and padded batches work unchanged.

Layout. The prefix of layer ``l`` is ``K_l, V_l`` of shape [Hkv, P, D] (Hkv key/value heads,
head dim D; GQA models train Hkv heads, as PEFT does). The reparameterization MLP
(``prefix_projection=True``) uses PEFT's layout, so PEFT adapters map one to one::

    embedding  Embedding(P, token_dim)            token_dim = Hkv * D (= hidden for MHA)
    transform  Linear(token_dim, encoder_hidden) -> Tanh -> Linear(encoder_hidden, L*2*Hkv*D)

and a row of the flat [P, L*2*Hkv*D] output is ordered (layer, k/v, head, dim).

Position convention. The virtual tokens have no position. With the default
``position_offset=0`` the input tokens keep the positions the model gives them without a
prefix (0..N-1 plus the cache length; ``position_ids`` you pass are used as is). With
``position_offset=k`` every position is shifted by k (also ``position_ids`` you pass and the
ones ``generate`` computes from the attention mask). PEFT behaves like
``position_offset=num_virtual_tokens`` (its prefix sits in the KV cache, so inputs start at
position P): :meth:`PrefixTuning.from_peft` uses that, and so must a prefix exported with
:meth:`PrefixTuning.to_peft`. With ``init="text"`` and ``position_offset=P`` the untrained
prefix is exactly the hard prompt ``init_text`` prepended to every input.

Supported: transformers >= 5.10, < 6 (tested on 5.10.0, 5.17.0, 5.23.0); PEFT prefix-tuning
adapters (``PREFIX_TUNING``, causal LM, one transformer submodule; parity tested with
PEFT 0.21).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from ..losses import chunked_loss_forward
from ..ops.validation import BACKENDS, MAX_HEAD_DIM, MIN_HEAD_DIM, PREFIX_WINDOWS
from ._common import INIT_STRATEGIES as INIT_STRATEGIES  # kept importable from here
from ._common import PEFT_WEIGHTS_KEY, TuningConfigBase, is_int
from .patching import (
    LayerPrefix,
    PrefixProvider,
    StaticPrefix,
    is_patched,
    patch,
    record_kv,
    set_prefix,
)
from .task_store import (
    PREFIX_CONFIG_NAME,
    PREFIX_FORMAT,
    PREFIX_FORMAT_VERSION,
    PREFIX_WEIGHTS_NAME,
    read_prefix,
)
from .tuner import (
    Tuner,
    generate_with,
    model_device,
    offset_positions,
    packed_inputs,
    prepare_init_text,
    repeat_to,
)

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "ModelGeometry",
    "PrefixTuning",
    "PrefixTuningConfig",
    "read_prefix",
    "token_kv",
]

CONFIG_NAME = PREFIX_CONFIG_NAME  # the formats live in the task store (read there)
WEIGHTS_NAME = PREFIX_WEIGHTS_NAME
FORMAT = PREFIX_FORMAT
FORMAT_VERSION = PREFIX_FORMAT_VERSION


@dataclass
class PrefixTuningConfig(TuningConfigBase):
    """Hyper-parameters of :class:`PrefixTuning` (saved next to the prefix)."""

    num_virtual_tokens: int = field(
        default=20,
        metadata={"help": "Number of virtual tokens P: prefix keys/values per attention layer."},
    )
    prefix_projection: bool = field(
        default=False,
        metadata={
            "help": "Reparameterize the prefix with an MLP (Embedding -> Linear -> Tanh -> "
            "Linear, the prefix-tuning paper / PEFT layout). Folded into plain K/V by save()."
        },
    )
    encoder_hidden_size: int | None = field(
        default=None,
        metadata={
            "help": "Hidden size of the reparameterization MLP; default token_dim = Hkv * D."
        },
    )
    init: str = field(
        default="random",
        metadata={
            "help": "'random' (normal, std init_std), 'vocab' (K/V activations of randomly "
            "sampled real tokens run through the frozen model, the paper's advice) or 'text' "
            "(activations of init_text)."
        },
    )
    init_text: str | list[int] | None = field(
        default=None,
        metadata={
            "help": "Text (with a tokenizer) or token ids for init='text'; repeated or cut "
            "to num_virtual_tokens tokens."
        },
    )
    init_std: float = field(
        default=1.0,
        metadata={
            "help": "Std of the normal init='random' (1.0: PEFT's nn.Embedding default). With "
            "prefix_projection it is the std of the MLP's input embedding."
        },
    )
    position_offset: int = field(
        default=0,
        metadata={
            "help": "Shift of the input positions; num_virtual_tokens reproduces PEFT (its "
            "inputs start after the P virtual tokens)."
        },
    )
    backend: str = field(
        default="auto",
        metadata={
            "help": "Kernel backend: 'auto' (Triton on CUDA, 'sdpa' elsewhere), 'triton', "
            "'sdpa' or 'reference'."
        },
    )
    prefix_window: str = field(
        default="all",
        metadata={
            "help": "On sliding-window layers (Mistral, Gemma-2/3, gpt-oss, ...): 'all' (every "
            "query sees the whole prefix, a task memory) or 'sliding' (PEFT's behaviour: the "
            "prefix keys are the P positions before the first token and leave the window). "
            "The two agree while the prefix plus the tokens fit the window (P + N <= window)."
        },
    )
    chunked_loss: bool = field(
        default=False,
        metadata={
            "help": "In training mode with labels, compute the causal-LM loss from the last "
            "hidden states in chunks of tokens (prefixattn.losses.causal_lm_loss): the same "
            "loss, but the [B, N, V] logits are never materialized (the output's logits are "
            "None). For GPT-2, Llama, Mistral and Qwen2/3 models."
        },
    )

    def __post_init__(self) -> None:
        self._check_num_virtual_tokens()
        if not isinstance(self.prefix_projection, bool):
            raise TypeError(
                f"prefix_projection must be a bool, got {type(self.prefix_projection).__name__}"
            )
        if self.encoder_hidden_size is not None and (
            not is_int(self.encoder_hidden_size) or self.encoder_hidden_size < 1
        ):
            raise ValueError(
                f"encoder_hidden_size must be an int >= 1 or None, got {self.encoder_hidden_size!r}"
            )
        self._check_init()
        if (
            isinstance(self.init_std, bool)
            or not isinstance(self.init_std, (int, float))
            or not math.isfinite(self.init_std)
            or self.init_std <= 0
        ):
            raise ValueError(f"init_std must be a finite float > 0, got {self.init_std!r}")
        if not is_int(self.position_offset) or self.position_offset < 0:
            raise ValueError(f"position_offset must be an int >= 0, got {self.position_offset!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.prefix_window not in PREFIX_WINDOWS:
            raise ValueError(
                f"prefix_window must be one of {PREFIX_WINDOWS}, got {self.prefix_window!r}"
            )
        self._check_chunked_loss()


@dataclass(frozen=True)
class ModelGeometry:
    """The attention sizes of a decoder: L layers, H query heads, Hkv key/value heads, D."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def token_dim(self) -> int:
        """Hkv * D: the width of one layer's K (or V) for one virtual token."""
        return self.num_kv_heads * self.head_dim

    @classmethod
    def of(cls, model: PreTrainedModel) -> ModelGeometry:
        """Read the sizes from ``model.config`` (its text config for multimodal models)."""
        cfg = model.config
        if hasattr(cfg, "get_text_config"):
            cfg = cfg.get_text_config()
        L = getattr(cfg, "num_hidden_layers", None)
        H = getattr(cfg, "num_attention_heads", None)
        if not is_int(L) or not is_int(H):
            raise ValueError(
                "model config must define num_hidden_layers and num_attention_heads, got "
                f"{L!r} and {H!r}"
            )
        Hkv = getattr(cfg, "num_key_value_heads", None) or H
        D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
        if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
            raise ValueError(
                f"the prefixattn kernel needs a head dim in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], "
                f"the model has head_dim={D}"
            )
        return cls(num_layers=int(L), num_heads=int(H), num_kv_heads=int(Hkv), head_dim=int(D))

    def check_prefix(self, prefix: torch.Tensor, what: str) -> None:
        """``prefix`` must be [L, 2, Hkv, P, D] for this model."""
        L, Hkv, D = self.num_layers, self.num_kv_heads, self.head_dim
        if prefix.dim() != 5 or prefix.shape[:3] != (L, 2, Hkv) or prefix.shape[4] != D:
            raise ValueError(
                f"{what} must have shape [L, 2, Hkv, P, D] = [{L}, 2, {Hkv}, P, {D}] for this "
                f"model, got {tuple(prefix.shape)}"
            )


class _TuningProvider(PrefixProvider):
    """Computes layer ``l``'s prefix from the live parameters (autograd-connected)."""

    def __init__(self, owner: PrefixTuning) -> None:
        self.owner = owner

    @property
    def prefix_window(self) -> str:  # type: ignore[override]
        """The owner's ``config.prefix_window``."""
        return self.owner.config.prefix_window

    def layer_prefix(self, layer_idx: int, batch_size: int) -> LayerPrefix:
        k, v = self.owner._layer_kv(layer_idx)
        return LayerPrefix(k, v)


@torch.no_grad()
def token_kv(
    model: PreTrainedModel,
    geometry: ModelGeometry,
    ids: torch.Tensor,
    restore: PrefixProvider | None,
) -> torch.Tensor:
    """K/V activations of token ids [P] run through the frozen, patched ``model`` without
    any prefix (the paper's "vocab" / "text" init): [L, 2, Hkv, P, D] float32. ``restore``
    is attached to the model again afterwards."""
    was_training = model.training
    model.eval()
    set_prefix(model, None)
    try:
        with record_kv(model) as rec:
            model(input_ids=ids[None].to(model_device(model)), use_cache=False)
    finally:
        set_prefix(model, restore)
        model.train(was_training)
    L = geometry.num_layers
    if sorted(rec) != list(range(L)):
        raise ValueError(
            f"expected K/V from layers 0..{L - 1}, the model produced layers {sorted(rec)}"
        )
    out = torch.stack([torch.stack(rec[i]) for i in range(L)])  # [L, 2, 1, Hkv, P, D]
    return out[:, :, 0].float()  # [L, 2, Hkv, P, D]


class PrefixTuning(Tuner):
    """Prefix tuning of a frozen transformers decoder (see the module docstring).

    ``PrefixTuning(model, num_virtual_tokens=20, ...)`` patches ``model`` (see
    :func:`prefixattn.patch`), freezes all its parameters and attaches a trainable prefix
    of P virtual keys/values per attention layer. :meth:`forward` and :meth:`generate` take
    what the model takes and return what it returns.

    The prefix stays attached to ``model`` after a call (gradient checkpointing recomputes
    layers during backward and needs it); every call re-attaches this object's prefix, so
    several ``PrefixTuning`` / ``TaskBank`` objects may share one base model. Use
    ``prefixattn.unpatch(pt.model)`` to give the model back untouched.

    Arguments:
        model: a transformers causal LM (``PreTrainedModel``).
        num_virtual_tokens: P, the prefix length.
        prefix_projection: train through the reparameterization MLP.
        encoder_hidden_size: MLP hidden size (default Hkv * D).
        init: "random", "vocab" or "text" (see :class:`PrefixTuningConfig`).
        init_text: text (needs ``tokenizer``) or token ids for ``init="text"``.
        tokenizer: tokenizer for a string ``init_text``.
        init_std: std of the random init.
        position_offset: input position shift (0: the model's own positions; P: PEFT's).
        backend: kernel backend ("auto", "triton", "sdpa", "reference").
        chunked_loss: in training mode with ``labels``, compute the loss in chunks of tokens
            from the last hidden states (:func:`prefixattn.losses.causal_lm_loss`): the
            same loss without the [B, N, V] logits, which then come back as ``None``.

    Parameters live in float32 on the model's device; they are cast to the model's dtype
    inside the attention function.
    """

    CONFIG_NAME = CONFIG_NAME
    WEIGHTS_NAME = WEIGHTS_NAME
    FORMAT = FORMAT
    FORMAT_VERSION = FORMAT_VERSION
    PEFT_TYPE = "PREFIX_TUNING"
    config_class = PrefixTuningConfig
    artifact_noun = "prefix"

    def __init__(
        self,
        model: PreTrainedModel,
        num_virtual_tokens: int = 20,
        *,
        prefix_projection: bool = False,
        encoder_hidden_size: int | None = None,
        init: str = "random",
        init_text: str | Sequence[int] | torch.Tensor | None = None,
        tokenizer: Any = None,
        init_std: float = 1.0,
        position_offset: int = 0,
        backend: str = "auto",
        chunked_loss: bool = False,
        prefix_window: str = "all",
    ) -> None:
        super().__init__()
        ids, stored_text = prepare_init_text(init, init_text, tokenizer)
        config = PrefixTuningConfig(
            num_virtual_tokens=num_virtual_tokens,
            prefix_projection=prefix_projection,
            encoder_hidden_size=encoder_hidden_size,
            init=init,
            init_text=stored_text,
            init_std=init_std,
            position_offset=position_offset,
            backend=backend,
            chunked_loss=chunked_loss,
            prefix_window=prefix_window,
        )
        self._attach(model, config)
        self._initialize(ids)

    # ------------------------------------------------------------------ construction

    @classmethod
    def check_model(cls, model: object) -> PreTrainedModel:
        """``model`` if it is a ``PreTrainedModel`` the kernel can serve (head dim), else
        ``TypeError`` / ``ValueError``."""
        model = super().check_model(model)
        ModelGeometry.of(model)
        return model

    def _setup(self) -> None:
        model, config = self.model, self.config
        geo = ModelGeometry.of(model)
        patch(model, config.backend)
        self.geometry = geo
        P, L, Hkv, D = config.num_virtual_tokens, geo.num_layers, geo.num_kv_heads, geo.head_dim
        dev = model_device(model)
        if config.prefix_projection:
            enc = config.encoder_hidden_size or geo.token_dim
            self.embedding = nn.Embedding(P, geo.token_dim, device=dev, dtype=torch.float32)
            self.transform = nn.Sequential(
                nn.Linear(geo.token_dim, enc, device=dev, dtype=torch.float32),
                nn.Tanh(),
                nn.Linear(enc, L * 2 * geo.token_dim, device=dev, dtype=torch.float32),
            )
            self.register_parameter("prefix", None)
        else:
            # [L, 2, Hkv, P, D]: layer l's K is prefix[l, 0], its V prefix[l, 1]
            self.prefix = nn.Parameter(torch.zeros(L, 2, Hkv, P, D, device=dev))
            self.embedding = None
            self.transform = None
        self._provider = _TuningProvider(self)
        set_prefix(model, self._provider)

    def _initialize(self, text_ids: torch.Tensor | None) -> None:
        c = self.config
        P = c.num_virtual_tokens
        if c.init == "random":
            with torch.no_grad():
                if self.prefix is not None:
                    self.prefix.normal_(0.0, c.init_std)
                else:
                    self.embedding.weight.normal_(0.0, c.init_std)
            return
        if c.init == "vocab":
            vocab = self.model.get_input_embeddings().num_embeddings
            ids = torch.randint(0, vocab, (P,))
        else:  # "text": the config guarantees init_text, __init__ tokenized it
            ids = repeat_to(text_ids, P)  # [P]
        target = self._activations(ids)  # [L, 2, Hkv, P, D]
        with torch.no_grad():
            if self.prefix is not None:
                self.prefix.copy_(target)
            else:
                self._fit_mlp_output(target)

    def _activations(self, ids: torch.Tensor) -> torch.Tensor:
        """K/V activations of token ids [P] run through the frozen model: [L, 2, Hkv, P, D]."""
        return token_kv(self.model, self.geometry, ids, restore=self._provider)

    def _fit_mlp_output(self, target: torch.Tensor) -> None:
        """Set the last MLP layer so the MLP outputs ``target`` [L, 2, Hkv, P, D] exactly.

        Solves [h, 1] @ [W; b] = T (minimum norm) for the hidden activations h [P, enc]; exact
        when enc + 1 >= P, least squares otherwise (with a warning).
        """
        P = self.config.num_virtual_tokens
        flat = target.permute(3, 0, 1, 2, 4).reshape(P, -1)  # [P, L*2*Hkv*D]
        h = self.transform[1](self.transform[0](self.embedding.weight)).double()  # [P, enc]
        ha = torch.cat([h, torch.ones(P, 1, dtype=h.dtype, device=h.device)], dim=1)
        sol = torch.linalg.pinv(ha) @ flat.double()  # [enc+1, L*2*Hkv*D]
        last = self.transform[2]
        last.weight.copy_(sol[:-1].T.to(last.weight.dtype))
        last.bias.copy_(sol[-1].to(last.bias.dtype))
        if ha.shape[1] < P:
            warnings.warn(
                f"encoder_hidden_size + 1 < num_virtual_tokens ({ha.shape[1]} < {P}): the MLP "
                "can only approximate the activation init",
                stacklevel=3,
            )

    # ------------------------------------------------------------------ the prefix

    @property
    def position_offset(self) -> int:
        """Shift added to every input position (see the module docstring)."""
        return self.config.position_offset

    def _layer_kv(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer_idx``'s prefix K, V, each [Hkv, P, D] (differentiable)."""
        geo = self.geometry
        if not 0 <= layer_idx < geo.num_layers:
            raise ValueError(
                f"layer_idx must be in [0, {geo.num_layers}), the model asked for {layer_idx}"
            )
        if self.prefix is not None:
            return self.prefix[layer_idx, 0], self.prefix[layer_idx, 1]  # views [Hkv, P, D]
        P, Hkv, D = self.config.num_virtual_tokens, geo.num_kv_heads, geo.head_dim
        h = self.transform[1](self.transform[0](self.embedding.weight))  # [P, enc]
        last = self.transform[2]
        rows = slice(layer_idx * 2 * Hkv * D, (layer_idx + 1) * 2 * Hkv * D)  # this layer's K, V
        out = F.linear(h, last.weight[rows], last.bias[rows])  # [P, 2*Hkv*D]
        out = out.view(P, 2, Hkv, D).permute(1, 2, 0, 3)  # [2, Hkv, P, D]
        return out[0], out[1]

    def prefix_tensor(self) -> torch.Tensor:
        """The whole prefix, MLP applied: [L, 2, Hkv, P, D] (differentiable)."""
        if self.prefix is not None:
            return self.prefix
        geo, P = self.geometry, self.config.num_virtual_tokens
        flat = self.transform(self.embedding.weight)  # [P, L*2*Hkv*D]
        out = flat.view(P, geo.num_layers, 2, geo.num_kv_heads, geo.head_dim)
        return out.permute(1, 2, 3, 0, 4)  # [L, 2, Hkv, P, D]

    def extra_repr(self) -> str:
        g = self.geometry
        return (
            f"num_virtual_tokens={self.num_virtual_tokens}, layers={g.num_layers}, "
            f"kv_heads={g.num_kv_heads}, head_dim={g.head_dim}, "
            f"prefix_projection={self.config.prefix_projection}, "
            f"position_offset={self.position_offset}"
        )

    # ------------------------------------------------------------------ running

    def _activate(self) -> None:
        if not is_patched(self.model):
            raise ValueError(
                "the model was unpatched (prefixattn.unpatch); PrefixTuning needs it patched: "
                "call prefixattn.patch(model) again"
            )
        set_prefix(self.model, self._provider)

    def _forward(self, input_ids: torch.Tensor | None, kwargs: dict[str, Any]) -> Any:
        """The model call with the prefix attached and positions shifted.

        ``input_ids`` [B, N], ``attention_mask`` [B, N] (or [B, cache + N] with a cache),
        ``labels`` [B, N], ``position_ids``, ``inputs_embeds``, ``past_key_values`` (the
        cache never holds the prefix), ...
        """
        self._activate()
        kwargs, _ = packed_inputs(kwargs, input_ids)  # packed: the same prefix per sequence
        kwargs = offset_positions(kwargs, input_ids, self.position_offset)
        if self.config.chunked_loss and self.training and kwargs.get("labels") is not None:
            return chunked_loss_forward(self.model, input_ids, kwargs)
        return self.model(input_ids=input_ids, **kwargs)

    def _backbone(self, input_ids: torch.Tensor | None, kwargs: dict[str, Any]) -> Any:
        self._activate()
        kwargs, _ = packed_inputs(kwargs, input_ids)
        kwargs = offset_positions(kwargs, input_ids, self.position_offset)
        return self.model.base_model(input_ids=input_ids, **kwargs)

    def folded_prefix(self) -> StaticPrefix:
        """A detached :class:`StaticPrefix` of the current prefix (MLP folded)."""
        with torch.no_grad():
            pre = self.prefix_tensor().detach()  # [L, 2, Hkv, P, D]
        return StaticPrefix(
            [pre[i, 0] for i in range(len(pre))],
            [pre[i, 1] for i in range(len(pre))],
            prefix_window=self.config.prefix_window,
        )

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """``model.generate`` with the prefix (folded once): same arguments and outputs."""
        self._activate()
        if input_ids is not None:
            kwargs["input_ids"] = input_ids
        return generate_with(
            self.model, self.folded_prefix(), self.position_offset, kwargs, self._provider
        )

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike) -> Path:
        """Write the inference prefix (MLP folded) to directory ``path`` (created if needed).

        Files: ``prefix.safetensors`` (``layers.{l}.key`` / ``layers.{l}.value``, each
        [Hkv, P, D] float32) and ``prefixattn_prefix.json``. Size: L * 2 * Hkv * P * D * 4
        bytes (GPT-2 small, P=20: 1.5 MB).

        Returns:
            ``path`` as a ``Path``.
        """
        return super().save(path)

    def _artifact_tensors(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            pre = self.prefix_tensor().detach().to("cpu", torch.float32)  # [L, 2, Hkv, P, D]
        tensors = {}
        for i in range(pre.shape[0]):
            tensors[f"layers.{i}.key"] = pre[i, 0].contiguous()
            tensors[f"layers.{i}.value"] = pre[i, 1].contiguous()
        return tensors

    def _artifact_meta(self) -> dict[str, Any]:
        g = self.geometry
        return {
            "num_layers": g.num_layers,
            "num_key_value_heads": g.num_kv_heads,
            "head_dim": g.head_dim,
        }

    @classmethod
    def read(cls, path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, Any]]:
        """:func:`read_prefix`."""
        return read_prefix(path)

    @classmethod
    def load(
        cls, path: str | os.PathLike, model: PreTrainedModel, *, backend: str | None = None
    ) -> PrefixTuning:
        """Restore a prefix written by :meth:`save` onto ``model``.

        The result trains the folded K/V directly (``prefix_projection`` becomes False);
        ``position_offset`` is restored. ``backend`` overrides the saved one.

        Raises:
            ValueError: ``path`` is not a saved prefix, or it does not fit ``model`` (shapes,
                model type).
            TypeError: ``model`` is not a ``PreTrainedModel``.
        """
        return cls._load(path, model, backend=backend)

    @classmethod
    def _load_config(cls, meta: Mapping[str, Any], **overrides: Any) -> PrefixTuningConfig:
        # the saved prefix is the folded K/V: it trains directly, without the MLP
        folded = dict(prefix_projection=False, encoder_hidden_size=None, init="random")
        cfg = {**meta["config"], **folded, "init_text": None}
        return super()._load_config({**meta, "config": cfg}, **overrides)

    @classmethod
    def _check_loaded_shape(
        cls, tensor: torch.Tensor, model: PreTrainedModel, config: Any, where: str
    ) -> None:
        ModelGeometry.of(model).check_prefix(tensor, where)
        if tensor.shape[3] != config.num_virtual_tokens:
            raise ValueError("prefix.safetensors and the JSON config disagree on P")

    def _set_loaded(self, tensor: torch.Tensor) -> None:
        self.prefix.copy_(tensor)

    # ------------------------------------------------------------------ PEFT

    @classmethod
    def from_peft(
        cls,
        adapter: str | os.PathLike | nn.Module,
        model: PreTrainedModel | None = None,
        *,
        backend: str = "auto",
        prefix_window: str = "all",
    ) -> PrefixTuning:
        """Load a PEFT prefix-tuning adapter; reproduces PEFT's logits, generations, gradients.

        Arguments:
            adapter: a directory written by ``PeftModel.save_pretrained`` (its
                ``prompt_embeddings`` [P, L*2*Hkv*D] are the projected prefix), or a live
                ``PeftModel``. A live, trainable model with ``prefix_projection`` keeps its
                MLP (same parameters, same gradients); otherwise the prefix is plain K/V.
            model: the base model to patch. Default for a ``PeftModel``: its own base model,
                which is then no longer usable through the ``PeftModel`` (the prefix would be
                applied twice); pass a separate copy to compare the two.
            backend: kernel backend.
            prefix_window: what a sliding-window layer's query sees of the prefix. PEFT's
                prefix sits in the KV cache, so on a sliding-window model (Mistral,
                Gemma-2/3, gpt-oss, ...) its keys leave the window: ``"sliding"``. The
                default ``"all"`` (every query sees the whole prefix) gives PEFT's result
                exactly while the prefix plus the tokens fit the window (P + N <= window),
                and is tested there; past that, pass ``"sliding"`` to keep PEFT's
                semantics.

        The result uses PEFT's position convention (``position_offset=P``).

        Raises:
            ValueError: not a causal-LM prefix-tuning adapter, or shapes that do not fit.
            TypeError: wrong argument types.
        """
        pcfg, weights, encoder, model = cls._peft_source(adapter, model)
        mlp = None
        if encoder is not None and pcfg.get("prefix_projection") and not pcfg.get("inference_mode"):
            mlp = encoder  # a live, trainable PEFT model: keep its MLP
        geo = ModelGeometry.of(model)
        P = int(pcfg["num_virtual_tokens"])
        expect = {
            "num_layers": geo.num_layers,
            "num_attention_heads": geo.num_kv_heads,
            "token_dim": geo.token_dim,
        }
        for key, want in expect.items():
            if pcfg.get(key) is not None and int(pcfg[key]) != want:
                raise ValueError(
                    f"adapter {key}={pcfg[key]} does not fit the model ({key} should be {want})"
                )
        config = PrefixTuningConfig(
            num_virtual_tokens=P,
            prefix_projection=mlp is not None,
            encoder_hidden_size=int(pcfg["encoder_hidden_size"]) if mlp is not None else None,
            position_offset=P,
            backend=backend,
            prefix_window=prefix_window,
        )
        self = cls._uninitialized(model, config)
        with torch.no_grad():
            if mlp is not None:
                self.embedding.load_state_dict(mlp.embedding.state_dict())
                self.transform.load_state_dict(mlp.transform.state_dict())
            else:
                flat = weights.float()
                width = geo.num_layers * 2 * geo.token_dim
                if tuple(flat.shape) != (P, width):
                    raise ValueError(
                        f"adapter {PEFT_WEIGHTS_KEY} must have shape [P, L*2*Hkv*D] = [{P}, "
                        f"{width}], got {tuple(flat.shape)}"
                    )
                pre = flat.view(P, geo.num_layers, 2, geo.num_kv_heads, geo.head_dim)
                self.prefix.copy_(pre.permute(1, 2, 3, 0, 4))  # [L, 2, Hkv, P, D]
        return self

    def to_peft(self, path: str | os.PathLike, *, allow_position_mismatch: bool = False) -> Path:
        """Write a PEFT prefix-tuning adapter (``PeftModel.from_pretrained`` loads it).

        Files: ``adapter_config.json`` and ``adapter_model.safetensors`` with
        ``prompt_embeddings`` [P, L*2*Hkv*D] (MLP folded, as PEFT saves it). PEFT shifts
        input positions by P, so the logits match only for a prefix with
        ``position_offset == num_virtual_tokens`` (as :meth:`from_peft` gives).

        Returns:
            ``path`` as a ``Path``.

        Raises:
            ValueError: the position offsets differ and ``allow_position_mismatch`` is False.
        """
        P = self.num_virtual_tokens
        if self.position_offset != P and not allow_position_mismatch:
            raise ValueError(
                f"position_offset is {self.position_offset} but PEFT runs prefix tuning with "
                f"position offset num_virtual_tokens={P}: train with position_offset={P} to "
                "export, or pass allow_position_mismatch=True"
            )
        return self._write_peft(path)

    def _peft_config(self) -> Any:
        from peft import PrefixTuningConfig as PeftPrefixTuningConfig

        g = self.geometry
        return PeftPrefixTuningConfig(
            **self._peft_common(),
            token_dim=g.token_dim,
            num_attention_heads=g.num_kv_heads,
            num_layers=g.num_layers,
            encoder_hidden_size=self.config.encoder_hidden_size or g.token_dim,
            prefix_projection=self.config.prefix_projection,
        )

    def _peft_weights(self) -> torch.Tensor:
        with torch.no_grad():
            pre = self.prefix_tensor().detach().to("cpu", torch.float32)  # [L, 2, Hkv, P, D]
        return pre.permute(3, 0, 1, 2, 4).reshape(self.num_virtual_tokens, -1)  # [P, L*2*Hkv*D]
