"""Stage 1: the serving engine's CUDA-graph decode, verified (issue 29).

The same greedy requests go through two engines on one tiny model (Llama: GQA, RoPE) and a
bank of tasks (P = 0, 1, 7, 33): one with dynamic-shape eager decode, one with
``decode_buckets`` (graphs captured per bucket at start-up and replayed each step). Each
row is also generated alone with ``PrefixTuning.generate`` (``TaskBank.generate`` for the
base rows). Checks, per dtype (float32 and bfloat16 on the GPU):

- **tokens**: eager engine == the row alone (first: it stands if graph capture fails),
  graph engine == eager engine, and graph engine == the row alone. A row may
  stop at its first difference only where the two top tokens are a near tie in both runs
  (top-2 logit gap <= :data:`TIE_TOL`: different but valid rounding); any other
  difference fails. The record says how many tokens were compared and how many rows
  stopped at a tie.
- **counters** (the engine's own metrics, ``Engine.graph_stats``: what ``/metrics.json``
  and Prometheus show). A graph bakes in the bank (the kernel reads the task prefixes
  through it), so its key holds the bank snapshot: at start-up one capture per bucket;
  round 1 (no bank change) no capture more, no key miss, no eager decode step, replays > 0;
  then a task with a longer prefix is added while the engine is idle, and round 2 (one of
  its rows runs to within a few keys of ``max_model_len``) sees exactly one re-capture per
  bucket, still no key miss and no eager decode step, and more replays.

The re-capture is deterministic: the engine captures between steps, when no row is
running, under its model lock and only when the bank snapshot changed
(``Engine._maybe_capture``); the late task is added before round 2 is submitted, so the
worker (or ``start()``) captures once before round 2's first step, whichever comes
first, and the other finds the graphs current.

Round 1 rows leave at different steps, so several buckets are replayed (the record lists
replays per bucket). On the CPU (the dry run) nothing is captured: the same requests run
through the same static buffers eagerly (``DecodeGraphs``' fallback), the token checks
run, and the CUDA-only counter checks are a ``skip`` with the reason.
"""

from __future__ import annotations

import copy
import math
import threading
from typing import Any

from .common import StepContext

# near-tie tolerance of the top-2 logit gap, per dtype (a gap this small may flip between
# two correct computations that round differently); anything larger must match
TIE_TOL = {"float32": 1e-3, "bfloat16": 0.1}
TASKS = {"base": 0, "p1": 1, "p7": 7, "p33": 33}
LATE_TASK = ("p40", 40)  # added between the rounds: the bank grows while graphs exist
MAX_MODEL_LEN = 96
# round 1: (task, prompt length, max_tokens); rows leave at different steps
ROUND1 = [("p33", 9, 12), ("base", 14, 5), ("p1", 6, 16), ("p7", 1, 9),
          ("p33", 20, 3), ("base", 4, 12), ("p7", 11, 7), ("p1", 3, 16)]  # fmt: skip
# round 2: the late task beside the others; its row needs 72 + 22 = 94 of the 96 KV
# positions of max_model_len (the prefix is in the bank, not in the row's blocks): the
# last block of its table is read
ROUND2 = [("p40", 72, 22), ("p33", 5, 10), ("base", 8, 14), ("p1", 2, 6)]
DRY_ROUND1 = [("p33", 5, 3), ("base", 3, 2), ("p1", 4, 4)]
DRY_ROUND2 = [("p40", 90, 4), ("p7", 2, 2)]  # 94 of 96 KV positions


class _Sink:
    """Collects a row's tokens and each token's top-2 logit gap (from logprobs=2)."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.gaps: list[float] = []
        self.finished: tuple[str, str | None] | None = None
        self.done = threading.Event()

    def prompt_logprobs(self, outs: list) -> None:
        pass

    def token(self, out: Any) -> bool:
        self.ids.append(out.token_id)
        top = out.top or []
        self.gaps.append(top[0][1] - top[1][1] if len(top) > 1 else math.inf)
        return False

    def finish(self, reason: str, error: str | None = None) -> None:
        self.finished = (reason, error)
        self.done.set()


def _build(device: str, dtype: Any) -> dict[str, Any]:
    """The tiny model, its tokenizer, the bank and each task's PrefixTuning."""
    import torch

    from prefixattn import PrefixTuning, TaskBank
    from prefixattn.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = tiny_model(len(tok), arch="llama").to(device=device, dtype=dtype).eval()
    bank = TaskBank(model)
    tuners: dict[str, Any] = {}
    for i, (name, P) in enumerate([*TASKS.items(), LATE_TASK]):
        if P == 0:
            bank.add_base(name)
            continue
        torch.manual_seed(100 + i)
        tuners[name] = PrefixTuning(copy.deepcopy(model), P, init="random")
        if name != LATE_TASK[0]:
            bank.add(name, tuners[name])
    return {"tok": tok, "model": model, "bank": bank, "tuners": tuners}


def _prompts(rows: list[tuple[str, int, int]], vocab: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for _, n, _ in rows]


def _serve(engine: Any, rows: list[tuple[str, int, int]], prompts: list[list[int]]) -> list[_Sink]:
    """Submit the rows (greedy, logprobs 2), start the engine, wait for every row."""
    from prefixattn.serve import GenRequest, SamplingParams

    sinks = [_Sink() for _ in rows]
    for (task, _, n), ids, sink in zip(rows, prompts, sinks):
        engine.submit(GenRequest(task, ids, SamplingParams(max_tokens=n, logprobs=2), sink))
    engine.start()
    for s in sinks:
        if not s.done.wait(120):
            raise TimeoutError("an engine row did not finish within 120 s")
        if s.finished[0] not in ("stop", "length"):
            raise RuntimeError(f"an engine row ended with {s.finished}")
    return sinks


def _alone(setup: dict, task: str, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """The row alone: ``PrefixTuning.generate`` (``TaskBank.generate`` for the base), greedy;
    tokens cut before EOS (the engine does not emit it) and each step's top-2 gap."""
    import torch

    model = setup["model"]
    x = torch.tensor([ids], device=model.device)
    kw = dict(max_new_tokens=n, do_sample=False, output_scores=True,
              return_dict_in_generate=True, pad_token_id=0)  # fmt: skip
    if task in setup["tuners"]:
        out = setup["tuners"][task].generate(x, **kw)
    else:
        out = setup["bank"].generate([task], input_ids=x, **kw)
    new = out.sequences[0, x.shape[1] :].tolist()
    gaps = []
    for s in out.scores:  # [1, V] per generated token
        top = s[0].float().topk(2).values
        gaps.append(float(top[0] - top[1]))
    eos = setup["tok"].eos_token_id
    if eos is not None and eos in new:
        new = new[: new.index(eos)]
    return new, gaps


def compare_tokens(
    got: list[tuple[list[int], list[float]]],
    want: list[tuple[list[int], list[float]]],
    tol: float,
) -> dict[str, Any]:
    """Row by row: equal, or stopped at the first difference where every side that chose
    a token there had a top-2 gap <= ``tol`` (a near tie). Returns the verdict, tokens
    compared, rows that stopped at a tie, and the mismatches."""
    compared, ties, mismatches = 0, [], []
    for r, ((a, ga), (b, gb)) in enumerate(zip(got, want)):
        i = next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), None)
        if i is None and len(a) == len(b):
            compared += len(a)
            continue
        if i is None:  # one stopped (EOS) where the other went on
            i = min(len(a), len(b))
        gaps = [g[i] for g in (ga, gb) if i < len(g)]
        gap = max(gaps) if gaps else math.inf
        compared += i
        if gap <= tol:
            ties.append({"row": r, "at": i, "gap": gap})
        else:
            mismatches.append({"row": r, "at": i, "got": a[i : i + 4], "want": b[i : i + 4],
                               "gap": None if math.isinf(gap) else gap})  # fmt: skip
    total = sum(len(b) for b, _ in want)
    return {"ok": not mismatches and len(got) == len(want), "tokens_compared": compared,
            "tokens_total": total, "near_tie_stops": ties, "mismatches": mismatches[:8],
            "tie_tol": tol}  # fmt: skip


def _engine(setup: dict, buckets: tuple[int, ...] | None, n_seqs: int) -> Any:
    from prefixattn.serve import Engine

    return Engine(setup["bank"], setup["tok"], max_num_seqs=n_seqs, max_num_batched_tokens=256,
                  max_model_len=MAX_MODEL_LEN, decode_buckets=buckets)  # fmt: skip


def _rounds(setup: dict, engine: Any, rounds: list[tuple[list, list[list[int]]]]) -> tuple:
    """Round 1, the late task added to the bank (while the engine runs), round 2; the
    engine's graph counters at start-up, after round 1 and at the end."""
    engine.start()  # captures the graphs (CUDA, with decode buckets)
    at_start = engine.graph_stats()
    sinks = _serve(engine, *rounds[0])
    after_warmup = engine.graph_stats()
    name, _ = LATE_TASK
    setup["bank"].add(name, setup["tuners"][name])  # the bank grows
    sinks += _serve(engine, *rounds[1])
    after = engine.graph_stats()
    engine.stop()
    setup["bank"].remove(name)  # the next engine starts from the same bank
    return sinks, {"at_start": at_start, "after_warmup": after_warmup, "after": after}


def check_dtype(ctx: StepContext, device: str, dtype: Any) -> None:
    """The eager engine and each row alone first (their check stands if capture fails),
    then the graph engine on the same requests."""
    import torch

    name = str(dtype).replace("torch.", "")
    setup = _build(device, dtype)
    r1, r2 = (DRY_ROUND1, DRY_ROUND2) if ctx.dry else (ROUND1, ROUND2)
    n_seqs = len(r1)
    # as `prefixattn serve --cuda-graphs` (buckets_up_to): powers of two, then max_num_seqs
    buckets = (*(b for b in (1, 2, 4) if b < n_seqs), n_seqs)
    vocab = len(setup["tok"])
    p1, p2 = _prompts(r1, vocab, 1), _prompts(r2, vocab, 2)
    rounds = [(r1, p1), (r2, p2)]
    tol = TIE_TOL.get(name, 0.1)
    tag = {"dtype": name, "device": device}

    eager = _engine(setup, None, n_seqs)
    out_e, _ = _rounds(setup, eager, rounds)
    del eager
    setup["bank"].add(LATE_TASK[0], setup["tuners"][LATE_TASK[0]])  # for the rows alone
    alone = [_alone(setup, t, ids, n) for (t, _, n), ids in zip(r1 + r2, p1 + p2)]
    setup["bank"].remove(LATE_TASK[0])
    eager_rows = [(s.ids, s.gaps) for s in out_e]
    c = compare_tokens(eager_rows, alone, tol)
    ctx.write("check", name=f"engine eager decode == PrefixTuning.generate alone ({name})",
              ok=c.pop("ok"), errors={"mismatched_rows": len(c["mismatches"])}, **tag, **c)  # fmt: skip

    graph = _engine(setup, buckets, n_seqs)
    out_g, counters = _rounds(setup, graph, rounds)
    del graph
    if device == "cuda":
        torch.cuda.empty_cache()
    got = [(s.ids, s.gaps) for s in out_g]
    for label, want in (("eager decode", eager_rows), ("PrefixTuning.generate alone", alone)):
        c = compare_tokens(got, want, tol)
        ctx.write("check", name=f"engine graph decode == {label} ({name})", ok=c.pop("ok"),
                  errors={"mismatched_rows": len(c["mismatches"])}, **tag, **c)  # fmt: skip

    at_start, after_warmup, after = (counters[k] for k in ("at_start", "after_warmup", "after"))
    captured = sum(at_start.get("captures", {}).values())
    if device != "cuda":
        # the CPU runs the same static buffers eagerly: every static step counted as eager
        ok = (captured == 0 and after["capture_runs"] == 0 and after["replays"] == 0
              and after["key_misses"] == 0
              and after["eager_steps"] == after["static_steps"] > 0)  # fmt: skip
        ctx.write("check", name=f"engine graph counters, eager fallback ({name})", ok=ok,
                  errors={}, counters=counters, **tag)  # fmt: skip
        ctx.write("skip", name=f"engine graph replays ({name})",
                  reason="CUDA-graph capture needs CUDA: the static decode ran eagerly "
                  f"({after['static_steps']} steps), replays and captures are 0 here")  # fmt: skip
        return
    per_bucket = {f"B{b}" for b in buckets}

    def labels(g: dict) -> dict[str, int]:  # captures per bucket ("B4/L96/..." -> "B4")
        return {k.split("/", 1)[0]: n for k, n in g["captures"].items()}

    warm_replays = after_warmup["replays"]
    problems = {
        "captures_at_start_not_one_per_bucket": at_start["capture_runs"] != 1
        or labels(at_start) != {b: 1 for b in per_bucket},
        "captured_in_round_1": after_warmup["capture_runs"] != 1
        or labels(after_warmup) != {b: 1 for b in per_bucket},
        "key_misses_in_round_1": after_warmup["key_misses"] != 0,
        "eager_decode_steps_in_round_1": after_warmup["eager_decode_steps"] != 0,
        "no_replay_in_round_1": warm_replays == 0,
        "not_one_recapture_per_bucket_after_the_task_was_added": after["recaptures"] != 1
        or labels(after) != {b: 2 for b in per_bucket},
        "key_misses": after["key_misses"] != 0,
        "eager_decode_steps": after["eager_decode_steps"] != 0,
        "overflow_steps": after["overflow_steps"] != 0,
        "no_replay_in_round_2": after["replays"] <= warm_replays,
    }
    ctx.write("check", name=f"engine graphs: one capture per bucket, replayed, one re-capture "
              f"per bucket after a task was added ({name})", ok=not any(problems.values()),
              errors={k: int(v) for k, v in problems.items()}, replays=after["replays"],
              replays_by_bucket=after["replays_by_bucket"], recaptures=after["recaptures"],
              counters=counters, **tag)  # fmt: skip


def run(ctx: StepContext) -> None:
    """float32 and bfloat16 on the GPU (graphs captured); float32 on the CPU (dry run:
    the eager fallback of the same static buffers)."""
    import torch

    from prefixattn.ops.settings import ACTIVE

    from .common import Skip

    try:  # the engine (prefixattn.serve imports its names lazily: the engine needs no fastapi)
        import prefixattn.serve.engine.core  # noqa: F401
    except ImportError as e:
        raise Skip(f"prefixattn.serve.engine not importable ({e}): carry the serve wheels (.whl, "
                   "python -m benchmarks.gpu_session.prepare)") from e  # fmt: skip

    # the first config of each kernel list (autotuning every specialization of the tiny
    # model's calls would compile every candidate); the serve step runs the tuned path
    ACTIVE.settings = ACTIVE.settings.replace(autotune=False)
    if ctx.dry:
        device, dtypes = "cpu", (torch.float32,)
    elif not torch.cuda.is_available():
        raise Skip("no CUDA device (run with --dry-run on a CPU machine)")
    else:
        device, dtypes = "cuda", (torch.float32, torch.bfloat16)
    for dtype in dtypes:
        with ctx.part(f"engine graphs {dtype}"):
            check_dtype(ctx, device, dtype)
