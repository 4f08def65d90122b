"""The chunked causal-LM loss against transformers' loss on materialized logits, and
PrefixTuning(chunked_loss=True) against the model's own loss."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from prefixattn import PrefixTuning, PromptTuning
from prefixattn.losses import causal_lm_loss
from prefixattn.testing import left_padded_batch, single_thread, tiny_gpt2, tiny_llama


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def hf_style_loss(hidden, weight, labels, bias=None, num_items=None) -> torch.Tensor:
    """transformers' ForCausalLMLoss on lm_head(hidden), written out independently."""
    logits = F.linear(hidden, weight, bias).float()
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    if num_items is None:
        return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
    return (
        F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum") / num_items
    )


def _data(B=3, N=11, d=8, V=37, seed=0, dtype=torch.float64, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, N, d, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, d, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=dtype, requires_grad=True) if bias else None
    labels = torch.randint(0, V, (B, N), generator=g)
    labels[0, :4] = -100  # left padding
    labels[2, -3:] = -100  # right padding
    return hidden, weight, b, labels


@pytest.mark.parametrize("chunk", [1, 4, 7, None])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("num_items", [None, 13])
def test_matches_materialized_logits_in_float64(chunk, bias, num_items) -> None:
    hidden, weight, b, labels = _data(bias=bias)
    leaves = [t for t in (hidden, weight, b) if t is not None]
    got = causal_lm_loss(hidden, weight, labels, b, num_items_in_batch=num_items,
                         chunk_tokens=chunk)  # fmt: skip
    want = hf_style_loss(hidden, weight, labels, b, num_items)
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-6)
    g_got = torch.autograd.grad(got, leaves)
    g_want = torch.autograd.grad(want, leaves)
    for a, w in zip(g_got, g_want):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-7)


class _CountMatmuls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_gradient_made_in_the_forward_pass() -> None:
    """With grad enabled each chunk costs two matmuls in the forward (logits, d hidden) and
    none in the backward (no recompute); under no_grad only the logits one. A scaled loss
    scales the gradients."""
    hidden, weight, _, labels = _data()
    weight = weight.detach()  # frozen lm_head: only d hidden
    n_chunks = -(-int((labels[:, 1:] != -100).sum()) // 4)
    with torch.no_grad(), _CountMatmuls() as mode:
        causal_lm_loss(hidden, weight, labels, chunk_tokens=4)
    assert mode.calls == n_chunks
    with _CountMatmuls() as mode:
        loss = causal_lm_loss(hidden, weight, labels, chunk_tokens=4)
    assert mode.calls == 2 * n_chunks
    with _CountMatmuls() as mode:
        (dh,) = torch.autograd.grad(3.0 * loss, [hidden])
    assert mode.calls == 0
    (want,) = torch.autograd.grad(3.0 * hf_style_loss(hidden, weight, labels), [hidden])
    torch.testing.assert_close(dh, want, rtol=1e-5, atol=1e-7)


def test_low_precision_follows_transformers_rounding() -> None:
    """bf16 hidden / weight: logits rounded to bf16 before the fp32 softmax, as the model
    does; the loss and the hidden-state gradient match within bf16 noise."""
    hidden, weight, _, labels = _data(dtype=torch.bfloat16, V=64, d=16)
    got = causal_lm_loss(hidden, weight, labels, chunk_tokens=5)
    want = hf_style_loss(hidden, weight, labels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (dh,) = torch.autograd.grad(got, [hidden])
    (dh_want,) = torch.autograd.grad(want, [hidden])
    assert dh.dtype == torch.bfloat16
    torch.testing.assert_close(dh.float(), dh_want.float(), rtol=2e-2, atol=1e-3)


def test_bad_input_names_the_argument() -> None:
    hidden, weight, _, labels = _data()
    with pytest.raises(ValueError, match="labels must have shape"):
        causal_lm_loss(hidden, weight, labels[:, :-1])
    with pytest.raises(ValueError, match="weight must have shape"):
        causal_lm_loss(hidden, weight[:, :-1], labels)
    with pytest.raises(ValueError, match=r"labels must be in \[0, V=37\)"):
        causal_lm_loss(hidden, weight, labels.masked_fill(labels == labels[1, 5], 99))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        causal_lm_loss(hidden, weight, labels.float())
    with pytest.raises(ValueError, match="chunk_tokens must be a positive int"):
        causal_lm_loss(hidden, weight, labels, chunk_tokens=0)
    with pytest.raises(ValueError, match=r"hidden must have shape \[B, N, d\]"):
        causal_lm_loss(hidden[0], weight, labels)


# ------------------------------------------------------------------ PrefixTuning / PromptTuning


class _LargestLogits(TorchDispatchMode):
    """Records the most elements of any new tensor (views do not allocate) whose last dim
    is the vocabulary."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab:
                self.largest = max(self.largest, t.numel())
        return out


TUNERS = {
    "prefix": lambda model, **kw: PrefixTuning(model, 5, init_std=0.5, **kw),
    "prompt": lambda model, **kw: PromptTuning(model, 4, seed=0, **kw),
}


@pytest.mark.parametrize("tuner", sorted(TUNERS))
@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_chunked_loss_is_the_models_loss(make, tuner: str) -> None:
    base = make()
    plain = TUNERS[tuner](copy.deepcopy(base))
    chunked = TUNERS[tuner](copy.deepcopy(base), chunked_loss=True)
    chunked.load_state_dict(plain.state_dict())
    ids, mask = left_padded_batch([9, 6, 3], seed=2)
    labels = ids.masked_fill(mask == 0, -100)
    plain.train()
    chunked.train()
    ref = plain(input_ids=ids, attention_mask=mask, labels=labels)
    out = chunked(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None and ref.logits is not None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    ref.loss.backward()
    out.loss.backward()
    for (name, p), q in zip(plain.named_parameters(), chunked.parameters()):
        if p.requires_grad:
            assert p.grad.abs().max() > 0
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # eval mode (or no labels): the model's own output, logits included
    chunked.eval()
    assert chunked(input_ids=ids, attention_mask=mask, labels=labels).logits is not None


def test_chunked_loss_never_materializes_the_logits(monkeypatch) -> None:
    """With 4-token chunks no op makes a logits-shaped tensor of more than 4 rows; the
    model's own loss makes the full [B, N, V] one."""
    from prefixattn import losses

    base = tiny_gpt2(vocab_size=211)  # no other dim of the model is 211
    V = base.config.vocab_size
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 4 * V)
    ids, mask = left_padded_batch([9, 6, 3], seed=2)
    labels = ids.masked_fill(mask == 0, -100)
    largest = {}
    for chunked in (False, True):
        pt = PrefixTuning(copy.deepcopy(base), 5, chunked_loss=chunked)
        pt.train()
        with _LargestLogits(V) as mode:
            pt(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        largest[chunked] = mode.largest
    assert largest[False] >= ids.numel() * V
    assert 0 < largest[True] <= 4 * V


def test_chunked_loss_validation() -> None:
    with pytest.raises(TypeError, match="chunked_loss must be a bool"):
        PrefixTuning(tiny_gpt2(), 4, chunked_loss="yes")
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                        intermediate_size=64, vocab_size=50)  # fmt: skip
    with pytest.raises(ValueError, match="chunked_loss=True supports models of type"):
        PrefixTuning(GPTNeoXForCausalLM(cfg), 4, chunked_loss=True)
    pt = PrefixTuning(tiny_gpt2(), 4, chunked_loss=True)
    pt.train()
    ids = torch.randint(0, 50, (2, 6))
    with pytest.raises(ValueError, match="does not take"):
        pt(input_ids=ids, labels=ids, logits_to_keep=1)
