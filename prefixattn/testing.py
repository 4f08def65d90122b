"""Test support: tiny random models and an independent prefix oracle (tests, examples).

Nothing in the library imports this module (the CLI's and the server's tiny model is
:mod:`prefixattn.tiny`); it used to be ``prefixattn.hf.testing``, which stays an alias.

Nothing here downloads anything: the models are built from small configs with random
weights. :func:`concat_prefix_forward` computes prefix attention the way transformers
itself would if the prefix were real cached tokens (a ``DynamicCache`` pre-filled with the
prefix K/V, run on an *unpatched* model), which is independent of the prefixattn kernel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import (
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from .hf._compat import cache_kwarg

__all__ = [
    "concat_prefix_forward",
    "greedy_reference",
    "left_padded_batch",
    "single_thread",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_qwen2",
]

VOCAB = 128
_SPECIAL = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}


def _tiny(
    model_cls: type[PreTrainedModel],
    config_cls: type[Any],
    sizes: dict[str, Any],
    overrides: dict[str, Any],
    seed: int,
    attn_implementation: str,
) -> Any:
    """``model_cls`` with random weights (seed ``seed``) from ``sizes`` + ``overrides``, eval."""
    torch.manual_seed(seed)
    cfg = config_cls(**{**sizes, **_SPECIAL, **overrides})
    return model_cls._from_config(cfg, attn_implementation=attn_implementation).eval()


def tiny_gpt2(
    seed: int = 0, attn_implementation: str = "sdpa", **overrides: Any
) -> GPT2LMHeadModel:
    """GPT-2, 2 layers, 4 heads, hidden 64 (D=16), layer-scaled attention, fp32, eval mode."""
    sizes = dict(
        n_layer=2,
        n_head=4,
        n_embd=64,
        vocab_size=VOCAB,
        n_positions=128,
        scale_attn_by_inverse_layer_idx=True,  # GPT-2's `scaling` differs per layer
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
    )
    return _tiny(GPT2LMHeadModel, GPT2Config, sizes, overrides, seed, attn_implementation)


# Llama-style decoders (Llama, Qwen2): 2 layers, 4 query heads, hidden 64 (D=16)
_LLAMA_SIZES = dict(
    num_hidden_layers=2,
    num_attention_heads=4,
    hidden_size=64,
    intermediate_size=128,
    vocab_size=VOCAB,
    max_position_embeddings=128,
)


def tiny_llama(
    seed: int = 0, attn_implementation: str = "sdpa", **overrides: Any
) -> LlamaForCausalLM:
    """Llama with GQA: 2 layers, 4 query heads, 2 key/value heads, D=16, fp32, eval mode."""
    sizes = {**_LLAMA_SIZES, "num_key_value_heads": 2}
    return _tiny(LlamaForCausalLM, LlamaConfig, sizes, overrides, seed, attn_implementation)


def tiny_qwen2(
    seed: int = 0, attn_implementation: str = "sdpa", **overrides: Any
) -> Qwen2ForCausalLM:
    """Qwen2 with GQA (MQA-like 4:1): 2 layers, 4 query heads, 1 key/value head, D=16."""
    sizes = {**_LLAMA_SIZES, "num_key_value_heads": 1}
    return _tiny(Qwen2ForCausalLM, Qwen2Config, sizes, overrides, seed, attn_implementation)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one CPU thread (tiny models: thread hand-offs cost more than the math)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def left_padded_batch(
    lengths: list[int], seed: int = 0, pad_id: int = 1, low: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids [B, max(lengths)] left-padded with ``pad_id``, and the 0/1 mask [B, N]."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.full((len(lengths), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for b, m in enumerate(lengths):
        ids[b, n - m :] = torch.randint(low, VOCAB, (m,), generator=g)
        mask[b, n - m :] = 1
    return ids, mask


def concat_prefix_forward(
    model: PreTrainedModel,
    prefix: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_offset: int = 0,
    **kwargs: Any,
) -> Any:
    """Reference prefix attention: the prefix as cached tokens of an unpatched model.

    Arguments:
        model: an unpatched transformers decoder (sdpa or eager).
        prefix: [L, 2, Hkv, P, D] (may require grad: gradients flow back to it).
        input_ids: [B, N]; attention_mask: 0/1 [B, N] or None.
        position_offset: input positions are arange(N) + position_offset.

    Returns:
        The model output for the N input tokens.
    """
    B, N = input_ids.shape
    L, _, Hkv, P, D = prefix.shape
    cache = DynamicCache(config=model.config)
    for layer in range(L):
        k = prefix[layer, 0][None].expand(B, Hkv, P, D)  # [B, Hkv, P, D]
        v = prefix[layer, 1][None].expand(B, Hkv, P, D)
        cache.update(k, v, layer)
    if attention_mask is None:
        attention_mask = torch.ones(B, N, dtype=torch.long)
    full_mask = torch.cat([torch.ones(B, P, dtype=attention_mask.dtype), attention_mask], dim=1)
    pos = (torch.arange(N) + position_offset)[None].expand(B, N)  # [B, N]
    return model(
        input_ids=input_ids,
        attention_mask=full_mask,
        position_ids=pos,
        use_cache=True,
        **{cache_kwarg(model.forward): cache},  # `cache` from transformers 5.2x
        **kwargs,
    )


@torch.no_grad()
def greedy_reference(
    forward: Callable[..., Any],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 8,
    eos_token_id: int | None = _SPECIAL["eos_token_id"],
    pad_token_id: int = _SPECIAL["pad_token_id"],
) -> torch.Tensor:
    """Greedy decoding from forward passes only: what ``generate(do_sample=False)`` must return.

    Each row is decoded alone, without its padding and without a KV cache: every step
    runs ``forward(input_ids=row, attention_mask=ones)`` on the whole sequence so far and
    appends the argmax of the last position's logits. Nothing of transformers' or PEFT's
    ``generate`` (caches, position bookkeeping, padded batches) is involved, so this is the
    reference generate is checked against.

    Arguments:
        forward: a callable taking ``input_ids`` [1, n] and ``attention_mask`` [1, n] and
            returning an output with ``logits`` [1, m, V] (m >= n; only the last position
            is read), e.g. a ``PeftModel``, a ``PrefixTuning`` or a plain model.
        input_ids: [B, N] prompts, padded on either side.
        attention_mask: 0/1 [B, N] (1 = real token) or None (no padding).
        max_new_tokens: tokens to generate per row.
        eos_token_id: a row stops after producing it (None: never stops early).
        pad_token_id: fills a finished row's remaining positions.

    Returns:
        [B, N + T] int64: each row's prompt as given (padding included) followed by its new
        tokens, with T = max_new_tokens, or fewer when every row produced ``eos_token_id``
        earlier (as ``generate`` does).
    """
    B = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    rows: list[list[int]] = []
    for b in range(B):
        seq = input_ids[b][attention_mask[b].bool()][None]  # [1, n]: the real tokens only
        new: list[int] = []
        for _ in range(max_new_tokens):
            logits = forward(input_ids=seq, attention_mask=torch.ones_like(seq)).logits
            token = int(logits[0, -1].argmax())
            new.append(token)
            if token == eos_token_id:
                break
            seq = torch.cat([seq, seq.new_tensor([[token]])], dim=1)  # [1, n + 1]
        rows.append(new)
    T = max(len(r) for r in rows) if rows else 0
    new_ids = torch.full((B, T), pad_token_id, dtype=input_ids.dtype)  # [B, T]
    for b, r in enumerate(rows):
        new_ids[b, : len(r)] = torch.tensor(r, dtype=input_ids.dtype)
    return torch.cat([input_ids, new_ids.to(input_ids.device)], dim=1)  # [B, N + T]
