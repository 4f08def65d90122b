"""The serving engine alone (no HTTP, no client process) on the vs-vLLM workload, CPU.

The same 40 greedy requests of 64 tokens from 8 "clients" as ``benchmarks/vs_vllm.py``,
every request on a 16-row task prefix of SmolLM2-135M (float32), submitted to an
:class:`~prefixattn.serve.engine.Engine` in this process: a finished request's slot is
refilled at once. Prints tokens/s, the steps by kind (decode-only, with prefill chunks)
with their p50 / mean times, the compiled call's p50 and the compiled step's counters,
with the load average: what the engine does per step without the server around it (set it
beside a ``vs_vllm.py`` run of the server to see what HTTP costs).

    python benchmarks/engine_alone.py --compile        # the engine as `serve --compile`
    python benchmarks/engine_alone.py                  # eager
    # the packed linears' C++ kernels against their Python ones, rounds alternating in
    # one process, beside a Python thread busy 20% of the time (as a server's)
    python benchmarks/engine_alone.py --compile --rounds 8 --alternate-linear-ops --python-thread 0.2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class _Sink:
    """Counts tokens; releases a client slot when its request finishes."""

    def __init__(self, slots: threading.Semaphore) -> None:
        self.slots, self.n = slots, 0

    def prompt_logprobs(self, outs: list) -> None:  # pragma: no cover - not asked
        pass

    def token(self, out: Any) -> bool:
        self.n += 1
        return False

    def finish(self, reason: str, error: str | None = None) -> None:
        self.slots.release()


def _busy_python(duty: float, stop: threading.Event, period: float = 0.005) -> None:
    """Hold the GIL running Python for ``duty`` of every ``period`` seconds until ``stop``."""
    while not stop.is_set():
        t = time.perf_counter()
        while time.perf_counter() - t < duty * period:
            pass
        time.sleep((1 - duty) * period)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--compile", action="store_true", help="Engine(compile=True)")
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=1, help="the workload this many times")
    p.add_argument("--alternate-linear-ops", action="store_true",
                   help="rounds alternate the packed linears' C++ and Python kernels "
                   "(c++, python, python, c++, ...; needs --compile)")  # fmt: skip
    p.add_argument("--python-thread", type=float, default=0.0,
                   help="a Python thread busy this fraction of every 5 ms beside the steps "
                   "(as a server's HTTP and detokenizer threads; 0: none)")  # fmt: skip
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    if args.rounds < 1 or not 0 <= args.python_thread < 1:
        raise SystemExit("--rounds: >= 1; --python-thread: in [0, 1)")

    from benchmarks.serve_load import make_tasks
    from benchmarks.vs_vllm import PROMPTS
    from prefixattn import TaskBank
    from prefixattn.serve import load_base
    from prefixattn.serve.engine import Engine, cpu_linear
    from prefixattn.serve.engine.request import GenRequest, SamplingParams

    model, tok, _ = load_base(args.model, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        bank = TaskBank(model, make_tasks(model, 1, [16], Path(tmp)))
    bank.add_base("base")  # as `prefixattn serve` has it
    eng = Engine(bank, tok, compile=args.compile, max_num_seqs=args.concurrency,
                 max_model_len=1024)  # fmt: skip
    t0 = time.perf_counter()
    eng.start()
    startup = time.perf_counter() - t0
    steps: list[tuple[int, int, float]] = []  # (decode rows, prefill tokens, seconds)
    step = eng._step

    def timed(plan: Any) -> None:
        t = time.perf_counter()
        step(plan)
        steps.append((len(plan.decode), sum(n for _, n in plan.prefill), time.perf_counter() - t))

    eng._step = timed
    ids = [tok(q)["input_ids"] for q in PROMPTS]
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    warm = threading.Semaphore(0)  # one request first: the prefix cache as a server's
    eng.submit(GenRequest("task0", ids[0], SamplingParams(max_tokens=2, ignore_eos=True),
                          _Sink(warm)))  # fmt: skip
    warm.acquire()
    stop = threading.Event()
    if args.python_thread > 0:  # Python work beside the steps, as a server's HTTP threads
        threading.Thread(target=_busy_python, args=(args.python_thread, stop), daemon=True).start()

    def ms(xs: list[float]) -> dict[str, Any]:
        return {"count": len(xs), "p50_ms": round(statistics.median(xs) * 1e3, 1) if xs else None,
                "mean_ms": round(statistics.mean(xs) * 1e3, 1) if xs else None}  # fmt: skip

    def one_round(kernels: str | None) -> dict[str, Any]:
        if kernels is not None:
            cpu_linear._NATIVE[0].set_enabled(kernels == "c++")
        steps.clear()
        slots = threading.Semaphore(args.concurrency)
        sinks = []
        load0 = [round(x, 2) for x in os.getloadavg()]
        t0 = time.perf_counter()
        for i in range(args.requests):
            slots.acquire()
            sinks.append(_Sink(slots))
            eng.submit(GenRequest("task0", ids[i % len(ids)], params, sinks[-1]))
        for _ in range(args.concurrency):
            slots.acquire()
        wall = time.perf_counter() - t0
        row = {
            "linear_kernels": kernels or "as loaded",
            "tokens_per_s": round(sum(s.n for s in sinks) / wall, 2), "wall_s": round(wall, 2),
            "decode_steps": ms([d for _, n, d in steps if n == 0]),
            "prefill_steps": ms([d for _, n, d in steps if n > 0]),
            "prefill_tokens_per_step": [n for _, n, _ in steps if n > 0],
            "load": [load0, [round(x, 2) for x in os.getloadavg()]],
        }  # fmt: skip
        print(json.dumps({k: v for k, v in row.items() if k != "prefill_tokens_per_step"}),
              flush=True)  # fmt: skip
        return row

    if args.alternate_linear_ops and not cpu_linear._NATIVE:
        raise SystemExit(f"--alternate-linear-ops: the C++ kernels are not loaded "
                         f"({cpu_linear.native_linear_ops()}); needs --compile")  # fmt: skip
    order = ("c++", "python", "python", "c++")  # A B B A, repeated
    rounds = [one_round(order[r % 4] if args.alternate_linear_ops else None)
              for r in range(args.rounds)]  # fmt: skip
    stop.set()
    eng.stop()

    g = eng.graphs.stats() if eng.graphs is not None else {}
    keep = ("replays", "eager_steps", "refused_recompiles", "compile_s", "mixed_steps",
            "mixed_eager", "linear_ops", "linear_ops_calls")  # fmt: skip
    by_kernels: dict[str, list[float]] = {}
    for row in rounds:
        by_kernels.setdefault(row["linear_kernels"], []).append(row["tokens_per_s"])
    out = {
        "command": "python benchmarks/engine_alone.py " + " ".join(argv or sys.argv[1:]),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "compile": args.compile, "startup_s": round(startup, 1),
        "python_thread": args.python_thread,
        **({} if len(rounds) > 1 else rounds[0]),
        "rounds": rounds if len(rounds) > 1 else None,
        "tokens_per_s_median": {k: statistics.median(v) for k, v in by_kernels.items()},
        "graphs": {k: g[k] for k in keep if k in g},
    }  # fmt: skip
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
