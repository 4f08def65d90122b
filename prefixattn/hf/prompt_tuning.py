"""Prompt tuning (Lester et al., 2021) of a frozen transformers decoder.

P trainable "soft prompt" vectors are prepended to the input embeddings; the model is
frozen. The soft prompt is the only trained tensor: [P, hidden] (``P * hidden`` numbers,
e.g. 20 x 576 = 11,520 for SmolLM2-135M).

What :class:`PromptTuning` does to a call, for input ``input_ids`` [B, N]:

- ``inputs_embeds = cat([prompt] * B, embed(input_ids))``: [B, P + N, hidden];
- ``attention_mask`` [B, N] gets P ones in front (virtual tokens are always visible;
  a missing mask is all ones); ``labels`` get P ``-100`` in front (no loss on virtual
  tokens; the first real token is predicted from the last virtual one and counts, as in
  PEFT); ``token_type_ids`` get P zeros; explicit ``position_ids`` [B, N] become
  ``cat(arange(P), position_ids + P)`` (without them the model numbers the P + N tokens
  0..P+N-1 itself, as PEFT does);
- the output is the model's own output type, with ``logits`` (and ``hidden_states``)
  cut back to the N real positions, so ``out.logits`` is [B, N, V] and lines up with
  ``input_ids`` exactly as for the bare model (PEFT returns [B, P + N, V]; the loss is
  the same). ``attentions``, when requested, keep the P virtual key/query positions.

:meth:`PromptTuning.generate` returns what ``model.generate`` returns for the same
``input_ids``: the input ids followed by the new tokens (PEFT does the same; virtual
tokens never appear in the output).

:meth:`PromptTuning.to_prefix_tuning` turns a (trained) soft prompt into the equivalent
per-layer prefix on the prefixattn kernel: same outputs, P fewer tokens per request.

Files written by :meth:`PromptTuning.save`: ``prompt.safetensors`` (``prompt_embeddings``
[P, hidden] float32) and ``prefixattn_prompt.json``. :meth:`PromptTuning.from_peft` /
:meth:`PromptTuning.to_peft` read and write PEFT ``PROMPT_TUNING`` adapters (causal LM):
the same tensor under the same name, so logits, generations and gradients match PEFT's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from ..losses import chunked_loss_forward
from ._common import INIT_STRATEGIES as INIT_STRATEGIES  # kept importable from here
from ._common import PEFT_WEIGHTS_KEY, TuningConfigBase, is_int
from ._compat import cache_arg
from .patching import get_prefix, is_patched, set_prefix
from .task_store import (
    PROMPT_CONFIG_NAME,
    PROMPT_FORMAT,
    PROMPT_FORMAT_VERSION,
    PROMPT_WEIGHTS_NAME,
    read_prompt,
)
from .tuner import Tuner, packed_inputs, prepare_init_text, repeat_to

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "PromptTuning", "PromptTuningConfig"]

CONFIG_NAME = PROMPT_CONFIG_NAME  # the formats live in the task store (read there)
WEIGHTS_NAME = PROMPT_WEIGHTS_NAME
FORMAT = PROMPT_FORMAT
FORMAT_VERSION = PROMPT_FORMAT_VERSION


@dataclass
class PromptTuningConfig(TuningConfigBase):
    """Hyper-parameters of :class:`PromptTuning` (saved next to the soft prompt)."""

    num_virtual_tokens: int = field(
        default=20,
        metadata={"help": "Number of virtual tokens P: soft prompt vectors prepended to inputs."},
    )
    init: str = field(
        default="random",
        metadata={
            "help": "'random' (normal with the mean and std of the model's input embedding "
            "matrix), 'vocab' (embeddings of P randomly sampled vocabulary tokens) or 'text' "
            "(embeddings of init_text, repeated or cut to P tokens)."
        },
    )
    init_text: str | list[int] | None = field(
        default=None,
        metadata={
            "help": "Text (with a tokenizer) or token ids for init='text'; repeated or cut to "
            "num_virtual_tokens tokens."
        },
    )
    seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the 'random' / 'vocab' init (None: torch's global RNG)."},
    )
    chunked_loss: bool = field(
        default=False,
        metadata={
            "help": "In training mode with labels, compute the loss in chunks of tokens "
            "without the [B, N, V] logits (see PrefixTuningConfig.chunked_loss)."
        },
    )

    def __post_init__(self) -> None:
        self._check_num_virtual_tokens()
        self._check_init()
        self._check_chunked_loss()
        if self.seed is not None and not is_int(self.seed):
            raise TypeError(f"seed must be an int or None, got {self.seed!r}")


def _check_2d(name: str, x: Any, batch: int, length: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, N], got {type(x).__name__}")
    if x.dim() != 2 or x.shape[0] != batch or x.shape[1] != length:
        raise ValueError(
            f"{name} must have shape [B, N] = [{batch}, {length}], got {tuple(x.shape)}"
        )
    return x


def check_not_packed(kwargs: dict[str, Any], input_ids: torch.Tensor | None) -> None:
    """Refuse a packed (padding-free) batch: a soft prompt is P input tokens before each
    sequence, so a packed row would need the prompt inserted before every packed sequence
    (new ids, positions and boundaries); not done."""
    if packed_inputs(kwargs, input_ids)[1] is not None:
        raise ValueError(
            "PromptTuning does not train packed (padding-free) batches: its soft prompt is P "
            "input tokens before each sequence, which a packed row (position_ids restarting, "
            "cu_seq_lens_q) has no room for. Use padded batches (padding_free=False), or "
            "PrefixTuning / MultiTaskPrefixTuning, which train packed batches"
        )


def _check_positions(pos: Any, batch: int, length: int) -> None:
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"position_ids must be a torch.Tensor [B, N], got {type(pos).__name__}")
    if pos.dim() != 2 or pos.shape[0] not in (1, batch) or pos.shape[1] != length:
        raise ValueError(
            f"position_ids must have shape [B, N] or [1, N] with B={batch}, N={length}, got "
            f"{tuple(pos.shape)}"
        )


class PromptTuning(Tuner):
    """Prompt tuning of a frozen transformers decoder (see the module docstring).

    ``PromptTuning(model, num_virtual_tokens=20, init=..., init_text=...)`` freezes all
    parameters of ``model`` and owns a trainable soft prompt ``prompt`` [P, hidden] (float32,
    on the model's device; cast to the embeddings' dtype at use). :meth:`forward` and
    :meth:`generate` take what the model takes and return what it returns.

    The model is not patched: prompt tuning changes only the input embeddings, so it runs on
    whatever attention the model uses. Several ``PromptTuning`` objects may share one model.

    Arguments:
        model: a transformers decoder-only causal LM (``PreTrainedModel``).
        num_virtual_tokens: P, the number of soft prompt vectors.
        init: "random" (normal with the mean / std of the input embedding matrix),
            "vocab" (embeddings of P token ids drawn uniformly from the vocabulary) or
            "text" (embeddings of ``init_text``, repeated or cut to P tokens).
        init_text: for ``init="text"``: token ids (list of int or 1-D int tensor), or a
            string together with ``tokenizer``.
        tokenizer: tokenizer for a string ``init_text``.
        seed: seed of the "random" / "vocab" init (default: torch's global RNG).
        chunked_loss: in training mode with ``labels``, compute the loss in chunks of tokens
            (:func:`prefixattn.losses.causal_lm_loss`): the same loss without the [B, N, V]
            logits, which then come back as ``None``.

    Raises:
        TypeError: ``model`` is not a ``PreTrainedModel``, bad argument types.
        ValueError: bad ``num_virtual_tokens`` / ``init`` / ``init_text``, token ids outside
            the vocabulary, an encoder-decoder model.
    """

    CONFIG_NAME = CONFIG_NAME
    WEIGHTS_NAME = WEIGHTS_NAME
    FORMAT = FORMAT
    FORMAT_VERSION = FORMAT_VERSION
    PEFT_TYPE = "PROMPT_TUNING"
    config_class = PromptTuningConfig
    artifact_noun = "soft prompt"

    def __init__(
        self,
        model: PreTrainedModel,
        num_virtual_tokens: int = 20,
        init: str = "random",
        init_text: str | Sequence[int] | torch.Tensor | None = None,
        *,
        tokenizer: Any = None,
        seed: int | None = None,
        chunked_loss: bool = False,
    ) -> None:
        super().__init__()
        text_ids, stored_text = prepare_init_text(init, init_text, tokenizer)
        config = PromptTuningConfig(
            num_virtual_tokens=num_virtual_tokens,
            init=init,
            init_text=stored_text,
            seed=seed,
            chunked_loss=chunked_loss,
        )
        rows = self.check_model(model).get_input_embeddings().num_embeddings
        if text_ids is not None:  # checked before the model is touched (frozen)
            bad = text_ids[(text_ids < 0) | (text_ids >= rows)]
            if bad.numel():
                raise ValueError(f"init_text token ids must be in [0, {rows}), got {bad.tolist()}")
        self._attach(model, config)
        self._initialize(text_ids)

    # ------------------------------------------------------------------ construction

    @classmethod
    def check_model(cls, model: object) -> PreTrainedModel:
        """``model`` if it is a decoder-only ``PreTrainedModel`` with ``nn.Embedding`` input
        embeddings, else ``TypeError`` / ``ValueError``."""
        model = super().check_model(model)
        if getattr(model.config, "is_encoder_decoder", False):
            raise ValueError("model must be a decoder-only model, got an encoder-decoder model")
        if not isinstance(model.get_input_embeddings(), nn.Embedding):
            raise ValueError("model must have an nn.Embedding as input embeddings")
        return model

    def _setup(self) -> None:
        emb = self.model.get_input_embeddings()
        self.hidden_size = int(emb.embedding_dim)
        # [P, hidden] float32 master copy, on the embeddings' device
        self.prompt = nn.Parameter(
            torch.zeros(self.config.num_virtual_tokens, self.hidden_size, device=emb.weight.device)
        )

    def _generator(self) -> torch.Generator | None:
        if self.config.seed is None:
            return None
        return torch.Generator(device="cpu").manual_seed(self.config.seed)

    @torch.no_grad()
    def _initialize(self, text_ids: torch.Tensor | None) -> None:
        c = self.config
        P = c.num_virtual_tokens
        weight = self.model.get_input_embeddings().weight  # [V, hidden]
        if c.init == "random":
            w = weight.detach().float()
            noise = torch.randn(P, self.hidden_size, generator=self._generator())
            self.prompt.copy_(noise.to(w.device) * w.std() + w.mean())
            return
        vocab = self.vocab_size
        if c.init == "vocab":
            ids = torch.randint(0, vocab, (P,), generator=self._generator())
        else:
            assert text_ids is not None, "init='text' without init_text passed the config check"
            ids = repeat_to(text_ids, P)  # [P]
        self.prompt.copy_(weight[ids.to(weight.device)].float())

    # ------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding matrix that are real tokens (config.vocab_size)."""
        rows = self.model.get_input_embeddings().num_embeddings
        cfg = self.model.config
        if hasattr(cfg, "get_text_config"):
            cfg = cfg.get_text_config()
        v = getattr(cfg, "vocab_size", None)
        return min(int(v), rows) if is_int(v) and v > 0 else rows

    def extra_repr(self) -> str:
        return (
            f"num_virtual_tokens={self.num_virtual_tokens}, hidden_size={self.hidden_size}, "
            f"init={self.config.init!r}"
        )

    # ------------------------------------------------------------------ running

    def soft_prompt(self, batch_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The soft prompt broadcast to a batch: [B, P, hidden] (a differentiable view)."""
        prompt = self.prompt if dtype is None else self.prompt.to(dtype)
        return prompt.unsqueeze(0).expand(batch_size, -1, -1)

    def _extend(
        self,
        input_ids: torch.Tensor | None,
        kwargs: dict[str, Any],
        *,
        prepend: bool,
        cache_len: int = 0,
    ) -> tuple[dict[str, Any], int]:
        """Model kwargs with the soft prompt prepended. Returns ``(kwargs, N)``."""
        kwargs = dict(kwargs)
        P = self.num_virtual_tokens
        embeds = kwargs.pop("inputs_embeds", None)
        if input_ids is not None and embeds is not None:
            raise ValueError("pass either input_ids or inputs_embeds, not both")
        if input_ids is None and embeds is None:
            raise ValueError("input_ids (or inputs_embeds) is required")
        if input_ids is not None:
            if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
                raise ValueError(
                    f"input_ids must be an integer tensor [B, N], got "
                    f"{getattr(input_ids, 'shape', type(input_ids).__name__)}"
                )
            if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
                raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype}")
            B, N = input_ids.shape
        else:
            if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3:
                raise ValueError(
                    f"inputs_embeds must be a float tensor [B, N, hidden], got "
                    f"{getattr(embeds, 'shape', type(embeds).__name__)}"
                )
            if embeds.shape[-1] != self.hidden_size:
                raise ValueError(
                    f"inputs_embeds must have hidden size {self.hidden_size}, got "
                    f"{embeds.shape[-1]}"
                )
            B, N = embeds.shape[:2]

        mask = kwargs.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                raise ValueError(
                    "attention_mask must be a 2-D padding mask [B, N] covering the real tokens "
                    f"(cached ones included), got {getattr(mask, 'shape', type(mask).__name__)}"
                )
            want = N + max(cache_len - P, 0) if not prepend else N
            _check_2d("attention_mask", mask, B, want)
        device = (input_ids if input_ids is not None else embeds).device

        if prepend:
            emb_layer = self.model.get_input_embeddings()
            if embeds is None:
                embeds = emb_layer(input_ids)  # [B, N, hidden]
            embeds = torch.cat([self.soft_prompt(B, embeds.dtype), embeds], dim=1)
            kwargs["inputs_embeds"] = embeds  # [B, P + N, hidden]
            if mask is None:
                mask = torch.ones(B, N, dtype=torch.long, device=device)
            kwargs["attention_mask"] = torch.cat([mask.new_ones(B, P), mask], dim=1)
            labels = kwargs.get("labels")
            if labels is not None:
                _check_2d("labels", labels, B, N)
                kwargs["labels"] = torch.cat([labels.new_full((B, P), -100), labels], dim=1)
            tt = kwargs.get("token_type_ids")
            if tt is not None:
                _check_2d("token_type_ids", tt, B, N)
                kwargs["token_type_ids"] = torch.cat([tt.new_zeros(B, P), tt], dim=1)
            pos = kwargs.get("position_ids")
            if pos is not None:
                _check_positions(pos, B, N)
                head = torch.arange(P, device=pos.device, dtype=pos.dtype)
                kwargs["position_ids"] = torch.cat([head.expand(pos.shape[0], P), pos + P], dim=1)
        else:
            # a cache that already holds the virtual tokens: inputs stay as they are
            if input_ids is not None:
                kwargs["input_ids"] = input_ids
            else:
                kwargs["inputs_embeds"] = embeds
            if mask is not None:
                kwargs["attention_mask"] = torch.cat([mask.new_ones(B, P), mask], dim=1)
            pos = kwargs.get("position_ids")
            if pos is not None:
                _check_positions(pos, B, N)
                kwargs["position_ids"] = pos + P
        return kwargs, N

    def _forward(self, input_ids: torch.Tensor | None, kwargs: dict[str, Any]) -> Any:
        """The model call with the soft prompt (``forward`` takes what the model takes).

        Arguments:
            input_ids: [B, N] token ids (or pass ``inputs_embeds`` [B, N, hidden]).
            kwargs: ``attention_mask`` [B, N] (real tokens only; with a non-empty
                ``past_key_values`` it covers the cached real tokens plus the N new ones),
                ``labels`` [B, N], ``position_ids`` [B, N], ``past_key_values``,
                ``use_cache``, ``return_dict``, ...

        With an empty (or no) cache the soft prompt is prepended; with a cache that already
        holds it (a cache returned by an earlier call), the new tokens are passed as they
        are and only the mask and positions are extended.

        Returns:
            The model's output; ``logits`` [B, N, V] and ``hidden_states`` cover the N real
            positions (see the module docstring). A tuple when ``return_dict=False``.

        Raises:
            ValueError, TypeError: missing or malformed inputs (the message names them),
                a packed (padding-free) batch.
        """
        check_not_packed(kwargs, input_ids)
        cache_name, past = cache_arg(kwargs)  # `cache` or `past_key_values`
        cache_len = 0
        if past is not None:
            if not hasattr(past, "get_seq_length"):
                raise TypeError(
                    f"{cache_name} must be a transformers Cache (e.g. the one returned by a "
                    f"previous call), got {type(past).__name__}"
                )
            cache_len = int(past.get_seq_length())
            if 0 < cache_len < self.num_virtual_tokens:
                raise ValueError(
                    f"{cache_name} holds {cache_len} positions, fewer than the "
                    f"{self.num_virtual_tokens} virtual tokens: not a cache of this PromptTuning"
                )
        prepend = cache_len == 0
        if not prepend and kwargs.get("labels") is not None:
            labels = kwargs["labels"]
            n = (input_ids if input_ids is not None else kwargs.get("inputs_embeds")).shape[1]
            _check_2d("labels", labels, labels.shape[0], n)
        self._detach_prefix()
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.model.config, "return_dict", True)
        model_kwargs, N = self._extend(input_ids, kwargs, prepend=prepend, cache_len=cache_len)
        if self.config.chunked_loss and self.training and model_kwargs.get("labels") is not None:
            ids = model_kwargs.pop("input_ids", None)
            out = chunked_loss_forward(self.model, ids, model_kwargs)
        else:
            out = self.model(**model_kwargs, return_dict=True)
        if prepend:
            self._strip_virtual(out, N)
        return out if return_dict else out.to_tuple()

    def _backbone(self, input_ids: torch.Tensor | None, kwargs: dict[str, Any]) -> Any:
        """The backbone on the soft prompt + inputs; ``last_hidden_state`` is cut back to
        the N real positions: [B, N, hidden]."""
        check_not_packed(kwargs, input_ids)
        _, past = cache_arg(kwargs)
        if past is not None and past.get_seq_length() > 0:
            raise ValueError("PromptTuning.base_model starts from the soft prompt: no cache")
        self._detach_prefix()
        model_kwargs, N = self._extend(input_ids, kwargs, prepend=True)
        out = self.model.base_model(**model_kwargs)
        self._strip_virtual(out, N, key="last_hidden_state")
        return out

    def _detach_prefix(self) -> None:
        """A ``PrefixTuning`` / ``TaskBank`` sharing this model leaves its prefix attached
        after its calls (they re-attach theirs on every call): run without it."""
        if is_patched(self.model) and get_prefix(self.model) is not None:
            set_prefix(self.model, None)

    def _strip_virtual(self, out: ModelOutput, n: int, key: str = "logits") -> None:
        """Cut ``out[key]`` (``logits`` or ``last_hidden_state``) and ``hidden_states`` of
        ``out`` to the last ``n`` (real) positions."""
        total = self.num_virtual_tokens + n
        logits = out.get(key) if isinstance(out, Mapping) else None
        if isinstance(logits, torch.Tensor) and logits.dim() == 3 and logits.shape[1] == total:
            out[key] = logits[:, total - n :]  # [B, N, V or hidden]
        hs = out.get("hidden_states") if isinstance(out, Mapping) else None
        if isinstance(hs, tuple):
            out["hidden_states"] = tuple(
                (h[:, total - n :])
                if isinstance(h, torch.Tensor) and h.dim() == 3 and h.shape[1] == total
                else h
                for h in hs
            )

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """``model.generate`` with the soft prompt: same arguments, same kind of output.

        Arguments:
            input_ids: [B, N] prompt token ids (left-pad batches of different lengths, with
                ``attention_mask``), or pass ``inputs_embeds`` [B, N, hidden] instead.
            **kwargs: anything ``model.generate`` takes (``attention_mask`` [B, N] over the
                real tokens, ``max_new_tokens``, ``do_sample``, ``num_beams``,
                ``return_dict_in_generate``, ...). ``max_length`` / ``min_length`` count
                real tokens (input + new), as for the bare model.

        Returns:
            What ``model.generate`` returns for ``input_ids``: token ids [B, N + new]
            (input ids followed by the generated ones; virtual tokens never appear), or a
            ``GenerateOutput`` whose ``sequences`` are those ids. With ``inputs_embeds``
            instead of ``input_ids`` only the new tokens are returned, as for the bare model.

        Raises:
            ValueError: ``past_key_values`` (generation starts from the soft prompt), or
                malformed inputs.
        """
        cache_name, past = cache_arg(kwargs)
        if past is not None:
            raise ValueError(
                f"{cache_name} is not supported by PromptTuning.generate: generation always "
                "starts from the soft prompt"
            )
        P = self.num_virtual_tokens
        self._detach_prefix()
        model_kwargs, N = self._extend(input_ids, kwargs, prepend=True)
        if input_ids is not None:
            # generate tracks input_ids (what it returns and what repetition penalties see)
            # while the first forward pass uses inputs_embeds with the soft prompt. Its
            # max_length / min_length arithmetic assumes inputs_embeds as long as input_ids,
            # so lengths are passed as counts of new tokens.
            model_kwargs["input_ids"] = input_ids
            for key, new_key in (
                ("max_length", "max_new_tokens"),
                ("min_length", "min_new_tokens"),
            ):
                value = model_kwargs.get(key)
                if value is not None and model_kwargs.get(new_key) is None:
                    if not is_int(value):
                        raise TypeError(f"{key} must be an int, got {value!r}")
                    del model_kwargs[key]
                    model_kwargs[new_key] = max(value - N, 0)
        else:
            # generate counts the P virtual tokens in the prompt length: keep max_length /
            # min_length about real tokens
            for key in ("max_length", "min_length"):
                if kwargs.get(key) is not None:
                    model_kwargs[key] = kwargs[key] + P
        return self.model.generate(**model_kwargs)

    # ------------------------------------------------------------------ as a prefix

    @torch.no_grad()
    def to_prefix_tuning(self, *, backend: str = "auto") -> Any:
        """The same model function as a :class:`~prefixattn.PrefixTuning` on the kernel.

        The virtual tokens come first and attention is causal, so their keys and values in
        every layer do not depend on the input: they *are* a prefix. This runs the soft
        prompt through the frozen model once, records each layer's K/V [Hkv, P, D] (after
        RoPE, at positions 0..P-1) and returns a ``PrefixTuning`` holding them, with
        ``position_offset=P`` so the inputs keep positions P, P+1, ... Its logits and
        generations equal this object's (up to float rounding), but serving skips the P
        virtual tokens per request and several tasks can share a batch (``TaskBank``).

        The returned object patches the shared model (see :func:`prefixattn.patch`); this
        ``PromptTuning`` keeps working on it (it detaches any attached prefix per call).

        Returns:
            a ``PrefixTuning`` (trainable further, ``save()``-able) on ``self.model``.
        """
        from .patching import patch, record_kv
        from .prefix_tuning import PrefixTuning

        model = self.model
        P = self.num_virtual_tokens
        was_patched = is_patched(model)
        previous = get_prefix(model) if was_patched else None
        patch(model, backend)
        set_prefix(model, None)
        was_training = model.training
        model.eval()
        try:
            emb = self.soft_prompt(1, model.get_input_embeddings().weight.dtype)  # [1, P, H]
            with record_kv(model) as rec:
                model(inputs_embeds=emb, use_cache=False)
        finally:
            model.train(was_training)
            set_prefix(model, previous)
        pt = PrefixTuning(model, P, init="random", position_offset=P, backend=backend)
        L = pt.prefix.shape[0]
        if sorted(rec) != list(range(L)):
            raise ValueError(
                f"model: expected K/V from layers 0..{L - 1}, got layers {sorted(rec)}"
            )
        kv = torch.stack([torch.stack(rec[i]) for i in range(L)])  # [L, 2, 1, Hkv, P, D]
        pt.prefix.copy_(kv[:, :, 0].float())
        return pt

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike) -> Path:
        """Write the soft prompt to directory ``path`` (created if needed).

        Files: ``prompt.safetensors`` (``prompt_embeddings`` [P, hidden] float32) and
        ``prefixattn_prompt.json``. Size: about P * hidden * 4 bytes.

        Returns:
            ``path`` as a ``Path``.
        """
        return super().save(path)

    def _artifact_tensors(self) -> dict[str, torch.Tensor]:
        return {PEFT_WEIGHTS_KEY: self.prompt.detach().to("cpu", torch.float32).contiguous()}

    def _artifact_meta(self) -> dict[str, Any]:
        return {"hidden_size": self.hidden_size, "vocab_size": self.vocab_size}

    @classmethod
    def read(cls, path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, Any]]:
        """:func:`read_prompt`."""
        return read_prompt(path)

    @classmethod
    def load(cls, path: str | os.PathLike, model: PreTrainedModel) -> PromptTuning:
        """Restore a soft prompt written by :meth:`save` onto ``model``.

        Raises:
            ValueError: ``path`` is not a saved soft prompt, or it does not fit ``model``
                (hidden size, model type).
            TypeError: ``model`` is not a ``PreTrainedModel``.
        """
        return cls._load(path, model)

    @classmethod
    def _check_loaded_shape(
        cls, tensor: torch.Tensor, model: PreTrainedModel, config: Any, where: str
    ) -> None:
        hidden = model.get_input_embeddings().embedding_dim
        if tensor.shape[1] != hidden:
            raise ValueError(f"model has hidden size {hidden} but {where} has {tensor.shape[1]}")
        if tensor.shape[0] != config.num_virtual_tokens:
            raise ValueError(f"{WEIGHTS_NAME} and {CONFIG_NAME} disagree on num_virtual_tokens")

    def _set_loaded(self, tensor: torch.Tensor) -> None:
        self.prompt.copy_(tensor)

    # ------------------------------------------------------------------ PEFT

    @classmethod
    def from_peft(
        cls, adapter: str | os.PathLike | nn.Module, model: PreTrainedModel | None = None
    ) -> PromptTuning:
        """Load a PEFT prompt-tuning adapter (``PROMPT_TUNING``, causal LM).

        Arguments:
            adapter: a directory written by ``PeftModel.save_pretrained`` or a live
                ``peft.PeftModel``.
            model: the base model; default for a ``PeftModel``: its own base model (which
                the ``PeftModel`` keeps using too: prompt tuning does not modify the model).

        The result reproduces PEFT's loss, logits (PEFT's ``logits[:, P:]``), greedy
        generations and soft-prompt gradients.

        Raises:
            ValueError: not a decoder-only PROMPT_TUNING adapter, or shapes that do not fit.
            TypeError: wrong argument types.
        """
        pcfg, weights, _, model = cls._peft_source(adapter, model)
        P = int(pcfg["num_virtual_tokens"])
        hidden = model.get_input_embeddings().embedding_dim
        if tuple(weights.shape) != (P, hidden):
            raise ValueError(
                f"adapter {PEFT_WEIGHTS_KEY} must have shape [P, hidden] = [{P}, {hidden}] for "
                f"this model, got {tuple(weights.shape)}"
            )
        self = cls._uninitialized(model, PromptTuningConfig(num_virtual_tokens=P))
        with torch.no_grad():
            self.prompt.copy_(weights.float())
        return self

    def to_peft(self, path: str | os.PathLike) -> Path:
        """Write a PEFT ``PROMPT_TUNING`` adapter (``PeftModel.from_pretrained`` loads it).

        Returns:
            ``path`` as a ``Path``.
        """
        return self._write_peft(path)

    def _peft_config(self) -> Any:
        from peft import PromptTuningConfig as PeftPromptTuningConfig

        cfg = self.model.config
        if hasattr(cfg, "get_text_config"):
            cfg = cfg.get_text_config()
        return PeftPromptTuningConfig(
            **self._peft_common(),
            token_dim=self.hidden_size,
            num_attention_heads=getattr(cfg, "num_attention_heads", None),
            num_layers=getattr(cfg, "num_hidden_layers", None),
        )

    def _peft_weights(self) -> torch.Tensor:
        return self.prompt  # [P, hidden]
