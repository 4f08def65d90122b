"""``prefixattn serve`` as a process: starts on 127.0.0.1, answers, exits on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

import httpx

from prefixattn import PrefixTuning
from prefixattn.cli import main
from prefixattn.serve import load_base

ROOT = Path(__file__).resolve().parents[1]


def test_serve_arguments_are_checked(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--model", "tiny", "--task", "no-equals-sign"])
    assert info.value.code == 2
    assert "NAME=PATH" in capsys.readouterr().err
    assert main(["serve", "--model", "tiny", "--task", f"a={tmp_path}"]) == 2
    assert "artifact" in capsys.readouterr().err
    assert main(["serve", "--model", "tiny", "--task", f"a/b={tmp_path}"]) == 2
    assert "task name 'a/b'" in capsys.readouterr().err


def _openmp_loaded(pid: int) -> set[str]:
    """The OpenMP runtimes mapped into process ``pid`` (Linux)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {rt for rt in ("libiomp5", "libgomp") if rt in maps}


@pytest.mark.parametrize("omp", ["intel", "gnu"])
def test_serve_process_answers_on_loopback(tmp_path, omp: str) -> None:
    """Started as users start it (the console script's path): on the CPU it re-executes
    itself on Intel OpenMP with a short spin where intel-openmp is installed (the serve
    extra on x86-64 Linux), says which runtime its threads run on, and keeps its PID;
    ``PREFIXATTN_SERVE_OMP=gnu`` keeps torch's GNU OpenMP."""
    from prefixattn._runtime import intel_openmp_library

    model, _, _ = load_base("tiny")
    torch.manual_seed(0)
    PrefixTuning(model, 4).save(tmp_path / "topic")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "LD_PRELOAD")},
        "PREFIXATTN_API_KEY": "k",
        "PREFIXATTN_SERVE_OMP": omp,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    intel = omp == "intel" and sys.platform == "linux" and intel_openmp_library() is not None
    cmd = [
        sys.executable, "-m", "prefixattn.cli", "serve", "--model", "tiny",
        "--task", f"topic={tmp_path / 'topic'}", "--port", str(port), "--device", "cpu",
        "--log-level", "warning", "--max-stop", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        t0 = time.time()
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            assert time.time() - t0 < 60, "server did not come up"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert httpx.get(url + "/v1/models", timeout=5).status_code == 401  # the API key
        key = {"authorization": "Bearer k"}
        models = httpx.get(url + "/v1/models", headers=key, timeout=5).json()["data"]
        assert [m["id"] for m in models] == ["tiny", "topic"]
        r = httpx.post(
            url + "/v1/completions",
            json={"model": "topic", "prompt": "the market", "max_tokens": 3, "temperature": 0},
            headers=key,
            timeout=30,
        )
        assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) <= 3
        # --max-stop 1: a request with two stop strings is refused by name, with the limit
        r = httpx.post(
            url + "/v1/completions",
            json={"model": "topic", "prompt": "x", "max_tokens": 1, "stop": ["a", "b"]},
            headers=key,
            timeout=30,
        )
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "stop" and "1" in err["message"], err
        assert httpx.post(url + "/admin/tasks", json={}, timeout=5).status_code == 404
        if sys.platform == "linux":  # the same process (PID), on the runtime it names
            # (torch's libgomp is mapped either way; preloaded, libiomp5 serves its calls)
            assert ("libiomp5" in _openmp_loaded(proc.pid)) == intel
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    out = proc.stdout.read().decode()
    assert "tiny, topic on http://127.0.0.1" in out and "no admin routes" in out
    assert "API key required" in out
    runtime = "CPU threads on Intel OpenMP (" if intel else "CPU threads on GNU OpenMP ("
    assert runtime in out, out
    if intel:
        assert "KMP_BLOCKTIME=1" in out, out
