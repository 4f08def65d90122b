"""Where a streamed token's time goes, from the engine's step to the client's socket.

Starts ``prefixattn serve`` in this process (uvicorn on 127.0.0.1), streams ``--requests``
greedy completions (``--concurrency`` at a time) from a client in a *separate process*
(so the client's parsing does not share this process's interpreter), and stamps every
token with ``time.perf_counter()`` (the machine's monotonic clock, the same in both
processes) at each hand-over:

    step      the engine's step began (forwards of the step start)
    sampled   the step's tokens were chosen (``choose_tokens`` returned)
    emitted   the engine handed the token to its request's sink (``RequestOutput.token``)
    detok0    the tokenizer's thread began on it
    detok1    the tokenizer's thread handed the event on (text decoded, stop strings)
    loop      the event loop took the event (``OpenAIServing._update``)
    sent      the SSE chunk was written (the stream generator resumed after ``send``)
    client    the client's process read the chunk's line from its socket

and reports, per stage, the p50 / p90 / p99 of the time between consecutive stamps
(milliseconds) over every streamed token, beside the client-side tokens/s and TTFT.

The stamps are put in by wrapping the functions named above from this script (nothing in
the package records them), so the script measures any checkout of the package: run it
with the checkout to measure on ``PYTHONPATH`` and ``--package-root`` pointing at it.

    python benchmarks/token_path.py --model smollm2 --requests 48 --concurrency 16 \\
        --out benchmarks/results/token-path-cpu.json
    python benchmarks/token_path.py --model tiny --requests 8          # smoke
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

STAGES = ["step", "sampled", "emitted", "detok0", "detok1", "loop", "sent", "client"]

CLIENT = r"""
import asyncio, json, sys, time
import httpx

async def main(url, bodies, concurrency):
    sem = asyncio.Semaphore(concurrency)
    out = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(body):
            async with sem:
                t0 = time.perf_counter()
                rid, lines = None, []
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        now = time.perf_counter()
                        data = line[5:].strip()
                        if data != "[DONE]" and rid is None:
                            rid = json.loads(data).get("id")
                        lines.append(now)
                out.append({"id": rid, "t_submit": t0, "lines": lines,
                            "t_done": time.perf_counter()})
        await asyncio.gather(*(one(b) for b in bodies))
    return out

spec = json.loads(sys.stdin.read())
t0 = time.perf_counter()
res = asyncio.run(main(spec["url"], spec["bodies"], spec["concurrency"]))
print(json.dumps({"wall": time.perf_counter() - t0, "requests": res}))
"""


class _Stamps:
    """The instrumentation: wraps the hand-over points, collects the stamps."""

    def __init__(self) -> None:
        self.t_step = 0.0
        self.t_sampled = 0.0
        self.chunks: dict[str, list[dict | None]] = {}  # rid -> per SSE line, its token

    def install(self) -> None:
        from prefixattn.serve.engine import core
        from prefixattn.serve.openai import output, serving, serving_completion

        st = self
        step, choose = core.Engine._step, core.choose_tokens

        def _step(self: Any, plan: Any) -> Any:
            st.t_step = time.perf_counter()
            return step(self, plan)

        def choose_tokens(*a: Any, **k: Any) -> Any:
            out = choose(*a, **k)
            st.t_sampled = time.perf_counter()
            return out

        core.Engine._step, core.choose_tokens = _step, choose_tokens

        token, _token = output.RequestOutput.token, output.RequestOutput._token

        def token_(self: Any, out: Any) -> bool:
            out._t = {"step": st.t_step, "sampled": st.t_sampled, "emitted": time.perf_counter()}
            return token(self, out)

        def _token_(self: Any, out: Any, eos: bool) -> None:
            t = getattr(out, "_t", None)
            if t is not None:
                t["detok0"] = time.perf_counter()
            emit = self.emit

            def emit_(ev: Any) -> None:
                if t is not None:
                    t["detok1"] = time.perf_counter()
                    ev._t = t
                emit(ev)

            self.emit = emit_
            try:
                _token(self, out, eos)
            finally:
                self.emit = emit

        output.RequestOutput.token, output.RequestOutput._token = token_, _token_

        update = serving.OpenAIServing._update

        def _update(self: Any, row: Any, ev: Any) -> None:
            t = getattr(ev, "_t", None)
            if t is not None:
                t["loop"] = time.perf_counter()
            row._last_t = t
            update(self, row, ev)

        serving.OpenAIServing._update = _update

        stream = serving_completion.OpenAIServingCompletion._stream

        async def _stream(self: Any, body: Any, request: Any, rows: Any, q: Any, rid: str,
                          *a: Any) -> Any:  # fmt: skip
            lines = st.chunks.setdefault(rid, [])
            async for chunk in stream(self, body, request, rows, q, rid, *a):
                t = getattr(rows[0], "_last_t", None)
                rows[0]._last_t = None  # a chunk not made from a token: no stamps
                yield chunk
                if t is not None:
                    t["sent"] = time.perf_counter()
                lines.append(t)

        serving_completion.OpenAIServingCompletion._stream = _stream


def _pct(v: list[float], p: float) -> float:
    v = sorted(v)
    return v[min(len(v) - 1, round(p / 100 * (len(v) - 1)))]


def breakdown(stamps: _Stamps, client: dict) -> dict[str, Any]:
    """Per stage: the p50 / p90 / p99 milliseconds between consecutive stamps."""
    gaps: dict[str, list[float]] = {f"{a}->{b}": [] for a, b in itertools.pairwise(STAGES)}
    total: list[float] = []
    tokens = 0
    for r in client["requests"]:
        server = stamps.chunks.get(r["id"], [])
        for t, t_client in zip(server, r["lines"]):
            if t is None or any(s not in t for s in STAGES[:-1]):
                continue
            t = dict(t, client=t_client)
            tokens += 1
            for a, b in itertools.pairwise(STAGES):
                gaps[f"{a}->{b}"].append(t[b] - t[a])
            total.append(t["client"] - t["sampled"])
    ms = {
        k: {p: round(1000 * _pct(v, q), 3) for p, q in (("p50", 50), ("p90", 90), ("p99", 99))}
        for k, v in [*gaps.items(), ("sampled->client", total)]
        if v
    }
    return {"tokens_stamped": tokens, "ms": ms}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2 | tiny | a local model folder")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--package-root", default=str(ROOT), help="the checkout measured")
    p.add_argument("--out", default=None, help="write the JSON here")
    args = p.parse_args(argv)
    sys.path.insert(0, args.package_root)
    sys.path.insert(1, str(ROOT))

    from benchmarks.serve_load import PROMPTS, _Server, environment
    from prefixattn.serve import create_app, load_base

    stamps = _Stamps()
    stamps.install()
    model, tok, _ = load_base(args.model, device="cpu")
    app = create_app(model, tok, {}, model_name="base", max_num_seqs=args.max_num_seqs,
                     max_queue=max(256, args.requests))  # fmt: skip
    bodies = [
        {"model": "base", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.max_tokens,
         "temperature": 0, "ignore_eos": True, "stream": True}
        for i in range(args.requests)
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with _Server(app) as srv, tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "client.py"
        script.write_text(CLIENT)

        def load(bs: list[dict]) -> dict:
            spec = json.dumps({"url": srv.url, "bodies": bs, "concurrency": args.concurrency})
            r = subprocess.run([sys.executable, str(script)], input=spec, capture_output=True,
                               text=True, env=env, timeout=1800, check=False)  # fmt: skip
            if r.returncode:
                raise RuntimeError(f"the client failed: {r.stderr[-2000:]}")
            return json.loads(r.stdout)

        load([dict(b, max_tokens=2) for b in bodies[:4]])  # first-call costs
        stamps.chunks.clear()
        load_before = [round(x, 2) for x in os.getloadavg()]
        client = load(bodies)
        load_after = [round(x, 2) for x in os.getloadavg()]
    reqs = client["requests"]
    ttft = [r["lines"][0] - r["t_submit"] for r in reqs if r["lines"]]
    n_tokens = sum(1 for r in reqs for t in stamps.chunks.get(r["id"], []) if t is not None)
    report = {
        "environment": environment(sys.argv[1:] if argv is None else argv),
        "model": args.model,
        "workload": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "max_num_seqs": args.max_num_seqs,
            "greedy": True,
            "ignore_eos": True,
            "stream": True,
        },
        "wall_s": round(client["wall"], 2),
        "streamed_tokens": n_tokens,
        "tokens_per_s": round(n_tokens / client["wall"], 2),
        "ttft_p50_s": round(statistics.median(ttft), 3),
        "load_before": load_before,
        "load_after": load_after,
        "breakdown": breakdown(stamps, client),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
