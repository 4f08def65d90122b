"""Automatic prefix caching: TTFT with and without it on a shared-system-prompt workload.

Every request is ``system prompt of its task (--system tokens, the same for every request
of that task) + a user turn of 8-40 random tokens``, greedy, ``max_tokens`` 4..16, under
``--concurrency`` closed-loop clients; 4 tasks of P = 8/16/32/64 (SmolLM2-135M, the demo's
model). The engine runs the same requests with caching on and off, alternating (on, off,
off, on, ...), in one process; per run: TTFT p50 / p99, generated tokens/s, the prefix
cache's hit rate; and whether every request's tokens are identical on and off.

    python benchmarks/prefix_cache_load.py --requests 24 --rounds 2 \\
        --out benchmarks/results/prefix-cache-smollm2-cpu.json
    python benchmarks/prefix_cache_load.py --model tiny --requests 8 --rounds 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.serve_engine_load import _load, _Sink, _summary  # noqa: E402
from benchmarks.serve_load import environment, make_tasks  # noqa: E402


def workload(n: int, vocab: int, seed: int, tasks: list[str], system: int) -> list:
    """``n`` requests (task, prompt ids, max_tokens): each task's system prompt + a tail."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sys_ids = {t: torch.randint(10, vocab - 10, (system,), generator=g).tolist() for t in tasks}
    out = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        tail = torch.randint(10, vocab - 10, (int(torch.randint(8, 41, (1,), generator=g)),),
                             generator=g).tolist()  # fmt: skip
        out.append((task, sys_ids[task] + tail, int(torch.randint(4, 17, (1,), generator=g))))
    return out


def run(bank: Any, tok: Any, work: list, args: argparse.Namespace, caching: bool) -> dict:
    from prefixattn.serve.engine import Engine
    from prefixattn.serve.engine.request import GenRequest, SamplingParams

    eng = Engine(
        bank, tok, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_queue=len(work) + 8,
        max_model_len=args.max_model_len, enable_prefix_caching=caching,
    )  # fmt: skip
    eng.start()
    try:
        warm = threading.Semaphore(0)  # one short request of another text: no cache help
        eng.submit(GenRequest("base", [11, 12, 13], SamplingParams(max_tokens=2), _Sink(warm)))
        warm.acquire()
        free = threading.Semaphore(args.concurrency)
        reqs = []
        t0 = time.perf_counter()
        for task, ids, mt in work:
            free.acquire()
            r = GenRequest(task, ids, SamplingParams(max_tokens=mt), _Sink(free))
            reqs.append(r)
            eng.submit(r)
        for _ in range(args.concurrency):
            free.acquire()
        wall = time.perf_counter() - t0
    finally:
        eng.stop()
    rows = [(r.t_submit, r.t_first_token or r.t_done, r.t_done, len(r.out_ids)) for r in reqs]
    out = _summary(f"prefix caching {'on' if caching else 'off'}", rows, wall)
    m = eng.metrics()
    out["prefix_cache"] = m["prefix_cache"]
    out["prefill_tokens"] = m["steps"]["prefill_tokens"]
    out["outputs"] = [r.out_ids for r in reqs]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2 | tiny | a local model folder")
    p.add_argument("--prefix-lengths", default="8,16,32,64")
    p.add_argument("--system", type=int, default=200, help="system prompt tokens per task")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=288)
    p.add_argument("--rounds", type=int, default=2, help="on/off alternations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the JSON here")
    args = p.parse_args(argv)

    import torch

    from prefixattn import TaskBank
    from prefixattn.serve import load_base

    model, tok, _ = load_base(args.model, device="cpu")
    argv = sys.argv[1:] if argv is None else argv
    report: dict[str, Any] = {"environment": environment(argv), "model": args.model}
    report["environment"]["torch_threads"] = torch.get_num_threads()
    report["environment"]["command"] = " ".join(["python benchmarks/prefix_cache_load.py", *argv])
    lengths = [int(x) for x in args.prefix_lengths.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tasks = make_tasks(model, len(lengths), lengths, Path(tmp))
        bank = TaskBank(model, tasks)
        bank.add_base("base")
    work = workload(args.requests, len(tok), args.seed, list(tasks), args.system)
    report["workload"] = {
        "requests": args.requests, "concurrency": args.concurrency, "prefix_lengths": lengths,
        "system_tokens": args.system, "user_tokens": [8, 40], "max_tokens": [4, 16],
        "prompt_tokens_total": sum(len(ids) for _, ids, _ in work), "seed": args.seed,
        "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
    }  # fmt: skip
    runs = []
    for rnd in range(args.rounds):
        order = (True, False) if rnd % 2 == 0 else (False, True)
        for caching in order:
            before = _load()
            row = run(bank, tok, work, args, caching)
            row.update(round=rnd, load_before=before, load_after=_load())
            print(json.dumps({k: v for k, v in row.items() if k not in ("outputs", "ttft_s_each")}),
                  flush=True)  # fmt: skip
            runs.append(row)
    on = [r for r in runs if r["prefix_cache"]["enabled"]]
    off = [r for r in runs if not r["prefix_cache"]["enabled"]]
    identical = all(r["outputs"] == runs[0]["outputs"] for r in runs)
    for r in runs:
        del r["outputs"]
    report["runs"] = runs
    report["summary"] = {
        "ttft_p50_on_s": statistics.median(r["ttft_p50_s"] for r in on),
        "ttft_p50_off_s": statistics.median(r["ttft_p50_s"] for r in off),
        "ttft_p50_ratio_on_off": round(
            statistics.median(r["ttft_p50_s"] for r in on)
            / statistics.median(r["ttft_p50_s"] for r in off), 3),
        "tokens_per_s_ratio_on_off": round(
            statistics.median(r["tokens_per_s"] for r in on)
            / statistics.median(r["tokens_per_s"] for r in off), 3),
        "hit_rate": on[0]["prefix_cache"]["hit_rate"],
        "outputs_identical_on_off": identical,
    }  # fmt: skip
    print(json.dumps(report["summary"]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
