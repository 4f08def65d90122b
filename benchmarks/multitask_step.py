"""Tokens/s and peak memory of one multi-task training step vs the same rows per task.

Configurations, each one optimizer step (forward, backward, AdamW) on the same rows:

- ``mixed``: :class:`prefixattn.MultiTaskPrefixTuning`, T tasks x B rows in ONE batch
  (the kernel's ragged bank path);
- ``per_task``: T :class:`prefixattn.PrefixTuning` steps of B rows, one task after the
  other (what training each task alone costs for the same rows);
- ``single``: one PrefixTuning step of T x B rows (one task, the same shape as ``mixed``:
  the bank's extra cost is ``mixed`` vs ``single``);
- ``peft``: PEFT prefix tuning, T steps of B rows (PEFT has no mixed batches).

Timing: all configurations in one process, alternating, ``--rounds`` rounds of
``--steps`` steps each after a warm-up; the median step time is reported with ratios.
Peak memory: each configuration again in a fresh subprocess; the growth of the process's
peak RSS (VmHWM) over the set-up, during the steps (CPU: no allocator statistics).

    python benchmarks/multitask_step.py --out benchmarks/results/multitask_step_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

CONFIGS = ("mixed", "per_task", "single", "peft")


def _vm_hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


def _model(args: argparse.Namespace) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=max(1, args.hidden // 128), head_dim=64,
                      max_position_embeddings=1024)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def _rows(args: argparse.Namespace, n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 1024, (n, args.seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def build(name: str, args: argparse.Namespace) -> list[tuple[Any, dict, torch.optim.Optimizer]]:
    """``[(module, batch, optimizer)]``: the calls one step of ``name`` makes."""
    from prefixattn import MultiTaskPrefixTuning, PrefixTuning

    T, B, lengths = args.tasks, args.rows, args.lengths
    model = _model(args)

    def opt(m: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)

    if name == "mixed":
        mt = MultiTaskPrefixTuning(model, {f"t{i}": lengths[i % len(lengths)] for i in range(T)},
                                   backend=args.backend)  # fmt: skip
        batch = _rows(args, T * B, 0)
        batch["task_ids"] = torch.arange(T).repeat_interleave(B)
        return [(mt, batch, opt(mt))]
    if name == "single":
        pt = PrefixTuning(model, max(lengths), backend=args.backend)
        return [(pt, _rows(args, T * B, 0), opt(pt))]
    if name == "per_task":
        out = []
        for i in range(T):
            pt = PrefixTuning(model, lengths[i % len(lengths)], backend=args.backend)
            out.append((pt, _rows(args, B, i), opt(pt)))
        return out
    from peft import PrefixTuningConfig, get_peft_model

    out = []
    for i in range(T):  # one PEFT model per task on its own copy (PEFT wraps the model)
        pm = get_peft_model(_model(args), PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=lengths[i % len(lengths)]))  # fmt: skip
        out.append((pm, _rows(args, B, i), opt(pm)))
    return out


def step(calls: list[tuple[Any, dict, torch.optim.Optimizer]]) -> None:
    for module, batch, opt in calls:
        module.train()
        module(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def memory_child(args: argparse.Namespace) -> None:
    """One configuration in this (fresh) process: print the peak-RSS growth of its steps."""
    calls = build(args.child, args)
    before = _vm_hwm_kib()
    for _ in range(args.steps):
        step(calls)
    print(
        json.dumps({"config": args.child, "peak_rss_growth_mib": (_vm_hwm_kib() - before) / 1024})
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--rows", type=int, default=4, help="rows per task per step")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument(
        "--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16, 32, 12]
    )
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--backend", default="sdpa")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.child:
        memory_child(args)
        return
    names = args.configs.split(",")
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    built = {n: build(n, args) for n in names}
    for n in names:  # warm-up
        step(built[n])
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):  # alternating
        for n in names:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(built[n])
            times[n].append((time.perf_counter() - t0) / args.steps)
    tokens = args.tasks * args.rows * args.seq
    res: dict[str, Any] = {}
    for n in names:
        med = statistics.median(times[n])
        res[n] = {"step_s": med, "tokens_per_s": tokens / med, "step_s_all": times[n]}
    for n in names:
        print(f"{n}: median step {res[n]['step_s']:.3f} s, {res[n]['tokens_per_s']:.0f} tokens/s")
    memory = {}
    shape_args = []  # this run's arguments without --out (the children write nothing)
    argv = iter(sys.argv[1:])
    for a in argv:
        if a == "--out":
            next(argv, None)
        elif not a.startswith("--out="):
            shape_args.append(a)
    for n in names:
        cmd = [sys.executable, __file__, "--child", n, *shape_args]
        got = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=900)
        memory[n] = json.loads(got.stdout.strip().splitlines()[-1])["peak_rss_growth_mib"]
        res[n]["peak_rss_growth_mib"] = memory[n]
    import peft
    import transformers

    env = {
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch thread(s))",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "loadavg_start": load_start, "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
        "command": "python benchmarks/multitask_step.py " + " ".join(sys.argv[1:]),
        "shape": {k: getattr(args, k) for k in ("tasks", "rows", "seq", "lengths", "layers",
                                                  "hidden", "backend", "rounds", "steps")},
    }  # fmt: skip
    lines = [f"{'config':<10} {'step s':>8} {'tokens/s':>9} {'vs mixed':>9} {'peak RSS +MiB':>14}"]
    for n in names:
        r = res[n]
        lines.append(f"{n:<10} {r['step_s']:>8.3f} {r['tokens_per_s']:>9.0f} "
                     f"{res['mixed']['step_s'] / r['step_s'] if 'mixed' in res else float('nan'):>9.2f} "
                     f"{r['peak_rss_growth_mib']:>14.1f}")  # fmt: skip
    print("\n".join(lines))
    print(json.dumps(env, indent=1))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(
            json.dumps({"env": env, "results": res}, indent=1) + "\n"
        )
        md = [f"# Multi-task training step vs per-task steps ({env['device']})", "",
              f"- command: `{env['command']}`", f"- torch {env['torch']}, transformers "
              f"{env['transformers']}, peft {env['peft']}, Python {env['python']}",
              f"- load average at start / end: {' '.join(load_start)} / "
              f"{' '.join(env['loadavg_end'])} (2 cores shared with other jobs)",
              f"- shape: {env['shape']}", "- 'vs mixed': mixed step time / this step time "
              "(> 1: this one is faster); tokens/s counts the same T x B x N tokens for all",
              "", "```", *lines, "```", ""]  # fmt: skip
        args.out.with_suffix(".md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
