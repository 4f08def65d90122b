"""PromptTuning: exactness against hard prompts, masks / labels / positions / cache,
generation, init strategies, save/load, PEFT interop, training, errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("transformers")

import prefixattn
import prefixattn.hf.patching
from prefixattn import PromptTuning, PromptTuningConfig
from prefixattn.hf._compat import CACHE_NAMES, cache_kwarg, output_cache
from prefixattn.hf.prompt_tuning import CONFIG_NAME, WEIGHTS_NAME
from prefixattn.testing import (
    VOCAB,
    greedy_reference,
    left_padded_batch,
    single_thread,
    tiny_gpt2,
    tiny_llama,
)

TOL = dict(atol=2e-5, rtol=1e-5)
MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}
P = 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(params=sorted(MODELS))
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


def hard_prompt_ids(n: int = P, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (n,), generator=g)


def text_tuner(arch: str, ids: torch.Tensor | None = None) -> PromptTuning:
    """A PromptTuning whose soft prompt is exactly the embeddings of ``ids`` (P tokens)."""
    ids = hard_prompt_ids() if ids is None else ids
    return PromptTuning(MODELS[arch](), len(ids), init="text", init_text=ids.tolist())


def right_padded(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.full((len(lengths), n), 1, dtype=torch.long)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for b, m in enumerate(lengths):
        ids[b, :m] = torch.randint(2, VOCAB, (m,), generator=g)
        mask[b, :m] = 1
    return ids, mask


# ------------------------------------------------------------------ exactness


def test_text_init_equals_hard_prompt(arch: str) -> None:
    """A soft prompt holding the embeddings of tokens T is the hard prompt T."""
    T = hard_prompt_ids()
    pt = text_tuner(arch, T)
    ids, _ = right_padded([7, 7])
    labels = ids.clone()
    labels[:, :2] = -100
    out = pt(input_ids=ids, labels=labels)
    full = torch.cat([T.expand(2, -1), ids], dim=1)
    ref = pt.model(input_ids=full, labels=torch.cat([torch.full((2, P), -100), labels], dim=1))
    assert out.logits.shape == (2, 7, VOCAB)
    torch.testing.assert_close(out.logits, ref.logits[:, P:], **TOL)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    # a different prompt changes the result: the soft prompt is really used
    other = text_tuner(arch, hard_prompt_ids(seed=4))
    assert not torch.allclose(other(input_ids=ids).logits, out.logits, atol=1e-3)


def test_padding_mask_extension(arch: str) -> None:
    """Right-padded rows give the logits of the same rows run alone."""
    pt = text_tuner(arch)
    ids, mask = right_padded([6, 3, 5], seed=1)
    out = pt(input_ids=ids, attention_mask=mask).logits
    for b in range(3):
        n = int(mask[b].sum())
        alone = pt(input_ids=ids[b : b + 1, :n]).logits
        torch.testing.assert_close(out[b : b + 1, :n], alone, **TOL)


def test_labels_get_minus_100_on_virtual_tokens(arch: str) -> None:
    """Loss = mean CE over the real labels; the first real token is predicted from the last
    virtual position (as in PEFT). Reference: the bare model on the hard prompt."""
    T = hard_prompt_ids()
    pt = text_tuner(arch, T)
    ids, mask = right_padded([6, 4], seed=2)
    labels = ids.masked_fill(mask == 0, -100)
    out = pt(input_ids=ids, attention_mask=mask, labels=labels)
    full = torch.cat([T.expand(2, -1), ids], dim=1)
    full_mask = torch.cat([torch.ones(2, P, dtype=torch.long), mask], dim=1)
    logits = pt.model(input_ids=full, attention_mask=full_mask).logits  # [B, P + N, V]
    pred = logits[:, P - 1 : -1].reshape(-1, VOCAB)  # position t predicts token t + 1
    ref = torch.nn.functional.cross_entropy(pred, labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref, **TOL)
    assert int((labels != -100).sum()) == 10  # all real tokens count, the first included


def test_explicit_position_ids_and_inputs_embeds(arch: str) -> None:
    pt = text_tuner(arch)
    ids, _ = right_padded([5, 5], seed=3)
    base = pt(input_ids=ids).logits
    pos = torch.arange(5)[None].expand(2, 5)
    torch.testing.assert_close(pt(input_ids=ids, position_ids=pos).logits, base, **TOL)
    shifted = pt(input_ids=ids, position_ids=pos + 3).logits
    if arch == "gpt2":  # absolute positions: a shift must change the logits
        assert not torch.allclose(shifted, base, atol=1e-4)
    embeds = pt.model.get_input_embeddings()(ids)
    torch.testing.assert_close(pt(inputs_embeds=embeds).logits, base, **TOL)


def test_kv_cache_continuation(arch: str) -> None:
    """Prefill then one-token steps with the returned cache = one full forward."""
    pt = text_tuner(arch)
    ids, _ = right_padded([8, 8], seed=4)
    full = pt(input_ids=ids).logits
    out = pt(input_ids=ids[:, :5], use_cache=True)
    steps = [out.logits]
    cache = output_cache(out)
    assert cache.get_seq_length() == P + 5
    name = cache_kwarg(pt.model.forward)  # `cache`, or `past_key_values` before 5.2x
    for i in range(5, 8):
        out = pt(
            input_ids=ids[:, i : i + 1],
            attention_mask=torch.ones(2, i + 1, dtype=torch.long),
            use_cache=True,
            **{name: cache},
        )
        cache = output_cache(out)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)


def test_hidden_states_and_tuple_output(arch: str) -> None:
    pt = text_tuner(arch)
    ids, _ = right_padded([5], seed=5)
    out = pt(input_ids=ids, output_hidden_states=True)
    assert all(h.shape[1] == 5 for h in out.hidden_states)
    tup = pt(input_ids=ids, labels=ids, return_dict=False)
    assert isinstance(tup, tuple)
    torch.testing.assert_close(tup[0], pt(input_ids=ids, labels=ids).loss, **TOL)
    assert tup[1].shape == (1, 5, VOCAB)


# ------------------------------------------------------------------ generation


def test_generate_matches_hard_prompt_generation(arch: str) -> None:
    """Left-padded batch: same tokens as the bare model generating after the hard prompt."""
    T = hard_prompt_ids()
    pt = text_tuner(arch, T)
    ids, mask = left_padded_batch([5, 3], seed=6)
    out = pt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert out.shape == (2, 5 + 6)
    assert torch.equal(out[:, :5], ids)  # the input ids come back, virtual tokens do not
    # bare model: [pads, T, ids] with the pads masked gives the same positions and keys
    rows = []
    for b in range(2):
        n = int(mask[b].sum())
        row = torch.cat([T, ids[b, 5 - n :]])[None]
        ref = pt.model.generate(
            input_ids=row,
            attention_mask=torch.ones_like(row),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=1,
        )
        rows.append(ref[0, -6:])
    assert torch.equal(out[:, 5:], torch.stack(rows))


def test_generate_equals_manual_greedy_loop(arch: str) -> None:
    pt = PromptTuning(MODELS[arch](), P, init="random", seed=1)
    ids, mask = left_padded_batch([4, 6], seed=7)
    out = pt.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=5,
        do_sample=False,
        return_dict_in_generate=True,
    )
    cur, m = ids, mask
    with torch.no_grad():
        for _ in range(5):
            # left padding: the model's default positions count the pads; generate derives
            # positions from the mask, so pass them explicitly here
            pos = (m.cumsum(1) - 1).clamp(min=0)
            nxt = pt(input_ids=cur, attention_mask=m, position_ids=pos).logits[:, -1].argmax(-1)
            cur = torch.cat([cur, nxt[:, None]], dim=1)
            m = torch.cat([m, torch.ones_like(nxt)[:, None]], dim=1)
    assert torch.equal(out.sequences, cur)


def test_generate_lengths_and_inputs_embeds(arch: str) -> None:
    pt = text_tuner(arch)
    ids, mask = left_padded_batch([5, 5], seed=8)
    by_ids = pt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert pt.generate(input_ids=ids, max_length=8, do_sample=False).shape == (2, 8)
    embeds = pt.model.get_input_embeddings()(ids)
    new = pt.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(new, by_ids[:, 5:])  # inputs_embeds: only the new tokens, as HF does
    for name in CACHE_NAMES:
        with pytest.raises(ValueError, match=f"^{name} is not supported"):
            pt.generate(input_ids=ids, **{name: object()})


def test_to_prefix_tuning_is_the_same_function(arch: str) -> None:
    """The soft prompt's per-layer K/V as a kernel prefix (position offset P): same logits,
    same greedy generations; the PromptTuning keeps working on the now patched model."""
    pt = PromptTuning(MODELS[arch](initializer_range=0.2), P, init="vocab", seed=0)
    ids, mask = right_padded([6, 4], seed=15)
    want = pt(input_ids=ids, attention_mask=mask).logits
    lids, lmask = left_padded_batch([6, 3], seed=16)
    want_gen = pt.generate(input_ids=lids, attention_mask=lmask, max_new_tokens=6, do_sample=False)

    pre = pt.to_prefix_tuning()
    assert isinstance(pre, prefixattn.PrefixTuning) and pre.position_offset == P
    assert prefixattn.hf.patching.is_patched(pt.model)
    got = pre(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], **TOL)
    gen = pre.generate(input_ids=lids, attention_mask=lmask, max_new_tokens=6, do_sample=False)
    assert torch.equal(gen, want_gen)
    # the prefix stays attached to the shared model; PromptTuning must not pick it up
    again = pt(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(again[real], want[real], **TOL)
    with torch.no_grad():
        pre.prefix.mul_(1.5)  # a different prefix gives different logits: the check is real
    assert not torch.allclose(pre(input_ids=ids, attention_mask=mask).logits[real], want[real])


# ------------------------------------------------------------------ init strategies


def test_init_random_vocab_text() -> None:
    model = tiny_llama()
    W = model.get_input_embeddings().weight.detach()
    r = PromptTuning(model, 64, init="random", seed=0).prompt.detach()
    assert abs(r.std().item() - W.std().item()) < 0.3 * W.std().item()
    torch.testing.assert_close(r, PromptTuning(model, 64, init="random", seed=0).prompt.detach())

    v = PromptTuning(model, 8, init="vocab", seed=0).prompt.detach()
    assert (v[:, None] == W[None]).all(-1).any(-1).all()  # every row is a token's embedding
    v2 = PromptTuning(model, 8, init="vocab", seed=1).prompt.detach()
    assert not torch.equal(v, v2)

    ids = [5, 9, 11]
    t = PromptTuning(model, 7, init="text", init_text=ids).prompt.detach()
    torch.testing.assert_close(t, W[torch.tensor([5, 9, 11, 5, 9, 11, 5])])
    t2 = PromptTuning(model, 2, init="text", init_text=torch.tensor(ids)).prompt.detach()
    torch.testing.assert_close(t2, W[torch.tensor([5, 9])])


def test_init_text_with_tokenizer() -> None:
    from prefixattn.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer(["the quick market"])
    model = tiny_model(len(tok))
    pt = PromptTuning(model, 5, init="text", init_text="the quick market", tokenizer=tok)
    want = tok("the quick market", add_special_tokens=False)["input_ids"]
    assert len(want) == 3
    W = model.get_input_embeddings().weight.detach()
    torch.testing.assert_close(pt.prompt.detach(), W[torch.tensor(want + want[:2])])
    assert pt.config.init_text == "the quick market"


# ------------------------------------------------------------------ parameters, training


def test_freezes_model_and_counts_parameters(arch: str) -> None:
    model = MODELS[arch]()
    pt = PromptTuning(model, P, init="vocab", seed=0)
    hidden = model.get_input_embeddings().embedding_dim
    base = sum(p.numel() for p in model.parameters())
    assert pt.num_trainable_parameters() == P * hidden
    assert pt.trainable_share() == pytest.approx(P * hidden / base)
    assert not any(p.requires_grad for p in model.parameters())
    ids, _ = right_padded([5, 5], seed=9)
    pt(input_ids=ids, labels=ids).loss.backward()
    assert pt.prompt.grad is not None and pt.prompt.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_keeps_gradients(reentrant: bool) -> None:
    pt = PromptTuning(tiny_llama(), P, init="vocab", seed=0)
    ids, _ = right_padded([6, 6], seed=14)
    pt(input_ids=ids, labels=ids).loss.backward()
    want = pt.prompt.grad.clone()
    pt.prompt.grad = None
    pt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    pt.train()
    pt(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    torch.testing.assert_close(pt.prompt.grad, want, atol=1e-6, rtol=1e-4)


def test_loss_falls_on_a_toy_task() -> None:
    """Learn to continue every input with the fixed sequence 7 8 9 10."""
    # initializer_range 0.2: with the default 0.02 the random model's logits are nearly
    # uniform whatever the input, and no prompt can move them much
    pt = PromptTuning(tiny_llama(initializer_range=0.2), 8, init="vocab", seed=0)
    opt = torch.optim.Adam([pt.prompt], lr=0.05)
    g = torch.Generator().manual_seed(0)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat(
            [
                torch.randint(20, VOCAB, (8, 4), generator=g),
                torch.tensor([7, 8, 9, 10]).expand(8, 4),
            ],
            dim=1,
        )
        y = x.clone()
        y[:, :4] = -100
        return x, y

    losses = []
    for _ in range(40):
        x, y = batch()
        loss = pt(input_ids=x, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.3 * sum(losses[:5]) / 5


def test_half_precision_model_keeps_fp32_prompt() -> None:
    model = tiny_llama().to(torch.bfloat16)
    pt = PromptTuning(model, P, init="vocab", seed=0)
    assert pt.prompt.dtype == torch.float32
    ids, _ = right_padded([5], seed=10)
    out = pt(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert pt.prompt.grad.dtype == torch.float32


# ------------------------------------------------------------------ files


def test_save_load_roundtrip(tmp_path, arch: str) -> None:
    pt = PromptTuning(MODELS[arch](), P, init="random", seed=0)
    with torch.no_grad():
        pt.prompt.add_(0.1)  # "trained"
    pt.save(tmp_path / "a")
    assert {p.name for p in (tmp_path / "a").iterdir()} == {CONFIG_NAME, WEIGHTS_NAME}
    size = sum(p.stat().st_size for p in (tmp_path / "a").iterdir())
    hidden = pt.hidden_size
    assert P * hidden * 4 <= size < P * hidden * 4 + 4096
    meta = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert meta["config"]["num_virtual_tokens"] == P

    loaded = PromptTuning.load(tmp_path / "a", MODELS[arch]())
    assert torch.equal(loaded.prompt, pt.prompt)
    ids, _ = right_padded([6], seed=11)
    torch.testing.assert_close(loaded(input_ids=ids).logits, pt(input_ids=ids).logits, **TOL)
    assert prefixattn.PromptTuningConfig is PromptTuningConfig


def test_load_errors(tmp_path) -> None:
    pt = PromptTuning(tiny_llama(), P, init="vocab", seed=0)
    pt.save(tmp_path)
    with pytest.raises(ValueError, match="hidden size"):
        PromptTuning.load(tmp_path, tiny_llama(hidden_size=32, intermediate_size=64))
    with pytest.raises(ValueError, match="gpt2"):
        PromptTuning.load(tmp_path, tiny_gpt2())
    with pytest.raises(ValueError, match=r"PromptTuning\.save"):
        PromptTuning.load(tmp_path / "nope", tiny_llama())
    with pytest.raises(TypeError, match="model"):
        PromptTuning.load(tmp_path, object())


# ------------------------------------------------------------------ PEFT


@pytest.fixture
def peft():
    return pytest.importorskip("peft")


def test_peft_parity(peft, tmp_path, arch: str) -> None:
    from peft import PromptTuningConfig as PeftConfig
    from peft import get_peft_model

    # a tiny random GPT-2 at its default init (std 0.02) repeats its last token whatever the
    # prompt: a larger init lets the soft prompt change the generations
    base = MODELS[arch](**({"initializer_range": 0.1} if arch == "gpt2" else {}))
    pm = get_peft_model(
        copy.deepcopy(base), PeftConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    )
    with torch.no_grad():  # PEFT's N(0, 1) init is huge for these models: use a sane prompt
        emb = pm.prompt_encoder["default"].embedding.weight
        emb.copy_(torch.randn(emb.shape, generator=torch.Generator().manual_seed(0)) * 0.1)
    ours = PromptTuning.from_peft(pm, copy.deepcopy(base))

    ids, mask = right_padded([6, 4], seed=12)
    labels = ids.masked_fill(mask == 0, -100)
    ref = pm(input_ids=ids, attention_mask=mask, labels=labels)
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits[:, P:], **TOL)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    ref.loss.backward()
    out.loss.backward()
    torch.testing.assert_close(
        ours.prompt.grad, pm.prompt_encoder["default"].embedding.weight.grad, atol=1e-6, rtol=1e-4
    )

    lids, lmask = left_padded_batch([5, 3], seed=13)
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=1)
    # against greedy decoding over PEFT's forward, not PEFT's generate (see test_peft_upstream)
    ref_gen = greedy_reference(pm, lids, lmask, max_new_tokens=5, pad_token_id=1)
    out_gen = ours.generate(input_ids=lids, attention_mask=lmask, **gen)
    assert torch.equal(out_gen, ref_gen)
    assert not torch.equal(out_gen, base.generate(input_ids=lids, attention_mask=lmask, **gen))

    # round trip through PEFT's file format, both ways
    ours.to_peft(tmp_path / "peft")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft"))
    torch.testing.assert_close(
        reloaded(input_ids=ids, attention_mask=mask).logits[:, P:], out.logits, **TOL
    )
    from_dir = PromptTuning.from_peft(tmp_path / "peft", copy.deepcopy(base))
    assert torch.equal(from_dir.prompt, ours.prompt)


def test_from_peft_rejects_other_adapters(peft, tmp_path) -> None:
    from peft import PrefixTuningConfig as PeftPrefix
    from peft import get_peft_model

    pm = get_peft_model(tiny_gpt2(), PeftPrefix(task_type="CAUSAL_LM", num_virtual_tokens=P))
    with pytest.raises(ValueError, match="PROMPT_TUNING"):
        PromptTuning.from_peft(pm)
    with pytest.raises(ValueError, match="model is required"):
        PromptTuning.from_peft(tmp_path)
    with pytest.raises(TypeError, match="adapter"):
        PromptTuning.from_peft(123, tiny_gpt2())


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(num_virtual_tokens=0), ValueError, "num_virtual_tokens"),
        (dict(num_virtual_tokens=2.5), ValueError, "num_virtual_tokens"),
        (dict(init="zeros"), ValueError, "init must be one of"),
        (dict(init="text"), ValueError, "init_text"),
        (dict(init="text", init_text="hello"), ValueError, "tokenizer"),
        (dict(init="random", init_text=[1, 2]), ValueError, "init_text"),
        (dict(init="text", init_text=[]), ValueError, "init_text"),
        (dict(init="text", init_text=[1, VOCAB + 5]), ValueError, "init_text token ids"),
        (dict(init="text", init_text=[1.5]), TypeError, "init_text"),
        (dict(init="text", init_text=torch.ones(2, 2, dtype=torch.long)), TypeError, "init_text"),
        (dict(tokenizer=object()), ValueError, "tokenizer"),
        (dict(seed="x"), TypeError, "seed"),
    ],
)
def test_constructor_errors(kwargs: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        PromptTuning(tiny_gpt2(), **kwargs)


def test_model_type_errors() -> None:
    with pytest.raises(TypeError, match="model must be a transformers PreTrainedModel"):
        PromptTuning(torch.nn.Linear(2, 2))


def test_forward_input_errors() -> None:
    pt = PromptTuning(tiny_gpt2(), P, init="vocab", seed=0)
    ids, mask = right_padded([5, 5])
    with pytest.raises(ValueError, match="input_ids"):
        pt(attention_mask=mask)
    with pytest.raises(ValueError, match="not both"):
        pt(input_ids=ids, inputs_embeds=pt.model.get_input_embeddings()(ids))
    with pytest.raises(ValueError, match="attention_mask"):
        pt(input_ids=ids, attention_mask=mask[:, :3])
    with pytest.raises(ValueError, match="labels"):
        pt(input_ids=ids, labels=ids[:1])
    with pytest.raises(ValueError, match="position_ids"):
        pt(input_ids=ids, position_ids=torch.arange(3)[None])
    with pytest.raises(TypeError, match="input_ids"):
        pt(input_ids=ids.float())
    with pytest.raises(ValueError, match="inputs_embeds"):
        pt(inputs_embeds=torch.zeros(2, 5, 7))
    for name in CACHE_NAMES:
        with pytest.raises(TypeError, match=f"^{name} must be"):
            pt(input_ids=ids, **{name: (1, 2)})
    with pytest.raises(TypeError, match="config"):
        PromptTuning.from_config(tiny_gpt2(), {"num_virtual_tokens": 3})
    with pytest.raises(ValueError, match="unknown PromptTuningConfig fields"):
        PromptTuningConfig.from_dict({"num_virtual_tokens": 3, "bogus": 1})
