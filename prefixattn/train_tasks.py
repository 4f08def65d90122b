"""``prefixattn train --task NAME=FILE ...``: several tasks' prefixes in one run, mixed batches.

Every step's batch holds rows of every task (balanced: row j of step s belongs to task
``(s * B + j) mod T``; each task's sequences are shuffled and cycled on their own), and one
forward / backward of a :class:`~prefixattn.MultiTaskPrefixTuning` trains all the
prefixes. Each task is saved as its own prefix artifact in ``OUT/NAME`` (with its
``prefixattn_train.json``), so ``prefixattn serve --task NAME=OUT/NAME`` serves it.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .artifacts import TRAIN_INFO, artifact_bytes
from .data import load_model, read_text_records
from .demo import kernel_backend, resolve_device
from .distributed import init_distributed
from .training import Batch, encode_records, evaluate_loss, pad_batch, split_records, train

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _task_lengths(args: argparse.Namespace, names: list[str]) -> dict[str, int]:
    """P per task: ``--task-tokens NAME=P`` or ``--num-virtual-tokens``."""
    out = dict.fromkeys(names, args.num_virtual_tokens)
    for name, value in args.task_tokens:
        if name not in out:
            raise ValueError(f"--task-tokens {name}={value}: no --task named {name!r}")
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"--task-tokens {name}={value}: expected an integer >= 1")
        out[name] = int(value)
    return out


def train_tasks(args: argparse.Namespace) -> int:
    """Run ``prefixattn train`` with ``--task`` (see the module docstring)."""
    from .hf.multitask import MultiTaskPrefixTuning

    names = [n for n, _ in args.task]
    if len(set(names)) != len(names):
        raise ValueError("--task: each NAME may appear once")
    if args.method != "prefix":
        raise ValueError(
            "--task trains prefixes (--method prefix) only: a soft prompt adds its own P input "
            "positions to its rows, so tasks with soft prompts cannot share a mixed batch; "
            "train each soft prompt with --data"
        )
    if args.prefix_projection:
        raise ValueError("--task does not take --prefix-projection (one MLP per task)")
    if args.init == "text" and args.init_text is None:
        raise ValueError("--init text needs --init-text TEXT")
    lengths = _task_lengths(args, names)
    dctx = init_distributed(args.device, backend=args.dist_backend)
    dctx.silence_other_ranks()
    if args.fsdp:
        raise ValueError("--task does not take --fsdp yet (DDP under torchrun works)")

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    dev = resolve_device(dctx.device_spec(args.device, fsdp=False))
    model, tok = load_model(args.model, device=str(dev), dtype=DTYPES[args.dtype])
    print(f"model {args.model!r} loaded in {time.perf_counter() - t0:.1f} s")
    data: dict[str, dict[str, Any]] = {}
    for name, path in args.task:
        eval_r, train_r = split_records(read_text_records(path), args.eval_size,
                                        args.eval_fraction, args.seed, what=f"--task {name}: ")  # fmt: skip
        seqs, starts = encode_records(train_r, tok, args.seq_len)
        eval_seqs, eval_starts = encode_records(eval_r, tok, args.seq_len)
        if not seqs:
            raise ValueError(f"--task {name}={path}: no training sequence with a token to learn")
        data[name] = dict(seqs=seqs, starts=starts, eval_seqs=eval_seqs, eval_starts=eval_starts)
        print(
            f"task {name!r}: {len(train_r)} training records -> {len(seqs)} sequences, "
            f"{len(eval_r)} eval records; P={lengths[name]}"
        )
    spec = {n: {"num_virtual_tokens": lengths[n], "init": args.init,
                "init_text": args.init_text} for n in names}  # fmt: skip
    tuner = MultiTaskPrefixTuning(model, spec, tokenizer=tok, backend=args.backend,
                                  chunked_loss=args.chunked_loss)  # fmt: skip
    module = dctx.prepare(tuner, fsdp=False)
    dev = dctx.device or dev
    dtype = model.get_input_embeddings().weight.dtype
    print(
        f"method: multi-task prefix tuning, {len(names)} tasks in mixed batches; "
        f"{tuner.num_trainable_parameters():,} trainable parameters; device {dev}; "
        f"kernel backend {kernel_backend(dev, dtype, args.backend)}"
    )
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def task_batch(t: int, seqs: list, starts: list) -> Batch:
        batch = pad_batch(seqs, starts, pad, dev)
        batch["task_ids"] = torch.full((len(seqs),), t, dtype=torch.int64, device=dev)
        return batch

    def eval_loss(t: int, name: str) -> float | None:
        d = data[name]
        if not d["eval_seqs"]:
            return None
        B = args.batch_size
        batches = (task_batch(t, d["eval_seqs"][i : i + B], d["eval_starts"][i : i + B])
                   for i in range(0, len(d["eval_seqs"]), B))  # fmt: skip
        return evaluate_loss(tuner, batches)

    before = {n: eval_loss(t, n) for t, n in enumerate(names)}
    rng = random.Random(args.seed)
    orders: dict[str, list[int]] = {n: [] for n in names}

    def get_batch(step: int) -> Batch:
        rows: list[tuple[int, int]] = []  # (task, sequence) per row, tasks interleaved
        for j in range(args.batch_size):
            t = (step * args.batch_size + j) % len(names)
            order = orders[names[t]]
            if not order:
                order.extend(range(len(data[names[t]]["seqs"])))
                rng.shuffle(order)
            rows.append((t, order.pop()))
        d = [data[names[t]] for t, _ in rows]
        batch = pad_batch([x["seqs"][i] for x, (_, i) in zip(d, rows)],
                          [x["starts"][i] for x, (_, i) in zip(d, rows)], pad, dev)  # fmt: skip
        batch["task_ids"] = torch.tensor([t for t, _ in rows], dtype=torch.int64, device=dev)
        return dctx.shard(batch)

    lr = args.lr if args.lr is not None else 3e-2
    result = train(module, get_batch, steps=args.steps, lr=lr,
                   progress=not args.no_progress and dctx.is_main, desc="multi-task")  # fmt: skip
    result = dctx.reduce_result(result)
    print(
        f"trained {args.steps} steps in {result.seconds:.1f} s "
        f"({result.tokens_per_second:.0f} tokens/s); last loss {result.losses[-1]:.4f}"
    )
    after = {n: eval_loss(t, n) for t, n in enumerate(names)}
    for n in names:
        if after[n] is not None:
            print(f"task {n!r}: eval loss {before[n]:.4f} -> {after[n]:.4f}")
    if not dctx.is_main:
        dctx.close()
        return 0
    out = Path(args.out)
    tuner.save(out)
    model_spec = str(Path(args.model).resolve()) if Path(args.model).is_dir() else args.model
    for name, path in args.task:
        info = {
            "model": model_spec, "method": "prefix", "task": name, "data": path,
            "num_virtual_tokens": lengths[name], "tasks_trained_together": names,
            "steps": args.steps, "lr": lr, "batch_size": args.batch_size,
            "seq_len": args.seq_len, "seed": args.seed,
            "eval_loss_before": before[name], "eval_loss_after": after[name],
            "train_seconds": result.seconds, "prefixattn_version": __version__,
        }  # fmt: skip
        (out / name / TRAIN_INFO).write_text(json.dumps(info, indent=2) + "\n")
        print(f"saved prefix of task {name!r} to {str(out / name)!r} "
              f"({artifact_bytes(out / name):,} bytes)")  # fmt: skip
    serve = " ".join(f"--task {n}={out / n}" for n in names)
    print(f"serve them: prefixattn serve --model {args.model} {serve}")
    dctx.close()
    return 0
