"""Serving benchmark: throughput and latency of ``prefixattn serve`` under a closed-loop load.

Starts the server in this process (uvicorn on 127.0.0.1, a free port), then sends
``--requests`` greedy completions, ``--concurrency`` at a time, over a mix of tasks of
different prefix lengths (a ragged bank), with httpx. Reports requests/s, generated
tokens/s, client-side p50 / p99 latency and the server's batch sizes, for continuous
batching and (``--compare-unbatched``) for one row at a time on the same model.
Writes a JSON with the device, versions and the command beside the numbers.

    python benchmarks/serve_load.py --model smollm2 --requests 64 --concurrency 16 \\
        --out benchmarks/results/serve-cpu.json --compare-unbatched
    python benchmarks/serve_load.py --model tiny --requests 8   # smoke (CI runs this)

``--burst``: the clients start together (the engine is held until the first
``--concurrency`` requests are all in, then the load goes on closed-loop), so the first
steps batch that many rows whatever the machine's speed.

Without ``--task NAME=PATH`` it makes ``--tasks`` random prefixes (P cycling through
``--prefix-lengths``) in a temporary folder: their values do not change the cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
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

PROMPTS = [
    "Article: Shares in the company rose sharply after strong quarterly results.\nTopic:",
    "Article: The striker scored twice as the team won the cup final.\nTopic:",
    "Article: The minister said the election would be held in the spring.\nTopic:",
    "Article: The new phone has a faster chip and a better camera.\nTopic:",
    "Article: The film won three awards at the festival on Sunday night.\nTopic:",
]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(argv: list[str]) -> dict[str, Any]:
    """Device, versions and the command (``argv``: its arguments) beside the numbers."""
    import fastapi
    import torch
    import transformers
    import uvicorn

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else _cpu_name()
    return {
        "device": dev,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "fastapi": fastapi.__version__,
        "uvicorn": uvicorn.__version__,
        "command": " ".join(["python benchmarks/serve_load.py", *argv]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def make_tasks(model: Any, n: int, lengths: list[int], folder: Path) -> dict[str, str]:
    """``n`` random prefixes of cycling lengths, saved under ``folder``."""
    import copy

    import torch

    from prefixattn import PrefixTuning

    tasks = {}
    for i in range(n):
        torch.manual_seed(i)
        P = lengths[i % len(lengths)]
        PrefixTuning(copy.deepcopy(model), P, init="random").save(folder / f"task{i}")
        tasks[f"task{i}"] = str(folder / f"task{i}")
    return tasks


class _Server:
    def __init__(self, app: Any) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> _Server:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


async def _load(url: str, bodies: list[dict], concurrency: int, timeout: float) -> list[tuple]:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:

        async def one(body: dict) -> tuple:
            async with sem:
                t0 = time.perf_counter()
                r = await client.post("/v1/completions", json=body)
                return r.status_code, time.perf_counter() - t0, r.json()

        return await asyncio.gather(*(one(b) for b in bodies))


def _burst(engine: Any, url: str, bodies: list[dict], args: argparse.Namespace) -> list:
    """The load, with the engine held until the first ``concurrency`` requests are in (in
    its held first step or queued): the clients start together."""
    out: dict[str, Any] = {}
    wave = min(args.concurrency, len(bodies))
    engine.model_lock.acquire()  # the engine's first step waits
    try:
        th = threading.Thread(
            target=lambda: out.setdefault(
                "r", asyncio.run(_load(url, bodies, args.concurrency, args.timeout))
            ),
            daemon=True,
        )
        th.start()
        deadline = time.monotonic() + args.timeout
        while engine.running + engine.queue_depth < wave:
            if time.monotonic() > deadline or not th.is_alive():
                raise RuntimeError(f"the first {wave} requests did not arrive")
            time.sleep(0.005)
    finally:
        engine.model_lock.release()
    th.join()
    if "r" not in out:
        raise RuntimeError("the load failed (see above)")
    return out["r"]


def run_config(
    model: Any, tok: Any, tasks: dict[str, str], args: argparse.Namespace, batch: int
) -> dict[str, Any]:
    """One server configuration under the load; its numbers."""
    import httpx

    from prefixattn.serve import create_app

    app = create_app(
        model, tok, tasks, model_name="base", max_num_seqs=batch,
        max_queue=max(256, args.requests), backend=args.backend, cuda_graphs=args.cuda_graphs,
    )  # fmt: skip
    names = list(tasks) or ["base"]
    bodies = [
        {"model": names[i % len(names)], "prompt": PROMPTS[i % len(PROMPTS)],
         "max_tokens": args.max_tokens, "temperature": 0}
        for i in range(args.requests)
    ]  # fmt: skip
    with _Server(app) as srv:
        warm = [dict(b, max_tokens=2) for b in bodies[: min(4, len(bodies))]]
        asyncio.run(_load(srv.url, warm, len(warm), args.timeout))  # first-call costs
        before = httpx.get(srv.url + "/metrics.json", timeout=10).json()
        t0 = time.perf_counter()
        if args.burst:
            results = _burst(app.state.engine, srv.url, bodies, args)
        else:
            results = asyncio.run(_load(srv.url, bodies, args.concurrency, args.timeout))
        wall = time.perf_counter() - t0
        after = httpx.get(srv.url + "/metrics.json", timeout=10).json()
    bad = [r for r in results if r[0] != 200]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed, e.g. {bad[0][2]}")
    lat = sorted(r[1] for r in results)
    tokens = sum(r[2]["usage"]["completion_tokens"] for r in results)
    sizes = {int(k): v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
    n_batches = sum(sizes.values())  # engine steps
    rows = sum(k * v for k, v in sizes.items())  # rows summed over the steps
    return {
        "max_batch_size": batch,
        "requests": len(results),
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(results) / wall, 3),
        "generated_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2),
        "latency_p50_s": round(statistics.median(lat), 4),
        "latency_p99_s": round(lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))], 4),
        "batches": n_batches,
        "mean_batch_size": round(rows / max(n_batches, 1), 2),
        "mixed_task_batches": after["mixed_task_batches"] - before["mixed_task_batches"],
        # the decode path's counters (CUDA-graph captures, replays, eager steps) before and
        # after the timed load (engine metrics: /metrics.json "cuda_graphs")
        "cuda_graphs_before": before.get("cuda_graphs"),
        "cuda_graphs": after.get("cuda_graphs"),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2 | tiny | a local model folder")
    p.add_argument("--task", action="append", default=[], metavar="NAME=PATH")
    p.add_argument("--tasks", type=int, default=4, help="random tasks when no --task")
    p.add_argument("--prefix-lengths", default="10,20,5,40", help="P of the random tasks")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch-size", type=int, default=16, help="the engine's max_num_seqs")
    p.add_argument("--compare-unbatched", action="store_true", help="also max_num_seqs 1")
    p.add_argument(
        "--burst", action="store_true", help="the first --concurrency requests start together"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default="auto")
    p.add_argument(
        "--cuda-graphs", action="store_true", help="decode steps as CUDA graphs (CUDA only)"
    )
    p.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    p.add_argument("--out", default=None, help="write the JSON here")
    args = p.parse_args(argv)

    from prefixattn.demo import resolve_device
    from prefixattn.serve import load_base

    model, tok, _ = load_base(args.model, device=str(resolve_device(args.device)))
    argv = sys.argv[1:] if argv is None else argv
    report: dict[str, Any] = {"environment": environment(argv), "model": args.model}
    with tempfile.TemporaryDirectory() as tmp:
        if args.task:
            tasks = dict(t.split("=", 1) for t in args.task)
        else:
            lengths = [int(x) for x in args.prefix_lengths.split(",")]
            tasks = make_tasks(model, args.tasks, lengths, Path(tmp))
        report["tasks"] = len(tasks)
        report["workload"] = {
            "requests": args.requests, "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "prompt_tokens": [len(tok(t)["input_ids"]) for t in PROMPTS],
        }  # fmt: skip
        runs = [run_config(model, tok, tasks, args, args.max_batch_size)]
        if args.compare_unbatched and args.max_batch_size != 1:
            runs.append(run_config(model, tok, tasks, args, 1))
    report["runs"] = runs
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
