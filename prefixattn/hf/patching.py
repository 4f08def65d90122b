"""Route a transformers model's attention through :func:`prefixattn.prefix_attention`.

:func:`patch` registers an attention function and a mask function under the name
``"prefixattn"`` with transformers' ``AttentionInterface`` / ``AttentionMaskInterface`` and
switches the model to it with ``model.set_attn_implementation("prefixattn")``;
:func:`unpatch` restores the previous implementation of every config exactly.

The mask function hands the kernel what it can use: a 2-D bool key padding mask
``[B, Nk]`` (True = real token) or ``None``, never a dense 4-D mask. Causality comes from
the kernel's own bottom-right aligned causal mask, which is exactly right for a growing
KV cache (``Nq = 1`` sees the whole cache).

The prefix comes from a :class:`PrefixProvider` attached to *one* model (see
:func:`set_prefix`): the attention function finds it through the attention module it is
called with (``module.layer_idx`` picks the layer), so two patched models with different
prefixes in one process never see each other's prefix. The prefix is never written to the
KV cache: the cache holds only real tokens, and every decoding step reads the prefix from
the provider.

Supported: transformers >= 5.10, < 6 (tested on 5.10.0, 5.17.0 and 5.23.0; older 5.x
releases pass ``cache_position`` to mask functions, which is accepted, but are not
supported: 5.0's GPT-2 ignores ``scale_attn_by_inverse_layer_idx`` outside eager) and every
decoder whose attention goes through ``ALL_ATTENTION_FUNCTIONS.get_interface`` (GPT-2,
Llama, Qwen2, Mistral, ... including GQA/MQA). Only public, 5.0-era APIs are used:
``AttentionInterface.register``, ``AttentionMaskInterface.register``,
``PreTrainedModel.set_attn_implementation`` and the config's ``_attn_implementation``
(plus ``sdpa_mask`` to check unusual mask patterns).

Each layer's sliding window, logit soft-capping and attention sinks are taken from the
attention kwargs the model passes (``sliding_window``, ``softcap``, ``s_aux`` / ``sinks``),
so hybrid models (Gemma-2/3, gpt-oss, Qwen2 with ``use_sliding_window``) get a window on
their sliding layers only; a sliding layer's mask is checked against the kernel's window
(see docs/model-families.md). With a prefix, what a windowed layer's query sees of the
prefix is the provider's ``prefix_window`` ("all" by default, "sliding" as PEFT).

Not supported (a ``ValueError`` says so, no silent fallback): static / compileable / paged
caches, custom 4-D attention masks, packed sequences (position-id resets without an
attention mask), chunked attention and other mask overlays that are not causal + padding
+ a sliding window.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..ops.attention import prefix_attention
from ..ops.validation import BACKENDS, PREFIX_WINDOWS

try:  # transformers is the optional "hf" extra
    from transformers import PreTrainedModel
    from transformers.masking_utils import (
        AttentionMaskInterface,
        bidirectional_mask_function,
        causal_mask_function,
        sdpa_mask,
    )
    from transformers.modeling_utils import AttentionInterface
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "prefixattn.hf needs transformers>=5.10: install the 'hf' extra "
        "(pip install 'prefixattn[hf]')"
    ) from err

__all__ = [
    "ATTN_IMPLEMENTATION",
    "LayerPrefix",
    "PrefixProvider",
    "StaticPrefix",
    "get_prefix",
    "is_patched",
    "patch",
    "prefixattn_attention_forward",
    "prefixattn_mask",
    "record_kv",
    "set_kv_pool",
    "set_prefix",
    "unpatch",
]

#: The name registered with transformers' attention and mask interfaces.
ATTN_IMPLEMENTATION = "prefixattn"

_STATE_ATTR = "_prefixattn_state"

# Attention-function kwargs whose meaning the kernel cannot reproduce: refuse them when set.
_UNSUPPORTED_KWARGS = {
    "position_bias": "additive position bias",
    "cu_seq_lens_q": "packed (varlen) sequences",
    "cu_seq_lens_k": "packed (varlen) sequences",
    "cu_seqlens_q": "packed (varlen) sequences",
    "cu_seqlens_k": "packed (varlen) sequences",
}


# --------------------------------------------------------------------------------------
# prefix providers
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerPrefix:
    """One layer's prefix as a :class:`PrefixProvider` hands it to the attention function.

    Attributes:
        key, value: [Hkv, P, D] (shared by all rows), [B, Hkv, P, D] (per row, ``index``
            None) or [T, Hkv, P, D] (a bank, with ``index``).
        index: int64 [B], the bank entry of each row (None: not a bank).
        lengths: int64 [T], a ragged bank: entry t exposes its first ``lengths[t]`` keys
            (None: every entry has all P; only with ``index``).
    """

    key: torch.Tensor
    value: torch.Tensor
    index: torch.Tensor | None = None
    lengths: torch.Tensor | None = None


class PrefixProvider:
    """Where a patched model gets its per-layer prefix K/V from.

    Subclasses implement :meth:`layer_prefix`. It is called once per attention layer per
    forward pass (and again when gradient checkpointing recomputes a layer), so it should be
    cheap and must return tensors that are part of the autograd graph if the prefix is
    trained.

    ``prefix_window`` says what a query of a sliding-window layer sees of the prefix:
    ``"all"`` (every prefix key, always: a task memory like an attention sink) or
    ``"sliding"`` (PEFT's behaviour: the prefix keys are the P positions before the
    first token and leave the window like cache entries). See
    :func:`prefixattn.prefix_attention`.
    """

    prefix_window: str = "all"

    def layer_prefix(self, layer_idx: int, batch_size: int) -> LayerPrefix | None:
        """The prefix of layer ``layer_idx`` for a batch of ``batch_size`` rows.

        Returns:
            ``None`` (no prefix on this layer) or a :class:`LayerPrefix` (see
            :func:`prefixattn.prefix_attention` for the shapes).
        """
        raise NotImplementedError


class StaticPrefix(PrefixProvider):
    """Fixed per-layer prefix tensors, optionally a bank with a row index.

    Arguments:
        keys, values: one tensor per layer (``None`` for a layer without prefix), each
            [Hkv, P, D] shared, [B, Hkv, P, D] per row, or [T, Hkv, P, D] bank.
        prefix_index: int64 [B] bank entry per row (only with 4-D bank tensors).
        expand_batch: allow a batch that is a multiple of ``len(prefix_index)`` (generation
            with ``num_beams`` / ``num_return_sequences`` repeats each row consecutively); the
            index is then repeated with ``repeat_interleave``.
        prefix_lengths: int64 [T], a ragged bank: entry t exposes its first
            ``prefix_lengths[t]`` keys (only with ``prefix_index``).
        prefix_window: "all" or "sliding" (see :class:`PrefixProvider`).
    """

    def __init__(
        self,
        keys: Sequence[torch.Tensor | None],
        values: Sequence[torch.Tensor | None],
        prefix_index: torch.Tensor | None = None,
        *,
        expand_batch: bool = False,
        prefix_lengths: torch.Tensor | None = None,
        prefix_window: str = "all",
    ) -> None:
        if prefix_window not in PREFIX_WINDOWS:
            raise ValueError(
                f"prefix_window must be one of {PREFIX_WINDOWS}, got {prefix_window!r}"
            )
        if prefix_lengths is not None and prefix_index is None:
            raise ValueError("prefix_lengths needs prefix_index (a bank)")
        if not isinstance(keys, Sequence) or not isinstance(values, Sequence):
            raise TypeError("keys and values must be sequences of per-layer tensors (or None)")
        if len(keys) != len(values):
            raise ValueError(
                f"keys and values must have one entry per layer each, got {len(keys)} and "
                f"{len(values)}"
            )
        for i, (k, v) in enumerate(zip(keys, values)):
            if (k is None) != (v is None):
                raise ValueError(f"keys[{i}] and values[{i}] must both be tensors or both None")
            if k is None:
                continue
            if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
                raise TypeError(f"keys[{i}] and values[{i}] must be torch.Tensor")
            if k.dim() not in (3, 4) or k.shape != v.shape:
                raise ValueError(
                    f"keys[{i}] and values[{i}] must have the same shape [Hkv, P, D] or "
                    f"[B|T, Hkv, P, D], got {tuple(k.shape)} and {tuple(v.shape)}"
                )
            if prefix_index is not None and k.dim() != 4:
                raise ValueError(
                    f"prefix_index needs bank prefixes [T, Hkv, P, D]; keys[{i}] has shape "
                    f"{tuple(k.shape)}"
                )
        if prefix_index is not None:
            if not isinstance(prefix_index, torch.Tensor) or prefix_index.dtype != torch.int64:
                raise TypeError("prefix_index must be an int64 torch.Tensor of shape [B]")
            if prefix_index.dim() != 1:
                raise ValueError(
                    f"prefix_index must have shape [B], got {tuple(prefix_index.shape)}"
                )
        self.keys = list(keys)
        self.values = list(values)
        self.prefix_index = prefix_index
        self.expand_batch = expand_batch
        self.prefix_lengths = prefix_lengths
        self.prefix_window = prefix_window

    def layer_prefix(self, layer_idx: int, batch_size: int) -> LayerPrefix | None:
        """See :meth:`PrefixProvider.layer_prefix`."""
        if layer_idx >= len(self.keys):
            raise ValueError(
                f"the prefix has {len(self.keys)} layers but the model asked for layer {layer_idx}"
            )
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if k is None:
            return None
        index = self.prefix_index
        if index is not None and index.shape[0] != batch_size:
            n = index.shape[0]
            if not (self.expand_batch and n > 0 and batch_size % n == 0):
                raise ValueError(f"prefix_index has {n} rows but the batch has {batch_size} rows")
            index = index.repeat_interleave(batch_size // n)  # [B]: beams/samples of a row
        return LayerPrefix(k, v, index, self.prefix_lengths)


@dataclass
class _PatchState:
    """What :func:`patch` attached to one model."""

    backend: str
    previous: list[tuple[Any, Any]]  # (config, its _attn_implementation before patching)
    provider: PrefixProvider | None = None
    # layer_idx -> (key, value) seen by the attention function, while record_kv is active
    recorder: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    # (cache_seqlens [B], cache_batch_idx [B]) while the model's cache hands the attention
    # a KV-cache pool [S, Hkv, Nmax, D] instead of each row's keys (see set_kv_pool)
    kv_pool: tuple[torch.Tensor, torch.Tensor | None] | None = None
    # int32 [B, max_blocks] while that pool is a paged block pool (see set_kv_pool)
    kv_block_table: torch.Tensor | None = None


# --------------------------------------------------------------------------------------
# patch / unpatch
# --------------------------------------------------------------------------------------


def _register() -> None:
    """Register the attention and mask functions (global, idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, prefixattn_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, prefixattn_mask)


def _configs(model: nn.Module) -> list[Any]:
    """Every distinct config of ``model`` and its submodels (including nested sub-configs)."""
    seen: dict[int, Any] = {}
    stack = [m.config for m in model.modules() if isinstance(m, PreTrainedModel)]
    while stack:
        cfg = stack.pop()
        if cfg is None or id(cfg) in seen:
            continue
        seen[id(cfg)] = cfg
        for name in getattr(cfg, "sub_configs", {}) or {}:
            stack.append(getattr(cfg, name, None))
    return list(seen.values())


def _check_model(model: object) -> PreTrainedModel:
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"model must be a transformers PreTrainedModel, got {type(model).__name__} "
            "(for a PEFT model use PrefixTuning.from_peft)"
        )
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`patch` was applied to ``model`` (and not undone)."""
    return isinstance(getattr(model, _STATE_ATTR, None), _PatchState)


def patch(model: PreTrainedModel, backend: str = "auto") -> PreTrainedModel:
    """Route every attention layer of ``model`` through :func:`prefixattn.prefix_attention`.

    Works on transformers >= 5.10 models whose attention goes through
    ``AttentionInterface`` (GPT-2, Llama, Qwen2, Mistral, ...). Without a prefix (see
    :func:`set_prefix`) the patched model gives the logits and greedy generations of the
    unpatched one (padded batches and KV cache included). Patching an already patched
    model only changes ``backend``.

    Arguments:
        model: a transformers ``PreTrainedModel``; modified in place.
        backend: kernel backend, "auto" (Triton on CUDA, "sdpa" elsewhere), "triton",
            "sdpa" or "reference".

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``model`` is not a ``PreTrainedModel``.
        ValueError: bad ``backend``, or the model does not use transformers' attention
            interface.
    """
    model = _check_model(model)
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    state = getattr(model, _STATE_ATTR, None)
    if isinstance(state, _PatchState):
        state.backend = backend
        return model

    _register()
    configs = _configs(model)
    previous = [(cfg, cfg._attn_implementation) for cfg in configs]
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        _restore(model, previous)
        raise ValueError(
            f"model ({type(model).__name__}) does not route its attention through "
            "transformers' AttentionInterface, so it cannot be patched"
        )
    state = _PatchState(backend=backend, previous=previous)
    for module in model.modules():
        # every module gets the state: the attention function reads it from the module
        # it is called with, whatever the model calls its attention modules
        module.__dict__[_STATE_ATTR] = state
    return model


def _restore(model: PreTrainedModel, previous: list[tuple[Any, Any]]) -> None:
    top = next((impl for cfg, impl in previous if cfg is model.config), None)
    if top is not None and top != model.config._attn_implementation:
        model.set_attn_implementation(top)
    for cfg, impl in previous:  # exact restore of every (sub-)config, whatever the checks did
        cfg._attn_implementation_internal = impl


def unpatch(model: PreTrainedModel) -> PreTrainedModel:
    """Undo :func:`patch`: restore the previous attention implementation of every config.

    The attached prefix provider is dropped as well.

    Arguments:
        model: a model patched by :func:`patch`.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``model`` is not a ``PreTrainedModel``.
        ValueError: ``model`` is not patched.
    """
    model = _check_model(model)
    state = getattr(model, _STATE_ATTR, None)
    if not isinstance(state, _PatchState):
        raise ValueError("model is not patched by prefixattn.patch, nothing to unpatch")
    _restore(model, state.previous)
    for module in model.modules():
        module.__dict__.pop(_STATE_ATTR, None)
    state.provider = None
    return model


def set_prefix(model: PreTrainedModel, provider: PrefixProvider | None) -> None:
    """Attach ``provider`` (or ``None`` for no prefix) to a patched ``model``.

    The provider stays attached until replaced: it is also what gradient checkpointing sees
    when it recomputes a layer during backward.

    Raises:
        TypeError: ``provider`` is not a :class:`PrefixProvider` or ``None``.
        ValueError: ``model`` is not patched.
    """
    state = getattr(model, _STATE_ATTR, None)
    if not isinstance(state, _PatchState):
        raise ValueError("model must be patched with prefixattn.patch(model) before set_prefix")
    if provider is not None and not isinstance(provider, PrefixProvider):
        raise TypeError(f"provider must be a PrefixProvider or None, got {type(provider).__name__}")
    state.provider = provider


@contextlib.contextmanager
def record_kv(model: PreTrainedModel) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Record the sequence keys/values every self-attention layer sees (detached).

    Yields a dict ``layer_idx -> (key, value)``, each [B, Hkv, Nk, D] as the kernel receives
    them (after RoPE, cache appended, prefix excluded). Used to initialise prefixes from the
    activations of real tokens.

    Raises:
        ValueError: ``model`` is not patched.
    """
    state = getattr(model, _STATE_ATTR, None)
    if not isinstance(state, _PatchState):
        raise ValueError("model must be patched with prefixattn.patch(model) to record K/V")
    previous = state.recorder
    state.recorder = {}
    try:
        yield state.recorder
    finally:
        state.recorder = previous


def set_kv_pool(
    model: PreTrainedModel,
    view: tuple[torch.Tensor, torch.Tensor | None] | None,
    *,
    block_table: torch.Tensor | None = None,
) -> None:
    """Tell a patched ``model``'s attention that its cache returns a KV-cache pool.

    ``view = (cache_seqlens, cache_batch_idx)``, int [B] each: the keys and values the
    attention receives are a pool [S, Hkv, Nmax, D] of slots, row b reads slot
    ``cache_batch_idx[b]`` up to key ``cache_seqlens[b]`` (see
    :func:`prefixattn.prefix_attention`); the kernel reads it in place. ``None``: keys
    and values are per row again. Used by the serving engine around a decode step.

    ``block_table`` int32 [B, max_blocks] (with ``cache_batch_idx`` None): the pool is a
    paged block pool [num_blocks, Hkv, block_size, D] (the kernel's paged mode).

    Raises:
        ValueError: ``model`` is not patched.
    """
    state = getattr(model, _STATE_ATTR, None)
    if not isinstance(state, _PatchState):
        raise ValueError("model must be patched with prefixattn.patch(model) before set_kv_pool")
    if block_table is not None and (view is None or view[1] is not None):
        raise ValueError("set_kv_pool: block_table needs view=(cache_seqlens, None)")
    state.kv_pool = view
    state.kv_block_table = None if view is None else block_table


def get_prefix(model: nn.Module) -> PrefixProvider | None:
    """The provider attached to ``model`` (``None`` if none or not patched)."""
    state = getattr(model, _STATE_ATTR, None)
    return state.provider if isinstance(state, _PatchState) else None


# --------------------------------------------------------------------------------------
# the functions transformers calls
# --------------------------------------------------------------------------------------


def _kernel_visible(
    batch_size: int,
    q_length: int,
    kv_length: int,
    kpm: torch.Tensor | None,
    device: Any,
    window: int | None = None,
) -> torch.Tensor:
    """The kernel's causal mask: bool [B, Nq, Nk], query i sees key j iff j <= i + Nk - Nq
    (and j > i + Nk - Nq - window with a sliding window)."""
    i = torch.arange(q_length, device=device)[:, None]
    j = torch.arange(kv_length, device=device)[None, :]
    vis = j <= i + (kv_length - q_length)  # [Nq, Nk]
    if window is not None:
        vis = vis & (j > i + (kv_length - q_length) - window)
    vis = vis[None].expand(batch_size, -1, -1)  # [B, Nq, Nk]
    if kpm is not None:
        vis = vis & kpm[:, None, :]
    return vis


def prefixattn_mask(
    batch_size: int,
    q_length: int | None = None,
    kv_length: int | None = None,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function: Any = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """Mask function for ``AttentionMaskInterface``: a 2-D key padding mask or ``None``.

    Called by transformers' ``create_causal_mask`` & co. with the same arguments as
    ``flash_attention_mask`` (``q_length``/``q_offset`` in recent 5.x; earlier 5.x versions
    pass ``cache_position`` [Nq] instead, which is accepted too).

    Returns:
        bool [B, kv_length] (True = real token) when the 2-D ``attention_mask`` has padding,
        else ``None``. Causality is left to the kernel (bottom-right aligned), and so is a
        sliding layer's window: the attention function gets it from the layer's
        ``sliding_window`` kwarg; here a sliding mask (``local_size`` = its window) is
        checked to be exactly causal + padding + that window.

    Raises:
        ValueError: the mask the model asks for cannot be expressed as a padding mask plus
            the kernel's causal mask and window (static cache, packed sequences, chunked
            attention, custom mask overlays).
    """
    cache_position = kwargs.pop("cache_position", None)
    position_kw: dict[str, Any]
    if q_length is None:  # older 5.x: the queries are given by cache_position [Nq]
        if cache_position is None or kv_length is None:
            raise ValueError("prefixattn_mask needs q_length and kv_length (or cache_position)")
        q_length = int(cache_position.shape[0])
        q_offset = int(cache_position[0]) if q_length > 0 else 0
        position_kw = {"cache_position": cache_position}
    else:
        if isinstance(q_offset, torch.Tensor) or isinstance(kv_offset, torch.Tensor):
            raise ValueError(
                "prefixattn does not support static / compileable KV caches (use the default "
                "DynamicCache)"
            )
        position_kw = {"q_length": q_length, "q_offset": q_offset}
    kpm = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(
                f"attention_mask must be a 2-D padding mask [B, N] for prefixattn, got "
                f"{attention_mask.dim()}-D"
            )
        kpm = attention_mask[:, kv_offset : kv_offset + kv_length].to(torch.bool)
        if kpm.shape != (batch_size, kv_length):
            raise ValueError(
                f"attention_mask of shape {tuple(attention_mask.shape)} does not cover the "
                f"{kv_length} keys (offset {kv_offset}) the model attends to"
            )
    plain = mask_function is causal_mask_function or mask_function is bidirectional_mask_function
    if mask_function is causal_mask_function and q_offset + q_length != kv_offset + kv_length:
        raise ValueError(
            f"prefixattn needs the last query aligned with the last key (queries "
            f"[{q_offset}, {q_offset + q_length}), keys [{kv_offset}, {kv_offset + kv_length})): "
            "attention_mask longer than the keys without a cache, or a static cache (use the "
            "default DynamicCache)"
        )
    if not plain:
        # sliding window, packed sequences, overlays: accept only if the dense mask the model
        # asks for equals what the kernel computes (causal + padding)
        dense = sdpa_mask(
            batch_size=batch_size,
            kv_length=kv_length,
            kv_offset=kv_offset,
            **position_kw,
            mask_function=mask_function,
            attention_mask=attention_mask,
            allow_is_causal_skip=False,
            allow_is_bidirectional_skip=False,
            use_vmap=kwargs.get("use_vmap", False),
            device=kwargs.get("device", "cpu"),
        )
        window = kwargs.get("local_size")  # a sliding layer's window (or a chunk size)
        ours = _kernel_visible(batch_size, q_length, kv_length, kpm, dense.device, window)
        if not torch.equal(dense[:, 0].expand_as(ours), ours):
            raise ValueError(
                "the attention pattern the model asks for (packed sequences, chunked "
                "attention or a custom mask overlay) is not a causal mask plus key padding "
                "and a sliding window, which is all the prefixattn kernel computes"
            )
    # An all-real mask is dropped (the kernel's unmasked path is faster); the check is a
    # host sync, so it is skipped while torch.compile traces (no graph break) and while a
    # CUDA graph is captured (the serving engine's decode graphs).
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    if kpm is not None and not torch.compiler.is_compiling() and not capturing and bool(kpm.all()):
        kpm = None
    return kpm


def _packed_hint(kwargs: dict[str, Any]) -> None:
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"prefixattn does not support {what} (attention kwarg {name!r})")


def prefixattn_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function for ``AttentionInterface`` (same contract as ``sdpa_attention_forward``).

    Arguments:
        module: the attention module; ``module.layer_idx`` picks the prefix layer and the
            patch state attached to it gives the provider and the backend.
        query: [B, H, Nq, D].
        key, value: [B, Hkv, Nk, D] (the KV cache already appended, without prefix).
        attention_mask: bool [B, Nk] key padding mask from :func:`prefixattn_mask`, or None.
        dropout: attention dropout probability (the model passes 0 in eval mode).
        scaling: softmax scale (e.g. GPT-2's, which folds ``scale_attn_by_inverse_layer_idx``);
            None means 1/sqrt(D).
        is_causal: overrides ``module.is_causal``.
        **kwargs: ``sliding_window`` (this layer's window, or None), ``softcap`` (logit
            soft-capping) and ``s_aux`` / ``sinks`` (attention sinks [H]) go to the kernel;
            other model kwargs (``position_ids``, ``use_cache``, ...) are not needed; the
            ones that would change the result (varlen, position bias) raise ``ValueError``.

    Returns:
        ``(out, None)`` with out [B, Nq, H, D] (attention weights are never materialised).
    """
    _packed_hint(kwargs)
    cache = kwargs.get("cache")
    if cache is not None and type(cache).__name__ == "PagedAttentionCache":
        raise ValueError("prefixattn does not support paged attention caches")
    B = query.shape[0]
    window = kwargs.get("sliding_window")
    softcap = kwargs.get("softcap")
    sinks = kwargs.get("s_aux")
    if sinks is None:
        sinks = kwargs.get("sinks")
    if attention_mask is not None and (
        attention_mask.dim() != 2 or attention_mask.dtype != torch.bool
    ):
        raise ValueError(
            "prefixattn expects a 2-D bool key padding mask [B, Nk] (built by its mask "
            f"function), got a {attention_mask.dim()}-D {attention_mask.dtype} mask; custom 4-D "
            "masks are not supported"
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    state = module.__dict__.get(_STATE_ATTR)
    backend = state.backend if state is not None else "auto"
    provider = state.provider if state is not None else None

    prefix_k = prefix_v = prefix_index = prefix_lengths = None
    prefix_window = "all"
    is_cross = getattr(module, "is_cross_attention", False)
    layer_idx = getattr(module, "layer_idx", None)
    if state is not None and state.recorder is not None and not is_cross and layer_idx is not None:
        state.recorder[int(layer_idx)] = (key.detach(), value.detach())
    if provider is not None and not is_cross:
        if layer_idx is None:
            raise ValueError(
                f"{type(module).__name__} has no layer_idx, so its prefix layer is unknown"
            )
        got = provider.layer_prefix(int(layer_idx), B)
        if got is not None:
            if not isinstance(got, LayerPrefix):
                raise TypeError(
                    f"{type(provider).__name__}.layer_prefix must return a LayerPrefix or None, "
                    f"got {type(got).__name__}"
                )
            # a prefix trained in fp32 on a half-precision model (or vice versa): cast
            prefix_k = got.key.to(device=query.device, dtype=query.dtype)
            prefix_v = got.value.to(device=query.device, dtype=query.dtype)
            if got.index is not None:
                prefix_index = got.index.to(query.device)
            if got.lengths is not None:  # a ragged bank
                prefix_lengths = got.lengths.to(query.device)
            prefix_window = provider.prefix_window
    pool = state.kv_pool if state is not None and not is_cross else None
    kw: dict[str, Any] = {}
    n_keys = key.shape[2]
    if pool is not None:
        kw = {"cache_seqlens": pool[0], "cache_batch_idx": pool[1]}
        if state.kv_block_table is not None:  # a paged pool: the rows' logical keys
            kw["block_table"] = state.kv_block_table
            n_keys = state.kv_block_table.shape[1] * key.shape[2]
    if window is not None and n_keys <= window and (prefix_k is None or prefix_window == "all"):
        window = None  # the window holds every key: plain causal (the faster kernel variant)

    out = prefix_attention(
        query,
        key,
        value,
        prefix_k,
        prefix_v,
        prefix_index=prefix_index,
        prefix_lengths=prefix_lengths,
        key_padding_mask=attention_mask,
        causal=bool(causal),
        sm_scale=None if scaling is None else float(scaling),
        dropout_p=float(dropout),
        backend=backend,
        window=None if window is None else int(window),
        softcap=None if softcap is None else float(softcap),
        sinks=sinks,
        prefix_window=prefix_window,
        **kw,
    )  # [B, H, Nq, D]
    return out.transpose(1, 2).contiguous(), None  # [B, Nq, H, D]
