"""Tasks on demand: one ``prefixattn serve --task-dir DIR --max-loaded-tasks 64`` process
serving ``--tasks`` (1,000) task folders.

Makes ``--tasks`` tiny artifacts in a temporary folder (random prefixes, P cycling 1..8;
every 20th a PEFT prefix and every 20th a soft prompt, so every reader runs), starts the
server as its own process (``prefixattn serve --model tiny --task-dir DIR
--max-loaded-tasks N`` on 127.0.0.1, a free port) and sends greedy completions
with httpx, ``--concurrency`` at a time, cycling over all tasks: each task's first request
(``cold``: not loaded yet, it costs one load) followed by a request for a task used a few
requests before (``hot``: still loaded). Every answer is checked against the greedy output
of a TaskBank built from the tuner objects in memory (not from the files) for that task:
all tasks. Reports the server process's RSS over the run, loads,
evictions, the seconds a load held the engine's model lock, and per-request latency
for cold and hot requests. Bounded: ``--tasks`` x 2 requests, ``--time-limit`` seconds.

    python benchmarks/task_dir_load.py --out benchmarks/results/task-dir-tiny-cpu.json
    python benchmarks/task_dir_load.py --tasks 40 --max-loaded-tasks 8   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPT = "Article: the market rose on strong earnings\nTopic:"
MAX_TOKENS = 8
HOT_WINDOW = 16  # a hot request picks one of the last HOT_WINDOW tasks (< max loaded)


def rss_mib(pid: int | str = "self") -> float:
    """VmRSS of process ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def wait_up(url: str, proc: Any, timeout: float = 300.0) -> None:
    """Until the server answers /health (or its process ended)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not come up")


def make_folder(model: Any, n: int, folder: Path) -> dict[str, Any]:
    """``n`` task folders; returns name -> the tuner object that wrote it."""
    import torch

    from prefixattn import PrefixTuning, PromptTuning

    base = copy.deepcopy(model)
    tuners: dict[str, Any] = {}
    for i in range(n):
        torch.manual_seed(1000 + i)
        P = 1 + i % 8
        name = f"task{i:04d}"
        if i % 20 == 7:  # a PEFT prefix (PEFT's positions: offset P)
            t = PrefixTuning(base, P, init="random", position_offset=P)
            with torch.no_grad():
                t.prefix.normal_(0, 1)
            t.to_peft(folder / name)
        elif i % 20 == 13:  # a soft prompt (converted into a prefix when loaded)
            t = PromptTuning(base, P, init="random")
            t.save(folder / name)
        else:
            t = PrefixTuning(base, P, init="random")
            with torch.no_grad():
                t.prefix.normal_(0, 1)
            t.save(folder / name)
        tuners[name] = t
    return tuners


def expected_outputs(model: Any, tok: Any, tuners: dict[str, Any], chunk: int = 100) -> dict:
    """Greedy MAX_TOKENS tokens of PROMPT for every task: TaskBank.generate on the tuner
    objects, ``chunk`` tasks per bank (one mixed batch each)."""
    import torch

    from prefixattn import TaskBank

    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    names, out = list(tuners), {}
    for s in range(0, len(names), chunk):
        part = names[s : s + chunk]
        bank = TaskBank(copy.deepcopy(model), {n: tuners[n] for n in part})
        with torch.no_grad():
            gen = bank.generate(
                part, input_ids=ids.expand(len(part), -1), max_new_tokens=MAX_TOKENS,
                do_sample=False, attention_mask=torch.ones(len(part), ids.shape[1]),
            )  # fmt: skip
        for j, n in enumerate(part):
            new = gen[j, ids.shape[1] :].tolist()
            eos = tok.eos_token_id
            out[n] = new[: new.index(eos)] if eos in new else new
    return out


def schedule(names: list[str], passes: int, seed: int = 0) -> list[tuple[str, str]]:
    """(task, "cold" | "hot"): each task's request in turn (not loaded: its last use was
    len(names) tasks ago), then a recent task's (loaded); ``passes`` times over all."""
    rng, out = random.Random(seed), []
    for _ in range(passes):
        for i, n in enumerate(names):
            out.append((n, "cold"))
            if i:
                out.append((names[rng.randrange(max(0, i - HOT_WINDOW), i)], "hot"))
    return out


async def drive(url: str, plan: list[tuple[str, str]], concurrency: int, deadline: float,
                samples: list, pid: int) -> list[dict]:  # fmt: skip
    import httpx

    results: list[dict] = []
    it = iter(enumerate(plan))
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def worker() -> None:
            for i, (task, kind) in it:
                if time.monotonic() > deadline:
                    return
                body = {"model": task, "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                        "temperature": 0}  # fmt: skip
                t0 = time.perf_counter()
                r = await client.post("/v1/completions", json=body)
                dt = time.perf_counter() - t0
                got = r.json()["choices"][0]["token_ids"] if r.status_code == 200 else None
                results.append(dict(i=i, task=task, kind=kind, status=r.status_code,
                                    latency=dt, tokens=got))  # fmt: skip
                if len(results) % 100 == 0:
                    samples.append((len(results), rss_mib(pid)))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def pct(values: list[float], p: float) -> float | None:
    v = sorted(values)
    return None if not v else v[min(len(v) - 1, round(p / 100 * (len(v) - 1)))]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--max-loaded-tasks", type=int, default=64)
    ap.add_argument("--passes", type=int, default=2, help="cycles over all tasks")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--time-limit", type=float, default=600.0, help="seconds of load")
    ap.add_argument("--out", default=None, help="results JSON (a .md beside it)")
    args = ap.parse_args(argv)

    import torch

    from benchmarks.serve_load import environment
    from prefixattn.serve import load_base
    from prefixattn.testing import single_thread

    env = environment(sys.argv[1:] if argv is None else argv)
    env["command"] = env["command"].replace("serve_load.py", "task_dir_load.py")
    torch.manual_seed(0)
    model, tok, _ = load_base("tiny")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        with single_thread():
            tuners = make_folder(model, args.tasks, folder)
            expected = expected_outputs(model, tok, tuners)
        prep_s = time.perf_counter() - t0
        del tuners
        kib = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1024
        names = sorted(expected)
        plan = schedule(names, args.passes)
        samples: list = []
        timeline: list = []
        stop = threading.Event()
        with socket.socket() as sock:  # a free port for the server
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [
            sys.executable, "-m", "prefixattn", "serve", "--model", "tiny",
            "--task-dir", str(folder), "--max-loaded-tasks", str(args.max_loaded_tasks),
            "--max-num-seqs", str(args.max_num_seqs), "--max-queue", str(4 * args.concurrency),
            "--port", str(port), "--log-level", "warning",
        ]  # fmt: skip
        shown = ["DIR" if c == str(folder) else c for c in cmd[3:]]
        env["server_command"] = " ".join(["prefixattn", *shown]).replace(str(port), "PORT")
        pypath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
        proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": pypath})
        url = f"http://127.0.0.1:{port}"
        try:
            wait_up(url, proc)
            pid = proc.pid

            def sampler() -> None:  # the server's RSS over time, every 0.5 s
                t = time.perf_counter()
                while not stop.wait(0.5):
                    timeline.append((round(time.perf_counter() - t, 1), rss_mib(pid)))

            rss_start = rss_mib(pid)
            th = threading.Thread(target=sampler, daemon=True)
            th.start()
            t1 = time.perf_counter()
            results = asyncio.run(
                drive(url, plan, args.concurrency, time.monotonic() + args.time_limit,
                      samples, pid)
            )  # fmt: skip
            wall = time.perf_counter() - t1
            stop.set()
            th.join()
            import httpx

            m = httpx.get(url + "/metrics.json", timeout=30).json()
            stats, engine_steps, bank_tasks = m["task_store"], m["steps"]["time_s"], len(m["tasks"])
        finally:
            proc.terminate()
            proc.wait(30)
    ok = [r for r in results if r["status"] == 200]
    wrong = [r["task"] for r in ok if r["tokens"] != expected[r["task"]]]
    lat = {k: [r["latency"] for r in ok if r["kind"] == k] for k in ("cold", "hot")}
    rss_values = [v for _, v in timeline] or [rss_start]
    half = [v for n, v in samples if n > len(results) // 2]
    per_pass = len(plan) // args.passes
    pass_end = [v for n, v in samples if n % per_pass < 100 and n >= per_pass]
    out = {
        "environment": env,
        "config": {
            "tasks": args.tasks,
            "passes": args.passes,
            "max_loaded_tasks": args.max_loaded_tasks,
            "concurrency": args.concurrency,
            "max_num_seqs": args.max_num_seqs,
            "max_tokens": MAX_TOKENS,
            "hot_window": HOT_WINDOW,
            "model": "tiny (random GPT-2)",
            "task_folder_kib": round(kib, 1),
            "prepare_s": round(prep_s, 1),
        },
        "requests": len(plan),
        "answered": len(results),
        "ok": len(ok),
        "statuses": {
            str(s): sum(r["status"] == s for r in results)
            for s in sorted({r["status"] for r in results})
        },
        "checked_against_reference": len(ok),
        "wrong": len(wrong),
        "wrong_tasks": wrong[:10],
        "distinct_tasks_served": len({r["task"] for r in ok}),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(results) / wall, 1),
        "latency_s": {
            k: {"count": len(v), "p50": pct(v, 50), "p90": pct(v, 90), "p99": pct(v, 99)}
            for k, v in lat.items()
        },
        "task_store": stats,
        "tasks_in_bank_at_end": bank_tasks,
        "engine_step_s": engine_steps,
        "rss_mib": {
            "server_start": round(rss_start, 1),
            "max": max(rss_values),
            "end": rss_values[-1],
            "second_half_min": min(half) if half else None,
            "second_half_max": max(half) if half else None,
            "at_each_pass_end": pass_end,
            "per_100_requests": samples,
            "timeline_s": timeline[:: max(1, len(timeline) // 60)],
        },
    }
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        Path(args.out).with_suffix(".md").write_text(report(out) + "\n")
    print(report(out))
    return out


def report(r: dict[str, Any]) -> str:
    e, c, s, rss = r["environment"], r["config"], r["task_store"], r["rss_mib"]
    ms = lambda x: "n/a" if x is None else f"{x * 1000:.1f}"  # noqa: E731
    lines = [
        f"# Tasks on demand: {c['tasks']} tasks, --max-loaded-tasks {c['max_loaded_tasks']}",
        "",
        f"`{e['command']}` on {e['device']} ({e['cpu_count']} CPUs, torch threads "
        f"{e['torch_threads']}), load average at start {e['load_average_at_start']}, "
        f"{e['date']}; torch {e['torch']}, transformers {e['transformers']}. Model: "
        f"{c['model']}; task folder {c['task_folder_kib']} KiB. CPU timings.",
        "",
        f"- requests: {r['answered']} of {r['requests']} sent ({c['passes']} passes), {r['ok']} answered 200 "
        f"({r['statuses']}); every 200 checked against TaskBank.generate of its task's "
        f"tuner object: {r['wrong']} wrong; {r['distinct_tasks_served']} distinct tasks",
        f"- loads {s['loads']}, evictions {s['evictions']}, load failures "
        f"{s['load_failures']}; loaded at the end {s['loaded']} (bank: "
        f"{r['tasks_in_bank_at_end']} tasks with the base)",
        f"- wall {r['wall_s']} s, {r['requests_per_s']} requests/s, concurrency {c['concurrency']}",
        "",
        "| requests | count | p50 ms | p90 ms | p99 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for k, v in r["latency_s"].items():
        what = "cold (task not loaded: one load)" if k == "cold" else "hot (task loaded)"
        lines.append(f"| {what} | {v['count']} | {ms(v['p50'])} | {ms(v['p90'])} | "
                     f"{ms(v['p99'])} |")  # fmt: skip
    lines += [
        "",
        "| the loader's | count | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for k, what in (("load_s", "whole load (read + evict + insert)"),
                    ("insert_s", "insert: model lock held (bank.add)"),
                    ("evict_s", "evict: model lock held (bank.remove)")):  # fmt: skip
        v = s[k]
        lines.append(f"| {what} | {v['count']} | {ms(v['p50'])} | {ms(v['p99'])} | "
                     f"{ms(v['max'])} |")  # fmt: skip
    st = r["engine_step_s"]
    lines += [
        f"| (an engine step, for scale) | {st['count']} | {ms(st['p50'])} | {ms(st['p99'])} | |",
        "",
        f"Server process RSS (MiB; `{e['server_command']}`): at start {rss['server_start']}, max {rss['max']}, end {rss['end']}; second "
        f"half of the run {rss['second_half_min']} .. {rss['second_half_max']}; at the "
        f"end of each pass over all {c['tasks']} tasks (after the first): "
        f"{rss['at_each_pass_end']}.",
        "",
        "RSS per 100 requests: " + ", ".join(f"{n}: {v}" for n, v in rss["per_100_requests"]),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
