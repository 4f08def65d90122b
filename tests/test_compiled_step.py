"""The engine's compiled decode step (``Engine(compile=True)``, :mod:`prefixattn.serve.engine.compiled`).

* the buckets: batch buckets start at 2, block buckets are 2, 4, ... up to the table;
* (slow: one Inductor compile of the tiny llama) greedy tokens of a mixed batch of tasks,
  rows crossing block buckets, equal the eager engine's; every decode step ran compiled
  (no step waited for a compile, none refused), the compile time is reported; a bank of
  another shape runs its steps eagerly, counted, with the eager logits.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from test_cpu_linear import cxx_compiler
from test_engine import prompts, request, run

from prefixattn import PrefixTuning, TaskBank
from prefixattn.hf.testing import single_thread
from prefixattn.serve.engine import Engine
from prefixattn.serve.engine.compiled import CompiledDecode, block_buckets, compile_batch_buckets
from prefixattn.tiny import tiny_model, tiny_tokenizer


def _bank(lengths=(4, 9)) -> tuple[TaskBank, object]:
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), arch="llama")
    bank = TaskBank(model, backend="sdpa")
    bank.add_base("base")
    for i, P in enumerate(lengths):
        torch.manual_seed(30 + i)
        bank.add(f"t{P}", PrefixTuning(copy.deepcopy(model), P, init="random", backend="sdpa"))
    return bank, tok


def test_buckets_start_at_two_and_cover_the_table() -> None:
    assert block_buckets(1) == (2,)
    assert block_buckets(5) == (2, 4, 5)
    assert block_buckets(64) == (2, 4, 8, 16, 32, 64)
    assert compile_batch_buckets((1, 2, 4, 5)) == (2, 4, 5)
    bank, tok = _bank()
    eng = Engine(bank, tok, max_num_seqs=5, max_model_len=80, compile=True)
    assert isinstance(eng.graphs, CompiledDecode)
    assert eng.graphs.buckets == (2, 4, 5) and eng.graphs.block_buckets == (2, 4, 5)
    assert eng.graph_stats()["compiled_buckets"] == 0  # nothing compiled before start()
    with pytest.raises(ValueError, match="budget_s"):
        Engine(bank, tok, compile=True, compile_budget_s=0)


def test_a_path_noted_eagerly_after_compiling_needs_no_recompile() -> None:
    """The sdpa path log's set of seen paths is not read while tracing (no guard on it)."""
    from prefixattn.ops import sdpa_features

    def f(x: torch.Tensor) -> torch.Tensor:
        sdpa_features.note_path("test-path")
        return x + 1

    saved = set(sdpa_features._seen)
    sdpa_features._seen.discard("test-path")
    try:
        torch._dynamo.reset()
        fn = torch.compile(f, backend="eager", fullgraph=True)
        fn(torch.zeros(2))
        sdpa_features.note_path("test-path")  # an eager call notes it
        with torch.compiler.set_stance("fail_on_recompile"):
            assert fn(torch.zeros(2)).tolist() == [1.0, 1.0]
    finally:
        sdpa_features._seen.clear()
        sdpa_features._seen.update(saved)


def test_capture_compiles_one_kernel_at_a_time_and_restores_the_setting() -> None:
    """Every bucket is compiled with Inductor's ``compile_threads`` at 1 (one C++ compiler
    process: the start-up peak memory); the user's setting is back afterwards."""
    import torch._inductor.config as inductor_config

    bank, tok = _bank()
    eng = Engine(bank, tok, max_num_seqs=2, max_model_len=32, compile=True)
    g = eng.graphs
    seen = []

    def record(ids: torch.Tensor, positions: torch.Tensor, k: int) -> torch.Tensor:
        seen.append(inductor_config.compile_threads)
        return eng.runner.model_call(ids, positions, k)  # eager: no compile in this test

    g.fn = record
    before = inductor_config.compile_threads
    with inductor_config.patch(compile_threads=max(before, 2)):
        g.capture(bank.snapshot())
        after = inductor_config.compile_threads
    assert seen and set(seen) == {1}, seen
    assert len(g.compiled) == len(g.buckets) * len(g.block_buckets)
    assert len(seen) == len(g._warm_shapes()) > len(g.compiled)  # and a mixed step's shape
    assert after == max(before, 2)


@pytest.mark.slow
def test_compiled_engine_greedy_tokens_equal_the_eager_engine() -> None:
    with single_thread():
        bank, tok = _bank()
        # prompts of 3..40 tokens + 30 new: rows of 1..5 blocks (block buckets 2, 4, 5)
        ps = prompts(len(tok), [3, 17, 30, 9, 40], seed=1)
        tasks = ["base", "t4", "t9", "t4", "t9"]
        outs, engines = {}, {}
        for compiled in (False, True):
            eng = Engine(bank, tok, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=80,
                         seed=0, compile=compiled)  # fmt: skip
            reqs = [request(t, p, max_tokens=30, ignore_eos=True) for t, p in zip(tasks, ps)]
            run(eng, reqs, timeout=1800)
            outs[compiled], engines[compiled] = [r.sink.ids for r in reqs], eng
        assert outs[True] == outs[False]
        st = engines[True].graph_stats()
        assert st["mode"] == "torch.compile" and st["compiled_buckets"] == 6
        decode_keys = {k for k in st["compile_s_by_bucket"] if not k.startswith("mixed")}
        assert st["compile_s"] > 0 and decode_keys == {
            f"B{b}/M{m}" for b in (2, 4) for m in (2, 4, 5)
        }
        # steps with prefill chunks ran compiled too (one row per token), none refused
        assert st["mixed_steps"] > 0 and not any(st["mixed_eager"].values()), st["mixed_eager"]
        assert any(k.startswith("mixed") for k in st["compile_s_by_bucket"])
        # every decode step ran compiled, none waited for or refused a compile
        assert st["decode_steps"] > 0 and st["replays"] == st["decode_steps"]
        assert st["eager_steps"] == 0 and st["refused_recompiles"] == 0
        # the graph's linear ops ran in C++ (no Python between its kernels), where a
        # compiler could build them; said either way
        if cxx_compiler():
            assert st["linear_ops"] == "c++", st["linear_ops"]
            assert st["linear_ops_calls"]["native_calls"] > 0, st["linear_ops_calls"]
        else:
            assert st["linear_ops"].startswith("python ("), st["linear_ops"]
        assert sum(st["steps_by_blocks"].values()) == st["decode_steps"]
        assert sum(1 for n in st["steps_by_blocks"].values() if n) >= 2  # crossed buckets

        # a bank of another shape (a longer prefix): its steps run eagerly, counted, and
        # give the eager forward's logits (not a graph compiled for the old shape)
        eng = engines[True]
        g = eng.graphs
        bank.add("t12", PrefixTuning(copy.deepcopy(bank.model), 12, init="random", backend="sdpa"))
        snap = bank.snapshot()
        assert g.stale(snap)
        B, M = 2, 2
        g._reset()
        g.block_table[:B, :M] = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
        g.starts[:B] = torch.tensor([20, 5])
        g.positions[:B, 0] = g.starts[:B]
        g.ids[:B, 0] = torch.tensor([7, 9])
        g.prefix_index[:B] = torch.tensor([snap.names.index("t12"), 0])
        with torch.no_grad():
            want = g._static_forward(B, M, snap, compiled=False)

        class _Row:  # what decode() reads of a row
            def __init__(self, b: int) -> None:
                self.last_token, self.next_position = int(g.ids[b, 0]), int(g.starts[b])
                self.num_computed, self.blocks = int(g.starts[b]), g.block_table[b, :M].tolist()
                self.task = snap.names[int(g.prefix_index[b])]

        eager_before = g.eager_steps
        with torch.no_grad():
            got = g.decode([_Row(0), _Row(1)], snap)
        assert g.eager_steps == eager_before + 1 and g.key_misses >= 1
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_compiled_step_asks_inductor_to_compute_reused_results_once() -> None:
    """The pinned torch's Inductor has the knob the compiled step sets (a rotary q / k
    computed once into a buffer, not inside every loop that reads it: see compiled.py);
    a torch without it compiles with its defaults instead of failing."""
    import torch._inductor.config as inductor_config

    from prefixattn.serve.engine import compiled

    assert hasattr(inductor_config, "realize_opcount_threshold")
    assert compiled._realize_options() == {
        "realize_opcount_threshold": compiled.REALIZE_OPCOUNT_THRESHOLD
    }


@pytest.mark.parametrize("family", ["tiny-llama", "mistral", "gemma2", "qwen2"])
def test_mixed_steps_one_row_per_token_equal_the_packed_forward(family) -> None:
    """Steps with prefill chunks run the compiled step's static forward, one row per new
    token with the LM head on the wanted rows only: its logprobs equal the packed forward's
    (float64 model; the graph's function left eager here: the slow test below compiles);
    prompt logprobs, too many rows, too much attention run the packed forward, counted.
    RoPE GQA (llama), a sliding window of 8 that the prompts cross (mistral), hybrid
    windows + soft-capped logits after the head (gemma2), a window on some layers (qwen2)."""
    from test_families import build

    with single_thread():
        if family == "tiny-llama":
            tok = tiny_tokenizer()
            model = tiny_model(len(tok), arch="llama").double()
        else:
            tok, model = None, build(family).double()
        vocab = model.config.vocab_size
        bank = TaskBank(model, backend="sdpa")
        bank.add_base("base")
        for i, P in enumerate((1, 7)):
            torch.manual_seed(40 + i)
            pt = PrefixTuning(copy.deepcopy(model), P, init="random", backend="sdpa")
            bank.add(f"t{P}", pt)
        # prompts of 1..33 tokens over 2 tasks and the base: chunks of 1..24 tokens (budget
        # 24), decode rows beside them, rows over 1..4 blocks of 16
        ps = prompts(vocab, [5, 33, 1, 17, 9, 24], seed=3)
        tasks = ["t7", "base", "t1", "t7", "base", "t1"]
        outs, engines = {}, {}
        for compiled in (False, True):
            eng = Engine(bank, tok, max_num_seqs=3, max_num_batched_tokens=24, max_model_len=64,
                         seed=0, compile=compiled)  # fmt: skip
            if compiled:
                eng.graphs.fn = eng.runner.model_call  # the traced function, run eagerly
            reqs = [request(t, p, max_tokens=7, ignore_eos=True, logprobs=3)
                    for t, p in zip(tasks, ps)]  # fmt: skip
            reqs.append(request("t1", ps[0], max_tokens=2, prompt_logprobs=2))
            run(eng, reqs, timeout=300)
            outs[compiled] = [(r.sink.ids, r.sink.tokens) for r in reqs]
            engines[compiled] = eng
        st = engines[True].graph_stats()
        assert st["mixed_steps"] > 0 and st["mixed_tokens"] > st["mixed_steps"], st
        assert st["mixed_eager"]["prompt_logprobs"] >= 1, st["mixed_eager"]
        assert st["mixed_eager"]["recompile"] == 0 and st["mixed_eager"]["head"] == 0
        for (ids0, outs0), (ids1, outs1) in zip(outs[False], outs[True]):
            assert ids0 == ids1
            for a, b in zip(outs0, outs1):
                assert a.token_id == b.token_id
                assert a.logprob == pytest.approx(b.logprob, abs=1e-9)
                assert (a.top is None) == (b.top is None)
                if a.top is not None:
                    assert [t for t, _ in a.top] == [t for t, _ in b.top]
                    assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=1e-9)
        assert engines[True].metrics()["steps"]["mixed_steps"] > 0  # chunks beside decode rows


def test_mixed_steps_the_compiled_step_does_not_take_say_why() -> None:
    """Prompt logprobs, more rows than the budget, attention over too many keys, a bank of
    another shape: None (the engine's packed forward runs the step), counted by reason;
    nothing is written to the rows."""
    bank, tok = _bank()
    eng = Engine(bank, tok, max_num_seqs=2, max_num_batched_tokens=40, max_model_len=512,
                 compile=True)  # fmt: skip
    g = eng.graphs
    g.fn = eng.runner.model_call  # no Inductor here
    snap = bank.snapshot()
    g.capture(snap)
    assert g.head_reads_rows is True
    assert g.max_tokens == 40 and g.attention_budget == max(2 * 32 * 16, 4096)

    class _Row:  # what mixed() reads of a row
        def __init__(self, n_blocks: int, n_tokens: int, task: str = "t4") -> None:
            self.blocks, self.token_ids = list(range(n_blocks)), list(range(5, 5 + n_tokens))
            self.num_computed, self.next_position, self.last_token = 0, 0, 5
            self.task = task

    def refused(decode: list, chunks: list, snapshot=snap) -> dict:
        before = dict(g.mixed_eager)
        assert g.mixed(decode, chunks, snapshot) is None
        assert all(r.num_computed == 0 for r in [*decode, *(r for r, _, _ in chunks)])
        return {k: v - before[k] for k, v in g.mixed_eager.items() if v != before[k]}

    assert refused([], [(_Row(1, 9), 9, True)]) == {"prompt_logprobs": 1}
    assert refused([_Row(1, 1)], [(_Row(3, 40), 40, False)]) == {"tokens": 1}
    # 32 rows over 16 blocks of 16: 8192 row-keys > 4096
    assert refused([], [(_Row(16, 32), 32, False)]) == {"attention": 1}
    bank.add("t12", PrefixTuning(copy.deepcopy(bank.model), 12, init="random", backend="sdpa"))
    assert refused([], [(_Row(1, 9), 9, False)], bank.snapshot()) == {"not_compiled": 1}
    # one that fits runs: the rows advance
    row = _Row(1, 9)
    with torch.no_grad():
        got = g.mixed([], [(row, 9, False)], snap)
    assert got is not None and got[0].shape[0] == 0 and got[1][0].shape == (1, len(tok))
    assert row.num_computed == 9 and g.mixed_steps == 1 and g.mixed_tokens == 9


def test_the_step_keeps_shape_tensor_and_value_guards_and_drops_the_module_structure() -> None:
    """The compiled step's guard filter (``keep_guard``): a global module hook registered
    after capture (a guard on the Python structure, dropped) needs no recompile; a bank of
    another shape handed straight to the graph (tensor / shape guards, kept) is refused,
    counted, never run on the old graph."""
    from prefixattn.serve.engine import compiled

    assert compiled._compile_options()["guard_filter_fn"] is compiled.keep_guard
    bank, tok = _bank()
    eng = Engine(bank, tok, max_num_seqs=2, max_model_len=32, compile=True)
    g = eng.graphs
    torch._dynamo.reset()
    g.fn = torch.compile(eng.runner.model_call, backend="eager", fullgraph=True,
                         options={"guard_filter_fn": compiled.keep_guard})  # fmt: skip
    snap = bank.snapshot()
    with torch.no_grad():
        g.capture(snap)
        B, M = 2, 2
        # a global module pre-hook (a tracer's, say): dict-keys guards, dropped
        handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda *a: None)
        try:
            assert g._try_compiled(B, M, snap) is not None
            assert g.refused_recompiles == 0
        finally:
            handle.remove()
        bank.add("t12", PrefixTuning(copy.deepcopy(bank.model), 12, init="random", backend="sdpa"))
        assert g._try_compiled(B, M, bank.snapshot()) is None
        assert g.refused_recompiles == 1
