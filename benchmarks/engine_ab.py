"""Two checkouts of the engine, back to back, on the workload of serve_engine_load.py.

Each run is a fresh process that imports ``prefixattn`` from one checkout (``--trees``,
e.g. a ``git worktree`` of the commit before a change, and ``.``) and runs that
checkout's :class:`~prefixattn.serve.Engine` under the closed loop of
``serve_engine_load.run_engine`` (every row with its task prefix, the issue-18 workload:
SmolLM2-135M, 4 tasks of P = 8/16/32/64, prompts of 20-200 random tokens, ``max_tokens``
4..64, fixed seed). Runs alternate A B B A ...; per run: generated tokens/s, TTFT and
latency percentiles, the load average before and after.

    python benchmarks/engine_ab.py --trees ../old-engine,. --labels before,after \\
        --requests 24 --rounds 2 --out benchmarks/results/engine-ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()


def child(tree: str, args: argparse.Namespace) -> dict:
    """In this process: the engine of ``tree`` on the workload (prefixes on)."""
    sys.path.insert(0, str(Path(tree).resolve()))  # that checkout's prefixattn wins
    sys.path.insert(1, str(HERE.parents[1]))  # this checkout's benchmark helpers
    import tempfile

    import prefixattn
    from benchmarks.serve_engine_load import run_engine, workload
    from benchmarks.serve_load import make_tasks
    from prefixattn import TaskBank
    from prefixattn.serve import load_base

    model, tok, _ = load_base(args.model, device="cpu")
    lengths = [8, 16, 32, 64]
    with tempfile.TemporaryDirectory() as tmp:
        tasks = make_tasks(model, len(lengths), lengths, Path(tmp))
        bank = TaskBank(model, tasks)
        bank.add_base("base")
    work = workload(args.requests, len(tok), args.seed, list(tasks), 20, 200, 64)
    ns = argparse.Namespace(
        max_num_seqs=16, max_num_batched_tokens=512, max_model_len=352,
        concurrency=args.concurrency,
    )  # fmt: skip
    out = run_engine(bank, tok, work, ns, True)
    out["prefixattn"] = str(Path(prefixattn.__file__).resolve().parents[1])
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trees", required=True, help="A,B: two checkouts")
    p.add_argument("--labels", default="A,B")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2, help="A B, then B A, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)), flush=True)
        return {}
    trees, labels = args.trees.split(","), args.labels.split(",")
    argv = sys.argv[1:] if argv is None else argv
    runs = []
    for rnd in range(args.rounds):
        order = [0, 1] if rnd % 2 == 0 else [1, 0]
        for i in order:
            before = [round(x, 2) for x in os.getloadavg()]
            cmd = [sys.executable, str(HERE), "--trees", args.trees, "--child", trees[i],
                   "--model", args.model, "--requests", str(args.requests),
                   "--concurrency", str(args.concurrency), "--seed", str(args.seed)]  # fmt: skip
            path = os.pathsep.join(
                [str(Path(trees[i]).resolve()), os.environ.get("PYTHONPATH", "")]
            )
            env = {**os.environ, "PYTHONPATH": path}  # that checkout first
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                raise SystemExit(f"run of {trees[i]} failed:\n{res.stderr[-3000:]}")
            row = json.loads(line[0][7:])
            row.pop("ttft_s_each", None)
            row.update(label=labels[i], round=rnd, load_before=before,
                       load_after=[round(x, 2) for x in os.getloadavg()])  # fmt: skip
            print(json.dumps(row), flush=True)
            runs.append(row)
    summary = {}
    for key in ("tokens_per_s", "ttft_p50_s", "latency_p50_s"):
        a = statistics.median(r[key] for r in runs if r["label"] == labels[0])
        b = statistics.median(r[key] for r in runs if r["label"] == labels[1])
        summary[f"{key} {labels[1]}/{labels[0]}"] = round(b / a, 3)
    report = {"command": "python benchmarks/engine_ab.py " + " ".join(argv), "runs": runs,
              "summary": summary}  # fmt: skip
    print(json.dumps(summary), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
