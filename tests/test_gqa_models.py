"""GQA / MQA families (Llama 4:2 heads, Qwen2 4:1) through the attention interface: no-prefix
parity, prefix tuning against the concat reference, KV-cache generation, training, PEFT."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

import prefixattn
from prefixattn import PrefixTuning
from prefixattn.hf import patching
from prefixattn.testing import (
    concat_prefix_forward,
    greedy_reference,
    left_padded_batch,
    single_thread,
    tiny_llama,
    tiny_qwen2,
)

TOL = dict(atol=2e-5, rtol=1e-5)
FAMILIES = {"llama": tiny_llama, "qwen2": tiny_qwen2}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_no_prefix_parity_with_generate(family: str) -> None:
    base = FAMILIES[family]()
    patched = prefixattn.patch(copy.deepcopy(base))
    ids, mask = left_padded_batch([5, 2, 7], seed=1)
    with torch.no_grad():
        ref, out = (
            base(input_ids=ids, attention_mask=mask),
            patched(input_ids=ids, attention_mask=mask),
        )
    torch.testing.assert_close(out.logits[mask.bool()], ref.logits[mask.bool()], **TOL)
    kw = dict(attention_mask=mask, max_new_tokens=7, do_sample=False)
    assert torch.equal(patched.generate(ids, **kw), base.generate(ids, **kw))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prefix_tuning_gqa_matches_concat_reference(family: str, monkeypatch) -> None:
    base = FAMILIES[family]()
    cfg = base.config
    pt = PrefixTuning(copy.deepcopy(base), 6, init="vocab")
    Hkv, D = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    assert Hkv < cfg.num_attention_heads
    assert pt.prefix.shape == (cfg.num_hidden_layers, 2, Hkv, 6, D)

    shapes = []
    real_kernel = patching.prefix_attention

    def spy(q, k, v, pk=None, pv=None, **kw):
        shapes.append((q.shape[1], k.shape[1], pk.shape))
        return real_kernel(q, k, v, pk, pv, **kw)

    monkeypatch.setattr(patching, "prefix_attention", spy)
    ids, mask = left_padded_batch([6, 4], seed=2)
    labels = ids.masked_fill(mask == 0, -100)
    out = pt(input_ids=ids, attention_mask=mask, labels=labels)
    monkeypatch.setattr(patching, "prefix_attention", real_kernel)
    # GQA reaches the kernel un-repeated: H query heads, Hkv key heads, shared [Hkv, P, D]
    assert shapes == [(cfg.num_attention_heads, Hkv, (Hkv, 6, D))] * cfg.num_hidden_layers

    out.loss.backward()
    pre = pt.prefix.detach().clone().requires_grad_(True)
    ref = concat_prefix_forward(base, pre, ids, mask, labels=labels)
    ref.loss.backward()
    torch.testing.assert_close(out.logits[mask.bool()], ref.logits[mask.bool()], **TOL)
    torch.testing.assert_close(pt.prefix.grad, pre.grad, atol=1e-7, rtol=1e-4)


def test_qwen2_train_with_checkpointing_then_generate() -> None:
    base = tiny_qwen2()
    pt = PrefixTuning(copy.deepcopy(base), 4, prefix_projection=True, init="vocab")
    pt.gradient_checkpointing_enable()
    pt.train()
    opt = torch.optim.Adam([p for p in pt.parameters() if p.requires_grad], lr=5e-2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 128, (6, 5), generator=g)
    labels = torch.full_like(ids, 9)
    losses = []
    for _ in range(25):
        loss = pt(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    pt.gradient_checkpointing_disable()
    pt.eval()
    prompt, mask = left_padded_batch([4, 2], seed=5)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    gen = pt.generate(input_ids=prompt, **kw)
    assert torch.equal(gen, pt.generate(input_ids=prompt, use_cache=False, **kw))
    assert not torch.equal(gen, base.generate(prompt, **kw))


def test_qwen2_peft_parity() -> None:
    peft = pytest.importorskip("peft")
    base = tiny_qwen2()
    torch.manual_seed(1)
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    ours = PrefixTuning.from_peft(pm, copy.deepcopy(base))
    ids, mask = left_padded_batch([5, 3], seed=6)
    with torch.no_grad():
        a, b = ours(input_ids=ids, attention_mask=mask), pm(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(a.logits[mask.bool()], b.logits[mask.bool()], **TOL)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    gen = ours.generate(**kw)
    # against greedy decoding over PEFT's forward, not PEFT's generate (see test_peft_upstream)
    assert torch.equal(gen, greedy_reference(pm, ids, mask, max_new_tokens=5))
    assert not torch.equal(gen, base.generate(**kw))  # the prefix changes the tokens
