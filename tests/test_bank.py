"""TaskBank: a mixed-task batch in one pass equals every row run alone with its own prefix."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from prefixattn import PrefixTuning, TaskBank
from prefixattn.hf import patching
from prefixattn.testing import left_padded_batch, single_thread, tiny_gpt2, tiny_llama

TOL = dict(atol=2e-5, rtol=1e-5)
P = 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def make_tasks(base, n: int = 3, offset: int = 0) -> dict[str, PrefixTuning]:
    """n differently initialised prefixes, each on its own copy of ``base``."""
    tasks = {}
    for i, name in enumerate(["sst2", "ner", "qa", "sum"][:n]):
        torch.manual_seed(100 + i)
        tasks[name] = PrefixTuning(
            copy.deepcopy(base), P, init="vocab", position_offset=offset,
            prefix_projection=(i == 1), encoder_hidden_size=16,
        ).eval()  # fmt: skip
    return tasks


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("offset", [0, P])
def test_mixed_batch_forward_equals_rows_alone(family: str, offset: int, monkeypatch) -> None:
    base = {"gpt2": tiny_gpt2, "llama": tiny_llama}[family]()
    tasks = make_tasks(base, offset=offset)
    bank = TaskBank(copy.deepcopy(base), tasks)
    assert bank.tasks == ["sst2", "ner", "qa"] and bank.num_virtual_tokens == P
    rows = ["ner", "sst2", "qa", "ner", "sst2"]
    ids, mask = left_padded_batch([6, 3, 5, 1, 4], seed=1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, N]: every row's real tokens start at 0

    seen = []
    real_kernel = patching.prefix_attention

    def spy(q, k, v, pk=None, pv=None, **kw):
        seen.append((pk.shape, kw["prefix_index"].tolist()))
        return real_kernel(q, k, v, pk, pv, **kw)

    monkeypatch.setattr(patching, "prefix_attention", spy)
    with torch.no_grad():
        out = bank(rows, input_ids=ids, attention_mask=mask, position_ids=pos).logits
    monkeypatch.setattr(patching, "prefix_attention", real_kernel)
    # one kernel call per layer for the whole batch, through the bank path
    assert len(seen) == base.config.num_hidden_layers
    assert all(s[0][0] == 3 and s[1] == [1, 0, 2, 1, 0] for s in seen)

    for b, name in enumerate(rows):
        real = mask[b].bool()
        with torch.no_grad():
            alone = tasks[name](input_ids=ids[b : b + 1, real]).logits[0]
        torch.testing.assert_close(out[b, real], alone, **TOL)
    # different tasks really give different outputs
    assert (out[1, -1] - out[0, -1]).abs().max() > 1e-3


def test_mixed_batch_generate_equals_rows_alone() -> None:
    base = tiny_llama()
    tasks = make_tasks(base)
    bank = TaskBank(copy.deepcopy(base), tasks)
    rows = ["qa", "ner", "sst2", "qa"]
    ids, mask = left_padded_batch([5, 2, 6, 3], seed=2)
    gen = bank.generate(rows, input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    N = ids.shape[1]
    for b, name in enumerate(rows):
        real = mask[b].bool()
        alone = tasks[name].generate(
            input_ids=ids[b : b + 1, real], max_new_tokens=6, do_sample=False
        )
        assert torch.equal(gen[b, N:], alone[0, int(real.sum()) :]), (b, name)
    outs = {tuple(gen[b, N:].tolist()) for b in range(4)}
    assert len(outs) > 1


def test_beam_search_and_multiple_sequences_keep_row_tasks() -> None:
    base = tiny_gpt2()
    tasks = make_tasks(base, n=2)
    bank = TaskBank(copy.deepcopy(base), tasks)
    ids, mask = left_padded_batch([4, 4], seed=3)
    kw = dict(max_new_tokens=4, do_sample=False, num_beams=3, num_return_sequences=2)
    gen = bank.generate(["ner", "sst2"], input_ids=ids, attention_mask=mask, **kw)
    assert gen.shape[0] == 4
    for b, name in enumerate(["ner", "sst2"]):
        alone = tasks[name].generate(input_ids=ids[b : b + 1], **kw)
        assert torch.equal(gen[2 * b : 2 * b + 2], alone)


def test_bank_from_saved_prefixes_and_single_task_name(tmp_path) -> None:
    base = tiny_gpt2()
    tasks = make_tasks(base, n=2)
    for name, pt in tasks.items():
        pt.save(tmp_path / name)
    bank = TaskBank(copy.deepcopy(base), {n: tmp_path / n for n in tasks})
    ids, mask = left_padded_batch([3, 5], seed=4)
    with torch.no_grad():
        out = bank("ner", input_ids=ids, attention_mask=mask).logits
        ref = tasks["ner"](input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], **TOL)
    bank.remove("ner")
    assert bank.tasks == ["sst2"] and bank.bank.shape[2] == 1


def test_bank_errors_name_the_problem() -> None:
    base = tiny_gpt2()
    tasks = make_tasks(base, n=2)
    bank = TaskBank(copy.deepcopy(base), tasks)
    ids = torch.tensor([[3, 4, 5], [6, 7, 8]])
    with pytest.raises(ValueError, match="unknown"):
        bank(["ner", "mnli"], input_ids=ids)
    with pytest.raises(ValueError, match="one task per row"):
        bank(["ner"], input_ids=ids)
    with pytest.raises(TypeError, match="tasks"):
        bank([1, 2], input_ids=ids)
    # (other P and other position offsets are accepted: tests/test_bank_ragged.py)
    with pytest.raises(ValueError, match=r"\[L, 2, Hkv, P, D\]"):
        bank.add("llama", PrefixTuning(tiny_llama(), P))
    with pytest.raises(TypeError, match="prefix"):
        bank.add("bad", torch.zeros(3))
    with pytest.raises(ValueError, match="empty"):
        TaskBank(tiny_gpt2())(["a"], input_ids=ids[:1])
    with pytest.raises(TypeError, match="model"):
        TaskBank(torch.nn.Linear(2, 2))
