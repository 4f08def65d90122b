"""Static KV caches and custom 4-D attention masks on patched models (issue 26, item 5).

A ``StaticCache`` hands attention all its preallocated keys with transformers' 4-D mask
over the written ones; a user's 4-D mask (a shared-prefix tree, a block diagonal) reaches
attention as it is. Both run patched on every family of tests/test_families.py: without a
prefix = the stock model, with one = the independent float64 reference attention of
tests/test_families.py (greedy decoding over its full forward, no cache), eagerly and
with the decode step under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch._dynamo.utils import counters

transformers = pytest.importorskip("transformers")

from reference64 import attention64  # noqa: E402
from test_families import (  # noqa: E402
    FAMILIES,
    _batch,
    _prefix_case,
    build,
    reference_model,
)
from transformers import GenerationConfig  # noqa: E402
from transformers.generation import CompileConfig  # noqa: E402

import prefixattn  # noqa: E402
from prefixattn.testing import greedy_reference, single_thread  # noqa: E402

W = 8
N_NEW = W + 3  # past the window: sliding caches fill and roll
LOGGER = "prefixattn.hf.patching"
MASKED = "exact masked path"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def _generate(model, ids, mask, **kw):
    """Greedy generate with its per-step logits."""
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=N_NEW, do_sample=False, output_logits=True,
        return_dict_in_generate=True, **kw,
    )  # fmt: skip
    return out.sequences, torch.stack(out.logits, 1)  # [B, N + n], [B, n, V]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_static_cache_generate_equals_stock(family: str, caplog) -> None:
    """generate(cache_implementation="static") patched = stock: the same tokens and
    logits, on a left-padded batch past the window; the fused kernel path throughout."""
    stock = build(family)
    patched = prefixattn.patch(copy.deepcopy(stock), backend="sdpa")
    ids, mask = _batch([W + 1, 5])
    want, want_logits = _generate(stock, ids, mask, cache_implementation="static")
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        got, got_logits = _generate(patched, ids, mask, cache_implementation="static")
    assert torch.equal(got, want)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-5)
    assert MASKED not in caplog.text  # the static cache's mask is causal + padding


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_static_cache_generate_with_prefix_equals_reference(family: str) -> None:
    """With a prefix, static-cache greedy decoding = greedy decoding over the float64
    reference's full forward (each row alone, no cache)."""
    stock, pt = _prefix_case(family, "sdpa", "all")
    ids, mask = _batch([W + 2, 4])
    got = pt.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=N_NEW, do_sample=False,
        cache_implementation="static",
    )  # fmt: skip
    ref = reference_model(stock, pt.prefix.detach(), "all")
    assert torch.equal(got, greedy_reference(ref, ids, mask, max_new_tokens=N_NEW))


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gemma2", "gpt_oss"])
def test_static_cache_sliding_prefix_window_equals_reference(family: str) -> None:
    """prefix_window="sliding" through a static cache: the prefix leaves each query's window
    by its true position (the written slots), as the reference computes it."""
    stock, pt = _prefix_case(family, "sdpa", "sliding")
    ids, mask = _batch([W + 1, W + 1])
    got = pt.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=N_NEW, do_sample=False,
        cache_implementation="static",
    )  # fmt: skip
    ref = reference_model(stock, pt.prefix.detach(), "sliding")
    assert torch.equal(got, greedy_reference(ref, ids, mask, max_new_tokens=N_NEW))


@pytest.mark.parametrize(("family", "with_prefix"), [("llama", False), ("gpt2", True)])
def test_static_cache_compiled_forward_fullgraph(family: str, with_prefix: bool) -> None:
    """generate with the forward under torch.compile(fullgraph=True) (Dynamo's graph run
    eagerly: the trace is what is tested) = eager static-cache generate, patched and
    stock; with a prefix = the float64 reference."""
    torch._dynamo.reset()
    counters.clear()
    stock, pt = _prefix_case(family, "sdpa", "all")
    ids, mask = _batch([W + 1, 5])
    cfg = CompileConfig(fullgraph=True, backend="eager", dynamic=False)
    cfg._compile_all_devices = True  # compile on the CPU too
    gen = GenerationConfig(
        max_new_tokens=N_NEW, do_sample=False, cache_implementation="static",
        compile_config=cfg, pad_token_id=1, eos_token_id=None,
    )  # fmt: skip
    if with_prefix:
        got = pt.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
        ref = reference_model(stock, pt.prefix.detach(), "all")
        want = greedy_reference(ref, ids, mask, max_new_tokens=N_NEW)
    else:
        patched = prefixattn.patch(copy.deepcopy(stock), backend="sdpa")
        got = patched.generate(ids, attention_mask=mask, generation_config=gen)
        want = stock.generate(ids, attention_mask=mask, generation_config=gen)
    assert torch.equal(got, want)
    # the decode steps really ran a Dynamo graph (fullgraph: one per compiled step shape)
    assert counters["stats"]["unique_graphs"] >= 1
    torch._dynamo.reset()


def _compiled_generation(max_new_tokens: int) -> GenerationConfig:
    cfg = CompileConfig(fullgraph=True, backend="eager", dynamic=False)
    cfg._compile_all_devices = True  # compile on the CPU too
    return GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
        cache_implementation="static", compile_config=cfg, pad_token_id=1, eos_token_id=None,
    )  # fmt: skip


# hybrid windows with soft-capping / with sinks (mistral and qwen2 pass too: ~5 s each)
@pytest.mark.parametrize("family", ["gemma2", "gpt_oss"])
def test_compiled_static_prefill_and_decode_with_prefix(family: str) -> None:
    """The whole forward under torch.compile(fullgraph=True) on a StaticCache, prefill
    (Nq > 1: transformers' 4-D mask through the masked path; the sliding layers aligned,
    their window checked in the graph) and a decode step (Nq = 1: the kernel's padding
    mask): logits = the float64 reference's full forward, prefix included."""
    from transformers import StaticCache

    torch._dynamo.reset()
    stock, pt = _prefix_case(family, "sdpa", "all")
    ids, mask = _batch([W + 1, 5])
    nxt = torch.tensor([[7], [9]])
    cache = StaticCache(config=pt.model.config, max_cache_len=16)

    def step(ids, mask):
        return pt(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True).logits

    f = torch.compile(step, fullgraph=True, backend="eager")
    with torch.no_grad():
        pre = f(ids, mask)
        mask2 = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        dec = f(nxt, mask2)
        ref = reference_model(stock, pt.prefix.detach(), "all")
        want = ref(input_ids=torch.cat([ids, nxt], 1), attention_mask=mask2).logits
    real = mask.bool()
    torch.testing.assert_close(pre[real], want[:, :-1][real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dec[:, -1], want[:, -1], atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


def test_static_cache_no_recompile_with_a_shorter_prompt() -> None:
    """After one compiled generation, a shorter prompt (same cache length) reuses the
    compiled decode step: nothing patched specialises on the number of written slots."""
    torch._dynamo.reset()
    _, pt = _prefix_case("llama", "sdpa", "all")
    ids, mask = _batch([7, 7])
    gen = _compiled_generation(4)
    pt.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
    with torch.compiler.set_stance("fail_on_recompile"):
        pt.generate(input_ids=ids[:, 1:], attention_mask=mask[:, 1:], generation_config=gen)
    torch._dynamo.reset()


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2", "gemma2"])
def test_static_cache_generate_from_inputs_embeds(family: str) -> None:
    """generate(inputs_embeds=..., cache_implementation="static") patched = stock."""
    stock = build(family)
    patched = prefixattn.patch(copy.deepcopy(stock), backend="sdpa")
    ids, mask = _batch([6, 4])
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        embeds = stock.get_input_embeddings()(ids)
        want = stock.generate(inputs_embeds=embeds, **kw)
        got = patched.generate(inputs_embeds=embeds, **kw)
    assert torch.equal(got, want)


# --------------------------------------------------------------------------------------
# custom 4-D masks
# --------------------------------------------------------------------------------------


def _tree_batch(dtype: torch.dtype):
    """transformers' shared-prefix test data: three continuations of one 4-token prefix,
    as 3 rows (positions 0..3) and as one packed row under a tree mask [1, 1, 7, 7]."""
    g = torch.Generator().manual_seed(5)
    prefix = torch.randint(2, 128, (3,), generator=g)
    tails = torch.randint(2, 128, (3,), generator=g)
    rows = torch.stack([torch.cat([prefix, t[None]]) for t in tails])  # [3, 4]
    packed = torch.cat([prefix, tails])[None]  # [1, 6]
    vis = torch.zeros(6, 6, dtype=torch.bool)
    vis[:3, :3] = torch.tril(torch.ones(3, 3, dtype=torch.bool))
    vis[3:, :3] = True
    vis[3:, 3:] = torch.eye(3, dtype=torch.bool)  # each tail sees the prefix and itself
    position_ids = torch.tensor([[0, 1, 2, 3, 3, 3]])
    m = vis[None, None]
    if dtype != torch.bool:
        m = torch.zeros(1, 1, 6, 6, dtype=dtype).masked_fill(~m, torch.finfo(dtype).min)
    return rows, packed, m, position_ids


def _tree_logits(model, dtype):
    rows, packed, m, pos = _tree_batch(dtype)
    with torch.no_grad():
        plain = model(input_ids=rows).logits[:, -1]  # [3, V]
        tree = model(input_ids=packed, attention_mask=m, position_ids=pos).logits[0, 3:]
    return plain, tree


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool], ids=["additive", "bool"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_custom_4d_mask_equals_stock(family: str, dtype: torch.dtype, caplog) -> None:
    """A shared-prefix tree mask: patched = stock logits, and the tree's continuations =
    the three separate rows (the masked path, which says so in the debug log). Stock runs
    eager attention, which adds the mask: it gets the additive form of the bool mask."""
    stock = build(family)
    patched = prefixattn.patch(copy.deepcopy(stock), backend="sdpa")
    _, want = _tree_logits(stock, torch.float32)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        plain, got = _tree_logits(patched, dtype)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, plain, atol=1e-4, rtol=1e-4)
    assert MASKED in caplog.text


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_oss", "mistral"])
def test_custom_4d_mask_with_prefix_equals_reference(family: str) -> None:
    """With a prefix (every prefix key visible), the tree mask's logits = the float64
    reference attention under the same mask."""
    stock, pt = _prefix_case(family, "sdpa", "all")
    rows, packed, m, pos = _tree_batch(torch.float32)
    ref = reference_model(stock, pt.prefix.detach(), "all")
    with torch.no_grad():
        got = pt(input_ids=packed, attention_mask=m, position_ids=pos).logits
        want = ref(input_ids=packed, attention_mask=m, position_ids=pos).logits
        plain = pt(input_ids=rows).logits[:, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0, 3:], plain, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_causal_padding_4d_mask_takes_the_kernel(backend: str, caplog) -> None:
    """A 4-D mask that is causal + left padding (what transformers' sdpa mask builds) runs
    the fused path, not the masked one, with the values of the 2-D padding mask."""
    stock = build("llama")
    pt = _prefix_case("llama", backend, "all")[1]
    ids, mask = _batch([9, 5])
    pad = mask.bool()
    vis = torch.tril(torch.ones(9, 9, dtype=torch.bool))[None, None] & pad[:, None, None, :]
    with torch.no_grad(), caplog.at_level(logging.DEBUG, logger=LOGGER):
        got = pt(input_ids=ids, attention_mask=vis).logits
        want = pt(input_ids=ids, attention_mask=mask).logits
    assert MASKED not in caplog.text
    torch.testing.assert_close(got[pad], want[pad], atol=1e-6, rtol=1e-6)
    assert stock is not None


def test_bad_4d_masks_name_the_mask() -> None:
    model = prefixattn.patch(build("llama"), backend="sdpa")
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(ValueError, match="4-D attention_mask must have shape"):
        model(input_ids=ids, attention_mask=torch.ones(1, 1, 3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"bool .* or float"):
        model(input_ids=ids, attention_mask=torch.ones(1, 1, 4, 4, dtype=torch.int64))


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_static_cache_on_the_triton_kernel(family: str) -> None:
    """The Triton kernel (the interpreter on CPU, fp32) reads a static cache's written
    slots in place (a strided view of the preallocated keys): with a prefix, greedy
    static-cache decoding = the float64 reference's."""
    stock, pt = _prefix_case(family, "triton", "all", P=3)
    ids, mask = _batch([W + 1, 4])
    got = pt.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
        cache_implementation="static",
    )  # fmt: skip
    ref = reference_model(stock, pt.prefix.detach(), "all")
    assert torch.equal(got, greedy_reference(ref, ids, mask, max_new_tokens=3))


# --------------------------------------------------------------------------------------
# the masked path itself
# --------------------------------------------------------------------------------------


def _per_query_reference(q, k, v, pk, pv, index, lengths, vis, **kw):
    """float64: each (row, mask head, query) alone through tests/reference64.py, its
    visible keys as the key padding mask of a one-query (decode-like) call."""
    B, H, Nq, D = q.shape
    out = torch.zeros(B, H, Nq, D, dtype=torch.float64)
    for b in range(B):
        for hm in range(vis.shape[1]):
            heads = slice(None) if vis.shape[1] == 1 else slice(hm, hm + 1)
            for i in range(Nq):
                row = attention64(
                    q[b : b + 1, :, i : i + 1], k[b : b + 1], v[b : b + 1],
                    None if pk is None else (pk if pk.dim() == 3 or index is not None else pk[b : b + 1]),
                    None if pv is None else (pv if pv.dim() == 3 or index is not None else pv[b : b + 1]),
                    prefix_index=None if index is None else index[b : b + 1],
                    prefix_lengths=lengths, key_padding_mask=vis[min(b, vis.shape[0] - 1), hm, i][None],
                    **kw,
                )  # fmt: skip
                out[b, heads, i] = row[0, heads, 0]
    return out


@pytest.mark.parametrize(
    ("P", "layout"), [(0, "shared"), (1, "per_row"), (7, "bank"), (7, "shared")]
)
@pytest.mark.parametrize(("H", "Hkv", "mask_heads"), [(4, 2, 1), (2, 2, 2)])
@pytest.mark.parametrize("extra", ["none", "softcap", "sinks"])
def test_masked_path_matches_reference64(layout, P, H, Hkv, mask_heads, extra) -> None:
    """masked_prefix_attention on a random mask (rows that see nothing included), bool and
    additive float, = float64 attention query by query; the gradients of q and the prefix
    too."""
    from prefixattn.hf.masked import masked_prefix_attention

    g = torch.Generator().manual_seed(P * 31 + H + mask_heads)
    B, Nq, Nk, D = 2, 5, 9, 16
    q = torch.randn(B, H, Nq, D, generator=g, requires_grad=True)
    k = torch.randn(B, Hkv, Nk, D, generator=g)
    v = torch.randn(B, Hkv, Nk, D, generator=g)
    rows = {"shared": (Hkv, P, D), "per_row": (B, Hkv, P, D), "bank": (3, Hkv, P, D)}[layout]
    pk = torch.randn(*rows, generator=g, requires_grad=True)
    pv = torch.randn(*rows, generator=g)
    index = torch.tensor([2, 0]) if layout == "bank" else None
    lengths = torch.tensor([P, max(P - 1, 0), P]) if layout == "bank" else None
    vis = torch.rand(B, mask_heads, Nq, Nk, generator=g) < 0.5
    vis[0, :, 1] = False  # a query that sees no sequence key
    kw = {"softcap": 3.0} if extra == "softcap" else {}
    sinks = torch.randn(H, generator=g) if extra == "sinks" else None
    want = _per_query_reference(q, k, v, pk, pv, index, lengths, vis, sinks=sinks, **kw)
    dout = torch.randn(B, H, Nq, D, generator=g)
    wq, wpk = torch.autograd.grad((want * dout.double()).sum(), (q, pk), allow_unused=True)
    additive = torch.zeros(vis.shape).masked_fill(~vis, torch.finfo(torch.float32).min)
    for m in (vis, additive):
        got = masked_prefix_attention(
            q, k, v, m, pk, pv, prefix_index=index, prefix_lengths=lengths, sinks=sinks, **kw
        )
        if m.dtype == torch.bool or P > 0 or sinks is not None:
            torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=2e-6)
        else:  # additive, no prefix: a row that sees nothing averages (as SDPA / eager)
            seen = vis.any(-1, keepdim=True).expand(B, H, Nq, 1)
            torch.testing.assert_close(
                got.double().masked_fill(~seen, 0), want, atol=2e-6, rtol=2e-6
            )
            continue
        gq, gpk = torch.autograd.grad((got * dout).sum(), (q, pk), allow_unused=True)
        torch.testing.assert_close(gq.double(), wq.double(), atol=2e-5, rtol=2e-5)
        if P:  # (P = 0: neither touches the empty prefix)
            assert gpk.abs().sum() > 0
            torch.testing.assert_close(gpk.double(), wpk.double(), atol=2e-5, rtol=2e-5)


def test_4d_masks_under_inference_mode_and_edited_in_place() -> None:
    """A mask made under torch.inference_mode (no version counter) works, and a mask
    edited in place between two forwards is classified again (causal -> tree)."""
    stock = build("llama")
    patched = prefixattn.patch(copy.deepcopy(stock), backend="sdpa")
    _, packed, tree, pos = _tree_batch(torch.bool)
    with torch.inference_mode():
        m = torch.tril(torch.ones(1, 1, 6, 6, dtype=torch.bool))
        a = patched(input_ids=packed, attention_mask=m, position_ids=pos).logits
        b = patched(input_ids=packed, position_ids=pos).logits
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    m = torch.tril(torch.ones(1, 1, 6, 6, dtype=torch.bool))
    with torch.no_grad():
        patched(input_ids=packed, attention_mask=m, position_ids=pos)
        m.copy_(tree)  # the same tensor, now the tree
        got = patched(input_ids=packed, attention_mask=m, position_ids=pos).logits
        want = stock(input_ids=packed, attention_mask=_tree_batch(torch.float32)[2],
                     position_ids=pos).logits  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
