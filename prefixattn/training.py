"""A small training loop for prefix / prompt tuning (used by the CLI and the demo).

Batches are dicts of model inputs (``input_ids``, ``attention_mask``, ``labels``, each
[B, N]). The loop trains the parameters of a tuner that require grad (the prefix or the
soft prompt; the base model is frozen) with AdamW, a short linear warm-up and a linear
decay, and shows a tqdm bar with the last step's loss, its moving average and the tokens
per second.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

Batch = dict[str, torch.Tensor]


@dataclass
class TrainResult:
    """What :func:`train` measured."""

    losses: list[float] = field(default_factory=list)  # one per step
    seconds: float = 0.0
    tokens: int = 0  # real (non-padding) tokens processed

    @property
    def tokens_per_second(self) -> float:
        """Real tokens per second of training (forward + backward + update)."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def _count_tokens(batch: Batch) -> int:
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    return int(batch["input_ids"].numel())


def lr_lambda(steps: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` steps, then linear decay to 10% at ``steps``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(steps - warmup, 1)
        return 1.0 - 0.9 * min(frac, 1.0)

    return f


def train(
    module: nn.Module,
    batches: Iterator[Batch] | Callable[[int], Batch],
    *,
    steps: int,
    lr: float,
    warmup: int | None = None,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    progress: bool = True,
    desc: str = "train",
) -> TrainResult:
    """Train the parameters of ``module`` that require grad for ``steps`` steps.

    Arguments:
        module: a tuner (``PrefixTuning`` / ``PromptTuning``) whose forward takes the batch
            dict and returns an output with ``.loss``; it is put in train mode, and back in
            eval mode at the end.
        batches: an iterator of batches, or a function ``step -> batch``. Each batch is a
            dict with ``input_ids`` [B, N], ``attention_mask`` [B, N], ``labels`` [B, N].
        steps: number of optimizer steps (>= 1).
        lr: peak learning rate of AdamW.
        warmup: warm-up steps (default: 10% of ``steps``, at least 1).
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient clipping norm (None: no clipping).
        progress: show a tqdm progress bar with the last step's loss (``loss``), its
            moving average (``loss_ema``) and tokens/s.
        desc: the bar's label.

    Returns:
        A :class:`TrainResult` (per-step losses, wall time, tokens processed).

    Raises:
        ValueError: bad ``steps`` / ``lr``, or ``module`` has no trainable parameter.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr: expected a float > 0, got {lr!r}")
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("module: expected trainable parameters (requires_grad), found none")
    warmup = max(1, steps // 10) if warmup is None else warmup
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, warmup))
    get = batches if callable(batches) else None
    it = None if callable(batches) else iter(batches)

    from tqdm.auto import tqdm

    result = TrainResult()
    module.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True)
    ema: float | None = None
    start = time.perf_counter()
    try:
        for step in bar:
            batch = get(step) if get is not None else next(it)
            out = module(**batch)
            loss = out.loss
            if loss is None or not torch.isfinite(loss):
                raise ValueError(f"the loss at step {step} is {loss}: check the labels / the lr")
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            value = float(loss.detach())
            result.losses.append(value)
            result.tokens += _count_tokens(batch)
            ema = value if ema is None else 0.8 * ema + 0.2 * value
            elapsed = time.perf_counter() - start
            bar.set_postfix(  # the last step's loss, and its moving average (EMA, weight 0.2)
                loss=f"{value:.3f}",
                loss_ema=f"{ema:.3f}",
                tok_s=f"{result.tokens / max(elapsed, 1e-9):.0f}",
            )
    finally:
        bar.close()
        module.eval()
    result.seconds = time.perf_counter() - start
    return result


@torch.no_grad()
def evaluate_loss(module: nn.Module, batches: Iterable[Batch]) -> float:
    """Mean loss per label token over ``batches`` (``nan`` when there is none)."""
    module.eval()
    total, count = 0.0, 0
    for batch in batches:
        labels = batch["labels"]
        n = int((labels[:, 1:] != -100).sum())  # causal LMs shift labels by one
        if n == 0:
            continue
        out = module(**batch)
        total += float(out.loss) * n
        count += n
    return total / count if count else float("nan")


def pad_batch(
    sequences: Sequence[Sequence[int]],
    label_starts: Sequence[int] | None,
    pad_id: int,
    device: torch.device | str = "cpu",
) -> Batch:
    """Right-pad token id lists into a batch.

    Arguments:
        sequences: B lists of token ids.
        label_starts: per row, the index of the first token that gets a loss (tokens before
            it, e.g. a prompt, get label -100); ``None``: no ``labels`` in the batch.
        pad_id: the padding token id.
        device: where the tensors go.

    Returns:
        ``input_ids``, ``attention_mask`` (and ``labels``), each int64 [B, max length].
    """
    if not sequences:
        raise ValueError("sequences: expected at least one sequence")
    n = max(len(s) for s in sequences)
    B = len(sequences)
    ids = torch.full((B, n), pad_id, dtype=torch.long)
    mask = torch.zeros((B, n), dtype=torch.long)
    labels = torch.full((B, n), -100, dtype=torch.long)
    for i, seq in enumerate(sequences):
        t = torch.as_tensor(list(seq), dtype=torch.long)
        ids[i, : len(seq)] = t
        mask[i, : len(seq)] = 1
        if label_starts is not None:
            start = label_starts[i]
            labels[i, start : len(seq)] = t[start:]
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if label_starts is not None:
        batch["labels"] = labels.to(device)
    return batch


def pack_batch(batch: Batch) -> Batch:
    """A right-padded batch (``input_ids``, ``attention_mask``, ``labels``, [B, N]) as one
    packed row (padding-free training): the B sequences' real tokens one after another.

    Returns ``input_ids`` and ``labels`` [1, total] (-100 on each sequence's first
    token, as TRL's padding-free collator: the padded batch never scores it either),
    ``position_ids`` [1, total]
    (restarting at 0 per sequence) and the sequence boundaries ``cu_seq_lens_q`` /
    ``cu_seq_lens_k`` (int32 [B + 1]) with ``max_length_q`` / ``max_length_k`` (ints), as
    ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` builds them; no
    ``attention_mask``. Other [B]-shaped entries (``task_ids``) are kept: one per packed
    sequence. A patched model attends within each sequence only (prefix per sequence).
    """
    mask = batch["attention_mask"].bool()  # [B, N], real tokens first (right padding)
    lens = mask.sum(1)  # [B]
    if not bool((mask.cumsum(1) == torch.arange(1, mask.shape[1] + 1, device=mask.device)
                 .clamp(max=lens[:, None])).all()):  # fmt: skip
        raise ValueError("pack_batch: expected a right-padded batch (real tokens first per row)")
    cu = torch.cat([lens.new_zeros(1), lens.cumsum(0)]).to(torch.int32)  # [B + 1]
    L = int(lens.max())
    out: Batch = {
        "input_ids": batch["input_ids"][mask][None],  # [1, total]
        "position_ids": torch.cat([torch.arange(int(n), device=mask.device) for n in lens])[None],
        "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": L, "max_length_k": L,
    }  # fmt: skip
    if "labels" in batch:  # a sequence's first token has no predecessor in the sequence:
        # no loss on it (the shifted loss would pair it with the previous sequence's end)
        out["labels"] = batch["labels"][mask][None].masked_fill(out["position_ids"] == 0, -100)
    for k, v in batch.items():  # per-row entries (task_ids): per sequence now
        if k not in ("input_ids", "attention_mask", "labels", "position_ids") and v.dim() == 1:
            out[k] = v
    return out


def encode_records(
    records: Sequence[Any], tokenizer: Any, seq_len: int
) -> tuple[list[list[int]], list[int]]:
    """Token ids and loss start per training sequence.

    ``text`` records are language modelling on the whole text (cut into ``seq_len``
    chunks); ``prompt``/``completion`` records get a loss on the completion only (the
    prompt is cut from the left when the pair is longer than ``seq_len``). An EOS token
    ends each record when the tokenizer has one.

    Returns:
        ``(sequences, label_starts)``; a record without any loss token is dropped.
    """
    eos = tokenizer.eos_token_id
    seqs: list[list[int]] = []
    starts: list[int] = []
    for r in records:
        tail = [eos] if eos is not None else []
        if not r.prompt:
            ids = list(tokenizer(r.completion)["input_ids"]) + tail
            for i in range(0, len(ids), seq_len):
                chunk = ids[i : i + seq_len]
                if len(chunk) >= 2:
                    seqs.append(chunk)
                    starts.append(0)
            continue
        p = list(tokenizer(r.prompt)["input_ids"])
        c = list(tokenizer(r.completion, add_special_tokens=False)["input_ids"]) + tail
        c = c[: max(seq_len - 1, 1)]
        p = p[-(seq_len - len(c)) :] if seq_len > len(c) else p[-1:]
        ids = (p + c)[:seq_len]
        start = len(p)
        if start < len(ids):
            seqs.append(ids)
            starts.append(start)
    return seqs, starts


def split_records(
    records: list[Any], eval_size: int | None, eval_fraction: float, seed: int, what: str
) -> tuple[list[Any], list[Any]]:
    """``(eval, train)``: ``records`` shuffled with ``seed``, the first ``eval_size`` (or
    ``eval_fraction`` of them, at least one when the fraction is > 0) held out.

    Raises:
        ValueError: nothing would be left to train on (the message starts with ``what``).
    """
    records = list(records)
    random.Random(seed).shuffle(records)
    if eval_size is not None:
        n_eval = eval_size
    else:
        n_eval = round(len(records) * eval_fraction)
        if eval_fraction > 0 and len(records) >= 2:
            n_eval = max(n_eval, 1)
    if n_eval >= len(records):
        raise ValueError(
            f"{what}--eval-size/--eval-fraction leave no training records ({len(records)} "
            f"records, {n_eval} for evaluation)"
        )
    return records[:n_eval], records[n_eval:]
