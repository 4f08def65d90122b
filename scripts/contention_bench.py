"""CPU contention benchmark: prefixattn idle vs beside a second PyTorch process, before/after.

Two PyTorch processes whose OpenMP threads spin-wait on the same cores starve each other
(issue 22). prefixattn now sets ``OMP_WAIT_POLICY=PASSIVE`` before torch starts
(``prefixattn/_runtime.py``). This script measures three workloads on the demo model, each
as its own process, in two configurations:

- ``before``: torch imported before prefixattn (``python -c "import torch; ..."``), so the
  OpenMP runtime starts with its default waiting (what every entry point did until now);
- ``after``: the entry point as shipped (``python -m prefixattn ...`` or the script), which
  imports prefixattn first;

and two conditions: ``idle`` (nothing of ours besides) and ``contended`` (beside a second
PyTorch process with default threads and default OpenMP waiting doing small matmuls in a
loop: the case that collapses; a plain busy loop does not show it). The workloads:

- ``demo``: ``scripts/demo_step_time.py --backends sdpa --rounds 1 --steps S`` (s/step);
- ``train``: ``prefixattn train`` for ``--train-steps`` steps (wall time of the process);
- ``serve``: ``prefixattn serve`` and ``--requests`` greedy completions (tokens/s).

Before and after run back to back, the order alternating round by round. Each number is
recorded with ``/proc/loadavg`` before and after it (the machine may be shared). The demo
model is converted once to a ``save_pretrained`` folder (same weights; loads in seconds
instead of de-quantizing the GGUF each run). Children get the environment without
``OMP_WAIT_POLICY`` and ``OMP_NUM_THREADS`` (PyTorch's default thread count).

    python scripts/contention_bench.py --rounds 2 --out benchmarks/results/contention-cpu
    python scripts/contention_bench.py --merge run1.json run2.json --out OUT   # OUT.json, .md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("before", "after")
CONDITIONS = ("idle", "contended")
WORKLOADS = ("demo", "train", "serve")

# the second PyTorch job: default threads, default OpenMP waiting, small matmuls forever
# (until its deadline: it never outlives the benchmark by long)
COMPETITOR = """
import time, torch
a, b = torch.randn(128, 128), torch.randn(128, 128)
deadline = time.time() + float(__import__("sys").argv[1])
print("competitor ready", torch.get_num_threads(), flush=True)
while time.time() < deadline:
    for _ in range(100):
        c = a @ b
"""

# before: torch (and so OpenMP) starts first, then the entry point runs as usual
BEFORE_SCRIPT = "import runpy, sys, torch; p = sys.argv[1]; sys.argv = sys.argv[1:]; runpy.run_path(p, run_name='__main__')"
BEFORE_CLI = "import sys, torch; from prefixattn.cli import main; sys.exit(main(sys.argv[1:]))"

PREPARE = """
import json, sys
from pathlib import Path
import torch
from prefixattn.data import DEMO_MODEL, load_bbc_news, load_model
out = Path(sys.argv[1])
model, tok = load_model(DEMO_MODEL, device="cpu", dtype=torch.float32)
cfg = model.config.to_dict()
cfg.pop("quantization_config", None)  # de-quantized float32 weights: a plain checkpoint
plain = type(model)(type(model.config).from_dict(cfg))
plain.load_state_dict(model.state_dict())
plain.save_pretrained(out / "model")
tok.save_pretrained(out / "model")
with open(out / "train.jsonl", "w") as f:
    for a in load_bbc_news()[:64]:
        words = " ".join(a.text.split()[:40])
        f.write(json.dumps({"prompt": f"Article: {words}\\nTopic:", "completion": " " + a.label}) + "\\n")
"""


def loadavg() -> str:
    """``/proc/loadavg``'s first three fields (or ``os.getloadavg``)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def child_env() -> dict[str, str]:
    """The children's environment: this one without OMP_WAIT_POLICY / OMP_NUM_THREADS."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def command(config: str, workload: str, work: Path, args: argparse.Namespace) -> list[str]:
    """The child's command line for ``workload`` in ``config`` (before / after)."""
    py = sys.executable
    model = str(work / "model")
    if workload == "demo":
        script = str(ROOT / "scripts" / "demo_step_time.py")
        rest = ["--backends", "sdpa", "--rounds", "1", "--steps", str(args.demo_steps)]
        rest += ["--model", model]
        return (
            [py, "-c", BEFORE_SCRIPT, script, *rest] if config == "before" else [py, script, *rest]
        )
    head = [py, "-c", BEFORE_CLI] if config == "before" else [py, "-m", "prefixattn"]
    if workload == "train":
        return [*head, "train", "--model", model, "--data", str(work / "train.jsonl"),
                "--out", str(work / f"out-{config}"), "--steps", str(args.train_steps),
                "--eval-fraction", "0", "--no-progress", "--device", "cpu"]  # fmt: skip
    return [*head, "serve", "--model", model, "--model-name", "base", "--device", "cpu",
            "--port", str(args.port), "--log-level", "warning"]  # fmt: skip


def _run(cmd: list[str], timeout: float, what: str) -> tuple[str | None, float]:
    """``(stdout, seconds)`` of ``cmd``; stdout ``None`` when it ran past ``timeout`` s."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:  # subprocess.run kills the child
        return None, time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout, time.perf_counter() - t0


def _timed_out(wall: float, unit: str) -> dict[str, Any]:
    return {"value": None, "unit": unit, "timed_out": True, "process_s": round(wall, 1)}


def run_demo(cmd: list[str], timeout: float) -> dict[str, Any]:
    """``demo_step_time.py``: its s/step median (1 round of S steps after a warm-up step)."""
    out, wall = _run(cmd, timeout, "demo_step_time")
    if out is None:
        return _timed_out(wall, "s/step")
    row = json.loads(next(x for x in out.splitlines() if x.startswith("{")))
    return {"value": row["s_per_step_median"], "unit": "s/step", "process_s": round(wall, 2),
            "child_omp_wait_policy": row.get("omp_wait_policy")}  # fmt: skip


def run_train(cmd: list[str], timeout: float) -> dict[str, Any]:
    """``prefixattn train``: the whole process's wall time, and the training loop's time."""
    out, wall = _run(cmd, timeout, "prefixattn train")
    if out is None:
        return _timed_out(wall, "s (process)")
    line = next(x for x in out.splitlines() if x.startswith("trained "))
    loop_s = float(line.split(" in ")[1].split(" s ")[0])
    return {"value": round(wall, 2), "unit": "s (process)", "train_loop_s": loop_s}


def _post(url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def run_serve(cmd: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """``prefixattn serve``: generated tokens/s over ``--requests`` greedy completions."""
    base = f"http://127.0.0.1:{args.port}"
    proc = subprocess.Popen(
        cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prefixattn serve exited:\n{proc.stdout.read()[-2000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2):
                    break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError("prefixattn serve did not come up in 600 s") from None
                time.sleep(0.5)
        body = {"model": "base", "max_tokens": args.max_tokens, "temperature": 0}
        prompts = [f"Article: story number {i} about the markets and the match.\nTopic:"
                   for i in range(args.requests)]  # fmt: skip
        t_up = time.perf_counter()
        try:
            _post(base + "/v1/completions", {**body, "prompt": prompts[0]}, args.timeout)  # warm-up
        except OSError:
            return _timed_out(time.perf_counter() - t_up, "tokens/s")
        tokens: list[int] = []
        lock = threading.Lock()

        def client(mine: list[str]) -> None:
            for p in mine:
                left = args.timeout - (time.perf_counter() - t_start)
                if left <= 0:
                    return
                try:
                    out = _post(base + "/v1/completions", {**body, "prompt": p}, left)
                except OSError:
                    return
                with lock:
                    tokens.append(out["usage"]["completion_tokens"])

        t_start = time.perf_counter()
        shares = [prompts[i :: args.concurrency] for i in range(args.concurrency)]
        threads = [threading.Thread(target=client, args=(s,)) for s in shares]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        if len(tokens) != args.requests:
            return {**_timed_out(wall, "tokens/s"), "finished_requests": len(tokens)}
        return {"value": round(sum(tokens) / wall, 2), "unit": "tokens/s",
                "tokens": sum(tokens), "seconds": round(wall, 2)}  # fmt: skip
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Competitor:
    """The second PyTorch process (default threads and waiting), for ``contended`` runs."""

    def __init__(self, seconds: float) -> None:
        env = child_env()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", COMPETITOR, str(seconds)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        ready = self.proc.stdout.readline() if self.proc.stdout else ""
        if not ready.startswith("competitor ready"):
            raise RuntimeError("the competitor process did not start")
        self.threads = int(ready.split()[-1])
        time.sleep(1.0)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def environment(argv: list[str]) -> dict[str, Any]:
    """Device, versions and the command beside the numbers (versions read without torch)."""
    from importlib.metadata import version

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "device": f"CPU: {cpu}",
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "command": " ".join(["python scripts/contention_bench.py", *argv]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_at_start": loadavg(),
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per workload and config: medians idle / contended and their ratio (slowdown)."""
    out: dict[str, Any] = {}
    for w in sorted({r["workload"] for r in rows}):
        for c in CONFIGS:
            med = {}
            for cond in CONDITIONS:
                vals = [
                    r["value"]
                    for r in rows
                    if (r["workload"], r["config"], r["condition"]) == (w, c, cond)
                ]
                med[cond] = statistics.median(vals) if vals else None
            if None in med.values():
                continue
            unit = next(r["unit"] for r in rows if r["workload"] == w)
            # slowdown: time ratio (tokens/s: the inverse)
            slow = (
                med["idle"] / med["contended"]
                if unit == "tokens/s"
                else med["contended"] / med["idle"]
            )
            out[f"{w}/{c}"] = {"unit": unit, "idle": med["idle"], "contended": med["contended"],
                               "slowdown_contended_vs_idle": round(slow, 2)}  # fmt: skip
    return out


def markdown(runs: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    """A report: the environment and command of each run, the summary and every row."""
    summary = summarize(rows)
    lines = ["# CPU contention: idle vs beside a second PyTorch process, before / after", ""]
    lines += [
        "Written by `scripts/contention_bench.py` (its docstring says what each case is).",
        "",
    ]
    for env in runs:
        lines.append(f"- {env['date']}: `{env['command']}`; {env['device']}, {env['cpu_count']} "
                     f"cores, torch {env['torch']}, transformers {env['transformers']}, Python "
                     f"{env['python']}; load average at the start {env['load_average_at_start']}")  # fmt: skip
    lines += ["", "| workload | config | idle (median) | beside a PyTorch job (median) | slowdown |",
              "|---|---|---|---|---|"]  # fmt: skip
    for key, v in summary.items():
        w, c = key.split("/")
        slow = v.get("slowdown_contended_vs_idle", v.get("note"))
        lines.append(f"| {w} | {c} | {v['idle']} | {v['contended']} | {slow} |")
    lines += ["", "Every measurement (load average `/proc/loadavg` before and after each):", "",
              "| round | workload | condition | config | value | unit | load before | load after |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['round']} | {r['workload']} | {r['condition']} | {r['config']} | "
                     f"{r['value']} | {r['unit']} | {r['loadavg_before']} | {r['loadavg_after']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def merge(files: list[str], out: str) -> None:
    """Merge result JSONs (or JSON-lines logs of rows) into ``out``.json and ``out``.md."""
    runs: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for f in files:
        text = Path(f).read_text()
        if f.endswith(".json"):
            data = json.loads(text)
            runs.append(data["environment"])
            rows += data["rows"]
            continue
        for line in text.splitlines():  # a log: the environment line, then one row per line
            obj = json.loads(line)
            (runs if "command" in obj else rows).append(obj)
    for env in runs:  # the scratch folders' paths are this machine's, not the result's
        env["command"] = re.sub(
            r"--(work|out) \S+", lambda m: f"--{m[1]} {m[1].upper()}", env["command"]
        )
    data = {"environments": runs, "summary": summarize(rows), "rows": rows}
    Path(out).with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    Path(out).with_suffix(".md").write_text(markdown(runs, rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--first-round", type=int, default=0, help="round number to start at (odd: after first)"
    )
    ap.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    ap.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=list(CONDITIONS))
    ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    ap.add_argument("--demo-steps", type=int, default=2, help="timed steps per demo run")
    ap.add_argument("--train-steps", type=int, default=4)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--port", type=int, default=0, help="0: a free port")
    ap.add_argument(
        "--timeout", type=float, default=600, help="s per measurement; then recorded as timed out"
    )
    ap.add_argument("--work", default=None, help="folder for the converted model (reused)")
    ap.add_argument("--out", default=None, help="write OUT.json (rows, summary, environment)")
    ap.add_argument(
        "--merge", nargs="+", default=None, help="merge these results (JSON / row logs) into --out"
    )
    args = ap.parse_args(argv)
    if args.merge:
        merge(args.merge, args.out)
        return 0
    if args.port == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            args.port = s.getsockname()[1]
    env = environment(sys.argv[1:] if argv is None else argv)
    print(json.dumps(env))
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="contention-")
        args.work = tmp.name
    work = Path(args.work)
    if not (work / "model" / "config.json").exists():
        print("converting the demo model to a save_pretrained folder ...", flush=True)
        subprocess.run([sys.executable, "-c", PREPARE, str(work)], env=child_env(), check=True)
    rows: list[dict[str, Any]] = []
    for r in range(args.first_round, args.first_round + args.rounds):
        for w in args.workloads:
            for cond in args.conditions:
                competitor = Competitor(3600) if cond == "contended" else None
                try:
                    order = [c for c in CONFIGS if c in args.configs]
                    for config in order if r % 2 == 0 else order[::-1]:
                        cmd = command(config, w, work, args)
                        load0 = loadavg()
                        if w == "demo":
                            res = run_demo(cmd, args.timeout)
                        elif w == "train":
                            res = run_train(cmd, args.timeout)
                        else:
                            res = run_serve(cmd, args)
                        row = {"round": r, "workload": w, "condition": cond, "config": config,
                               **res, "loadavg_before": load0, "loadavg_after": loadavg()}  # fmt: skip
                        if competitor is not None:
                            row["competitor_threads"] = competitor.threads
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                finally:
                    if competitor is not None:
                        competitor.stop()
    summary = summarize(rows)
    for k, v in summary.items():
        if "note" in v:
            print(f"{k}: {v}")
            continue
        print(f"{k}: idle {v['idle']} {v['unit']}, contended {v['contended']}: "
              f"slowdown {v['slowdown_contended_vs_idle']}x")  # fmt: skip
    if args.out:
        Path(args.out).with_suffix(".json").write_text(
            json.dumps({"environment": env, "summary": summary, "rows": rows}, indent=1) + "\n"
        )
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
