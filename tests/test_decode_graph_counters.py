"""The engine's CUDA-graph decode counters (``Engine.graph_stats``, ``/metrics.json``'s
``cuda_graphs``, Prometheus ``prefixattn:decode_steps_total`` ...) and the graph key.

On the CPU nothing is captured: every static step runs eagerly and is counted so; a step
with more rows than the largest bucket is an overflow step (the dynamic path). The graph
lookup is checked with a stand-in graph object: replayed for its own key only, never
after the key changed (another bank snapshot, KV pool or attention backend).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("prometheus_client")
pytest.importorskip("fastapi")

from prefixattn import PrefixTuning, TaskBank
from prefixattn.hf.testing import single_thread
from prefixattn.serve import Engine, GenRequest, SamplingParams, create_app
from prefixattn.tiny import tiny_model, tiny_tokenizer


class _Sink:
    def __init__(self) -> None:
        import threading

        self.ids: list[int] = []
        self.done = threading.Event()

    def prompt_logprobs(self, outs: list) -> None:
        pass

    def token(self, out) -> bool:
        self.ids.append(out.token_id)
        return False

    def finish(self, reason: str, error: str | None = None) -> None:
        self.done.set()


@pytest.fixture(scope="module")
def bank() -> TaskBank:
    with single_thread():
        tok = tiny_tokenizer()
        model = tiny_model(len(tok), arch="llama")
        b = TaskBank(model)
        b.add_base("base")
        torch.manual_seed(3)
        b.add("p5", PrefixTuning(copy.deepcopy(model), 5, init="random"))
        b.tok = tok  # type: ignore[attr-defined]
        return b


def _serve(eng: Engine, max_tokens: list[int], tasks=("base", "p5")) -> list[list[int]]:
    """Rows of the tasks in turn, ``max_tokens[i]`` tokens each (rows leave at different
    steps)."""
    g = torch.Generator().manual_seed(1)
    reqs = [
        GenRequest(tasks[i % len(tasks)], torch.randint(4, 100, (3 + 2 * i,), generator=g).tolist(),
                   SamplingParams(max_tokens=n, ignore_eos=True), _Sink())
        for i, n in enumerate(max_tokens)
    ]  # fmt: skip
    for r in reqs:
        eng.submit(r)
    eng.start()
    try:
        for r in reqs:
            assert r.sink.done.wait(60), "request not done"
    finally:
        eng.stop()
    return [r.sink.ids for r in reqs]


def test_cpu_static_decode_counts_eager_steps_and_no_captures(bank: TaskBank) -> None:
    with single_thread():
        eng = Engine(bank, bank.tok, max_num_seqs=5, max_num_batched_tokens=64,
                     max_model_len=64, decode_buckets=(1, 2, 4))  # fmt: skip
        outs = _serve(eng, [2, 6, 3, 4, 3])
    assert [len(o) for o in outs] == [2, 6, 3, 4, 3]
    g = eng.graph_stats()
    assert g["enabled"] and g["buckets"] == [1, 2, 4]
    assert g["captures"] == {} and g["captured_graphs"] == 0 and g["replays"] == 0
    assert g["capture_runs"] == 0 and g["recaptures"] == 0
    assert g["key_misses"] == 0  # nothing captured: an eager step is no miss
    assert g["static_steps"] == g["eager_steps"] > 0
    assert g["overflow_steps"] > 0  # 5 decoding rows exceed the largest bucket (4)
    # every decode forward is eager: static ones and the overflow (dynamic) ones
    assert g["decode_steps"] == g["eager_decode_steps"] == g["static_steps"] + g["overflow_steps"]
    assert eng.metrics()["cuda_graphs"] == g
    assert eng.metrics()["steps"]["decode_steps"] == g["decode_steps"]


def test_without_buckets_every_decode_step_is_eager(bank: TaskBank) -> None:
    with single_thread():
        eng = Engine(bank, bank.tok, max_num_seqs=2, max_model_len=64)
        _serve(eng, [3, 2])
    g = eng.graph_stats()
    assert g == {"enabled": False, "decode_steps": g["decode_steps"],
                 "eager_decode_steps": g["decode_steps"]}  # fmt: skip
    assert g["decode_steps"] > 0


def test_step_times_are_split_by_kind(bank: TaskBank) -> None:
    """``steps.decode_time_s`` counts the decode-only steps, ``steps.prefill_time_s`` the
    steps that carried a prefill chunk; together every step."""
    with single_thread():
        eng = Engine(bank, bank.tok, max_num_seqs=2, max_model_len=64)
        _serve(eng, [3, 5, 2])
    st = eng.metrics()["steps"]
    dec, pre = st["decode_time_s"], st["prefill_time_s"]
    assert dec["count"] == st["decode_steps"] > 0
    assert pre["count"] >= 2  # two rows at a time: the third request prefills later
    assert dec["count"] + pre["count"] == st["time_s"]["count"] == st["count"]
    assert st["time_s"]["p50"] >= min(dec["p50"], pre["p50"]) > 0


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_prometheus_and_metrics_json_show_the_decode_path(cuda_graphs: bool) -> None:
    """The server's /metrics (Prometheus) and /metrics.json carry the engine's counters."""
    with single_thread():
        tok = tiny_tokenizer()
        app = create_app(tiny_model(len(tok), arch="gpt2"), tok, max_num_seqs=3,
                         max_model_len=64, cuda_graphs=cuda_graphs)  # fmt: skip
        eng = app.state.engine
        _serve(eng, [3, 5, 2], tasks=("base",))
    g = eng.metrics()["cuda_graphs"]
    assert g["enabled"] is cuda_graphs and g["decode_steps"] == g["eager_decode_steps"] > 0
    text = app.state.metrics.render().decode()
    assert f'prefixattn:decode_steps_total{{path="eager"}} {float(g["decode_steps"])}' in text
    assert 'prefixattn:decode_steps_total{path="graph"} 0.0' in text
    assert "prefixattn:cuda_graph_key_misses_total 0.0" in text
    assert "prefixattn:cuda_graph_recaptures_total 0.0" in text
    assert "prefixattn:cuda_graph_captures_total{" not in text  # none captured on the CPU
    st = eng.metrics()["steps"]
    for kind in ("decode", "prefill"):
        p50 = st[f"{kind}_time_s"]["p50"]
        assert f'prefixattn:step_time_seconds{{kind="{kind}",quantile="0.5"}} {p50}' in text


class _StandInGraph:
    """What the engine needs of a captured graph: ``replay`` refreshes its output."""

    def __init__(self, out: torch.Tensor) -> None:
        self.out, self.replays = out, 0

    def replay(self) -> None:
        self.replays += 1
        self.out.fill_(float(self.replays))


def test_a_graph_is_replayed_for_its_own_key_only(bank: TaskBank) -> None:
    """A graph stored under the key of bucket 2 now: a 2-row step replays it (its output
    is returned, nothing runs eagerly). After the bank, the attention backend or the KV
    pool changed, the same step misses (runs eagerly, counted as a key miss) instead of
    replaying a graph captured for another bank or other memory."""
    from prefixattn import patch
    from prefixattn.hf.patching import get_backend
    from prefixattn.serve.engine.scheduler import Row

    eng = Engine(bank, bank.tok, max_num_seqs=4, max_model_len=32, block_size=16,
                 decode_buckets=(1, 2, 4))  # fmt: skip
    dg = eng.graphs
    snap = bank.snapshot()
    key = dg.key(2, snap)
    assert key.batch == 2 and key.kv_len == 32 and key.dtype == "torch.float32"
    assert key.backend == "sdpa"  # "auto" on the CPU
    assert key.label() == "B2/L32/float32/sdpa"
    assert dg.key(2, snap) == key  # the same snapshot: the same version
    fake = _StandInGraph(torch.zeros(2, 7))
    dg.graphs[key] = (fake, fake.out)
    dg.captures[key.label()] += 1

    def rows() -> list[Row]:
        out = []
        for b in (0, 1):  # a row of 2 tokens in block b
            req = GenRequest("base", [5, 6], SamplingParams(max_tokens=2), _Sink())
            out.append(Row(req, "base", 0, 0, None, blocks=[b], num_computed=2, last_token=7))
        return out

    with torch.no_grad():
        got = dg.decode(rows(), snap)
        assert fake.replays == 1 and torch.equal(got, torch.ones(2, 7))
        assert (dg.replays, dg.eager_steps, dg.key_misses) == (1, 0, 0)
        # another backend: another key
        was = get_backend(bank.model)
        patch(bank.model, backend="reference")
        try:
            assert dg.key(2, snap) != key and dg.key(2, snap).backend == "reference"
        finally:
            patch(bank.model, backend=was)
        assert dg.key(2, snap) == key
        # a task added: a new bank snapshot, which the graph does not hold
        torch.manual_seed(4)
        bank.add("late", PrefixTuning(copy.deepcopy(bank.model), 3, init="random"))
        try:
            snap2 = bank.snapshot()
            assert dg.key(2, snap2) != key and dg.key(2, snap2).bank == key.bank + 1
            got = dg.decode(rows(), snap2)
        finally:
            bank.remove("late")
        assert fake.replays == 1 and got.shape[0] == 2  # not replayed: the eager forward
        assert (dg.replays, dg.eager_steps, dg.key_misses) == (1, 1, 1)
        # a new pool (same shapes, new storage): the graph's addresses are stale
        eng.pool.keys[0] = eng.pool.keys[0].clone()
        k3 = dg.key(2, snap)
        assert k3 != key and k3._replace(pool=key.pool, bank=key.bank) == key
        dg.decode(rows(), snap)
    assert fake.replays == 1
    assert (dg.replays, dg.eager_steps, dg.key_misses) == (1, 2, 2)
    assert dg.stats()["replays_by_bucket"] == {"1": 0, "2": 1, "4": 0}
    assert dg.stats()["captures"] == {"B2/L32/float32/sdpa": 1}
    assert dg.stats()["overflow_steps"] == 0 and dg.stats()["recaptures"] == 0
