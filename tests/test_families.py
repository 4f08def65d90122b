"""The family matrix: tiny random configs of the popular decoder families, each run on
sequences longer than its sliding window (W = 8), patched vs stock and with a prefix vs an
independent reference.

The reference for a prefix is eager attention written here, registered as its own
attention implementation: the prefix is concatenated with the layer's keys and values,
the sequence part of the mask is transformers' own eager mask (its sliding window
included), the prefix columns follow the documented semantics (``"all"``: always
visible; ``"sliding"``: prefix key c at position c - P), and soft-capping and sinks are
applied as the families' eager code does. It shares no code with prefixattn.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, eager_mask  # noqa: E402

import prefixattn  # noqa: E402
from prefixattn import PrefixTuning  # noqa: E402
from prefixattn.hf.testing import greedy_reference, left_padded_batch, single_thread  # noqa: E402

T = transformers
W = 8  # every windowed family's sliding window: the sequences below are longer
VOCAB = 128
SPECIAL = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)
BASE = dict(
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
    intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=256,
)  # fmt: skip
HYBRID = ["sliding_attention", "full_attention"]

# family -> (model class, config class, config kwargs, what it needs from the kernel)
FAMILIES = {
    "gpt2": (
        "GPT2LMHeadModel", "GPT2Config",
        dict(n_layer=2, n_head=4, n_embd=64, vocab_size=VOCAB, n_positions=256,
             scale_attn_by_inverse_layer_idx=True),
        "per-layer scaling",
    ),
    "llama": ("LlamaForCausalLM", "LlamaConfig", BASE, "GQA"),
    "qwen2": (
        "Qwen2ForCausalLM", "Qwen2Config",
        {**BASE, "num_hidden_layers": 3, "use_sliding_window": True, "sliding_window": W,
         "max_window_layers": 1},
        "GQA, window on layers >= max_window_layers",
    ),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {**BASE, "head_dim": 16}, "GQA, q/k norm"),
    "mistral": ("MistralForCausalLM", "MistralConfig", {**BASE, "sliding_window": W}, "window"),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", {**BASE, "head_dim": 16}, "GQA"),
    "gemma2": (
        "Gemma2ForCausalLM", "Gemma2Config",
        {**BASE, "head_dim": 16, "sliding_window": W, "layer_types": HYBRID,
         "attn_logit_softcapping": 5.0, "final_logit_softcapping": 30.0,
         "query_pre_attn_scalar": 16},
        "hybrid window, soft-capping",
    ),
    "gemma3": (
        "Gemma3ForCausalLM", "Gemma3TextConfig",
        {**BASE, "head_dim": 16, "sliding_window": W, "layer_types": HYBRID,
         "query_pre_attn_scalar": 16},
        "hybrid window",
    ),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {**BASE, "sliding_window": W}, "window"),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", BASE, "q/k norm"),
    "gpt_neox": (
        "GPTNeoXForCausalLM", "GPTNeoXConfig",
        dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128,
             vocab_size=VOCAB, max_position_embeddings=256),
        "partial rotary",
    ),
    "starcoder2": ("Starcoder2ForCausalLM", "Starcoder2Config", {**BASE, "sliding_window": W}, "window"),
    "granite": ("GraniteForCausalLM", "GraniteConfig", BASE, "custom scaling"),
    "gpt_oss": (
        "GptOssForCausalLM", "GptOssConfig",
        {**BASE, "head_dim": 16, "sliding_window": W, "layer_types": HYBRID,
         "num_local_experts": 4, "num_experts_per_tok": 2,
         "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
        "hybrid window, sinks",
    ),
}  # fmt: skip
WINDOWED = [f for f, (_, _, kw, _) in FAMILIES.items() if kw.get("sliding_window")]
BACKENDS = ["sdpa", "reference"]
TOL = dict(atol=1e-5, rtol=1e-5)


def build(family: str, seed: int = 0):
    """The family's tiny model (eager attention, fp32, eval) with random weights; gpt-oss's
    sinks (left uninitialised by ``_from_config``) get random values."""
    model_name, config_name, kw, _ = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = getattr(T, config_name)(**{**kw, **SPECIAL})
    model = getattr(T, model_name)._from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".sinks"):
                p.copy_(torch.randn(p.shape) * 0.5)
    return model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def _batch(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return left_padded_batch(lengths, seed=seed)


LENGTHS = [21, 13, 4]  # longer than W, longer than W, shorter: left padding up to 17


# --------------------------------------------------------------------------------------
# the independent reference: eager attention over an explicit prefix
# --------------------------------------------------------------------------------------

REF_IMPL = "prefixattn_test_reference"
_REF_ATTR = "_prefix_reference_state"


def _reference_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
):
    """query [B, H, Nq, D], key/value [B, Hkv, Nk, D], attention_mask: transformers' eager
    additive mask [B, 1, Nq, Nk] (window included) or None. Computed in float64."""
    state = module.__dict__.get(_REF_ATTR) or {}
    B, H, Nq, D = query.shape
    Hkv, Nk = key.shape[1], key.shape[2]
    g = H // Hkv
    scale = scaling if scaling is not None else 1.0 / math.sqrt(D)
    q = query.double()
    k = key.double().repeat_interleave(g, 1)  # [B, H, Nk, D]
    v = value.double().repeat_interleave(g, 1)
    vis = torch.ones(B, 1, Nq, Nk, dtype=torch.bool)
    if attention_mask is not None:
        vis = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    prefix = state.get("prefix")  # [L, 2, Hkv, P, D] or None
    if prefix is not None:
        pk = (
            prefix[module.layer_idx, 0].double().repeat_interleave(g, 0)[None].expand(B, -1, -1, -1)
        )
        pv = (
            prefix[module.layer_idx, 1].double().repeat_interleave(g, 0)[None].expand(B, -1, -1, -1)
        )
        P = pk.shape[2]
        pvis = torch.ones(B, 1, Nq, P, dtype=torch.bool)
        window = kwargs.get("sliding_window")
        if window is not None and state.get("prefix_window") == "sliding":
            pos = torch.arange(Nq)[:, None] + (Nk - Nq)  # no cache: positions of the queries
            c = torch.arange(P)[None, :]
            pvis = pvis & (c - P > pos - window)
        k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        vis = torch.cat([pvis.expand(B, 1, Nq, P), vis.expand(B, 1, Nq, Nk)], -1)
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if kwargs.get("softcap") is not None:
        s = kwargs["softcap"] * torch.tanh(s / kwargs["softcap"])
    s = s.masked_fill(~vis, float("-inf"))
    sinks = kwargs.get("s_aux")
    if sinks is not None:
        col = sinks.double().view(1, H, 1, 1).expand(B, H, Nq, 1)
        p = torch.softmax(torch.cat([s, col], -1), -1)[..., :-1]
    else:
        p = torch.softmax(s, -1).nan_to_num(0.0)
    out = torch.einsum("bhij,bhjd->bhid", p, v).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(REF_IMPL, _reference_attention)
AttentionMaskInterface.register(REF_IMPL, eager_mask)


def reference_model(model, prefix: torch.Tensor | None, prefix_window: str = "all"):
    """A deep copy of (unpatched) ``model`` on the reference attention with ``prefix``."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation(REF_IMPL)
    state = {"prefix": prefix, "prefix_window": prefix_window}
    for m in ref.modules():
        m.__dict__[_REF_ATTR] = state
    return ref


# --------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------


def test_windowed_families_use_their_window() -> None:
    """The matrix really runs past the window: every windowed family has W < the prompt."""
    assert len(WINDOWED) >= 6 and max(LENGTHS) > W
    for family in WINDOWED:
        assert FAMILIES[family][2]["sliding_window"] == W


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_no_prefix_parity_past_the_window(family: str, backend: str) -> None:
    """Patched = stock (eager) logits on a left-padded batch longer than the window, and
    the same greedy tokens through the KV cache (sliding-window caches included)."""
    stock = build(family)
    patched = prefixattn.patch(copy.deepcopy(stock), backend=backend)
    ids, mask = _batch(LENGTHS)
    with torch.no_grad():
        ref = stock(input_ids=ids, attention_mask=mask).logits
        out = patched(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], **TOL)
    kw = dict(attention_mask=mask, max_new_tokens=2 * W, do_sample=False)
    assert torch.equal(patched.generate(ids, **kw), stock.generate(ids, **kw))


def test_reference_without_prefix_is_stock() -> None:
    """The reference attention itself: without a prefix it is the stock model (so its
    prefix columns are the only thing it adds)."""
    for family in ("gemma2", "gpt_oss", "mistral"):
        stock = build(family)
        ref = reference_model(stock, None)
        ids, mask = _batch(LENGTHS)
        with torch.no_grad():
            a = stock(input_ids=ids, attention_mask=mask).logits
            b = ref(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(b[mask.bool()], a[mask.bool()], **TOL)


def _prefix_case(family: str, backend: str, prefix_window: str, P: int = 5):
    stock = build(family)
    pt = PrefixTuning(copy.deepcopy(stock), P, backend=backend, prefix_window=prefix_window)
    with torch.no_grad():
        pt.prefix.copy_(torch.randn(pt.prefix.shape, generator=torch.Generator().manual_seed(3)))
    return stock, pt


def _check_against_reference(
    stock, pt: PrefixTuning, prefix_window: str, ids: torch.Tensor, mask: torch.Tensor
) -> None:
    """``pt``'s logits and prefix gradient (causal-LM loss) = the reference model's over
    the same prefix, on the real tokens of the batch."""
    labels = ids.masked_fill(mask == 0, -100)
    out = pt(input_ids=ids, attention_mask=mask, labels=labels)
    (grad,) = torch.autograd.grad(out.loss, pt.prefix)
    prefix = pt.prefix.detach().clone().requires_grad_()
    ref = reference_model(stock, prefix, prefix_window)(
        input_ids=ids, attention_mask=mask, labels=labels
    )
    (ref_grad,) = torch.autograd.grad(ref.loss, prefix)
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], ref.logits[real], **TOL)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("family", "prefix_window"), [("gemma2", "all"), ("gpt_oss", "sliding")])
def test_triton_family_past_the_window(family: str, prefix_window: str) -> None:
    """The Triton kernel (the interpreter on CPU) in a whole model: soft-capping + window
    (Gemma-2) and sinks + window (gpt-oss), patched = stock without a prefix, and
    PrefixTuning logits and prefix gradients = the reference."""
    stock = build(family)
    patched = prefixattn.patch(copy.deepcopy(stock), backend="triton")
    ids, mask = _batch([13, 10])
    real = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(
            patched(input_ids=ids, attention_mask=mask).logits[real],
            stock(input_ids=ids, attention_mask=mask).logits[real],
            **TOL,
        )
    _, pt = _prefix_case(family, "triton", prefix_window)
    _check_against_reference(stock, pt, prefix_window, ids, mask)


@pytest.mark.parametrize("prefix_window", ["all", "sliding"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prefix_tuning_matches_reference(family: str, backend: str, prefix_window: str) -> None:
    """PrefixTuning logits and prefix gradients = the eager reference over an explicit
    prefix, on a left-padded batch longer than the window."""
    if prefix_window == "sliding" and family not in WINDOWED:
        pytest.skip("prefix_window only matters on sliding-window layers")
    stock, pt = _prefix_case(family, backend, prefix_window)
    _check_against_reference(stock, pt, prefix_window, *_batch(LENGTHS))


@pytest.mark.parametrize("prefix_window", ["all", "sliding"])
@pytest.mark.parametrize("family", WINDOWED)
def test_prefix_generate_past_the_window(family: str, prefix_window: str) -> None:
    """Greedy generate with a prefix through the KV cache (sliding-window caches), past
    the window = greedy decoding over the reference's full forward (each row alone, no
    cache). "sliding" counts positions in cache slots as PEFT does, so left padding moves
    a row's prefix further out of its window: that case runs on rows without padding."""
    stock, pt = _prefix_case(family, "sdpa", prefix_window)
    ids, mask = _batch([11, 5] if prefix_window == "all" else [9, 9])
    n_new = W + 3
    got = pt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False)
    ref = reference_model(stock, pt.prefix.detach(), prefix_window)
    want = greedy_reference(ref, ids, mask, max_new_tokens=n_new)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["gemma2", "gpt_oss", "qwen2"])
def test_save_load_keeps_prefix_window(family: str, tmp_path) -> None:
    stock, pt = _prefix_case(family, "sdpa", "sliding")
    pt.save(tmp_path / "p")
    loaded = PrefixTuning.load(tmp_path / "p", copy.deepcopy(stock))
    assert loaded.config.prefix_window == "sliding"
    ids, mask = _batch(LENGTHS)
    with torch.no_grad():
        a = pt(input_ids=ids, attention_mask=mask).logits
        b = loaded(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b)


def test_prefix_windows_agree_when_everything_fits() -> None:
    """ "all" and "sliding" give the same result while P + N <= W (where from_peft's
    default agrees with PEFT), and differ past it."""
    _, pt_all = _prefix_case("mistral", "sdpa", "all", P=3)
    _, pt_sl = _prefix_case("mistral", "sdpa", "sliding", P=3)
    short, mask = _batch([W - 3, 2])
    with torch.no_grad():
        a = pt_all(input_ids=short, attention_mask=mask).logits
        b = pt_sl(input_ids=short, attention_mask=mask).logits
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    long, mask = _batch([W + 4])
    with torch.no_grad():
        a = pt_all(input_ids=long, attention_mask=mask).logits
        b = pt_sl(input_ids=long, attention_mask=mask).logits
    assert not torch.allclose(a, b, atol=1e-3)


def test_task_bank_refuses_a_sliding_prefix_window(tmp_path) -> None:
    """A bank runs every task with prefix_window="all": a task tuned with "sliding" is an
    error (live or saved), never silently run with the other semantics."""
    stock, pt = _prefix_case("mistral", "sdpa", "sliding")
    pt.save(tmp_path / "p")
    with pytest.raises(ValueError, match="prefix_window"):
        prefixattn.TaskBank(copy.deepcopy(stock), {"t": pt})
    with pytest.raises(ValueError, match="prefix_window"):
        prefixattn.TaskBank(copy.deepcopy(stock), {"t": tmp_path / "p"})
    _, ok = _prefix_case("mistral", "sdpa", "all")
    bank = prefixattn.TaskBank(copy.deepcopy(stock), {"t": ok})
    ids, mask = _batch(LENGTHS)
    with torch.no_grad():
        a = bank(["t"] * 3, input_ids=ids, attention_mask=mask).logits
        b = ok(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], **TOL)


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_from_peft_on_a_windowed_model_where_peft_agrees(family: str) -> None:
    """from_peft's default prefix_window="all" reproduces PEFT's logits on a
    sliding-window model while the prefix and the tokens fit the window (P + N <= W);
    past that, prefix_window="sliding" does (and "all" does not)."""
    peft = pytest.importorskip("peft")
    base = build(family)
    P = 3
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    with torch.no_grad():
        emb = pm.prompt_encoder[pm.active_adapter].embedding.weight
        emb.copy_(torch.randn(emb.shape))
    ours = PrefixTuning.from_peft(pm, copy.deepcopy(base), backend="sdpa").eval()
    assert ours.config.prefix_window == "all"
    ids = _batch([W - P])[0]  # P + N = W: every prefix key still in every window
    with torch.no_grad():
        want = pm(input_ids=ids).logits
        got = ours(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    long = _batch([W + 6])[0]
    sliding = PrefixTuning.from_peft(
        pm, copy.deepcopy(base), backend="sdpa", prefix_window="sliding"
    ).eval()
    with torch.no_grad():
        want = pm(input_ids=long).logits
        torch.testing.assert_close(sliding(input_ids=long).logits, want, atol=2e-5, rtol=1e-5)
        assert not torch.allclose(ours(input_ids=long).logits, want, atol=1e-3)
