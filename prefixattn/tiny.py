"""Tiny random models, a word-level tokenizer and synthetic articles, built offline.

Used by ``prefixattn demo --tiny`` (a CI smoke run of the whole demo in seconds) and by
the tests: nothing here downloads or reads anything.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

from .data import Example

TINY_LABELS = ("business", "entertainment", "politics", "sports", "tech")

_TOPIC_WORDS = {
    "business": "profit shares market bank economy firm sales growth investors prices "
    "company deal oil dollar trade",
    "entertainment": "film music actor band award singer album star festival show "
    "comedy theatre oscar chart director",
    "politics": "minister election party government vote labour tory parliament "
    "campaign policy leader blair council law tax",
    "sports": "match goal team coach league season player win cup injury rugby "
    "football champion striker race",
    "tech": "software computer internet mobile phone users digital online games "
    "network microsoft web broadband chip data",
}
_FILLER = [
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "on",
    "for",
    "with",
    "said",
    "it",
    "was",
    "is",
    "by",
    "at",
    "from",
    "as",
    "its",
    "has",
    "have",
    "will",
    "year",
    "new",
    "last",
    "first",
    "people",
    "more",
    "this",
    "that",
]
_SPECIAL = ("<pad>", "<unk>", "<s>", "</s>")
_PROMPT_WORDS = ["Article", "Topic", ":", ".", ","]


def synthetic_articles(per_class: int = 12, *, words: int = 40, seed: int = 0) -> list[Example]:
    """Made-up "articles": topic words mixed with filler words, ``per_class`` per label.

    Deterministic for a given ``seed``; labels are :data:`TINY_LABELS`.
    """
    if not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class: expected an int >= 1, got {per_class!r}")
    rng = random.Random(seed)
    out = []
    for label in TINY_LABELS:
        topic = _TOPIC_WORDS[label].split()
        for _ in range(per_class):
            toks = [
                rng.choice(topic) if rng.random() < 0.4 else rng.choice(_FILLER)
                for _ in range(words)
            ]
            out.append(Example(text=" ".join(toks) + ".", label=label))
    rng.shuffle(out)
    return out


def tiny_tokenizer(texts: Iterable[str] = ()) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` whose vocabulary covers ``texts``.

    Words are split on whitespace and punctuation; unknown words map to ``<unk>``. The
    vocabulary always holds the demo's prompt words, :data:`TINY_LABELS` and the synthetic
    article words, so each label is one token. Special tokens: ``<pad>`` (0), ``<unk>``,
    ``<s>``, ``</s>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    vocab: dict[str, int] = {}
    for tok in _SPECIAL:
        vocab.setdefault(tok, len(vocab))
    base = [*_PROMPT_WORDS, *TINY_LABELS, *_FILLER, *" ".join(_TOPIC_WORDS.values()).split()]
    for text in [" ".join(base), *texts]:
        for word, _ in pre.pre_tokenize_str(text):
            vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )


def tiny_model(
    vocab_size: int, *, arch: str = "llama", seed: int = 0, initializer_range: float = 0.2
) -> Any:
    """A randomly initialised 2-layer causal LM (hidden 64, head dim 16), in eval mode.

    Arguments:
        vocab_size: vocabulary size (``len(tokenizer)``).
        arch: ``"llama"`` (4 query heads, 2 KV heads: GQA, RoPE) or ``"gpt2"``.
        seed: torch seed of the random weights.
        initializer_range: std of the random weights. The default 0.2 (transformers uses
            0.02) gives logits that depend on the input enough for a few training steps to
            show a falling loss; with 0.02 the outputs are nearly uniform whatever the input.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if not isinstance(vocab_size, int) or vocab_size < 8:
        raise ValueError(f"vocab_size: expected an int >= 8, got {vocab_size!r}")
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        initializer_range=initializer_range,
    )
    if arch == "llama":
        cfg = LlamaConfig(
            **common,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=512,
            tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(**common, n_embd=64, n_layer=2, n_head=4, n_positions=512)
        )
    else:
        raise ValueError(f"arch: expected 'llama' or 'gpt2', got {arch!r}")
    model.eval()
    return model


TINY_MODEL = "tiny"  # the CLI's --model value for tiny_base()


def tiny_base(*, dtype: Any = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of ``--model tiny``: a tiny random GPT-2 and the word tokenizer.

    Seeded (the same weights every time), in eval mode; for tests and smoke runs of every
    ``prefixattn`` subcommand. ``dtype``: a ``torch.dtype`` or ``None`` (float32).
    """
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), arch="gpt2")
    if dtype is not None:
        model = model.to(dtype)
    return model, tok
