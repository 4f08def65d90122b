"""TaskBank on the ragged bank: tasks of any P and position offset (prefixes and soft
prompts) in one mixed batch, each row equal to its task alone; add / remove in use."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from prefixattn import PrefixTuning, PromptTuning, TaskBank
from prefixattn.hf import patching
from prefixattn.testing import left_padded_batch, single_thread, tiny_gpt2, tiny_llama

TOL = dict(atol=2e-5, rtol=1e-5)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def make_tuners(base) -> dict:
    """Prefixes of P = 2, 5 and 1 (one with offset 3) and a soft prompt of P = 3, each on
    its own copy of ``base``."""
    tuners = {}
    for i, (name, P, off) in enumerate([("a", 2, 0), ("b", 5, 0), ("c", 1, 3)]):
        torch.manual_seed(200 + i)
        tuners[name] = PrefixTuning(
            copy.deepcopy(base), P, init="vocab", position_offset=off
        ).eval()
    torch.manual_seed(300)
    tuners["soft"] = PromptTuning(copy.deepcopy(base), 3, init="vocab").eval()
    return tuners


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_ragged_mixed_batch_forward_equals_rows_alone(family: str, monkeypatch) -> None:
    base = {"gpt2": tiny_gpt2, "llama": tiny_llama}[family]()
    tuners = make_tuners(base)
    bank = TaskBank(copy.deepcopy(base), tuners)
    assert bank.lengths == {"a": 2, "b": 5, "c": 1, "soft": 3}
    assert bank.offsets == {"a": 0, "b": 0, "c": 3, "soft": 3}
    assert bank.num_virtual_tokens == 5 and bank.position_offset is None
    rows = ["soft", "a", "c", "b", "a", "soft"]
    ids, mask = left_padded_batch([6, 3, 5, 1, 4, 2], seed=1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, N]: every row's real tokens start at 0

    seen = []
    real_kernel = patching.prefix_attention

    def spy(q, k, v, pk=None, pv=None, **kw):
        seen.append((kw["prefix_index"].tolist(), kw["prefix_lengths"].tolist()))
        return real_kernel(q, k, v, pk, pv, **kw)

    monkeypatch.setattr(patching, "prefix_attention", spy)
    with torch.no_grad():
        out = bank(rows, input_ids=ids, attention_mask=mask, position_ids=pos).logits
    monkeypatch.setattr(patching, "prefix_attention", real_kernel)
    # one ragged-bank kernel call per layer for the whole batch
    assert seen == [([3, 0, 2, 1, 0, 3], [2, 5, 1, 3])] * base.config.num_hidden_layers
    for b, name in enumerate(rows):
        real = mask[b].bool()
        with torch.no_grad():
            alone = tuners[name](input_ids=ids[b : b + 1, real]).logits[0]
        torch.testing.assert_close(out[b, real], alone, **TOL)


def test_ragged_generate_equals_rows_alone_left_padded() -> None:
    """GPT-2 (absolute positions): greedy generation of a left-padded mixed batch with
    different P and offsets equals each row generated alone."""
    base = tiny_gpt2()
    tuners = make_tuners(base)
    bank = TaskBank(copy.deepcopy(base), tuners)
    rows = ["b", "soft", "a", "c"]
    ids, mask = left_padded_batch([5, 2, 6, 3], seed=2)
    gen = bank.generate(rows, input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    N = ids.shape[1]
    outs = set()
    for b, name in enumerate(rows):
        real = mask[b].bool()
        alone = tuners[name].generate(
            input_ids=ids[b : b + 1, real], max_new_tokens=6, do_sample=False
        )
        n = int(real.sum())
        assert torch.equal(gen[b, N:], alone[0, n:]), (b, name)
        single = bank.generate([name], input_ids=ids[b : b + 1, real], max_new_tokens=6)
        assert torch.equal(single[0, n:], gen[b, N:])
        outs.add(tuple(gen[b, N:].tolist()))
    assert len(outs) > 1


def test_add_and_remove_in_use_and_saved_artifacts(tmp_path) -> None:
    base = tiny_gpt2()
    tuners = make_tuners(base)
    tuners["b"].save(tmp_path / "b")
    tuners["soft"].save(tmp_path / "soft")
    bank = TaskBank(copy.deepcopy(base), {"a": tuners["a"]})
    ids = torch.tensor([[5, 6, 7, 8]])
    before = bank.generate(["a"], input_ids=ids, max_new_tokens=4)
    bank.add("b", tmp_path / "b")  # a saved prefix, longer: the bank grows to P = 5
    bank.add("soft", tmp_path / "soft")  # a saved soft prompt, converted
    assert bank.num_virtual_tokens == 5 and bank.lengths["soft"] == 3
    assert torch.equal(bank.generate(["a"], input_ids=ids, max_new_tokens=4), before)
    for name in ("b", "soft"):
        got = bank.generate([name], input_ids=ids, max_new_tokens=4)
        assert torch.equal(got, tuners[name].generate(input_ids=ids, max_new_tokens=4)), name
    bank.remove("b")  # the longest: the bank shrinks back to P = 3
    assert bank.tasks == ["a", "soft"] and bank.num_virtual_tokens == 3
    assert torch.equal(bank.generate(["a"], input_ids=ids, max_new_tokens=4), before)
    # a call's provider keeps its snapshot even if a task is removed after it was built
    st = bank._state
    provider = bank._provider(st, torch.tensor([1]))
    bank.remove("soft")
    assert provider.keys[0].shape[0] == 2 and len(bank) == 1
    bank.add("a", tuners["c"])  # replace a task in place
    assert bank.lengths == {"a": 1} and bank.offsets == {"a": 3}
    with pytest.raises(ValueError, match="tasks contains unknown"):
        bank.generate(["soft"], input_ids=ids, max_new_tokens=1)
    with pytest.raises(ValueError, match="one of the bank's tasks"):
        bank.remove("soft")
    with pytest.raises(ValueError, match="artifact"):
        bank.add("nothing", tmp_path / "missing")
