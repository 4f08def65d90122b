"""PrefixTuning: semantics against an independent concat reference, gradients, gradient
checkpointing, init strategies, save/load, generation with a KV cache, training, errors."""

from __future__ import annotations

import copy
import os

import pytest
import torch

pytest.importorskip("transformers")

import prefixattn
from prefixattn import PrefixTuning, PrefixTuningConfig
from prefixattn.hf._compat import cache_kwarg, output_cache
from prefixattn.hf.patching import get_prefix, record_kv, set_prefix
from prefixattn.testing import (
    concat_prefix_forward,
    left_padded_batch,
    single_thread,
    tiny_gpt2,
    tiny_llama,
)

TOL = dict(atol=2e-5, rtol=1e-5)
GRAD_TOL = dict(atol=1e-6, rtol=1e-4)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def labels_for(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ids.masked_fill(mask == 0, -100)


# ------------------------------------------------------------------ semantics & gradients


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("offset", [0, 5])
def test_forward_and_gradients_match_concat_reference(projection: bool, offset: int) -> None:
    base = tiny_gpt2()
    pt = PrefixTuning(
        copy.deepcopy(base), 5, prefix_projection=projection, encoder_hidden_size=24,
        position_offset=offset, init_std=0.5,
    )  # fmt: skip
    ids, mask = left_padded_batch([6, 4, 2], seed=1)
    labels = labels_for(ids, mask)
    out = pt(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    ours = {n: p.grad.clone() for n, p in pt.named_parameters() if p.requires_grad}

    # reference: the same prefix as cached tokens of the unpatched model, same parameters
    ref_pt = copy.deepcopy(pt)
    for p in ref_pt.parameters():
        p.grad = None
    prefix = ref_pt.prefix_tensor()  # [L, 2, Hkv, P, D], differentiable
    ref = concat_prefix_forward(base, prefix, ids, mask, offset, labels=labels)
    ref.loss.backward()
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], ref.logits[real], **TOL)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    for name, p in ref_pt.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours[name], p.grad, **GRAD_TOL)
            assert ours[name].abs().max() > 0
    # only the prefix trains; the model is frozen
    assert all(not p.requires_grad for p in pt.model.parameters())
    assert all(p.grad is None for p in pt.model.parameters())


def test_position_offset_shifts_given_and_default_positions() -> None:
    base = tiny_llama()
    pt = PrefixTuning(copy.deepcopy(base), 3, position_offset=3)
    ids, _ = left_padded_batch([5, 5], seed=2)
    with torch.no_grad():
        default = pt(input_ids=ids).logits
        given = pt(input_ids=ids, position_ids=torch.arange(5)[None]).logits
        ref = concat_prefix_forward(base, pt.prefix_tensor(), ids, None, 3).logits
    torch.testing.assert_close(default, ref, **TOL)
    torch.testing.assert_close(given, ref, **TOL)


def test_counts_and_share() -> None:
    base = tiny_llama()  # L=2, Hkv=2, D=16
    pt = PrefixTuning(base, 7)
    assert pt.num_trainable_parameters() == 2 * 2 * 2 * 7 * 16
    n_base = sum(p.numel() for p in base.parameters())
    assert pt.trainable_share() == pytest.approx(pt.num_trainable_parameters() / n_base)
    proj = PrefixTuning(tiny_llama(), 7, prefix_projection=True, encoder_hidden_size=10)
    tok = 2 * 16  # Hkv * D
    expect = 7 * tok + (tok * 10 + 10) + (10 * 2 * 2 * tok + 2 * 2 * tok)
    assert proj.num_trainable_parameters() == expect


# ------------------------------------------------------------------ gradient checkpointing


@pytest.mark.parametrize("projection", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(projection: bool) -> None:
    base = tiny_gpt2(n_layer=3)
    pt = PrefixTuning(base, 4, prefix_projection=projection, init_std=0.5)
    pt.train()
    ids, mask = left_padded_batch([6, 3], seed=3)
    labels = labels_for(ids, mask)

    def grads() -> dict[str, torch.Tensor]:
        pt.zero_grad(set_to_none=True)
        pt(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in pt.named_parameters() if p.requires_grad}

    calls = {"n": 0}
    attn = pt.model.transformer.h[1].attn  # inside the checkpointed block
    hook = attn.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    plain = grads()
    assert calls["n"] == 1
    pt.gradient_checkpointing_enable()
    checkpointed = grads()
    assert calls["n"] == 3  # forward + recomputation in backward: checkpointing is on
    pt.gradient_checkpointing_disable()
    hook.remove()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-7, rtol=1e-4)
        assert plain[name].abs().max() > 0

    # reentrant checkpointing works too (inputs are made to require grad)
    pt.gradient_checkpointing_enable({"use_reentrant": True})
    reentrant = grads()
    pt.gradient_checkpointing_disable()
    for name in plain:
        torch.testing.assert_close(reentrant[name], plain[name], atol=1e-7, rtol=1e-4)


# ------------------------------------------------------------------ generation


@pytest.mark.parametrize("offset", [0, 4])
def test_generate_kv_cache_matches_full_recompute(offset: int) -> None:
    pt = PrefixTuning(tiny_llama(), 4, init="vocab", position_offset=offset)
    ids, mask = left_padded_batch([5, 2, 4], seed=4)
    steps = 6
    gen = pt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False)
    no_cache = pt.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, use_cache=False
    )
    assert torch.equal(gen, no_cache)
    # independent greedy loop: full forward each step, positions from the mask (as generate)
    cur, cur_mask = ids, mask
    with torch.no_grad():
        for _ in range(steps):
            pos = (cur_mask.cumsum(-1) - 1).clamp(min=0)
            logits = pt(input_ids=cur, attention_mask=cur_mask, position_ids=pos).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            cur = torch.cat([cur, nxt], 1)
            cur_mask = torch.cat([cur_mask, torch.ones_like(nxt)], 1)
    assert torch.equal(gen, cur)
    # the prefix changes the generations, and never enters the cache
    plain = copy.deepcopy(pt.model)
    prefixattn.unpatch(plain)
    base_gen = plain.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False)
    assert not torch.equal(gen, base_gen)
    with torch.no_grad():
        out = pt(input_ids=ids, attention_mask=mask, use_cache=True)
    assert output_cache(out).get_seq_length() == ids.shape[1]
    assert get_prefix(pt.model) is pt._provider  # generate restored the live provider


def test_cache_continuation_without_position_ids() -> None:
    """With a position offset, a call given a cache (under the release's name: ``cache``, or
    ``past_key_values`` before 5.2x) and no position_ids continues at cache length + offset."""
    pt = PrefixTuning(tiny_llama(), 4, init="vocab", position_offset=4)  # RoPE: positions matter
    ids = torch.randint(2, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = pt(input_ids=ids).logits
        cache = output_cache(pt(input_ids=ids[:, :5], use_cache=True))
        kw = {cache_kwarg(pt.model.forward): cache}
        step = pt(input_ids=ids[:, 5:], use_cache=True, **kw).logits
        unshifted = PrefixTuning(tiny_llama(), 4, init="vocab")(input_ids=ids).logits
    torch.testing.assert_close(step, full[:, 5:], **TOL)
    assert not torch.allclose(full, unshifted, atol=1e-3)  # the offset changes the logits


# ------------------------------------------------------------------ init strategies


@pytest.mark.parametrize("projection", [False, True])
def test_text_init_with_offset_is_the_hard_prompt(projection: bool) -> None:
    base = tiny_gpt2()
    text = [11, 12, 13, 14, 15]
    pt = PrefixTuning(
        copy.deepcopy(base), 5, init="text", init_text=text, position_offset=5,
        prefix_projection=projection, encoder_hidden_size=16,
    )  # fmt: skip
    ids = torch.tensor([[40, 41, 42, 43], [50, 51, 52, 53]])
    with torch.no_grad():
        ours = pt(input_ids=ids).logits
        hard = base(input_ids=torch.cat([torch.tensor([text] * 2), ids], 1)).logits[:, 5:]
    torch.testing.assert_close(ours, hard, atol=1e-4, rtol=1e-4)


def test_text_init_accepts_tokenizer_text_and_cycles_ids() -> None:
    class Tok:
        def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
            assert add_special_tokens is False
            return {"input_ids": [ord(c) % 100 + 2 for c in text]}

    base = tiny_gpt2()
    a = PrefixTuning(copy.deepcopy(base), 6, init="text", init_text="abc", tokenizer=Tok())
    b = PrefixTuning(
        copy.deepcopy(base), 6, init="text", init_text=torch.tensor([99, 100, 101] * 2)
    )
    assert a.config.init_text == "abc"
    torch.testing.assert_close(a.prefix, b.prefix, atol=0, rtol=0)


def test_vocab_init_is_the_activations_of_real_tokens() -> None:
    base = tiny_gpt2()
    P = 4
    torch.manual_seed(123)
    pt = PrefixTuning(copy.deepcopy(base), P, init="vocab")
    # Recover the sampled tokens from layer 0's keys: at position p they depend only on
    # (token, p). Then the whole prefix must be the activations of that token sequence.
    probe = prefixattn.patch(copy.deepcopy(base))
    vocab = torch.arange(base.config.vocab_size)[:, None]  # [V, 1]
    tokens = []
    for p in range(P):
        with torch.no_grad(), record_kv(probe) as rec:
            probe(input_ids=vocab, position_ids=torch.full_like(vocab, p))
        keys0 = rec[0][0][:, :, 0]  # [V, Hkv, D]
        dist = (keys0 - pt.prefix[0, 0, :, p][None]).flatten(1).norm(dim=1)
        tokens.append(int(dist.argmin()))
        assert dist.min() < 1e-5
    text = PrefixTuning(copy.deepcopy(base), P, init="text", init_text=tokens)
    torch.testing.assert_close(pt.prefix, text.prefix, atol=1e-6, rtol=1e-6)
    assert len(set(tokens)) > 1


# ------------------------------------------------------------------ save / load


@pytest.mark.parametrize("projection", [False, True])
def test_save_load_round_trip(tmp_path, projection: bool) -> None:
    base = tiny_llama()
    pt = PrefixTuning(copy.deepcopy(base), 6, prefix_projection=projection, position_offset=2)
    pt.save(tmp_path / "p")
    files = sorted(os.listdir(tmp_path / "p"))
    assert files == ["prefix.safetensors", "prefixattn_prefix.json"]
    size = sum(os.path.getsize(tmp_path / "p" / f) for f in files)
    assert size < 2 * 2 * 2 * 6 * 16 * 4 + 4096  # the folded K/V and a small header/JSON
    loaded = PrefixTuning.load(tmp_path / "p", copy.deepcopy(base))
    assert loaded.position_offset == 2 and loaded.config.prefix_projection is False
    ids, mask = left_padded_batch([5, 3], seed=5)
    with torch.no_grad():
        a = pt(input_ids=ids, attention_mask=mask).logits
        b = loaded(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(b[real], a[real], **TOL)
    assert loaded.num_trainable_parameters() == 2 * 2 * 2 * 6 * 16


def test_load_rejects_bad_files_and_models(tmp_path) -> None:
    with pytest.raises(ValueError, match="path"):
        PrefixTuning.load(tmp_path / "missing", tiny_gpt2())
    assert PrefixTuning(tiny_llama(), 3).save(tmp_path / "llama") == tmp_path / "llama"
    with pytest.raises(ValueError, match="'llama' model"):
        PrefixTuning.load(tmp_path / "llama", tiny_gpt2())
    PrefixTuning(tiny_gpt2(), 3).save(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"\[L, 2, Hkv, P, D\] = \[3, 2, 4, P, 16\]"):
        PrefixTuning.load(tmp_path / "gpt2", tiny_gpt2(n_layer=3))
    with pytest.raises(TypeError, match="model"):
        PrefixTuning.load(tmp_path / "llama", torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="path"):
        PrefixTuning(tiny_gpt2(), 3).save(3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_with_fp32_prefix(dtype: torch.dtype) -> None:
    base = tiny_llama()
    pt32 = PrefixTuning(copy.deepcopy(base), 4, init_std=0.5)
    pt16 = PrefixTuning(copy.deepcopy(base).to(dtype), 4)
    with torch.no_grad():
        pt16.prefix.copy_(pt32.prefix)
    assert pt16.prefix.dtype == torch.float32
    ids, mask = left_padded_batch([5, 3], seed=7)
    out16 = pt16(input_ids=ids, attention_mask=mask, labels=labels_for(ids, mask))
    out32 = pt32(input_ids=ids, attention_mask=mask, labels=labels_for(ids, mask))
    assert out16.logits.dtype == dtype
    out16.loss.backward()
    out32.loss.backward()
    assert pt16.prefix.grad.dtype == torch.float32 and torch.isfinite(pt16.prefix.grad).all()
    real = mask.bool()
    torch.testing.assert_close(out16.logits[real].float(), out32.logits[real], atol=0.1, rtol=0.05)
    cos = torch.nn.functional.cosine_similarity(
        pt16.prefix.grad.flatten(), pt32.prefix.grad.flatten(), dim=0
    )
    assert cos > 0.95


# ------------------------------------------------------------------ several wrappers, training


def test_two_prefix_tunings_on_one_model() -> None:
    base = tiny_gpt2()
    shared = copy.deepcopy(base)
    a = PrefixTuning(shared, 3, init_std=0.7)
    b = PrefixTuning(shared, 5, init_std=0.7)
    ids, _ = left_padded_batch([4, 4], seed=6)
    pos = torch.arange(4)[None]
    with torch.no_grad():
        out_a1 = a(input_ids=ids, position_ids=pos).logits
        out_b = b(input_ids=ids, position_ids=pos).logits
        out_a2 = a(input_ids=ids, position_ids=pos).logits
        ref_a = concat_prefix_forward(base, a.prefix_tensor(), ids).logits
        ref_b = concat_prefix_forward(base, b.prefix_tensor(), ids).logits
    torch.testing.assert_close(out_a1, ref_a, **TOL)
    torch.testing.assert_close(out_a2, ref_a, **TOL)
    torch.testing.assert_close(out_b, ref_b, **TOL)


@pytest.mark.parametrize("projection", [False, True])
def test_loss_falls_on_a_toy_task(projection: bool) -> None:
    pt = PrefixTuning(tiny_gpt2(), 4, prefix_projection=projection, init="vocab")
    pt.train()
    opt = torch.optim.Adam([p for p in pt.parameters() if p.requires_grad], lr=5e-2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 128, (8, 6), generator=g)
    labels = torch.full_like(ids, 7)  # task: always answer token 7
    losses = []
    for _ in range(40):
        loss = pt(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    assert min(losses[-5:]) < min(losses[:5])


# ------------------------------------------------------------------ errors


def test_bad_arguments_raise_naming_them() -> None:
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PrefixTuning(model, 0)
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PrefixTuning(model, True)
    with pytest.raises(ValueError, match="init"):
        PrefixTuning(model, 4, init="zeros")
    with pytest.raises(ValueError, match="init_text"):
        PrefixTuning(model, 4, init="text")
    with pytest.raises(ValueError, match="tokenizer"):
        PrefixTuning(model, 4, init="text", init_text="hello")
    with pytest.raises(TypeError, match="init_text"):
        PrefixTuning(model, 4, init="text", init_text=3.5)
    with pytest.raises(ValueError, match="init_text"):
        PrefixTuning(model, 4, init="random", init_text=[3, 4])
    with pytest.raises(ValueError, match="tokenizer"):
        PrefixTuning(model, 4, tokenizer=object())
    with pytest.raises(ValueError, match="position_offset"):
        PrefixTuning(model, 4, position_offset=-1)
    with pytest.raises(ValueError, match="backend"):
        PrefixTuning(model, 4, backend="gpu")
    with pytest.raises(TypeError, match="prefix_projection"):
        PrefixTuning(model, 4, prefix_projection="yes")
    with pytest.raises(ValueError, match="encoder_hidden_size"):
        PrefixTuning(model, 4, prefix_projection=True, encoder_hidden_size=0)
    with pytest.raises(TypeError, match="model"):
        PrefixTuning(torch.nn.Linear(3, 3), 4)
    with pytest.raises(ValueError, match="unknown"):
        PrefixTuningConfig.from_dict({"num_virtual_tokens": 3, "lr": 1.0})
    pt = PrefixTuning(model, 4)
    prefixattn.unpatch(pt.model)
    with pytest.raises(ValueError, match="unpatched"):
        pt(input_ids=torch.tensor([[3, 4]]))
    set_prefix  # re-exported helper stays importable


def test_config_round_trip_and_from_config() -> None:
    cfg = PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=8)
    assert PrefixTuningConfig.from_dict(cfg.to_dict()) == cfg
    pt = PrefixTuning.from_config(tiny_gpt2(), cfg)
    assert pt.config == cfg and pt.embedding.weight.shape == (3, 64)
