"""Smoke run of ``benchmarks/serve_engine_load.py`` (the engine against transformers'
continuous batching) on the tiny model, so the script cannot rot. Not a measurement."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from benchmarks import serve_engine_load


@pytest.mark.bench_smoke
def test_serve_engine_load_smoke(tmp_path) -> None:
    out = tmp_path / "engine.json"
    report = serve_engine_load.main(
        [
            "--model", "tiny", "--requests", "6", "--concurrency", "3", "--prompt-min", "3",
            "--prompt-max", "12", "--max-tokens", "5", "--max-num-seqs", "4",
            "--max-model-len", "128", "--step-rows", "3", "--step-context", "8",
            "--step-count", "2", "--step-rounds", "1", "--rss-requests", "20",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert out.is_file()
    names = [r["config"] for r in report["runs"]]
    assert names == [
        "engine, task prefixes", "engine, no prefix",
        "transformers continuous batching, no prefix",
    ]  # fmt: skip
    for run in report["runs"]:
        assert run["requests"] == 6 and 0 < run["generated_tokens"] <= 6 * 5
        assert run["ttft_p50_s"] <= run["latency_p99_s"] and run["load_before"]
    assert report["decode_step"]["ratio"] > 0 and len(report["rss"]["rss_mb"]) >= 2
