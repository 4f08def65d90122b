"""PEFT interop: from_peft reproduces PEFT's own logits, prefix gradients and greedy
generations (live PeftModel and saved adapter, with and without prefix_projection); to_peft
writes an adapter PEFT loads with identical logits. Generations are checked against greedy
decoding over PEFT's *forward* (greedy_reference: one unpadded row at a time, no cache),
not against PEFT's generate, which does not follow its own forward under some transformers
releases (tests/test_peft_upstream.py reports that as an upstream defect)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from prefixattn import PrefixTuning  # noqa: E402
from prefixattn.testing import (  # noqa: E402
    greedy_reference,
    left_padded_batch,
    single_thread,
    tiny_gpt2,
    tiny_llama,
)

TOL = dict(atol=2e-5, rtol=1e-5)
GRAD_TOL = dict(atol=1e-7, rtol=1e-4)
P = 5


def gpt2() -> torch.nn.Module:
    """A tiny GPT-2 whose greedy generations depend on the prefix: with GPT-2's default init
    (std 0.02) a tiny random GPT-2 repeats its last token whatever the prefix is."""
    return tiny_gpt2(initializer_range=0.1)


FAMILIES = {"gpt2": gpt2, "llama": tiny_llama}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def make_peft(base: torch.nn.Module, projection: bool, seed: int = 0) -> torch.nn.Module:
    cfg = peft.PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=P,
        prefix_projection=projection,
        encoder_hidden_size=24,
    )
    torch.manual_seed(seed)
    return peft.get_peft_model(copy.deepcopy(base), cfg).eval()


def flat_to_prefix(flat: torch.Tensor, L: int, Hkv: int, D: int) -> torch.Tensor:
    """PEFT's [P, L*2*Hkv*D] rows -> [L, 2, Hkv, P, D] (independent of the code under test)."""
    out = torch.empty(L, 2, Hkv, flat.shape[0], D)
    for p in range(flat.shape[0]):
        for layer in range(L):
            for kv in range(2):
                for h in range(Hkv):
                    start = ((layer * 2 + kv) * Hkv + h) * D
                    out[layer, kv, h, p] = flat[p, start : start + D]
    return out


def real_logits(out, mask):
    return out.logits[mask.bool()]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("projection", [False, True])
def test_live_peft_model_parity(family: str, projection: bool) -> None:
    base = FAMILIES[family]()
    pm = make_peft(base, projection)
    ours = PrefixTuning.from_peft(pm, copy.deepcopy(base)).eval()
    assert ours.position_offset == P
    assert ours.config.prefix_projection is projection
    ids, mask = left_padded_batch([6, 3, 5], seed=1)
    labels = ids.masked_fill(mask == 0, -100)

    out_p = pm(input_ids=ids, attention_mask=mask, labels=labels)
    out_o = ours(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(real_logits(out_o, mask), real_logits(out_p, mask), **TOL)
    torch.testing.assert_close(out_o.loss, out_p.loss, **TOL)

    out_p.loss.backward()
    out_o.loss.backward()
    enc = pm.prompt_encoder["default"]
    if projection:
        pairs = [
            (ours.embedding.weight, enc.embedding.weight),
            (ours.transform[0].weight, enc.transform[0].weight),
            (ours.transform[0].bias, enc.transform[0].bias),
            (ours.transform[2].weight, enc.transform[2].weight),
            (ours.transform[2].bias, enc.transform[2].bias),
        ]
        for a, b in pairs:
            torch.testing.assert_close(a.grad, b.grad, **GRAD_TOL)
            assert b.grad.abs().max() > 0
    else:
        g = ours.geometry
        want = flat_to_prefix(enc.embedding.weight.grad, g.num_layers, g.num_kv_heads, g.head_dim)
        torch.testing.assert_close(ours.prefix.grad, want, **GRAD_TOL)
        assert want.abs().max() > 0

    gen_kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    g_o = ours.generate(**gen_kw)
    assert torch.equal(g_o, greedy_reference(pm, ids, mask, max_new_tokens=6))
    assert not torch.equal(g_o, base.generate(**gen_kw))  # the prefix changes the tokens


@pytest.mark.parametrize("projection", [False, True])
def test_saved_adapter_parity(tmp_path, projection: bool) -> None:
    base = gpt2()
    make_peft(base, projection, seed=3).save_pretrained(str(tmp_path))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    ours = PrefixTuning.from_peft(tmp_path, copy.deepcopy(base)).eval()
    assert ours.config.prefix_projection is False  # the file holds the projected prefix
    ids, mask = left_padded_batch([7, 4, 2, 6], seed=2)
    labels = ids.masked_fill(mask == 0, -100)

    # gradients w.r.t. the saved prefix: switch PEFT's (inference-mode) prefix to trainable
    weight = pm.prompt_encoder["default"].embedding.weight
    weight.requires_grad_(True)
    out_p = pm(input_ids=ids, attention_mask=mask, labels=labels)
    out_o = ours(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(real_logits(out_o, mask), real_logits(out_p, mask), **TOL)
    out_p.loss.backward()
    out_o.loss.backward()
    g = ours.geometry
    want = flat_to_prefix(weight.grad, g.num_layers, g.num_kv_heads, g.head_dim)
    torch.testing.assert_close(ours.prefix.grad, want, **GRAD_TOL)
    weight.requires_grad_(False)

    gen_kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=7, do_sample=False)
    g_o = ours.generate(**gen_kw)
    assert torch.equal(g_o, greedy_reference(pm, ids, mask, max_new_tokens=7))
    assert len(set(g_o[:, ids.shape[1] :].flatten().tolist())) > 1
    assert not torch.equal(g_o, base.generate(**gen_kw))  # the prefix changes the tokens


def test_to_peft_round_trip(tmp_path) -> None:
    base = tiny_llama()
    ours = PrefixTuning(copy.deepcopy(base), P, position_offset=P, init="vocab")
    with torch.no_grad():
        ours.prefix.add_(0.3 * torch.randn_like(ours.prefix))  # not just an init
    ours.to_peft(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PREFIX_TUNING" and cfg["num_virtual_tokens"] == P
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    ids, mask = left_padded_batch([5, 2, 4], seed=4)
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask)
        b = pm(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(real_logits(a, mask), real_logits(b, mask), **TOL)
    gen_kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    g_o = ours.generate(**gen_kw)
    assert torch.equal(g_o, greedy_reference(pm, ids, mask, max_new_tokens=5))
    assert not torch.equal(g_o, base.generate(**gen_kw))  # the prefix changes the tokens
    back = PrefixTuning.from_peft(tmp_path, copy.deepcopy(base))
    torch.testing.assert_close(back.prefix, ours.prefix, atol=0, rtol=0)


def test_to_peft_refuses_a_different_position_convention(tmp_path) -> None:
    ours = PrefixTuning(tiny_gpt2(), P)  # position_offset=0
    with pytest.raises(ValueError, match="position_offset"):
        ours.to_peft(tmp_path)
    ours.to_peft(tmp_path, allow_position_mismatch=True)
    assert (tmp_path / "adapter_model.safetensors").is_file()


def test_from_peft_rejects_mismatches(tmp_path) -> None:
    make_peft(tiny_gpt2(), False).save_pretrained(str(tmp_path / "gpt2"))
    with pytest.raises(ValueError, match="num_layers"):
        PrefixTuning.from_peft(tmp_path / "gpt2", tiny_gpt2(n_layer=3))
    with pytest.raises(ValueError, match=r"adapter_config\.json"):
        PrefixTuning.from_peft(tmp_path / "nothing", tiny_gpt2())
    with pytest.raises(ValueError, match="model"):
        PrefixTuning.from_peft(tmp_path / "gpt2")
    with pytest.raises(TypeError, match="adapter"):
        PrefixTuning.from_peft(42, tiny_gpt2())
    lora = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(target_modules=["c_attn"]))
    lora.save_pretrained(str(tmp_path / "lora"))
    with pytest.raises(ValueError, match="PREFIX_TUNING"):
        PrefixTuning.from_peft(tmp_path / "lora", tiny_gpt2())
    with pytest.raises(ValueError, match="PREFIX_TUNING"):
        PrefixTuning.from_peft(lora, tiny_gpt2())
