"""Route a transformers model's attention through :func:`prefixattn.prefix_attention`.

:func:`patch` registers an attention function and a mask function under the name
``"prefixattn"`` with transformers' ``AttentionInterface`` / ``AttentionMaskInterface`` and
switches the model to it with ``model.set_attn_implementation("prefixattn")``;
:func:`unpatch` restores the previous implementation of every config exactly.

The mask function hands the kernel what it can use: a 2-D bool key padding mask
``[B, N]`` (True = real token; its last Nk columns are a layer's keys) or ``None``.
Causality comes from the kernel's own bottom-right aligned causal mask, which is exactly
right for a growing KV cache (``Nq = 1`` sees the whole cache). Only a static cache, whose
keys are all its preallocated slots, gets transformers' 4-D mask (see below).

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

Static caches (``StaticCache``, ``generate(cache_implementation="static")``, eager and
with the forward under ``torch.compile(fullgraph=True)``) run the fused kernel over the
written slots (see :func:`prefixattn_mask`). Custom 4-D masks run the kernel when they are
causal + padding, else the exact masked path of :mod:`prefixattn.hf.masked` (logged at
DEBUG on the ``prefixattn.hf.patching`` logger); the prefix keys stay visible.

Packed (padding-free) batches train: several sequences in one row with ``position_ids``
restarting per sequence and no attention mask (``DataCollatorWithFlattening``, TRL's
``padding_free=True``), optionally with the ``cu_seq_lens_q/k`` / ``max_length_q/k``
kwargs. The mask function recognises the block-diagonal causal mask and hands the
attention function the sequence boundaries (int32 [S + 1]) instead of a padding mask;
the attention function calls the kernel with ``cu_seqlens``, and the provider is asked
for S "rows", one per packed sequence (a bank: one entry per sequence).

Not supported (a ``ValueError`` says so, no silent fallback): paged caches, chunked
attention and other mask-function overlays that are not causal + padding + a sliding
window or packed sequences (pass the overlay as a 4-D mask instead).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.attention import prefix_attention
from ..ops.validation import BACKENDS, PREFIX_WINDOWS
from .masked import masked_prefix_attention

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
    "get_backend",
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

logger = logging.getLogger(__name__)

# Attention-function kwargs whose meaning the kernel cannot reproduce: refuse them when set.
_UNSUPPORTED_KWARGS = {
    "position_bias": "additive position bias",
}
# Packed (padding-free) batches: the sequence boundaries come as these attention kwargs
# (transformers' FlashAttention kwargs, from DataCollatorWithFlattening(
# return_flash_attn_kwargs=True)) or from the mask function (position_ids restarting per
# sequence without an attention mask): see _packed_call
_PACKED_KWARGS = (("cu_seq_lens_q", "cu_seq_lens_k"), ("cu_seqlens_q", "cu_seqlens_k"))
_PACKED_MAX_ATTR = "_prefixattn_max_seqlen"  # the longest sequence, on the mask function's cu


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
    # int32 [B + 1] while the forward packs B rows into one (see set_kv_pool)
    kv_cu_seqlens_q: torch.Tensor | None = None


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
    cu_seqlens_q: torch.Tensor | None = None,
) -> None:
    """Tell a patched ``model``'s attention that its cache returns a KV-cache pool.

    ``view = (cache_seqlens, cache_batch_idx)``, int [B] each: the keys and values the
    attention receives are a pool [S, Hkv, Nmax, D] of slots, row b reads slot
    ``cache_batch_idx[b]`` up to key ``cache_seqlens[b]`` (see
    :func:`prefixattn.prefix_attention`); the kernel reads it in place. ``None``: keys
    and values are per row again. Used by the serving engine around a decode step.

    ``block_table`` int32 [B, max_blocks] (with ``cache_batch_idx`` None): the pool is a
    paged block pool [num_blocks, Hkv, block_size, D] (the kernel's paged mode).

    ``cu_seqlens_q`` int32 [B + 1]: the forward packs B rows into one sequence (input
    [1, total_q]: row b's new tokens are ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]``, the last
    of its ``cache_seqlens[b]`` keys); the attention gets ``cu_seqlens_q`` and the prefix
    provider is asked for B rows (a serving step: decode rows and prefill chunks in one
    forward).

    Raises:
        ValueError: ``model`` is not patched, or ``cu_seqlens_q`` without a view.
    """
    state = getattr(model, _STATE_ATTR, None)
    if not isinstance(state, _PatchState):
        raise ValueError("model must be patched with prefixattn.patch(model) before set_kv_pool")
    if block_table is not None and (view is None or view[1] is not None):
        raise ValueError("set_kv_pool: block_table needs view=(cache_seqlens, None)")
    if cu_seqlens_q is not None and view is None:
        raise ValueError("set_kv_pool: cu_seqlens_q needs view=(cache_seqlens, ...)")
    state.kv_pool = view
    state.kv_block_table = None if view is None else block_table
    state.kv_cu_seqlens_q = None if view is None else cu_seqlens_q


def get_prefix(model: nn.Module) -> PrefixProvider | None:
    """The provider attached to ``model`` (``None`` if none or not patched)."""
    state = getattr(model, _STATE_ATTR, None)
    return state.provider if isinstance(state, _PatchState) else None


def get_backend(model: nn.Module) -> str | None:
    """The kernel backend ``model`` was patched with (``None`` if not patched)."""
    state = getattr(model, _STATE_ATTR, None)
    return state.backend if isinstance(state, _PatchState) else None


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


def _padding(attention_mask: torch.Tensor, batch_size: int, start: int, stop: int) -> torch.Tensor:
    """bool [B, stop - start]: the 2-D ``attention_mask``'s keys [start, stop); slots past
    its end are not real (a static cache's unwritten slots), as transformers pads it."""
    if attention_mask.shape[-1] < stop:
        attention_mask = F.pad(attention_mask, (0, stop - attention_mask.shape[-1]))
    kpm = attention_mask[:, start:stop].to(torch.bool)
    if kpm.shape[0] != batch_size:
        raise ValueError(
            f"attention_mask of shape {tuple(attention_mask.shape)} does not have the batch's "
            f"{batch_size} rows"
        )
    return kpm


def _tracing() -> bool:
    """Under torch.compile, or while a CUDA graph is captured: no host syncs allowed."""
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    return torch.compiler.is_compiling() or capturing


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
    """Mask function for ``AttentionMaskInterface``: what the attention function can use.

    Called by transformers' ``create_causal_mask`` & co. with the same arguments as
    ``flash_attention_mask`` (``q_length``/``q_offset`` in recent 5.x; earlier 5.x versions
    pass ``cache_position`` [Nq] instead, which is accepted too).

    Returns:
        - ``None`` or bool [B, kv_length] (True = real token) when the last query is
          aligned with the last key (no cache, a ``DynamicCache``): a key padding mask,
          ``None`` when nothing is padded. Causality is left to the kernel (bottom-right
          aligned), and so is a sliding layer's window: the attention function gets it
          from the layer's ``sliding_window`` kwarg; here a sliding mask (``local_size`` =
          its window) is checked to be exactly causal + padding + that window.
        - a static cache (``StaticCache``: keys ``[B, Hkv, max_cache_len, D]`` of which the
          queries' positions fill the first ``q_offset + q_length``): eagerly, bool
          [B, L] over the L written keys (an expanded, stride-0 all-True tensor when nothing
          is padded); the attention function reads only those L keys, so the kernel's
          bottom-right causal mask is exact again. Under ``torch.compile`` (where L is a
          tensor: reading it would break the graph) transformers' own 4-D bool mask
          ``[B, 1, Nq, kv_length]``, which the attention function applies exactly (a decode
          step, ``Nq = 1``, as the kernel's key padding mask).
        - a packed batch (a block-diagonal causal mask, no padding, no cache): the
          sequence boundaries, int32 [S + 1] over the B * N flattened tokens (the
          attention function runs each sequence on its own, see :func:`_packed_call`).

    Raises:
        ValueError: the mask the model asks for cannot be expressed as a padding mask plus
            the kernel's causal mask and window (packed sequences, chunked attention,
            custom mask overlays), or the 2-D mask is longer than the keys without a cache.
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
        position_kw = {"q_length": q_length, "q_offset": q_offset}
    if isinstance(kv_offset, torch.Tensor) or kv_length is None:
        raise ValueError("prefixattn_mask needs int kv_length and kv_offset")
    tracing = _tracing()
    kv_end = kv_offset + kv_length
    causal = mask_function is not bidirectional_mask_function
    # a static cache: its keys are every preallocated slot, the queries' positions end
    # before the last one (transformers 5.24 passes a tensor q_offset, 5.25 an int)
    static = isinstance(q_offset, torch.Tensor)
    if not static:
        if causal and q_offset + q_length > kv_end:
            raise ValueError(
                f"prefixattn needs the last query aligned with the last key (queries "
                f"[{q_offset}, {q_offset + q_length}), keys [{kv_offset}, {kv_end}))"
            )
        static = q_offset + q_length < kv_end
        no_cache = q_offset == 0 and attention_mask is not None and attention_mask.dim() == 2
        if static and no_cache and attention_mask.shape[-1] == kv_end:
            raise ValueError(
                f"attention_mask covers {kv_end} keys but the model attends to "
                f"{q_length} (no cache): prefixattn needs the last query aligned with "
                "the last key, a 2-D mask longer than the keys is not supported"
            )
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask must be a 2-D padding mask [B, N] for prefixattn, got "
            f"{attention_mask.dim()}-D"
        )
    plain = mask_function is causal_mask_function or mask_function is bidirectional_mask_function
    window = kwargs.get("local_size")  # a sliding layer's window (or a chunk size)

    def dense() -> torch.Tensor:  # transformers' own mask, bool [B, 1, Nq, kv_length]
        return sdpa_mask(
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

    if static:
        # transformers' own mask: the attention function finds the written keys in it
        # (eagerly) or applies it as it is (traced: the number of written keys is a tensor
        # there, and reading it would break the graph). Being 4-D, it also passes
        # unchanged through a second create_causal_mask (generate precomputes the mask
        # of a compileable cache and hands it to the model as its attention_mask).
        return dense()
    full = None  # bool [B, kv_end]: the padding of every position up to the last key
    kpm = None  # bool [B, kv_length]: the padding of the keys the layer attends to
    if attention_mask is not None:
        full = _padding(attention_mask, batch_size, 0, kv_end)
        kpm = full[:, kv_offset:]
    if not plain:
        # sliding window, packed sequences, overlays: accept only if the dense mask the model
        # asks for equals what the kernel computes (causal + padding + window)
        want = dense()
        ours = _kernel_visible(batch_size, q_length, kv_length, kpm, want.device, window)
        same = torch.eq(want[:, 0].expand_as(ours), ours).all()
        msg = (
            "the attention pattern the model asks for (packed sequences, chunked "
            "attention or a custom mask overlay) is not a causal mask plus key padding "
            "and a sliding window, which is all the prefixattn kernel computes"
        )
        if tracing:
            torch._assert_async(same, msg)  # no host sync in a graph
        elif not bool(same):
            packed = (
                None if kpm is not None else _packed_cu_seqlens(want, q_offset, kv_offset, window)
            )
            if packed is not None:  # a packed batch: its sequence boundaries
                return packed
            raise ValueError(msg)
    # An all-real mask is dropped (the kernel's unmasked path is faster); the check is a
    # host sync, so it is skipped while torch.compile traces (no graph break) and while a
    # CUDA graph is captured (the serving engine's decode graphs).
    if kpm is not None and not tracing and bool(kpm.all()):
        return None
    # the whole [B, kv_end] mask, not only the keys' part: the attention function takes
    # its last Nk columns, and the result means the same when it is fed back as a 2-D
    # attention_mask (generate precomputes the mask of a compileable cache)
    return full


# (weak reference to a 4-D mask, its version and the call's sizes, what _classify found)
_CLASSIFIED: list[tuple[Any, tuple, tuple | None]] = []


def _classify(
    mask: torch.Tensor, B: int, Nq: int, Nk: int, window: int | None, prefix_sliding: bool,
    causal: bool,
) -> tuple[torch.Tensor | None, int | None, int] | None:  # fmt: skip
    """Eagerly: ``(key_padding_mask, window, n)`` if the 4-D mask is the kernel's causal
    mask (+ window) over its first n keys plus padding, else None (host syncs)."""
    vis = mask if mask.dtype == torch.bool else None
    if vis is None:  # a float mask of 0 / very negative entries is a visibility mask
        low = mask <= torch.finfo(mask.dtype).min / 2
        if bool(((mask == 0) | low).all()):
            vis = ~low
    if vis is None or vis.shape[1] != 1 or not causal or Nq == 0 or Nk == 0:
        return None
    seq = vis[:, 0].expand(B, Nq, Nk)
    seen = seq.any(dim=1).any(dim=0)  # [Nk]: keys some query sees
    n = int(torch.arange(1, Nk + 1, device=mask.device)[seen].max()) if seen.any() else Nk
    if n < Nq:
        return None
    kpm = seq[:, -1, :n]  # [B, n]: the last query sees every real key
    for w in [window] if window is None or prefix_sliding else [window, None]:
        if torch.equal(seq[:, :, :n], _kernel_visible(B, Nq, n, kpm, mask.device, w)):
            return (None if bool(kpm.all()) else kpm.contiguous()), w, n
    return None


def _four_d_mask(
    mask: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    window: int | None,
    prefix_sliding: bool,
    causal: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, int | None, int]:
    """Classify a 4-D mask [B|1, 1|H, Nq, >= Nk] (bool: True = visible; float: additive).

    Returns ``(key_padding_mask, None, window, n)`` when the kernel computes the mask
    exactly over the first n keys, else ``(None, mask, window, Nk)`` for
    :func:`~prefixattn.hf.masked.masked_prefix_attention` (the mask alone decides the
    sequence keys, as in transformers' SDPA and eager paths; ``window`` still places the
    prefix for ``prefix_window="sliding"``). The kernel takes it

    - eagerly, when the mask is the kernel's bottom-right causal mask (with or without the
      layer's window) over its first n keys plus the padding of its last query row, and
      hides keys n.. from every query: n = Nk for a dynamic cache, n = the written slots
      of a static cache (whose unwritten slots no query sees). One host sync per layer;
    - traced (torch.compile, CUDA-graph capture), for a bool decode-step mask (Nq = 1):
      the query sees every key the kernel's causal mask allows, so the mask is a key
      padding mask. No host sync.

    Raises:
        ValueError, TypeError: a mask that does not fit the query and keys, or an integer mask.
    """
    B, H, Nq = query.shape[:3]
    Nk = key.shape[2]
    if mask.shape[-1] > Nk:  # transformers' attention functions cut it to the keys too
        mask = mask[..., :Nk]
    if mask.shape[0] not in (1, B) or mask.shape[1] not in (1, H) or mask.shape[2:] != (Nq, Nk):
        raise ValueError(
            f"a 4-D attention_mask must have shape [B|1, 1|H, Nq, Nk] = [{B}|1, 1|{H}, {Nq}, "
            f"{Nk}], got {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(
            "a 4-D attention_mask must be bool (True = visible) or float (added to the "
            f"scores), got {mask.dtype}"
        )
    vis = mask if mask.dtype == torch.bool else None
    if not _tracing():
        # the layers of one forward share their mask: classify it once (an inference
        # tensor has no version counter to key on: classified every time)
        version = None if mask.is_inference() else mask._version
        key_ = (version, B, Nq, Nk, window, prefix_sliding, causal)
        hits = [got for ref, k, got in _CLASSIFIED if ref() is mask and k == key_]
        if hits and version is not None:
            found = hits[0]
        else:
            found = _classify(mask, B, Nq, Nk, window, prefix_sliding, causal)
            if version is not None:
                _CLASSIFIED.insert(0, (weakref.ref(mask), key_, found))
                del _CLASSIFIED[4:]
        if found is not None:
            return found[0], None, found[1], found[2]
    elif vis is not None and vis.shape[1] == 1 and Nq == 1 and not prefix_sliding:
        # a decode step sees every key the kernel's causal mask allows: padding alone
        return vis[:, 0, 0, :].expand(B, Nk), None, None, Nk
    if not _tracing() and logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "prefixattn: a 4-D attention mask %s (%s) that is not causal + key padding runs "
            "the exact masked path (materialises the scores)", tuple(mask.shape), mask.dtype,
        )  # fmt: skip
    return None, mask, window, Nk


def _packed_cu_seqlens(
    dense: torch.Tensor, q_offset: Any, kv_offset: Any, window: int | None
) -> torch.Tensor | None:
    """The packed sequences of a mask, if it is one: int32 [S + 1] over the B * N flattened
    tokens (sequence s = tokens cu[s]:cu[s + 1] of the row-major [B, N] batch), else None.

    ``dense`` bool [B, 1, N, N]: a packed batch's mask is block-diagonal causal (and
    windowed): token i starts a sequence iff it does not see token i - 1, and then it must
    see exactly the keys of its own sequence that the kernel's causal mask (and window)
    lets it see. The longest sequence rides on the tensor (``_PACKED_MAX_ATTR``): one host
    sync per forward, not one per layer.
    """
    if q_offset != 0 or kv_offset != 0 or dense.shape[-1] != dense.shape[-2]:
        return None
    d = dense[:, 0]  # [B, N, N]
    B, N, _ = d.shape
    if N < 2:
        return None
    i = torch.arange(1, N, device=d.device)
    starts = torch.ones(B, N, dtype=torch.bool, device=d.device)
    starts[:, 1:] = ~d[:, i, i - 1]  # [B, N]: token i does not see token i - 1
    seq = starts.cumsum(-1)  # [B, N] sequence id within the row
    same = seq[:, :, None] == seq[:, None, :]  # [B, N, N]
    if not torch.equal(d, _kernel_visible(B, N, N, None, d.device, window) & same):
        return None
    first = starts.reshape(-1).nonzero().flatten()  # [S] first token of each sequence
    cu = torch.cat([first, first.new_tensor([B * N])]).to(torch.int32)  # [S + 1]
    setattr(cu, _PACKED_MAX_ATTR, int((cu[1:] - cu[:-1]).max()))
    return cu


def _packed_call(
    query: torch.Tensor, key: torch.Tensor, attention_mask: Any, kwargs: dict[str, Any]
) -> tuple[torch.Tensor, int | None] | None:
    """``(cu_seqlens [S + 1] over the B * N flattened tokens, max_seqlen or None)`` of a
    packed batch, or None for an ordinary one: from the ``cu_seq_lens_q/k`` kwargs (the
    same for q and k) or from the mask function's packed mask (an int32 [S + 1])."""
    cu = max_len = None
    for qname, kname in _PACKED_KWARGS:
        cq, ck = kwargs.get(qname), kwargs.get(kname)
        if cq is None and ck is None:
            continue
        if cq is None or ck is None or (cq is not ck and not torch.equal(cq, ck)):
            raise ValueError(
                f"prefixattn trains packed sequences with the same boundaries for queries and "
                f"keys: {qname!r} and {kname!r} must both be given and equal"
            )
        cu, max_len = cq, kwargs.get("max_length_q", kwargs.get("max_seqlen_q"))
        break
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 1:
        if cu is None:  # the mask function's packed mask
            cu, max_len = attention_mask, getattr(attention_mask, _PACKED_MAX_ATTR, None)
    elif cu is not None and attention_mask is not None:
        raise ValueError(
            "prefixattn got packed-sequence kwargs (cu_seq_lens_q/k) and a padding mask: "
            "a packed batch has no padding"
        )
    if cu is None:
        return None
    if key.shape[2] != query.shape[2]:
        raise ValueError(
            f"prefixattn trains packed sequences without a KV cache: the queries ({query.shape[2]}"
            f") and keys ({key.shape[2]}) must be the same packed tokens"
        )
    if isinstance(max_len, torch.Tensor):
        max_len = int(max_len)
    return cu.to(query.device), max_len


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
    state = module.__dict__.get(_STATE_ATTR)
    is_cross = getattr(module, "is_cross_attention", False)
    pool = state.kv_pool if state is not None and not is_cross else None
    cu_q = None if pool is None else state.kv_cu_seqlens_q
    packed = None
    if cu_q is not None:  # packed rows over the pool (a serving step): one prefix per row
        B = cu_q.shape[0] - 1
    else:
        packed = _packed_call(query, key, attention_mask, kwargs)
    if packed is not None:  # a packed batch: one prefix per sequence (S of them)
        attention_mask = None
        B = packed[0].shape[0] - 1
    window = kwargs.get("sliding_window")
    softcap = kwargs.get("softcap")
    sinks = kwargs.get("s_aux")
    if sinks is None:
        sinks = kwargs.get("sinks")
    explicit = None  # a 4-D mask the kernel cannot express: the exact masked path
    if attention_mask is not None:
        if attention_mask.dim() == 2 and attention_mask.dtype == torch.bool:
            n = attention_mask.shape[1]
            if n < key.shape[2]:
                raise ValueError(
                    f"the key padding mask covers {n} positions but the layer has "
                    f"{key.shape[2]} keys"
                )
            # the mask covers every position up to the last key: the keys are its last Nk
            attention_mask = attention_mask[:, n - key.shape[2] :]  # [B, Nk]
        elif attention_mask.dim() == 4:
            explicit, attention_mask = attention_mask, None  # classified below
        else:
            raise ValueError(
                "prefixattn expects a 2-D bool key padding mask [B, Nk] (built by its mask "
                f"function) or a 4-D mask [B, 1|H, Nq, Nk], got a {attention_mask.dim()}-D "
                f"{attention_mask.dtype} mask"
            )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    backend = state.backend if state is not None else "auto"
    provider = state.provider if state is not None else None

    prefix_k = prefix_v = prefix_index = prefix_lengths = None
    prefix_window = "all"
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
    kw: dict[str, Any] = {}
    n_keys = key.shape[2]
    if pool is not None:
        kw = {"cache_seqlens": pool[0], "cache_batch_idx": pool[1]}
        if state.kv_block_table is not None:  # a paged pool: the rows' logical keys
            kw["block_table"] = state.kv_block_table
            n_keys = state.kv_block_table.shape[1] * key.shape[2]
        if cu_q is not None:
            if attention_mask is not None:
                raise ValueError(
                    "prefixattn: packed rows over a KV-cache pool (set_kv_pool(cu_seqlens_q="
                    "...)) take no attention mask (each row's keys are its cache_seqlens)"
                )
            kw["cu_seqlens_q"] = cu_q
    if window is not None and n_keys <= window and (prefix_k is None or prefix_window == "all"):
        window = None  # the window holds every key: plain causal (the faster kernel variant)

    sm_scale = None if scaling is None else float(scaling)
    if explicit is not None:
        prefix_sliding = window is not None and prefix_k is not None and prefix_window == "sliding"
        attention_mask, explicit, window, n = _four_d_mask(
            explicit, query, key, window, prefix_sliding, bool(causal)
        )
        if n < key.shape[2]:  # a static cache: its first n slots are written
            key, value = key[:, :, :n], value[:, :, :n]  # [B, Hkv, n, D] (views)
    if explicit is not None:  # the exact path under the given mask
        out = masked_prefix_attention(
            query, key, value, explicit, prefix_k, prefix_v, prefix_index=prefix_index,
            prefix_lengths=prefix_lengths, sm_scale=sm_scale, dropout_p=float(dropout),
            softcap=None if softcap is None else float(softcap), sinks=sinks,
            window=None if window is None else int(window), prefix_window=prefix_window,
        )  # fmt: skip
        return out.transpose(1, 2).contiguous(), None  # [B, Nq, H, D]
    Bq, H, Nq, D = query.shape
    if packed is not None:  # [Bq, H(kv), N, D] -> [1, H(kv), Bq * N, D], rows one after another
        if pool is not None:
            raise ValueError("prefixattn: a packed batch cannot read a KV-cache pool")
        kw = {"cu_seqlens": packed[0], "max_seqlen": packed[1]}
        query, key, value = (
            t.transpose(0, 1).reshape(1, t.shape[1], Bq * Nq, D) for t in (query, key, value)
        )
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
        sm_scale=sm_scale,
        dropout_p=float(dropout),
        backend=backend,
        window=None if window is None else int(window),
        softcap=None if softcap is None else float(softcap),
        sinks=sinks,
        prefix_window=prefix_window,
        **kw,
    )  # [B, H, Nq, D]
    if packed is not None:  # [1, H, Bq * Nq, D] -> [Bq, Nq, H, D]
        return out.view(H, Bq, Nq, D).permute(1, 2, 0, 3).contiguous(), None
    return out.transpose(1, 2).contiguous(), None  # [B, Nq, H, D]
