"""The continuous-batching engine, driven directly with a test sink (no HTTP).

Tiny random GPT-2 and Llama (GQA, RoPE) models; a bank of tasks with P = 0 (the base
model), 1, 7, 33 and a soft prompt (a position offset). Greedy rows must equal
``TaskBank.generate`` of the row alone; logprobs must equal a float64 log-softmax of a
plain forward over the same tokens; seeded rows must not depend on their neighbours.
"""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch

pytest.importorskip("transformers")

from prefixattn import PrefixTuning, PromptTuning, TaskBank
from prefixattn.hf.testing import single_thread
from prefixattn.serve.engine import Engine
from prefixattn.serve.engine.request import (
    CANCELLED,
    ERROR,
    LENGTH,
    STOP,
    GenRequest,
    QueueFullError,
    SamplingParams,
    TokenOut,
)
from prefixattn.tiny import tiny_model, tiny_tokenizer

TASK_P = {"p1": 1, "p7": 7, "p33": 33}


class Sink:
    """Records everything the engine reports for one request (and checks the protocol)."""

    def __init__(self, engine: Engine | None = None, stop_after: int | None = None) -> None:
        self.engine, self.stop_after = engine, stop_after
        self.tokens: list[TokenOut] = []
        self.prompt: list | None = None
        self.finished: list[tuple[str, str | None]] = []
        self.steps: list[int] = []  # engine step count at each token
        self.done = threading.Event()

    def prompt_logprobs(self, outs: list) -> None:
        assert self.prompt is None and not self.tokens, "prompt_logprobs once, before tokens"
        self.prompt = outs

    def token(self, out: TokenOut) -> bool:
        assert not self.finished, "token after finish"
        self.tokens.append(out)
        if self.engine is not None:
            self.steps.append(self.engine.batches)
        return self.stop_after is not None and len(self.tokens) >= self.stop_after

    def finish(self, reason: str, error: str | None = None) -> None:
        self.finished.append((reason, error))
        self.done.set()

    @property
    def ids(self) -> list[int]:
        return [t.token_id for t in self.tokens]


def request(task: str, ids: list[int], engine: Engine | None = None, **params) -> GenRequest:
    params.setdefault("max_tokens", 6)
    return GenRequest(task, list(ids), SamplingParams(**params), Sink(engine))


def run(engine: Engine, reqs: list[GenRequest], timeout: float = 60.0) -> None:
    """Submit ``reqs``, run the engine until all finished, stop it."""
    for r in reqs:
        engine.submit(r)
    engine.start()
    try:
        deadline = time.monotonic() + timeout
        for r in reqs:
            assert r.sink.done.wait(max(deadline - time.monotonic(), 0.01)), "request not done"
    finally:
        engine.stop()
    for r in reqs:
        assert len(r.sink.finished) == 1, f"finish called {len(r.sink.finished)} times"


def prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request):
    with single_thread():
        tok = tiny_tokenizer()
        model = tiny_model(len(tok), arch=request.param)
        bank = TaskBank(model)
        bank.add_base("base")
        for i, (name, P) in enumerate(TASK_P.items()):
            torch.manual_seed(100 + i)
            bank.add(name, PrefixTuning(copy.deepcopy(model), P, init="random"))
        torch.manual_seed(200)
        bank.add("soft", PromptTuning(copy.deepcopy(model), 2, init="vocab"))
        yield dict(bank=bank, tok=tok, vocab=len(tok), arch=request.param)


def alone(bank: TaskBank, task: str, ids: list[int], n: int, eos: int | None) -> list[int]:
    """Greedy ``TaskBank.generate`` of the row alone, cut before EOS."""
    x = torch.tensor([ids])
    out = bank.generate([task], input_ids=x, max_new_tokens=n, do_sample=False)
    new = out[0, x.shape[1] :].tolist()
    return new[: new.index(eos)] if eos is not None and eos in new else new


def engine_for(setup, **kw) -> Engine:
    kw.setdefault("max_num_seqs", 4)
    kw.setdefault("max_num_batched_tokens", 16)
    kw.setdefault("max_model_len", 128)
    return Engine(setup["bank"], setup["tok"], seed=0, **kw)


def test_greedy_every_task_and_a_mixed_batch_equal_taskbank_alone(setup) -> None:
    with single_thread():
        bank = setup["bank"]
        tasks = ["base", "p1", "p7", "p33", "soft"]
        lens = [1, 17, 5, 40, 3, 23, 9, 2, 30, 12]
        ps = prompts(setup["vocab"], lens)
        # 10 rows, 4 at a time, a 16-token budget: prompts chunked over steps, rows joining
        # and leaving while others decode, every step mixing tasks
        eng = engine_for(setup)
        reqs = [request(tasks[i % 5], p, max_tokens=3 + i % 7) for i, p in enumerate(ps)]
        run(eng, reqs)
        eos = setup["tok"].eos_token_id
        outs = set()
        for r in reqs:
            want = alone(bank, r.task, r.prompt_ids, r.params.max_tokens, eos)
            assert r.sink.ids == want == r.out_ids, (r.task, len(r.prompt_ids))
            reason = LENGTH if len(want) == r.params.max_tokens else STOP
            assert r.sink.finished == [(reason, None)] and r.finish_reason == reason
            outs.add(tuple(want))
        assert len(outs) > 5  # the tasks really differ
        m = eng.metrics()
        assert m["mixed_task_batches"] > 0 and max(int(k) for k in m["batch_sizes"]) == 4
        assert m["steps"]["prefill_tokens"] == sum(lens)
        assert m["kv_cache"]["blocks_used"] == 0 and m["running"] == 0
        assert m["requests"]["completed"] == 10 and m["ttft_s"]["count"] == 10


def test_each_task_alone_in_one_long_prefill(setup) -> None:
    """A budget larger than the prompt (one prefill chunk), one row: every task."""
    with single_thread():
        bank = setup["bank"]
        (p,) = prompts(setup["vocab"], [33], seed=1)
        eos = setup["tok"].eos_token_id
        for task in bank.tasks:
            eng = engine_for(setup, max_num_batched_tokens=64)
            r = request(task, p, max_tokens=8)
            run(eng, [r])
            assert r.sink.ids == alone(bank, task, p, 8, eos), task


def _plain_logprobs(bank: TaskBank, task: str, ids: list[int]) -> torch.Tensor:
    """float64 log-softmax [N, V] of one plain forward (the bank's own prefix path)."""
    with torch.no_grad():
        logits = bank([task], input_ids=torch.tensor([ids])).logits[0]  # [N, V]
    return torch.log_softmax(logits.double(), dim=-1)


def test_logprobs_and_prompt_logprobs_equal_a_plain_forward(setup) -> None:
    with single_thread():
        bank = setup["bank"]
        ps = prompts(setup["vocab"], [19, 6, 11], seed=2)
        eng = engine_for(setup, max_num_batched_tokens=8)  # prompts in several chunks
        reqs = [
            request("p7", ps[0], logprobs=3, prompt_logprobs=2, max_tokens=5),
            request("soft", ps[1], logprobs=0, max_tokens=4),
            request("base", ps[2], logprobs=5, prompt_logprobs=0, max_tokens=5, temperature=0.8,
                    seed=3),
        ]  # fmt: skip
        run(eng, reqs)
        for r in reqs:
            seq = r.prompt_ids + r.sink.ids
            ref = _plain_logprobs(bank, r.task, seq)  # [N, V]
            n = len(r.prompt_ids)
            for i, out in enumerate(r.sink.tokens):
                row = ref[n - 1 + i]
                assert out.logprob == pytest.approx(float(row[out.token_id]), abs=1e-4)
                k = r.params.logprobs
                want = torch.topk(row, k).indices.tolist() if k else []
                got = [t for t, _ in out.top] if k else (out.top or [])
                assert got == want
                if k:
                    vals = torch.tensor([v for _, v in out.top], dtype=torch.float64)
                    torch.testing.assert_close(vals, row[want], atol=1e-4, rtol=0)
            if r.params.prompt_logprobs is None:
                assert r.sink.prompt is None
                continue
            assert len(r.sink.prompt) == n and r.sink.prompt[0] is None
            for t in range(1, n):
                out = r.sink.prompt[t]
                assert out.token_id == r.prompt_ids[t]
                assert out.logprob == pytest.approx(float(ref[t - 1, out.token_id]), abs=1e-4)
                assert len(out.top or []) == r.params.prompt_logprobs


def test_seeded_rows_reproduce_whatever_shares_the_step(setup) -> None:
    with single_thread():
        ps = prompts(setup["vocab"], [9, 14, 4, 21], seed=3)
        seeded = dict(temperature=1.3, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
        solo = request("p7", ps[0], **seeded)
        run(engine_for(setup), [solo])
        crowd = [
            request("base", ps[1], temperature=0.7, max_tokens=12),
            request("p33", ps[2], max_tokens=9),
            request("p7", ps[0], **seeded),
            request("soft", ps[3], temperature=2.0, top_p=0.5, seed=9, max_tokens=11),
        ]
        run(engine_for(setup, max_num_batched_tokens=20), crowd)
        assert crowd[2].sink.ids == solo.sink.ids and len(solo.sink.ids) == 10
        other = request("p7", ps[0], **{**seeded, "seed": 99})
        unseeded = [request("p7", ps[0], **{**seeded, "seed": None}) for _ in range(2)]
        run(engine_for(setup), [other, *unseeded])
        draws = {tuple(r.sink.ids) for r in (solo, other, *unseeded)}
        assert len(draws) >= 3  # seeds matter; unseeded rows get their own streams


def test_tiny_top_p_is_greedy(setup) -> None:
    """top_p so small that only the most likely token survives: the greedy tokens."""
    with single_thread():
        (p,) = prompts(setup["vocab"], [12], seed=4)
        g = request("p1", p, max_tokens=8)
        s = request("p1", p, max_tokens=8, temperature=5.0, top_p=1e-6, seed=5)
        run(engine_for(setup), [g, s])
        assert s.sink.ids == g.sink.ids


def test_stop_token_ids_ignore_eos_and_sink_stop(setup) -> None:
    with single_thread():
        (p,) = prompts(setup["vocab"], [8], seed=5)
        free = request("p33", p, max_tokens=12, ignore_eos=True)
        run(engine_for(setup), [free])
        ids = free.sink.ids
        cut = ids[4]
        stopped = request("p33", p, max_tokens=12, ignore_eos=True, stop_token_ids=(cut,))
        by_sink = request("p33", p, max_tokens=12, ignore_eos=True)
        by_sink.sink.stop_after = 3
        run(engine_for(setup), [stopped, by_sink])
        assert stopped.sink.ids == ids[: ids.index(cut)]  # the stop token is not reported
        assert stopped.sink.finished == [(STOP, None)]
        assert by_sink.sink.ids == ids[:3] and by_sink.sink.finished == [(STOP, None)]


def test_short_request_among_15_long_ones_finishes_within_5_steps(setup) -> None:
    with single_thread():
        ps = prompts(setup["vocab"], [10] * 15 + [4], seed=6)
        eng = engine_for(setup, max_num_seqs=16, max_num_batched_tokens=64, max_model_len=320)
        longs = [request("p7", p, eng, max_tokens=300, ignore_eos=True) for p in ps[:15]]
        for r in longs:
            eng.submit(r)
        eng.start()
        try:
            deadline = time.monotonic() + 60
            while not all(len(r.sink.tokens) >= 3 for r in longs):  # all 15 decoding
                assert time.monotonic() < deadline
                time.sleep(0.005)
            short = request("p1", ps[15], eng, max_tokens=2, ignore_eos=True)
            at_submit = eng.batches
            eng.submit(short)
            assert short.sink.done.wait(60)
            assert all(not r.done for r in longs)  # the long ones still run
        finally:
            for r in longs:
                eng.cancel(r)
            eng.stop()
        first, last = short.sink.steps
        assert first - at_submit <= 2  # prefilled in the next step (or the one after)
        assert last - first <= 5  # and its 2nd token within 5 decode steps
        assert short.sink.finished == [(LENGTH, None)]


def test_cancel_frees_the_row_and_kv_capacity_is_fixed(setup) -> None:
    with single_thread():
        (p,) = prompts(setup["vocab"], [6], seed=7)
        eng = engine_for(setup, max_num_seqs=2, max_model_len=200, enable_prefix_caching=False)
        ptrs = [t.data_ptr() for t in eng.pool.keys + eng.pool.values]
        nbytes = eng.pool.bytes
        long = request("p7", p, eng, max_tokens=150, ignore_eos=True)
        eng.submit(long)
        eng.start()
        try:
            deadline = time.monotonic() + 30
            while len(long.sink.tokens) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            eng.cancel(long)
            assert long.sink.done.wait(30)
            assert long.sink.finished == [(CANCELLED, None)] and len(long.sink.tokens) < 150
            while eng.metrics()["kv_cache"]["blocks_used"]:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            # the freed blocks serve the next rows; 3x the rows in requests, same memory
            more = [request("p33", p, max_tokens=5) for _ in range(6)]
            for r in more:
                eng.submit(r)
            for r in more:
                assert r.sink.done.wait(30)
        finally:
            eng.stop()
        assert all(r.finish_reason in (LENGTH, STOP) for r in more)
        assert [t.data_ptr() for t in eng.pool.keys + eng.pool.values] == ptrs
        assert eng.pool.bytes == nbytes and eng.kv.num_free_blocks == eng.pool.num_blocks


def test_queue_full_drain_and_bad_requests(setup) -> None:
    with single_thread():
        eng = engine_for(setup, max_queue=2)  # not started: nothing leaves the queue
        reqs = [request("base", [5, 6]) for _ in range(2)]
        for r in reqs:
            eng.submit(r)
        with pytest.raises(QueueFullError, match="queue is full"):
            eng.submit(request("base", [5]))
        assert eng.queue_depth == 2 and eng.metrics()["requests"]["rejected"] == 1
        with pytest.raises(TypeError, match="req must be a GenRequest"):
            eng.submit("hello")
        # a task removed while its request waits; a row too long; empty prompt
        bank = setup["bank"]
        bank.add("gone", PrefixTuning(copy.deepcopy(bank.model), 2, init="random"))
        eng = engine_for(setup, max_model_len=40)
        bad = [
            request("gone", [5, 6]),
            request("p33", [5] * 30, max_tokens=11),  # 30 + 11 > 40 (the prefix: not counted)
            request("base", []),
        ]
        good = request("p33", [5] * 30, max_tokens=10)  # fits: 30 + 10
        for r in bad:
            eng.submit(r)
        bank.remove("gone")
        run(eng, [good])
        for r in bad:
            assert r.sink.done.wait(10)
            (reason, error), = r.sink.finished  # fmt: skip
            assert reason == ERROR and error
        assert "removed" in bad[0].sink.finished[0][1]
        assert "--max-model-len" in bad[1].sink.finished[0][1]
        assert good.finish_reason in (LENGTH, STOP) and good.out_ids
        # drain: new requests refused, the ones taken finish
        eng = engine_for(setup)
        r = request("p1", [5, 6, 7], max_tokens=5)
        eng.submit(r)
        eng.start()
        assert eng.drain(timeout=30)
        assert r.finish_reason == LENGTH
        with pytest.raises(QueueFullError, match="shutting down"):
            eng.submit(request("p1", [5]))
        # stop with rows running and waiting: each still finishes once, with ERROR
        eng = engine_for(setup, max_num_seqs=1, max_model_len=300)
        rows = [request("p1", [5, 6], max_tokens=250, ignore_eos=True) for _ in range(2)]
        for r in rows:
            eng.submit(r)
        eng.start()
        while not rows[0].sink.tokens:
            time.sleep(0.005)
        eng.stop()
        for r in rows:
            assert r.sink.finished == [(ERROR, "the engine stopped")]


def test_a_sink_that_raises_ends_only_its_row(setup) -> None:
    class Broken(Sink):
        def token(self, out: TokenOut) -> bool:
            raise RuntimeError("boom")

    with single_thread():
        (p,) = prompts(setup["vocab"], [7], seed=8)
        bad = GenRequest("p7", p, SamplingParams(max_tokens=5), Broken())
        good = request("p7", p, max_tokens=5)
        run(engine_for(setup), [bad, good])
        assert bad.sink.finished[0][0] == ERROR and "boom" in bad.sink.finished[0][1]
        assert good.finish_reason in (LENGTH, STOP) and good.sink.ids


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(max_num_seqs=0), "max_num_seqs"),
        (dict(max_num_batched_tokens=0), "max_num_batched_tokens"),
        (dict(max_queue=0), "max_queue"),
        (dict(kv_slots=0), "kv_slots"),
        (dict(max_model_len=1), "max_model_len"),
        (dict(block_size=8), "block_size"),
        (dict(block_size=24), "block_size"),
        (dict(num_blocks=0), "num_blocks"),
        (dict(kv_cache_memory=10), "holds no KV block"),
        (dict(num_blocks=4, kv_cache_memory=10**6), "not both"),
        (dict(max_num_seqs=8, max_num_batched_tokens=4), "max_num_batched_tokens"),
    ],
)
def test_bad_engine_options(setup, kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        Engine(setup["bank"], setup["tok"], **kw)


def test_static_decode_buckets_equal_taskbank_alone(setup) -> None:
    """The CUDA-graph decode path's static buffers, run eagerly on the CPU: padded to
    buckets 1/2/4 (padding rows on the scratch slot), 6 rows (5-6 decoding rows exceed the
    largest bucket and fall back to the dynamic path); the same tokens as the row alone."""
    with single_thread():
        bank = setup["bank"]
        ps = prompts(setup["vocab"], [3, 14, 6, 1, 9, 20, 4], seed=9)
        tasks = ["p33", "base", "soft", "p1", "p7", "p33", "base"]
        eng = engine_for(setup, max_num_seqs=6, max_num_batched_tokens=24,
                         decode_buckets=(1, 2, 4))  # fmt: skip
        assert eng.pool.scratch_block == eng.pool.num_blocks
        reqs = [request(t, p, max_tokens=4 + i) for i, (t, p) in enumerate(zip(tasks, ps))]
        run(eng, reqs)
        eos = setup["tok"].eos_token_id
        for r in reqs:
            assert r.sink.ids == alone(bank, r.task, r.prompt_ids, r.params.max_tokens, eos)
        assert eng.graphs.graphs == {}  # nothing captured off CUDA
        assert 0 < eng.graphs.steps < eng.metrics()["steps"]["count"]
        assert eng.graphs.eager_steps == eng.graphs.steps and eng.graphs.replays == 0


def test_pick_bucket_and_bad_buckets(setup) -> None:
    from prefixattn.serve.engine.cuda_graphs import DecodeGraphs, pick_bucket

    assert [pick_bucket(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, None]
    eng = engine_for(setup)
    with pytest.raises(ValueError, match="scratch block"):
        DecodeGraphs(eng.runner, (1, 2))
    eng = engine_for(setup, decode_buckets=(1, 2))
    for bad in ((), (2, 1), (0, 1), (1, 1)):
        with pytest.raises(ValueError, match="buckets"):
            DecodeGraphs(eng.runner, bad)


@pytest.mark.parametrize("n_new, starts", [(1, [3, 0, 33]), (1, [16]), (5, [14])])
def test_paged_cache_writes_each_token_into_its_block(n_new, starts) -> None:
    """PagedCache.update against plain indexing: token j of row b lands in block
    block_table[b, j // 16] at offset j % 16; other blocks and layers untouched; the
    attention gets the whole pool."""
    from prefixattn.serve.engine.kv_cache import PagedCache, PagedKVPool, StepLayout

    torch.manual_seed(0)
    pool = PagedKVPool(2, 2, 5, num_blocks=8, block_size=16, dtype=torch.float64, device="cpu")
    for t in pool.keys + pool.values:
        t.normal_()
    before = [t.clone() for t in pool.keys]
    tables = [[5, 2, 7], [1, 0, 0], [3, 6, 4]][: len(starts)]
    cache = PagedCache(pool)
    kv_len = max(starts) + n_new
    layout = StepLayout(torch.tensor(tables, dtype=torch.int32), torch.tensor(starts), n_new,
                        kv_len)  # fmt: skip
    cache.set_step(layout)
    new_k = torch.randn(len(starts), 2, n_new, 5, dtype=torch.float64)
    k, v = cache.update(new_k, new_k + 1, 1)
    want = before[1].clone()
    for b, a in enumerate(starts):
        for i in range(n_new):
            j = a + i
            want[tables[b][j // 16], :, j % 16] = new_k[b, :, i]
    torch.testing.assert_close(pool.keys[1], want, rtol=0, atol=0)
    torch.testing.assert_close(pool.keys[0], before[0], rtol=0, atol=0)  # other layer
    assert k is pool.keys[1] and v is pool.values[1]
    assert layout.cache_seqlens.tolist() == [a + n_new for a in starts]
    assert cache.get_seq_length() == kv_len - n_new and cache.get_mask_sizes(n_new, 0) == (
        kv_len, 0)  # fmt: skip
    with pytest.raises(ValueError, match="block_size"):
        PagedKVPool(1, 1, 4, num_blocks=2, block_size=12, dtype=torch.float32, device="cpu")
