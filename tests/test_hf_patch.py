"""prefixattn.patch / unpatch on transformers models: no-prefix parity, prefix semantics,
isolation between models, revertibility, attention kwargs, refusals."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

import prefixattn
from prefixattn.hf import patching
from prefixattn.hf._compat import cache_kwarg, output_cache
from prefixattn.hf.patching import StaticPrefix, get_prefix, is_patched, set_prefix
from prefixattn.testing import (
    concat_prefix_forward,
    left_padded_batch,
    single_thread,
    tiny_gpt2,
    tiny_llama,
)

TOL = dict(atol=2e-5, rtol=1e-5)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


FACTORIES = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def random_prefix(model: torch.nn.Module, P: int, seed: int) -> torch.Tensor:
    """[L, 2, Hkv, P, D] random prefix for ``model``."""
    cfg = model.config
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    Hkv = getattr(cfg, "num_key_value_heads", None) or H
    D = cfg.hidden_size // H
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, 2, Hkv, P, D, generator=g)


def static(prefix: torch.Tensor) -> StaticPrefix:
    return StaticPrefix(list(prefix[:, 0]), list(prefix[:, 1]))


def greedy_with_cache(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, steps: int):
    """Manual greedy decoding with a KV cache; returns the per-step last logits [steps, B, V]."""
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    cache, logits = output_cache(out), [out.logits[:, -1]]
    name = cache_kwarg(model.forward)  # `cache`, or `past_key_values` before transformers 5.2x
    pos = mask.long().cumsum(-1)[:, -1:] - 1  # [B, 1] position of the last real token
    for _ in range(steps - 1):
        nxt = logits[-1].argmax(-1, keepdim=True)  # [B, 1]
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        pos = pos + 1
        out = model(
            input_ids=nxt,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **{name: cache},
        )
        cache = output_cache(out)
        logits.append(out.logits[:, -1])
    return torch.stack(logits)


# ------------------------------------------------------------------ no-prefix parity


@pytest.mark.parametrize("family", sorted(FACTORIES))
@pytest.mark.parametrize("baseline", ["sdpa", "eager"])
def test_no_prefix_logits_match_unpatched(family: str, baseline: str) -> None:
    base = FACTORIES[family](attn_implementation=baseline)
    patched = prefixattn.patch(copy.deepcopy(base))
    ids, mask = left_padded_batch([7, 4, 1, 6])
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).logits
        out = patched(input_ids=ids, attention_mask=mask).logits
        # right padding and no mask at all
        rids, rmask = ids.flip(1), mask.flip(1)
        rref = base(input_ids=rids, attention_mask=rmask).logits
        rout = patched(input_ids=rids, attention_mask=rmask).logits
        full_ref, full_out = base(input_ids=ids).logits, patched(input_ids=ids).logits
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], **TOL)
    torch.testing.assert_close(rout[rmask.bool()], rref[rmask.bool()], **TOL)
    torch.testing.assert_close(full_out, full_ref, **TOL)
    # padded query rows see nothing when P == 0: zeros from the kernel, never NaN
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("family", sorted(FACTORIES))
def test_no_prefix_kv_cache_and_generate_match_unpatched(family: str) -> None:
    base = FACTORIES[family]()
    patched = prefixattn.patch(copy.deepcopy(base))
    ids, mask = left_padded_batch([6, 3, 5], seed=1)
    with torch.no_grad():
        ref = greedy_with_cache(base, ids, mask, steps=6)
        out = greedy_with_cache(patched, ids, mask, steps=6)
    torch.testing.assert_close(out, ref, **TOL)
    gen_kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False)
    g_ref = base.generate(ids, **gen_kw)
    g_out = patched.generate(ids, **gen_kw)
    assert torch.equal(g_out, g_ref)
    # the tokens are not all the same (otherwise greedy equality would say little)
    assert len(set(g_ref[:, ids.shape[1] :].flatten().tolist())) > 1


# ------------------------------------------------------------------ prefix semantics


@pytest.mark.parametrize("family", sorted(FACTORIES))
def test_static_prefix_matches_concat_reference(family: str) -> None:
    base = FACTORIES[family]()
    patched = prefixattn.patch(copy.deepcopy(base))
    prefix = random_prefix(base, P=5, seed=3)
    set_prefix(patched, static(prefix))
    ids, mask = left_padded_batch([7, 2, 5], seed=2)
    with torch.no_grad():
        out = patched(input_ids=ids, attention_mask=mask, position_ids=torch.arange(7)[None])
        ref = concat_prefix_forward(base, prefix, ids, mask)
        plain = base(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], ref.logits[real], **TOL)
    assert (out.logits[real] - plain[real]).abs().max() > 1e-2  # the prefix does something
    # the prefix stays out of the KV cache
    assert output_cache(out).get_seq_length() == ids.shape[1]


def test_per_row_prefix_matches_rows_alone() -> None:
    base = tiny_gpt2()
    patched = prefixattn.patch(copy.deepcopy(base))
    prefixes = [random_prefix(base, P=3, seed=s) for s in (10, 11)]
    ids, mask = left_padded_batch([5, 3], seed=4)
    per_row = torch.stack(prefixes, dim=2)  # [L, 2, B, Hkv, P, D]
    set_prefix(patched, StaticPrefix(list(per_row[:, 0]), list(per_row[:, 1])))
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, N]: each row's real tokens start at 0
    with torch.no_grad():
        out = patched(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    for b in range(2):
        real = mask[b].bool()
        with torch.no_grad():
            ref = concat_prefix_forward(base, prefixes[b], ids[b : b + 1, real]).logits[0]
        torch.testing.assert_close(out[b, real], ref, **TOL)


def test_two_models_do_not_interfere() -> None:
    base = tiny_gpt2()
    m1, m2 = prefixattn.patch(copy.deepcopy(base)), prefixattn.patch(copy.deepcopy(base))
    p1, p2 = random_prefix(base, 4, seed=20), random_prefix(base, 6, seed=21)
    set_prefix(m1, static(p1))
    set_prefix(m2, static(p2))
    ids, mask = left_padded_batch([5, 4], seed=5)
    pos = torch.arange(5)[None]
    with torch.no_grad():
        ref1 = concat_prefix_forward(base, p1, ids, mask).logits
        ref2 = concat_prefix_forward(base, p2, ids, mask).logits
        a1 = m1(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        a2 = m2(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        b1 = m1(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    torch.testing.assert_close(a1[real], ref1[real], **TOL)
    torch.testing.assert_close(a2[real], ref2[real], **TOL)
    torch.testing.assert_close(b1, a1, atol=0, rtol=0)
    assert get_prefix(m1) is not get_prefix(m2)
    assert get_prefix(base) is None


# ------------------------------------------------------------------ revertibility


@pytest.mark.parametrize("baseline", ["sdpa", "eager"])
def test_unpatch_restores_previous_implementation(baseline: str) -> None:
    model = tiny_gpt2(attn_implementation=baseline)
    ids, mask = left_padded_batch([4, 6], seed=6)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    assert prefixattn.patch(model) is model
    assert is_patched(model) and model.config._attn_implementation == "prefixattn"
    set_prefix(model, static(random_prefix(model, 3, seed=7)))
    assert prefixattn.unpatch(model) is model
    assert not is_patched(model)
    assert model.config._attn_implementation == baseline
    assert get_prefix(model) is None
    assert not any("_prefixattn_state" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    with pytest.raises(ValueError, match="not patched"):
        prefixattn.unpatch(model)


# ------------------------------------------------------------------ what reaches the kernel


def test_kernel_receives_scale_dropout_mask_and_causal(monkeypatch: pytest.MonkeyPatch) -> None:
    model = prefixattn.patch(tiny_gpt2(attn_pdrop=0.25))
    calls: list[dict] = []
    real_kernel = patching.prefix_attention

    def spy(q, k, v, pk=None, pv=None, **kw):
        calls.append(dict(q=q.shape, k=k.shape, pk=None if pk is None else pk.shape, **kw))
        return real_kernel(q, k, v, pk, pv, **kw)

    monkeypatch.setattr(patching, "prefix_attention", spy)
    ids, mask = left_padded_batch([5, 3], seed=8)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    scales = [model.transformer.h[i].attn.scaling for i in range(2)]
    assert [c["sm_scale"] for c in calls] == pytest.approx(scales)  # 1/sqrt(D)/(layer+1)
    assert scales[0] != pytest.approx(scales[1])
    assert all(c["dropout_p"] == 0.0 and c["causal"] is True for c in calls)
    kpm = calls[0]["key_padding_mask"]
    assert kpm.dtype == torch.bool and kpm.shape == (2, 5)
    assert torch.equal(kpm, mask.bool())
    calls.clear()
    model.train()
    model(input_ids=ids[:1, :], attention_mask=None)
    assert all(c["dropout_p"] == 0.25 for c in calls)
    assert calls[0]["key_padding_mask"] is None  # no padding: no mask at all


def test_dropout_in_train_mode_is_applied() -> None:
    model = prefixattn.patch(tiny_gpt2(attn_pdrop=0.5))
    ids, _ = left_padded_batch([6, 6], seed=9)
    model.train()
    a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert (a - b).abs().max() > 1e-4
    model.eval()
    with torch.no_grad():
        c, d = model(input_ids=ids).logits, model(input_ids=ids).logits
    torch.testing.assert_close(c, d, atol=0, rtol=0)


def test_triton_backend_matches_reference_through_the_model() -> None:
    pytest.importorskip("triton")
    base = tiny_gpt2()
    ref_model = prefixattn.patch(copy.deepcopy(base), backend="reference")
    tri_model = prefixattn.patch(copy.deepcopy(base), backend="triton")
    prefix = random_prefix(base, 3, seed=12)
    set_prefix(ref_model, static(prefix))
    set_prefix(tri_model, static(prefix))
    ids, mask = left_padded_batch([5, 3], seed=13)
    with torch.no_grad():
        ref = ref_model(input_ids=ids, attention_mask=mask).logits
        out = tri_model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ refusals


def test_bad_arguments_raise() -> None:
    with pytest.raises(TypeError, match="model"):
        prefixattn.patch(torch.nn.Linear(2, 2))
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="backend"):
        prefixattn.patch(model, backend="cuda")
    with pytest.raises(ValueError, match="patch"):
        set_prefix(model, None)
    prefixattn.patch(model)
    with pytest.raises(TypeError, match="provider"):
        set_prefix(model, torch.zeros(3))
    with pytest.raises(ValueError, match="keys"):
        StaticPrefix([torch.zeros(4, 2, 16)], [])
    with pytest.raises(ValueError, match="prefix_index"):
        StaticPrefix([torch.zeros(4, 2, 16)], [torch.zeros(4, 2, 16)], torch.zeros(2).long())
    # a provider with too few layers names the layer
    set_prefix(model, StaticPrefix([torch.zeros(4, 2, 16)], [torch.zeros(4, 2, 16)]))
    with pytest.raises(ValueError, match="layer 1"):
        model(input_ids=torch.tensor([[3, 4]]))


def test_unsupported_attention_patterns_raise() -> None:
    from transformers import DynamicCache, StaticCache

    model = prefixattn.patch(tiny_gpt2())
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    # packed sequences (position ids restart without an attention mask) are supported
    # now: each sequence as if alone (more in tests/test_padding_free.py)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]),
                       use_cache=False).logits  # fmt: skip
        alone = model(input_ids=ids.view(2, 3), use_cache=False).logits
    torch.testing.assert_close(packed.view(2, 3, -1), alone, atol=2e-5, rtol=1e-5)
    # a custom 4-D mask of the wrong size (4-D masks and static caches run: see
    # tests/test_static_cache_masks.py)
    with pytest.raises(ValueError, match="4-D"):
        model(input_ids=ids, attention_mask=torch.ones(1, 1, 5, 6, dtype=torch.bool))
    cache = StaticCache(config=model.config, max_cache_len=16)
    model(input_ids=ids, use_cache=True, **{cache_kwarg(model.forward): cache})
    # a mask longer than the keys, without a cache
    with pytest.raises(ValueError, match="aligned"):
        model(input_ids=ids, attention_mask=torch.ones(1, 9, dtype=torch.long), use_cache=False)
    assert isinstance(DynamicCache(config=model.config), DynamicCache)
    # a sliding window shorter than the sequence is the kernel's window now (the family
    # matrix, tests/test_families.py, checks values); a mask whose window is not the one
    # the kernel would apply (here: mask window 4, announced 3) is refused
    from transformers.masking_utils import sliding_window_causal_mask_function

    with pytest.raises(ValueError, match="sliding window"):
        patching.prefixattn_mask(
            1, q_length=6, kv_length=6, mask_function=sliding_window_causal_mask_function(4),
            local_size=3,
        )  # fmt: skip
    assert patching.prefixattn_mask(
        1, q_length=6, kv_length=6, mask_function=sliding_window_causal_mask_function(4),
        local_size=4,
    ) is None  # fmt: skip


def test_patch_non_interface_model_raises_and_leaves_it_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = tiny_gpt2()
    monkeypatch.setattr(type(model), "_can_set_attn_implementation", classmethod(lambda cls: False))
    with pytest.raises(ValueError, match="AttentionInterface"):
        prefixattn.patch(model)
    assert model.config._attn_implementation == "sdpa"
    assert not is_patched(model)


def test_llama_base_config_is_patched_too() -> None:
    model = prefixattn.patch(tiny_llama())
    assert model.model.config._attn_implementation == "prefixattn"
    prefixattn.unpatch(model)
    assert model.model.config._attn_implementation == "sdpa"


def test_cross_attention_is_non_causal_and_gets_no_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    base = tiny_gpt2(add_cross_attention=True)
    patched = prefixattn.patch(copy.deepcopy(base))
    ids, mask = left_padded_batch([5, 3], seed=14)
    g = torch.Generator().manual_seed(15)
    enc = torch.randn(2, 4, 64, generator=g)  # [B, M, hidden]
    enc_mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    kw = dict(input_ids=ids, attention_mask=mask, encoder_hidden_states=enc)
    with torch.no_grad():
        ref = base(**kw, encoder_attention_mask=enc_mask).logits
        seen = []
        real_kernel = patching.prefix_attention

        def spy(q, k, v, pk=None, pv=None, **kw2):
            seen.append((kw2["causal"], pk is None, q.shape[2], k.shape[2]))
            return real_kernel(q, k, v, pk, pv, **kw2)

        monkeypatch.setattr(patching, "prefix_attention", spy)
        out = patched(**kw, encoder_attention_mask=enc_mask).logits
        monkeypatch.setattr(patching, "prefix_attention", real_kernel)
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], **TOL)
    # per layer: causal self-attention over 5 keys, then non-causal cross-attention over 4
    assert seen == [(True, True, 5, 5), (False, True, 5, 4)] * 2
    # with a prefix: self-attention only (the concat reference has no cross-attention
    # prefix either)
    prefix = random_prefix(base, 3, seed=16)
    set_prefix(patched, static(prefix))
    with torch.no_grad():
        out = patched(**kw, encoder_attention_mask=enc_mask, position_ids=torch.arange(5)[None])
        ref = concat_prefix_forward(base, prefix, ids, mask, encoder_hidden_states=enc,
                                    encoder_attention_mask=enc_mask)  # fmt: skip
    torch.testing.assert_close(out.logits[real], ref.logits[real], **TOL)
