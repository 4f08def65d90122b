"""prefixattn's own calls into transformers use no deprecated name.

pyproject's ``filterwarnings`` turns a DeprecationWarning / FutureWarning *attributed to*
prefixattn into an error, but transformers attributes its deprecated-keyword warnings to
its own wrappers (``stacklevel=2`` inside ``deprecate_kwarg``), so a deprecated name we pass
(``past_key_values`` since the rename to ``cache``, ``gradient_checkpointing_enable`` since
``activation_checkpointing_enable``) would slip through. Here every path of the HF glue that
calls transformers runs with those warnings as errors, whoever they are attributed to.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator

import pytest
import torch

pytest.importorskip("transformers")

from prefixattn import PrefixTuning, PromptTuning, TaskBank
from prefixattn.demo import concat_reference_logits
from prefixattn.hf._compat import cache_kwarg, output_cache
from prefixattn.testing import (
    concat_prefix_forward,
    greedy_reference,
    left_padded_batch,
    single_thread,
    tiny_gpt2,
    tiny_llama,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


@pytest.fixture
def strict() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", FutureWarning)
        yield


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prefix_tuning_paths(strict, family: str) -> None:
    base = {"gpt2": tiny_gpt2, "llama": tiny_llama}[family]()
    pt = PrefixTuning(copy.deepcopy(base), 3, init="vocab", position_offset=3)
    ids, mask = left_padded_batch([5, 3], seed=1)
    labels = ids.masked_fill(mask == 0, -100)
    pt.train()
    pt.gradient_checkpointing_enable()
    pt(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    pt.gradient_checkpointing_disable()
    pt.eval()
    with torch.no_grad():
        out = pt(input_ids=ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
        kw = {cache_kwarg(pt.model.forward): output_cache(out)}
        pt(input_ids=ids[:, 4:], attention_mask=mask, use_cache=True, **kw)
        concat_prefix_forward(base, pt.prefix_tensor(), ids, mask, position_offset=3)
        concat_reference_logits(pt, ids, mask)
    gen = pt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(gen, greedy_reference(pt, ids, mask, max_new_tokens=3))
    chunked = PrefixTuning(copy.deepcopy(base), 3, chunked_loss=True).train()
    chunked(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()


def test_prompt_tuning_and_bank_paths(strict) -> None:
    base = tiny_llama()
    ids, mask = left_padded_batch([4, 2], seed=2)
    pt = PromptTuning(copy.deepcopy(base), 3, init="vocab", seed=0)
    pt.train()
    pt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pt(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    pt.eval()
    with torch.no_grad():
        out = pt(input_ids=ids, attention_mask=mask, use_cache=True)
        step = torch.ones(2, 1, dtype=torch.long)
        kw = {cache_kwarg(pt.model.forward): output_cache(out)}
        pt(input_ids=step + 1, attention_mask=torch.cat([mask, step], 1), use_cache=True, **kw)
    pt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    tasks = {}
    for seed, name in enumerate("ab"):
        torch.manual_seed(seed)
        tasks[name] = PrefixTuning(copy.deepcopy(base), 3, init="vocab")
    bank = TaskBank(copy.deepcopy(base), tasks)
    with torch.no_grad():
        bank(["a", "b"], input_ids=ids, attention_mask=mask)
    bank.generate(["b", "a"], input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
