"""MultiTaskPrefixTuning: one mixed batch, one backward, every task its own gradient.

The reference for each task is computed separately and independently of the kernel: the
task's prefix as cached tokens of an unpatched copy of the model, on that task's rows only
(tests/ use prefixattn.testing.concat_prefix_forward), in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

import prefixattn.hf.patching as patching
from prefixattn import MultiTaskPrefixTuning, PrefixTuning, PromptTuning, TaskBank
from prefixattn.hf.tuner import STATE_META_KEY
from prefixattn.testing import (
    concat_prefix_forward,
    left_padded_batch,
    single_thread,
    tiny_gpt2,
    tiny_llama,
)

TASKS = {"a": 1, "b": 7, "c": 3}
ROWS = ["b", "a", "c", "b", "a", "b"]
LENGTHS = [6, 4, 2, 5, 3, 1]
MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def summed_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross entropies over the valid labels (independent of batching)."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
        ignore_index=-100, reduction="sum",
    )  # fmt: skip


def batch(seed: int = 1):
    ids, mask = left_padded_batch(LENGTHS, seed=seed)
    return ids, mask, ids.masked_fill(mask == 0, -100)


def check_against_per_task(mt, base, dtype, offset: int, tol: dict) -> None:
    """Mixed batch through the tuner vs each task alone through the concat reference."""
    ids, mask, labels = batch()
    logits = mt(input_ids=ids, attention_mask=mask, tasks=ROWS).logits
    summed_lm_loss(logits, labels).backward()
    grad = mt.bank.grad
    assert grad is not None and grad.dtype == dtype
    for t, name in enumerate(mt.tasks):
        P = mt.task_lengths()[name]
        rows = [b for b, task in enumerate(ROWS) if task == name]
        prefix = mt.task_prefix(name).detach().clone().requires_grad_(True)
        ref = concat_prefix_forward(
            base, prefix, ids[rows], mask[rows], position_offset=offset
        ).logits
        torch.testing.assert_close(logits[rows], ref, **tol)
        summed_lm_loss(ref, labels[rows]).backward()
        torch.testing.assert_close(grad[:, :, t, :, :P], prefix.grad, **tol)
        assert prefix.grad.abs().max() > 0, f"task {name} got no gradient"
        # the bank positions past the task's own length get exactly nothing
        assert torch.count_nonzero(grad[:, :, t, :, P:]) == 0


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_mixed_batch_gradients_equal_per_task_float64(arch: str, backend: str) -> None:
    base = MODELS[arch]().double()
    offset = 2 if arch == "llama" else 0
    torch.manual_seed(0)
    mt = MultiTaskPrefixTuning(copy.deepcopy(base), TASKS, backend=backend, position_offset=offset)
    mt.double()
    check_against_per_task(mt, base, torch.float64, offset, dict(atol=1e-10, rtol=1e-9))


def test_mixed_batch_gradients_triton_interpreter_fp32() -> None:
    base = tiny_gpt2()
    torch.manual_seed(0)
    mt = MultiTaskPrefixTuning(copy.deepcopy(base), TASKS, backend="triton")
    check_against_per_task(mt, base, torch.float32, 0, dict(atol=2e-4, rtol=2e-4))


def test_equal_lengths_use_the_plain_bank_path() -> None:
    base = tiny_gpt2().double()
    torch.manual_seed(0)
    mt = MultiTaskPrefixTuning(copy.deepcopy(base), {"a": 4, "b": 4, "c": 4}, backend="sdpa")
    mt.double()
    assert mt.lengths is None
    check_against_per_task(mt, base, torch.float64, 0, dict(atol=1e-10, rtol=1e-9))


def test_one_kernel_call_per_layer_on_views_of_the_bank(monkeypatch) -> None:
    """No loop over tasks, no per-row copy: each layer calls the kernel once, with the
    bank's own storage, a [B] row index and the [T] lengths."""
    mt = MultiTaskPrefixTuning(tiny_gpt2(), TASKS, backend="sdpa")
    calls = []
    real = patching.prefix_attention

    def spy(q, k, v, prefix_k, prefix_v, **kw):
        calls.append((prefix_k, prefix_v, kw["prefix_index"], kw["prefix_lengths"]))
        return real(q, k, v, prefix_k, prefix_v, **kw)

    monkeypatch.setattr(patching, "prefix_attention", spy)
    ids, mask, labels = batch()
    mt(input_ids=ids, attention_mask=mask, labels=labels, tasks=ROWS).loss.backward()
    assert len(calls) == mt.geometry.num_layers
    bank_ptr = mt.bank.untyped_storage().data_ptr()
    want_index = torch.tensor([mt.tasks.index(t) for t in ROWS])
    for pk, pv, index, lengths in calls:
        assert pk.shape[0] == len(TASKS) and pk.untyped_storage().data_ptr() == bank_ptr
        assert pv.untyped_storage().data_ptr() == bank_ptr
        assert torch.equal(index.cpu(), want_index)
        assert lengths.tolist() == list(TASKS.values())


def test_per_task_init_and_lengths() -> None:
    model = tiny_gpt2()
    torch.manual_seed(3)
    mt = MultiTaskPrefixTuning(
        model,
        {"r": {"num_virtual_tokens": 2, "init_std": 0.1},
         "t": {"num_virtual_tokens": 5, "init": "text", "init_text": [5, 6, 7]}},
    )  # fmt: skip
    assert mt.task_lengths() == {"r": 2, "t": 5} and mt.bank.shape[4] == 5
    alone = PrefixTuning(tiny_gpt2(), 5, init="text", init_text=[5, 6, 7])
    torch.testing.assert_close(mt.task_prefix("t"), alone.prefix, atol=1e-6, rtol=1e-6)
    r = mt.task_prefix("r")
    assert 0.05 < r.detach().std().item() < 0.2  # its own init_std
    assert torch.count_nonzero(mt.bank[:, :, 0, :, 2:]) == 0


def test_save_per_task_artifacts_that_serve_and_reload(tmp_path) -> None:
    torch.manual_seed(0)
    mt = MultiTaskPrefixTuning(tiny_llama(), TASKS, backend="sdpa", position_offset=1)
    mt.eval()
    ids, mask, _ = batch(seed=4)
    want = mt(input_ids=ids, attention_mask=mask, tasks=ROWS).logits.detach()
    mt.save(tmp_path)
    for name in TASKS:  # each task alone: the existing PrefixTuning format
        pt = PrefixTuning.load(tmp_path / name, tiny_llama())
        assert torch.equal(pt.prefix, mt.task_prefix(name).detach())
        assert pt.position_offset == 1
    bank = TaskBank(tiny_llama(), {n: tmp_path / n for n in TASKS}, backend="sdpa")
    got = bank(ROWS, input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    again = MultiTaskPrefixTuning.load(tmp_path, tiny_llama())
    assert again.tasks == mt.tasks and torch.equal(again.bank, mt.bank.detach())
    assert set(mt.state_dict()) == {"bank", STATE_META_KEY}


def test_task_ids_generate_and_errors() -> None:
    torch.manual_seed(0)
    mt = MultiTaskPrefixTuning(tiny_gpt2(), TASKS, backend="sdpa")
    mt.eval()
    ids, mask, _ = batch()
    by_name = mt(input_ids=ids, attention_mask=mask, tasks=ROWS).logits
    task_ids = torch.tensor([mt.tasks.index(t) for t in ROWS])
    by_id = mt(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits
    assert torch.equal(by_name, by_id)
    gen = mt.generate(ids, attention_mask=mask, tasks=ROWS, max_new_tokens=3, do_sample=False)
    bank_gen = mt.to_bank().generate(ROWS, input_ids=ids, attention_mask=mask,
                                     max_new_tokens=3, do_sample=False)  # fmt: skip
    assert torch.equal(gen, bank_gen)

    with pytest.raises(ValueError, match=r"tasks=.*task_ids"):
        mt(input_ids=ids)
    with pytest.raises(ValueError, match="unknown task"):
        mt(input_ids=ids, tasks=["zz"] * len(ROWS))
    with pytest.raises(ValueError, match="one task per row"):
        mt(input_ids=ids, tasks=ROWS[:2])
    with pytest.raises(ValueError, match="task_ids must be in"):
        mt(input_ids=ids, task_ids=torch.full((len(ROWS),), 3))
    with pytest.raises(TypeError, match="task_ids"):
        mt(input_ids=ids, task_ids=torch.zeros(len(ROWS)))


def test_refusals_say_why() -> None:
    model = tiny_gpt2()
    with pytest.raises(TypeError, match="prompt tuning cannot share a mixed batch"):
        MultiTaskPrefixTuning(model, {"a": 2, "p": PromptTuning(tiny_gpt2(), 2)})
    with pytest.raises(ValueError, match="unknown settings"):
        MultiTaskPrefixTuning(model, {"a": {"num_virtual_tokens": 2, "prefix_projection": True}})
    with pytest.raises(ValueError, match="task names"):
        MultiTaskPrefixTuning(model, {"../x": 2})
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        MultiTaskPrefixTuning(model, {"a": 0})
    with pytest.raises(ValueError, match="non-empty"):
        MultiTaskPrefixTuning(model, {})
    with pytest.raises(TypeError, match="model"):
        MultiTaskPrefixTuning(torch.nn.Linear(2, 2), {"a": 2})
