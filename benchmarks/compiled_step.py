"""Eager vs compiled (``torch.compile``, Inductor) decode step of the serving engine, CPU.

One :class:`~prefixattn.serve.Engine` with ``compile=True`` (not started): its compiled
decode step (:mod:`prefixattn.serve.engine.compiled`) is compiled for every (batch,
block) bucket (the time reported), then the same padded step of B rows over M blocks
(random tokens, positions, blocks and tasks; every row on a task prefix of the bank) runs
eagerly and compiled, alternating, ``--rounds`` rounds of ``--steps`` steps; per round the
median ms/step of each and the ratio, with the load average. The logits of the two are
compared (max abs difference, argmax equal). ``--pack``: the model's linears run over
oneDNN-packed weights in both (as a started engine runs them, packed before compiling:
:mod:`prefixattn.serve.engine.cpu_linear`); ``--profile``: torch.profiler's top ops of five
compiled steps per shape.

    python benchmarks/compiled_step.py --model smollm2 --pack --shapes 8x8,4x4 --out r.json
    python benchmarks/compiled_step.py --tiny        # the tiny random model
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tiny", action="store_true", help="the tiny random llama")
    p.add_argument("--shapes", default="8x8,2x4", help="BxM decode steps to time")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-model-len", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument(
        "--pack",
        action="store_true",
        help="eager and compiled with the linears oneDNN-packed (as a started "
        "engine runs them: packed before compiling; see serve/engine/cpu_linear.py)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="print torch.profiler's top ops of 5 compiled steps of each shape",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from prefixattn import PrefixTuning, TaskBank
    from prefixattn.serve.engine import Engine

    if args.tiny:
        from prefixattn.tiny import tiny_model, tiny_tokenizer

        tok = tiny_tokenizer()
        model, lengths, name = tiny_model(len(tok)), (4, 9), "tiny-llama"
    else:
        from prefixattn.serve import load_base

        model, tok, name = load_base(args.model, device="cpu")
        lengths = (16, 32)
    bank = TaskBank(model, backend="sdpa")
    bank.add_base("base")
    for i, P in enumerate(lengths):
        torch.manual_seed(30 + i)
        bank.add(f"t{P}", PrefixTuning(copy.deepcopy(model), P, init="random", backend="sdpa"))
    eng = Engine(bank, tok, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                 compile=True)  # fmt: skip
    g, snap = eng.graphs, bank.snapshot()
    if args.pack:
        from prefixattn.serve.engine.cpu_linear import pack_linears

        packed = pack_linears(model)
        print(f"linears: {packed.stats()}")
    load0 = _load()
    t0 = time.perf_counter()
    g.capture(snap)
    compile_s = time.perf_counter() - t0
    print(f"compiled {len(g.compiled)} buckets in {compile_s:.1f} s, load {load0} -> {_load()}")
    gen = torch.Generator().manual_seed(0)
    bs, nb = eng.pool.block_size, eng.pool.num_blocks
    V = model.config.vocab_size
    report: dict[str, Any] = {
        "command": "python benchmarks/compiled_step.py " + " ".join(argv or sys.argv[1:]),
        "model": name, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "packed_linears": args.pack,
        "compile_s": round(compile_s, 1), "compile_load": [load0, _load()],
        "compile_s_by_bucket": g.compile_s_by_bucket, "shapes": [],
    }  # fmt: skip
    with torch.no_grad():
        for shape in args.shapes.split(","):
            B, M = (int(x) for x in shape.split("x"))
            perm = torch.randperm(nb, generator=gen)[: B * M].view(B, M).to(torch.int32)
            g.block_table[:B, :M] = perm
            g.starts[:B] = torch.randint((M - 1) * bs, M * bs - 1, (B,), generator=gen)
            g.positions[:B, 0] = g.starts[:B]
            g.ids[:B, 0] = torch.randint(4, V, (B,), generator=gen)
            g.prefix_index[:B] = torch.randint(0, len(snap.names), (B,), generator=gen)
            pool = [k.clone() for k in eng.pool.keys]
            eager = g._static_forward(B, M, snap, compiled=False)
            for k, k0 in zip(eng.pool.keys, pool):
                k.copy_(k0)
            comp = g._static_forward(B, M, snap, compiled=True)
            row: dict[str, Any] = {
                "B": B, "M": M, "max_abs_diff": float((eager - comp).abs().max()),
                "argmax_equal": bool(torch.equal(eager.argmax(-1), comp.argmax(-1))),
                "rounds": [],
            }  # fmt: skip
            if args.profile:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(5):
                        g._static_forward(B, M, snap, compiled=True)
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
            for _ in range(args.rounds):
                load = _load()
                ms = {}
                for mode in ("eager", "compiled"):
                    ts = []
                    for _ in range(args.steps):
                        t = time.perf_counter()
                        g._static_forward(B, M, snap, compiled=mode == "compiled")
                        ts.append(time.perf_counter() - t)
                    ms[mode] = round(statistics.median(ts) * 1e3, 2)
                ms["ratio_eager_over_compiled"] = round(ms["eager"] / ms["compiled"], 2)
                ms["load"] = [load, _load()]
                row["rounds"].append(ms)
                print(f"B{B} M{M}: {ms}", flush=True)
            report["shapes"].append(row)
    report["refused_recompiles"] = g.refused_recompiles
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
