"""Smoke test of ``benchmarks/vs_vllm.py``'s own logic (the vLLM comparison is a benchmark,
never a test: no vLLM here). The streaming client against an in-process ``prefixattn``
server on the tiny model, a few requests; the summary, ratios and markdown on its rows.
Its numbers are not a measurement (tiny random model)."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from benchmarks import serve_load, vs_vllm


def test_percentile_and_hash() -> None:
    assert vs_vllm.percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert vs_vllm.percentile([1.0, 2.0, 3.0, 4.0], 0.99) == 4.0
    with pytest.raises(ValueError, match="empty"):
        vs_vllm.percentile([], 0.5)
    assert vs_vllm.text_hash(["a", "b"]) != vs_vllm.text_hash(["ab", ""])
    assert vs_vllm.text_hash(["a", "b"]) == vs_vllm.text_hash(["a", "b"])


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--only", "vllm,nope"], "--only"),
        (["--only", "vllm", "--tiny", "--vllm-python", "x"], "--vllm-python"),
        (["--only", "prefixattn", "--tiny", "--requests", "0"], "--requests"),
    ],
)
def test_bad_arguments(argv: list[str], match: str, tmp_path) -> None:
    with pytest.raises(ValueError, match=match):
        vs_vllm.main([*argv, "--out-dir", str(tmp_path)])


@pytest.mark.bench_smoke
def test_client_against_tiny_server(tmp_path) -> None:
    """The same client the benchmark points at every server, against ours: streamed greedy
    requests, usage counted, identical texts for identical prompts, a report written."""
    from prefixattn.serve import create_app
    from prefixattn.tiny import tiny_base

    model, tok = tiny_base()
    app = create_app(model, tok, {}, model_name=vs_vllm.SERVED_NAME, max_num_seqs=2)
    args = vs_vllm.argparse.Namespace(requests=len(vs_vllm.PROMPTS) + 2, max_tokens=3,
                                      ignore_eos=True)  # fmt: skip
    bodies = vs_vllm.bodies_for(args, vs_vllm.SERVED_NAME)
    with serve_load._Server(app) as srv:
        rows, wall = asyncio.run(vs_vllm._drive(srv.url, bodies, 3, timeout=120))
        engine = vs_vllm.engine_metrics(srv.url)  # the server's own account of the run
    assert len(rows) == args.requests and wall > 0
    st = engine["steps"]
    assert st["decode_time_s"]["count"] + st["prefill_time_s"]["count"] == st["count"] > 0
    assert engine["linear_path"] and engine["ttft_s"]["count"] == args.requests + 1  # + warm-up
    for r in rows:
        assert r["usage"] and r["tokens"] == 3, r  # ignore_eos: every request max_tokens long
        assert 0 < r["ttft"] <= r["latency"]
    # greedy: the same prompt gives the same text (prompts cycle)
    n = len(vs_vllm.PROMPTS)
    assert [r["text"] for r in rows[:2]] == [r["text"] for r in rows[n : n + 2]]
    s = vs_vllm.summary(rows, wall)
    assert s["generated_tokens"] == 3 * args.requests and s["requests"] == args.requests
    assert s["ttft_p50_s"] <= s["ttft_p99_s"] and s["latency_p50_s"] <= s["latency_p99_s"]
    assert s["text_sha256"] == vs_vllm.text_hash([r["text"] for r in rows])

    runs = [
        {**s, "config": c, "round": 0, "startup_s": 1.0, "peak_rss_mb": rss,
         "load_before": [1.0], "load_after": [1.0]}
        for c, rss in (("vllm", 400.0), ("prefixattn", 100.0), ("hf_cb", None))
    ]  # fmt: skip
    runs[1]["tokens_per_s"] = runs[0]["tokens_per_s"] / 2
    runs[1]["engine"] = engine
    rat = vs_vllm.ratios(runs)
    assert rat["prefixattn/vllm"]["tokens_per_s"] == 0.5
    assert rat["prefixattn/vllm"]["peak_rss"] == 0.25
    assert rat["prefixattn/hf_cb"]["peak_rss"] is None
    report = {
        "environment": {"date": "d", "device": "cpu", "cpu_count": 2, "uptime_before": "u1",
                        "uptime_after": "u2", "versions": {"torch": "x"}, "command": "c"},
        "model": {"spec": "tiny"}, "runs": runs, "ratios": rat,
        "workload": {"requests": 1, "concurrency": 1, "max_tokens": 3, "ignore_eos": True,
                     "prompts": n, "prefix_length": 4, "prefix": "random"},
        "same_text": {"vllm == prefixattn": "1/1 requests"},
    }  # fmt: skip
    md = vs_vllm.markdown(report)
    assert "u1" in md and "u2" in md and "| prefixattn/vllm | 0.5 |" in md
    assert f"| 0 | prefixattn | {st['count']} | {st['decode_time_s']['count']} |" in md
    json.dumps(report)


def test_public_argv_hides_paths() -> None:
    argv = ["--vllm-python", "/a/b/python", "--model-dir=/x/m", "--requests", "4", "--tiny",
            "--log-dir", "/l/d"]  # fmt: skip
    out = vs_vllm.public_argv(argv)
    assert out == ["--vllm-python VENV/bin/python", "--model-dir=MODEL_DIR", "--requests", "4",
                   "--tiny", "--log-dir LOG_DIR"]  # fmt: skip
    assert "/a/b" not in " ".join(out) and "/l/d" not in " ".join(out)
