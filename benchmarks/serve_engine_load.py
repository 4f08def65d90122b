"""Continuous-batching benchmark: the engine with and without task prefixes, and
transformers' own continuous batching (``init_continuous_batching``, the machinery behind
``generate_batch``) on the same prompts, in one process, configurations alternating.

The issue-18 workload: SmolLM2-135M (the demo's embedded model), 4 random tasks of
P = 8/16/32/64, greedy requests with prompts of 20-200 random tokens and ``max_tokens``
uniform in 4..64 (fixed seed), ``--concurrency`` closed-loop clients (a finished request
is replaced by the next at once). No HTTP: every configuration is driven in-process, so the
comparison is engine against engine. Per row: requests/s, generated tokens/s, p50 / p99
latency and time to first token, the load average before and after. Also the decode step
of a batch of ``--step-rows`` rows with ~``--step-context`` cached keys, with and without
prefixes, timed back to back (the bank's decode cost).

    python benchmarks/serve_engine_load.py --requests 96 --rounds 2 \\
        --out benchmarks/results/serve-engine-cpu.json
    python benchmarks/serve_engine_load.py --model tiny --requests 8 --rounds 1   # smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import os
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

from benchmarks.serve_load import environment, make_tasks  # noqa: E402


def _load() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def workload(n: int, vocab: int, seed: int, tasks: list[str], lo: int, hi: int, max_new: int):
    """``n`` requests (task, prompt ids, max_tokens), fixed by ``seed``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        plen = int(torch.randint(lo, hi + 1, (1,), generator=g))
        ids = torch.randint(10, vocab - 10, (plen,), generator=g).tolist()
        mt = int(torch.randint(4, max_new + 1, (1,), generator=g))
        out.append((tasks[i % len(tasks)], ids, mt))
    return out


def _summary(name: str, rows: list[tuple[float, float, float, int]], wall: float) -> dict:
    """rows: (t_submit, t_first_token, t_done, generated tokens) per request."""
    lat = sorted(d - s for s, _, d, _ in rows)
    ttft = sorted(f - s for s, f, _, _ in rows)
    tokens = sum(n for *_, n in rows)

    def p99(v: list[float]) -> float:
        return round(v[min(len(v) - 1, round(0.99 * (len(v) - 1)))], 3)

    return {
        "config": name,
        "requests": len(rows),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(rows) / wall, 3),
        "generated_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2),
        "latency_p50_s": round(statistics.median(lat), 3),
        "latency_p99_s": p99(lat),
        "ttft_p50_s": round(statistics.median(ttft), 3),
        "ttft_p99_s": p99(ttft),
        "ttft_s_each": [round(f - s, 3) for s, f, _, _ in rows],  # in submission order
    }


class _Sink:
    def __init__(self, done: threading.Semaphore) -> None:
        self.done, self.n = done, 0

    def prompt_logprobs(self, outs: list) -> None:
        pass

    def token(self, out: Any) -> bool:
        self.n += 1
        return False

    def finish(self, reason: str, error: str | None = None) -> None:
        if error:
            print("request failed:", error, file=sys.stderr)
        self.done.release()


def run_engine(bank: Any, tok: Any, work: list, args: argparse.Namespace, prefix: bool) -> dict:
    """Our engine under the closed loop; every row on its task (``prefix``) or the base."""
    from prefixattn.serve.engine import Engine
    from prefixattn.serve.engine.request import GenRequest, SamplingParams

    eng = Engine(
        bank, tok, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_queue=len(work) + 8,
        max_model_len=args.max_model_len,
    )  # fmt: skip
    eng.start()
    try:
        warm = threading.Semaphore(0)
        for task, ids, _ in work[:2]:
            eng.submit(GenRequest(task, ids, SamplingParams(max_tokens=2), _Sink(warm)))
        for _ in range(2):
            warm.acquire()
        free = threading.Semaphore(args.concurrency)
        reqs = []
        t0 = time.perf_counter()
        for task, ids, mt in work:
            free.acquire()
            r = GenRequest(task if prefix else "base", ids, SamplingParams(max_tokens=mt),
                           _Sink(free))  # fmt: skip
            reqs.append(r)
            eng.submit(r)
        for _ in range(args.concurrency):
            free.acquire()
        wall = time.perf_counter() - t0
    finally:
        eng.stop()
    rows = [(r.t_submit, r.t_first_token or r.t_done, r.t_done, len(r.out_ids)) for r in reqs]
    out = _summary("engine, task prefixes" if prefix else "engine, no prefix", rows, wall)
    m = eng.metrics()
    out["steps"] = m["steps"]["count"]
    out["mean_step_s"] = round(m["steps"]["mean_time_s"], 4)
    return out


def run_hf_cb(model: Any, tok: Any, work: list, args: argparse.Namespace) -> dict:
    """transformers' continuous batching (no prefix) under the same closed loop."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gc = GenerationConfig(
        do_sample=False, max_new_tokens=max(mt for *_, mt in work),
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    # the same KV capacity and token budget as the engine (left alone, it sizes its cache
    # from free memory: gigabytes on a CPU machine)
    cb = ContinuousBatchingConfig(
        page_size=32,
        num_blocks=-(-args.max_num_seqs * args.max_model_len // 32),
        max_batch_tokens=args.max_num_batched_tokens,
        max_requests_per_batch=args.max_num_seqs, allow_block_sharing=False,
    )  # fmt: skip
    manager = model.init_continuous_batching(generation_config=gc, continuous_batching_config=cb)
    manager.start()
    try:
        for _, ids, _ in work[:2]:
            manager.add_request(ids, max_new_tokens=2)
        done = 0
        while done < 2:
            r = manager.get_result(timeout=600)
            done += r is not None and r.is_finished()
        results: dict[str, Any] = {}
        submit: dict[str, float] = {}
        pending = list(work)
        inflight = 0
        t0 = time.perf_counter()
        while pending or inflight:
            while pending and inflight < args.concurrency:
                _, ids, mt = pending.pop(0)
                rid = manager.add_request(ids, max_new_tokens=mt, record_timestamps=True)
                submit[rid] = time.perf_counter()
                inflight += 1
            r = manager.get_result(timeout=600)
            if r is not None and r.is_finished() and r.request_id in submit:
                results[r.request_id] = (r, time.perf_counter())
                inflight -= 1
        wall = time.perf_counter() - t0
    finally:
        manager.stop(block=True)
    rows = []
    for rid, (r, t_done) in results.items():
        first = r.timestamps[0] if r.timestamps else t_done
        rows.append((submit[rid], first, t_done, len(r.generated_tokens)))
    return _summary("transformers continuous batching, no prefix", rows, wall)


def decode_step_ratio(bank: Any, tok: Any, args: argparse.Namespace, tasks: list[str]) -> dict:
    """Decode-only steps of ``--step-rows`` rows with ~``--step-context`` keys: prefixes on
    every row vs none, alternating; the engine's own step timer."""
    from prefixattn.serve.engine import Engine
    from prefixattn.serve.engine.request import GenRequest, SamplingParams

    work = workload(args.step_rows, len(tok), 7, tasks, args.step_context, args.step_context, 4)

    def one(prefix: bool) -> float:
        eng = Engine(
            bank, tok, max_num_seqs=args.step_rows, max_num_batched_tokens=4096,
            max_model_len=args.step_context + 128,
        )  # fmt: skip
        done = threading.Semaphore(0)
        for task, ids, _ in work:
            p = SamplingParams(max_tokens=args.step_count + 1, ignore_eos=True)
            eng.submit(GenRequest(task if prefix else "base", ids, p, _Sink(done)))
        eng.start()
        for _ in work:
            done.acquire()
        eng.stop()
        return statistics.median(list(eng.step_times)[1:])  # the steps after the prefill

    times: dict[str, list[float]] = {"prefix": [], "base": []}
    loads = []
    for _ in range(args.step_rounds):
        for key in ("prefix", "base"):
            times[key].append(one(key == "prefix"))
            loads.append(_load())
    p, b = statistics.median(times["prefix"]), statistics.median(times["base"])
    return {
        "rows": args.step_rows, "context": args.step_context,
        "step_s_prefix": round(p, 4), "step_s_base": round(b, 4), "ratio": round(p / b, 3),
        "all_s": {k: [round(x, 4) for x in v] for k, v in times.items()}, "load": loads,
    }  # fmt: skip


def _rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def rss_over_requests(bank: Any, tok: Any, args: argparse.Namespace, tasks: list[str]) -> dict:
    """RSS (MB) every ``n / 10`` of ``--rss-requests`` short requests through one engine
    (``--concurrency`` at a time): flat if nothing grows per request."""
    from prefixattn.serve.engine import Engine
    from prefixattn.serve.engine.request import GenRequest, SamplingParams

    n = args.rss_requests
    work = workload(n, len(tok), 11, tasks, 4, 24, 8)
    eng = Engine(bank, tok, max_num_seqs=args.max_num_seqs, max_queue=n + 8,
                 max_model_len=args.max_model_len)  # fmt: skip
    eng.start()
    free = threading.Semaphore(args.concurrency)
    samples = []
    try:
        for i, (task, ids, mt) in enumerate(work):
            if i % max(n // 10, 1) == 0:
                samples.append((i, _rss_mb()))
            free.acquire()
            eng.submit(GenRequest(task, ids, SamplingParams(max_tokens=mt), _Sink(free)))
        for _ in range(args.concurrency):
            free.acquire()
        samples.append((n, _rss_mb()))
    finally:
        eng.stop()
    return {"requests": n, "rss_mb": samples, "kv_bytes": eng.pool.bytes}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2 | tiny | a local model folder")
    p.add_argument("--prefix-lengths", default="8,16,32,64")
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--prompt-min", type=int, default=20)
    p.add_argument("--prompt-max", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens uniform in 4..this")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=352)
    p.add_argument("--rounds", type=int, default=1, help="alternations of the 3 configs")
    p.add_argument("--no-hf", action="store_true", help="skip transformers' batching")
    p.add_argument("--reverse", action="store_true", help="start with the last config")
    p.add_argument("--step-rows", type=int, default=16)
    p.add_argument("--step-context", type=int, default=150)
    p.add_argument("--step-count", type=int, default=8)
    p.add_argument("--step-rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rss-requests", type=int, default=0, help="then RSS over this many")
    p.add_argument("--only-rss", action="store_true", help="only the RSS check")
    p.add_argument("--out", default=None, help="write the JSON here")
    args = p.parse_args(argv)

    import torch

    from prefixattn import TaskBank
    from prefixattn.serve import load_base

    model, tok, _ = load_base(args.model, device="cpu")
    plain = copy.deepcopy(model)  # transformers' own batching runs the unpatched model
    argv = sys.argv[1:] if argv is None else argv
    report: dict[str, Any] = {"environment": environment(argv), "model": args.model}
    report["environment"]["torch_threads"] = torch.get_num_threads()
    report["environment"]["command"] = " ".join(["python benchmarks/serve_engine_load.py", *argv])
    lengths = [int(x) for x in args.prefix_lengths.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tasks = make_tasks(model, len(lengths), lengths, Path(tmp))
        bank = TaskBank(model, tasks)
        bank.add_base("base")
    names = list(tasks)
    work = workload(args.requests, len(tok), args.seed, names, args.prompt_min,
                    args.prompt_max, args.max_tokens)  # fmt: skip
    report["workload"] = {
        "requests": args.requests, "concurrency": args.concurrency,
        "prefix_lengths": lengths, "prompt_tokens": [args.prompt_min, args.prompt_max],
        "max_tokens": [4, args.max_tokens], "seed": args.seed,
        "prompt_tokens_total": sum(len(ids) for _, ids, _ in work),
        "max_tokens_total": sum(mt for *_, mt in work),
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
    }  # fmt: skip
    if args.rss_requests:
        report["rss"] = rss_over_requests(bank, tok, args, names)
        print(json.dumps(report["rss"]), flush=True)
    if args.only_rss:
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        return report
    runs = []
    for rnd in range(args.rounds):
        configs = [
            lambda: run_engine(bank, tok, work, args, True),
            lambda: run_engine(bank, tok, work, args, False),
        ]
        if not args.no_hf:
            configs.append(lambda: run_hf_cb(plain, tok, work, args))
        for fn in configs if (rnd % 2 == 0) != args.reverse else configs[::-1]:
            before = _load()
            row = fn()
            row.update(round=rnd, load_before=before, load_after=_load())
            print(json.dumps(row), flush=True)
            runs.append(row)
    report["runs"] = runs
    report["decode_step"] = decode_step_ratio(bank, tok, args, names)
    print(json.dumps(report["decode_step"]), flush=True)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
