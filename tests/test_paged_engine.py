"""The engine's paged KV cache, shared task prefixes, preemption and prefix caching.

* every family of docs/model-families.md (tiny random configs, W = 8 on the windowed
  ones): greedy rows of a mixed batch of tasks with different P, prompt + output well
  past the window and over several 16-token blocks, some starting from prefix-cache hits,
  equal ``PrefixTuning.generate`` of the row alone;
* a row's KV memory holds only its own tokens (P = 64 and P = 0 rows use the same
  blocks; the prefix is one copy in the bank);
* a pool too small for every row: the newest is preempted, recomputed, outputs exact;
* prefix caching: hits on a shared system prompt, the same outputs with caching off,
  no hit for the same text under another task;
* the block pool's bookkeeping (ref counts, LRU eviction of cached blocks).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from test_engine import Sink, alone, prompts, request, run
from test_families import FAMILIES, W, build

from prefixattn import PrefixTuning, TaskBank
from prefixattn.hf.testing import single_thread
from prefixattn.serve.engine import Engine
from prefixattn.serve.engine.block_pool import BlockPool, hash_blocks
from prefixattn.serve.engine.request import LENGTH, STOP, GenRequest, SamplingParams, TokenOut
from prefixattn.tiny import tiny_model, tiny_tokenizer

EOS = 1  # the families' eos_token_id


def family_bank(family: str, lengths: dict[str, int]) -> tuple[TaskBank, dict]:
    model = build(family)
    bank = TaskBank(model, backend="sdpa")
    bank.add_base("base")
    tuners = {}
    for i, (name, P) in enumerate(lengths.items()):
        torch.manual_seed(10 + i)
        tuners[name] = PrefixTuning(copy.deepcopy(model), P, init="random", backend="sdpa")
        bank.add(name, tuners[name])
    return bank, tuners


def pt_alone(tuner: PrefixTuning | None, model, ids: list[int], n: int) -> list[int]:
    """Greedy ``PrefixTuning.generate`` (the base model's for None) of one row, cut at EOS."""
    x = torch.tensor([ids])
    gen = model.generate if tuner is None else tuner.generate
    out = gen(input_ids=x, max_new_tokens=n, do_sample=False, eos_token_id=EOS, pad_token_id=EOS)
    new = out[0, x.shape[1] :].tolist()
    return new[: new.index(EOS)] if EOS in new else new


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_mixed_tasks_past_the_window_equal_prefix_tuning_alone(family) -> None:
    with single_thread():
        bank, tuners = family_bank(family, {"a": 3, "b": 12})
        vocab = bank.model.config.vocab_size
        eng = Engine(bank, None, max_num_seqs=3, max_num_batched_tokens=12, max_model_len=64,
                     seed=0)  # fmt: skip
        shared = prompts(vocab, [20], seed=3)[0]  # 1 full block + 4: a cacheable prefix
        ps = prompts(vocab, [5, 13, 22, 9], seed=4)
        first = [request(t, p, max_tokens=14) for t, p in zip(["a", "b", "base", "a"], ps)]
        run(eng, first)
        # then "b" rows sharing their first 16 tokens: the later one's first block comes
        # from the prefix cache (prefill over cached pages); "a" with that text: no hit
        again = [request("b", [*shared, 7, 8], max_tokens=12)]
        run(eng, again)
        more = [request("b", [*shared, 9], max_tokens=12), request("a", shared, max_tokens=12)]
        run(eng, more)
        for r in first + again + more:
            tuner = tuners.get(r.task)
            want = pt_alone(tuner, bank.model, r.prompt_ids, r.params.max_tokens)
            assert r.sink.ids == want, (family, r.task, len(r.prompt_ids))
            assert len(r.prompt_ids) + len(want) > W or not FAMILIES[family][2].get(
                "sliding_window"
            )  # fmt: skip
        m = eng.metrics()
        assert m["prefix_cache"]["hits"] >= 1  # "b" hit its block; "a" (other task) did not
        assert m["kv_cache"]["blocks_used"] == 0
        # some steps packed decode rows and prefill chunks into one forward
        assert m["steps"]["mixed_steps"] >= 1


@pytest.mark.parametrize("family", ["gemma2", "qwen2", "llama"])
def test_packed_steps_give_each_rows_logits_alone_in_float64(family) -> None:
    """Every logit the packed steps compute (decode rows and prefill chunks of several
    tasks in one forward, prompt logprobs asking every chunk token's logits) equals the
    float64 forward of that row's tokens alone through its PrefixTuning (no cache, no
    packing): hybrid windows + soft-capping (gemma2), a window on some layers (qwen2), GQA
    (llama). (gpt-oss's sinks: its experts' grouped matmul has no float64; its greedy
    tokens are checked by the family tests above and the attention by test_varlen.)"""
    with single_thread():
        model = build(family).double()
        bank = TaskBank(model, backend="sdpa")
        bank.add_base("base")
        tuners = {}
        for i, (name, P) in enumerate({"a": 3, "b": 12}.items()):
            torch.manual_seed(20 + i)
            tuners[name] = PrefixTuning(copy.deepcopy(model), P, init="random", backend="sdpa")
            bank.add(name, tuners[name])
        eng = Engine(bank, None, max_num_seqs=4, max_num_batched_tokens=20, max_model_len=64,
                     seed=0)  # fmt: skip
        seen = []  # (task, the tokens fed so far, logits [K, V], how many tokens K covers)
        step = eng.runner.step

        def recording(decode, prefill, snapshot):
            before = [(r.task, list(r.token_ids[: r.num_computed + 1])) for r in decode]
            chunks = [(r.task, r.token_ids[: r.num_computed + n], n, w) for r, n, w in prefill]
            dec, outs = step(decode, prefill, snapshot)
            seen.extend((t, ids, lg[None], 1) for (t, ids), lg in zip(before, dec))
            seen.extend((t, ids, lg, n if w else 1) for (t, ids, n, w), lg in zip(chunks, outs))
            return dec, outs

        eng.runner.step = recording
        vocab = model.config.vocab_size
        ps = prompts(vocab, [5, 23, 9, 30, 2], seed=8)
        lp = [None, None, None, 2, None]  # row 3 asks prompt logprobs: every chunk token
        reqs = [
            request(t, p, max_tokens=n, ignore_eos=True, prompt_logprobs=k)
            for t, p, n, k in zip(["a", "b", "base", "a", "b"], ps, [9, 6, 12, 3, 10], lp)
        ]
        run(eng, reqs)
        assert eng.metrics()["steps"]["mixed_steps"] >= 1
        assert any(k > 1 for *_, k in seen)  # prompt logprobs: a whole chunk's logits
        for task, ids, logits, k in seen:
            fwd = bank.model if task == "base" else tuners[task]
            with torch.no_grad():
                want = fwd(input_ids=torch.tensor([ids])).logits[0, -k:]  # [k, V]
            # float64 all the way; the engine hands out float32 logits (its rounding only)
            torch.testing.assert_close(logits.double(), want, atol=1e-6, rtol=1e-6)


def test_kv_bytes_per_row_do_not_grow_with_the_tasks_prefix() -> None:
    """16 rows of a P = 64 task hold the blocks 16 rows of the base model hold; the prefix
    is the bank's one copy (its bytes counted once, in ``prefix``)."""
    with single_thread():
        tok = tiny_tokenizer()
        model = tiny_model(len(tok), arch="llama")
        bank = TaskBank(model)
        bank.add_base("base")
        bank.add("p64", PrefixTuning(copy.deepcopy(model), 64, init="random"))
        ps = prompts(len(tok), [9] * 16, seed=5)
        seen = {}
        for task in ("p64", "base"):
            eng = Engine(bank, tok, max_num_seqs=16, max_num_batched_tokens=256,
                         max_model_len=64, seed=0, enable_prefix_caching=False)  # fmt: skip
            peak = {"bytes": 0.0, "blocks": 0}
            reqs = [GenRequest(task, p, SamplingParams(max_tokens=4, ignore_eos=True),
                               PeakSink(eng, peak)) for p in ps]  # fmt: skip
            run(eng, reqs)
            seen[task] = dict(peak)
            prefix = eng.metrics()["prefix"]
        assert seen["p64"]["blocks"] == seen["base"]["blocks"] == 16  # 9 + 4 tokens: 1 block
        assert seen["p64"]["bytes"] == seen["base"]["bytes"] == eng.pool.bytes_per_block
        g = bank.geometry
        one = g.num_layers * 2 * g.num_kv_heads * 64 * g.head_dim * 4  # float32, one copy
        assert prefix["bytes"] == 2 * one and prefix["copies_per_task"] == 1  # 2 bank rows


class PeakSink(Sink):
    """Records the KV metrics at the step with the most blocks in use."""

    def __init__(self, engine: Engine, peak: dict) -> None:
        super().__init__(engine)
        self.peak = peak

    def token(self, out: TokenOut) -> bool:
        m = self.engine.metrics()["kv_cache"]
        if m["blocks_used"] >= self.peak["blocks"]:
            self.peak.update(bytes=m["bytes_per_running_row"], blocks=m["blocks_used"])
        return super().token(out)


def _tiny_bank():
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), arch="gpt2")
    bank = TaskBank(model)
    bank.add_base("base")
    for i, P in enumerate((4, 9)):
        torch.manual_seed(30 + i)
        bank.add(f"t{P}", PrefixTuning(copy.deepcopy(model), P, init="random"))
    return bank, tok


def test_a_pool_too_small_preempts_the_newest_and_recomputes_exactly() -> None:
    with single_thread():
        bank, tok = _tiny_bank()
        ps = prompts(len(tok), [10, 14, 6, 12], seed=6)
        tasks = ["t4", "t9", "base", "t4"]
        # 4 rows of up to 14 + 40 tokens (4 blocks each) in 8 blocks: rows must give way
        eng = Engine(bank, tok, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64,
                     num_blocks=8, seed=0)  # fmt: skip
        reqs = [request(t, p, max_tokens=40, ignore_eos=True) for t, p in zip(tasks, ps)]
        run(eng, reqs, timeout=120)
        for r in reqs:
            x = torch.tensor([r.prompt_ids])
            out = bank.generate([r.task], input_ids=x, max_new_tokens=40, do_sample=False,
                                eos_token_id=None)  # fmt: skip
            assert r.sink.ids == out[0, x.shape[1] :].tolist(), r.task
            assert r.sink.finished == [(LENGTH, None)]
        m = eng.metrics()
        assert m["kv_cache"]["preemptions"] > 0 and m["kv_cache"]["blocks_used"] == 0
        assert eng.kv.num_free_blocks == 8


def test_prefix_caching_hits_a_shared_system_prompt_and_changes_no_output() -> None:
    with single_thread():
        bank, tok = _tiny_bank()
        system = prompts(len(tok), [40], seed=7)[0]  # 2 full blocks + 8
        tails = prompts(len(tok), [3, 7, 5, 11], seed=8)
        outs = {}
        for caching in (True, False):
            eng = Engine(bank, tok, max_num_seqs=2, max_num_batched_tokens=32,
                         max_model_len=96, seed=0, enable_prefix_caching=caching)  # fmt: skip
            warm = [request("t9", [*system, 5], max_tokens=6)]
            run(eng, warm)
            reqs = [request("t9", system + t, max_tokens=8) for t in tails]
            other = [request("t4", system + tails[0], max_tokens=8)]  # same text, other task
            run(eng, reqs)
            before = eng.metrics()["prefix_cache"]["hits"]
            run(eng, other)
            m = eng.metrics()
            outs[caching] = [r.sink.ids for r in warm + reqs + other]
            if caching:
                assert m["prefix_cache"]["hits"] == before == 2 * len(tails)  # 2 blocks each
                assert m["prefix_cache"]["cached_prompt_tokens"] == 32 * len(tails)
                assert 0 < m["prefix_cache"]["hit_rate"] < 1
                # every prompt token is prefilled once, except the cached ones
                total = sum(len(r.prompt_ids) for r in warm + reqs + other)
                assert m["steps"]["prefill_tokens"] == total - 32 * len(tails)
            else:
                assert m["prefix_cache"]["hits"] == 0 and not m["prefix_cache"]["enabled"]
        assert outs[True] == outs[False]
        for r, ids in zip(warm + reqs + other, outs[True]):
            assert ids == alone(bank, r.task, r.prompt_ids, r.params.max_tokens, tok.eos_token_id)


def test_a_replaced_task_ends_its_running_rows_and_its_cache_entries_are_stale() -> None:
    """The cache key holds a digest of the task's prefix: the same name with another
    prefix hits nothing, and its rows get the new prefix's outputs."""
    with single_thread():
        bank, tok = _tiny_bank()
        p = prompts(len(tok), [33], seed=9)[0]
        eng = Engine(bank, tok, max_num_seqs=2, max_model_len=96, seed=0)
        run(eng, [request("t4", p, max_tokens=3)])
        torch.manual_seed(99)
        bank.add("t4", PrefixTuning(copy.deepcopy(bank.model), 4, init="random"))
        r = request("t4", p, max_tokens=5)
        run(eng, [r])
        assert eng.metrics()["prefix_cache"]["hits"] == 0
        assert r.sink.ids == alone(bank, "t4", p, 5, tok.eos_token_id)
        assert r.finish_reason in (LENGTH, STOP)


def test_block_pool_ref_counts_and_lru_eviction() -> None:
    pool = BlockPool(4)
    a = pool.allocate(2)
    hs = hash_blocks(("task", 0), list(range(40)), 16)
    assert len(hs) == 2 and hs != hash_blocks(("other", 0), list(range(40)), 16)
    pool.cache(a[0], hs[0])
    pool.cache(a[1], hs[1])
    assert pool.lookup(hs) == a and pool.num_free == 2
    pool.touch(a[:1])  # a second row shares block a[0]
    pool.free(a)  # the first row ends: a[1] parks, a[0] still held
    assert pool.ref_cnt[a[0]] == 1 and pool.num_free == 3
    pool.free(a[:1])
    assert pool.num_free == 4 and pool.lookup(hs) == a  # cached, reusable
    got = pool.allocate(3)  # the never-used blocks first, then the least recently freed
    assert a[1] in got and a[0] not in got and pool.lookup(hs) == a[:1]
    assert pool.evictions == 1
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free([a[0]])
    with pytest.raises(RuntimeError, match="asked for"):
        pool.allocate(2)


@pytest.mark.parametrize("family", sorted(FAMILIES))  # every family of docs/model-families.md
def test_http_greedy_mixed_tasks_past_the_window_equal_prefix_tuning_alone(family) -> None:
    """Through the real server (uvicorn on 127.0.0.1, the openai client): concurrent
    greedy completions of tasks with P = 3 and 12 and the base model, prompt + output past
    the window; each text = the tokenizer's decoding of ``PrefixTuning.generate`` alone."""
    import concurrent.futures

    import transformers
    from serve_support import Server

    openai = pytest.importorskip("openai")
    from prefixattn.serve import create_app

    with single_thread():
        tok = tiny_tokenizer()
        model_name, config_name, kw, _ = FAMILIES[family]
        torch.manual_seed(0)
        cfg = getattr(transformers, config_name)(**{
            **kw, "vocab_size": len(tok), "eos_token_id": tok.eos_token_id,
            "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id,
        })  # fmt: skip
        model = getattr(transformers, model_name)._from_config(cfg).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".sinks"):
                    p.copy_(torch.randn(p.shape) * 0.5)
        tuners = {}
        for i, P in enumerate((3, 12)):
            torch.manual_seed(40 + i)
            tuners[f"t{P}"] = PrefixTuning(copy.deepcopy(model), P, init="random", backend="sdpa")
        app = create_app(copy.deepcopy(model), tok, tuners, model_name="base", max_num_seqs=4,
                         max_num_batched_tokens=16, backend="sdpa")  # fmt: skip
        ps = prompts(len(tok), [6, 19, 11, 25, 9, 14], seed=12)
        tasks = ["t3", "t12", "base", "t12", "t3", "base"]
        with Server(app) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)

            def one(i: int) -> str:
                r = client.completions.create(model=tasks[i], prompt=ps[i], max_tokens=14,
                                              temperature=0)  # fmt: skip
                return r.choices[0].text

            with concurrent.futures.ThreadPoolExecutor(6) as pool:
                texts = list(pool.map(one, range(len(ps))))
        eos = tok.eos_token_id
        for task, p, text in zip(tasks, ps, texts):
            x = torch.tensor([p])
            gen = (model if task == "base" else tuners[task]).generate
            out = gen(input_ids=x, max_new_tokens=14, do_sample=False, eos_token_id=eos,
                      pad_token_id=eos)[0, x.shape[1]:].tolist()  # fmt: skip
            out = out[: out.index(eos)] if eos in out else out
            assert text == tok.decode(out, skip_special_tokens=True), (family, task, len(p))
        assert len(set(texts)) > 3  # the tasks really differ


def test_a_task_removed_while_its_row_runs_ends_that_row_only() -> None:
    """Rows hold task names, resolved in every step: removing a task (the bank rebuilt,
    indices shifted) ends its running row with an error and misroutes no other row."""
    import time

    with single_thread():
        bank, tok = _tiny_bank()
        p = prompts(len(tok), [7], seed=13)[0]
        eng = Engine(bank, tok, max_num_seqs=4, max_model_len=128, seed=0)
        doomed = request("t4", p, eng, max_tokens=100, ignore_eos=True)
        keep = request("t9", p, eng, max_tokens=24, ignore_eos=True)
        eng.submit(doomed)
        eng.submit(keep)
        eng.start()
        try:
            deadline = time.monotonic() + 60
            while len(doomed.sink.tokens) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.002)
            with eng.model_lock:  # between steps
                bank.remove("t4")  # "t9" moves up in the bank's order
            assert doomed.sink.done.wait(60) and keep.sink.done.wait(60)
        finally:
            eng.stop()
        assert bank.tasks == ["base", "t9"]
        (reason, error), = doomed.sink.finished  # fmt: skip
        assert reason == "error" and "removed or replaced" in error
        x = torch.tensor([p])
        want = bank.generate(["t9"], input_ids=x, max_new_tokens=24, do_sample=False,
                             eos_token_id=None)[0, 7:].tolist()  # fmt: skip
        assert keep.sink.ids == want and eng.kv.num_free_blocks == eng.pool.num_blocks


@pytest.mark.parametrize("buckets", [None, (1, 2, 4)], ids=["dynamic", "static"])
def test_paged_steps_through_the_triton_kernel(buckets) -> None:
    """The Triton kernel (the interpreter on the CPU) reads the pages in place and the
    bank prefixes through prefix_index: decode batches (dynamic and the static CUDA-graph
    buffers) and prefill chunks over cached pages (a prefix-cache hit); the same greedy
    tokens as TaskBank.generate of each row alone (sdpa)."""
    from prefixattn.hf.patching import patch

    with single_thread():
        bank, tok = _tiny_bank()
        shared = prompts(len(tok), [17], seed=14)[0]
        ps = [[*shared, 5], prompts(len(tok), [6], seed=15)[0], [*shared, 9, 4]]
        tasks = ["t9", "base", "t9"]
        want = [alone(bank, t, p, 4, tok.eos_token_id) for t, p in zip(tasks, ps)]
        patch(bank.model, "triton")
        try:
            eng = Engine(bank, tok, max_num_seqs=2, max_num_batched_tokens=8, max_model_len=48,
                         seed=0, decode_buckets=buckets)  # fmt: skip
            reqs = [request(t, p, max_tokens=4) for t, p in zip(tasks, ps)]
            run(eng, reqs[:2])
            run(eng, reqs[2:])
        finally:
            patch(bank.model, "auto")
        for r, w in zip(reqs, want):
            assert r.sink.ids == w, r.task
        m = eng.metrics()
        assert m["prefix_cache"]["hits"] == 1 and m["steps"]["decode_tokens"] > 0
