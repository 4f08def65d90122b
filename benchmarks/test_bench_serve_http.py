"""Smoke run of ``benchmarks/serve_load.py`` (the HTTP serving benchmark) on the tiny model,
so that the script cannot rot. Its numbers are not a measurement (tiny random model)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from benchmarks import serve_load


@pytest.mark.bench_smoke
def test_serve_load_smoke(tmp_path) -> None:
    out = tmp_path / "serve.json"
    report = serve_load.main(
        [
            "--model", "tiny", "--tasks", "3", "--prefix-lengths", "2,5,1", "--requests", "12",
            "--concurrency", "6", "--max-tokens", "3",
            "--compare-unbatched", "--burst", "--device", "cpu", "--out", str(out),
        ]
    )  # fmt: skip
    assert out.is_file() and report["tasks"] == 3
    batched, single = report["runs"]
    assert batched["requests"] == single["requests"] == 12
    assert single["mean_batch_size"] == 1.0 and single["batches"] >= 12
    # --burst: the 6 first requests (3 tasks) are all in before the first step runs, so
    # a step holds several rows of several tasks whatever the machine's speed
    assert batched["mean_batch_size"] > 1.0 and batched["mixed_task_batches"] >= 1
    for run in (batched, single):
        assert run["latency_p50_s"] <= run["latency_p99_s"]
        assert 0 < run["generated_tokens"] <= 12 * 3
    env = report["environment"]
    assert (
        env["command"].startswith("python benchmarks/serve_load.py --model tiny") and env["torch"]
    )
