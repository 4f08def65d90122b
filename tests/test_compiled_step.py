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
    assert len(seen) == len(g.buckets) * len(g.block_buckets) == len(g.compiled)
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
        assert st["compile_s"] > 0 and set(st["compile_s_by_bucket"]) == {
            f"B{b}/M{m}" for b in (2, 4) for m in (2, 4, 5)
        }
        # every decode step ran compiled, none waited for or refused a compile
        assert st["decode_steps"] > 0 and st["replays"] == st["decode_steps"]
        assert st["eager_steps"] == 0 and st["refused_recompiles"] == 0
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
