"""Padding-free (packed) training: ``prefix_attention(cu_seqlens=...)`` and packed batches
through the patched HF models and the tuners (issue 28 item 3).

Packed results are checked against the same sequences as a padded batch and against the
independent float64 reference (tests/reference64.py), one sequence at a time.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from reference64 import attention64

from prefixattn import prefix_attention

LENGTHS = [1, 7, 17, 33]  # awkward sequence lengths, one packed row
H, HKV, P, T = 4, 2, 7, 3


def cu_of(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def packed_inputs(dtype: torch.dtype, D: int, prefix: str, seed: int = 0):
    """(q, k, v, prefix_k, prefix_v, kw) for LENGTHS packed in one row (GQA)."""
    g = torch.Generator().manual_seed(seed)
    total = sum(LENGTHS)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype).requires_grad_()

    q, k, v = rnd(1, H, total, D), rnd(1, HKV, total, D), rnd(1, HKV, total, D)
    kw: dict = {}
    if prefix == "none":
        return q, k, v, None, None, kw
    if prefix == "shared":
        return q, k, v, rnd(HKV, P, D), rnd(HKV, P, D), kw
    kw["prefix_index"] = torch.tensor([2, 0, 2, 1], device=DEVICE)  # a task per sequence
    kw["prefix_lengths"] = torch.tensor([P, 3, 0], device=DEVICE)  # ragged bank
    return q, k, v, rnd(T, HKV, P, D), rnd(T, HKV, P, D), kw


def per_sequence64(q, k, v, pk, pv, kw):
    """float64: each sequence alone (its own prefix entry), concatenated: [1, H, total, D]."""
    cu, outs = cu_of(LENGTHS).tolist(), []
    for s in range(len(LENGTHS)):
        a, b = cu[s], cu[s + 1]
        idx = kw.get("prefix_index")
        outs.append(attention64(
            q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], pk, pv,
            prefix_index=None if idx is None else idx[s : s + 1],
            prefix_lengths=kw.get("prefix_lengths"),
        ))  # fmt: skip
    return torch.cat(outs, 2)


def padded_call(q, k, v, pk, pv, kw, backend):
    """The same sequences as a right-padded batch [S, H, L, D] with a key padding mask."""
    cu, L, S = cu_of(LENGTHS).tolist(), max(LENGTHS), len(LENGTHS)

    def pad(x):  # [1, Hx, total, D] -> [S, Hx, L, D]
        return torch.stack([F.pad(x[0, :, cu[s] : cu[s + 1]], (0, 0, 0, L - LENGTHS[s]))
                            for s in range(S)])  # fmt: skip

    kpm = torch.arange(L, device=DEVICE)[None] < torch.tensor(LENGTHS, device=DEVICE)[:, None]
    out = prefix_attention(pad(q), pad(k), pad(v), pk, pv, key_padding_mask=kpm,
                           backend=backend, **kw)  # fmt: skip
    return torch.cat([out[s, :, : LENGTHS[s]] for s in range(S)], 1)[None]  # [1, H, total, D]


SLOW = pytest.mark.slow  # long interpreter runs: the rest of the Triton matrix

# (backend, dtype, D, prefix): every backend and layout; under the Triton interpreter one
# fp32 and one fp16 case by default, the others marked slow
CASES = [
    *[(b, dt, 40, p) for b, dt in [("reference", torch.float64), ("reference", torch.float32),
                                   ("sdpa", torch.float32)] for p in ("shared", "bank", "none")],
    ("triton", torch.float32, 16, "bank"),
    ("triton", torch.float16, 16, "shared"),
    pytest.param("triton", torch.float32, 16, "shared", marks=SLOW),
    pytest.param("triton", torch.float16, 16, "bank", marks=SLOW),
    pytest.param("triton", torch.float32, 16, "none", marks=SLOW),
]  # fmt: skip


@pytest.mark.parametrize("backend,dtype,D,prefix", CASES)
def test_packed_equals_padded_and_float64(backend, dtype, D, prefix) -> None:
    q, k, v, pk, pv, kw = packed_inputs(dtype, D, prefix)
    leaves = [t for t in (q, k, v, pk, pv) if t is not None]
    cu = cu_of(LENGTHS).to(DEVICE)
    out = prefix_attention(q, k, v, pk, pv, cu_seqlens=cu, backend=backend, **kw)
    assert out.shape == q.shape and out.dtype == dtype
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, leaves, do)

    ref = per_sequence64(q, k, v, pk, pv, kw)
    ref_grads = torch.autograd.grad(ref, leaves, do.double())
    pad = padded_call(q, k, v, pk, pv, kw, backend)
    pad_grads = torch.autograd.grad(pad, leaves, do)

    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(out, pad, atol=tol, rtol=tol)
    for name, g, r, p in zip(["q", "k", "v", "pk", "pv"], grads, ref_grads, pad_grads):
        torch.testing.assert_close(
            g.double(), r.double(), atol=tol * 4, rtol=tol, msg=lambda m, n=name: f"{n}: {m}"
        )
        torch.testing.assert_close(g, p, atol=tol * 4, rtol=tol, msg=lambda m, n=name: f"{n}: {m}")
    if pk is not None:  # prefix gradients bitwise reproducible
        again = torch.autograd.grad(
            prefix_attention(q, k, v, pk, pv, cu_seqlens=cu, backend=backend, **kw), [pk, pv], do
        )
        assert torch.equal(again[0], grads[3]) and torch.equal(again[1], grads[4])
    if prefix == "bank":  # ragged: keys past an entry's length get no gradient
        dpk = grads[3]
        assert dpk[2].abs().sum() == 0 and dpk[1, :, 3:].abs().sum() == 0
        assert dpk[1, :, :3].abs().sum() > 0 and dpk[0].abs().sum() > 0


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_packed_features_window_softcap_noncausal(backend) -> None:
    """A window, soft-capping and sinks apply within each sequence; causal=False too."""
    q, k, v, pk, pv, kw = packed_inputs(torch.float64, 40, "bank", seed=3)
    cu = cu_of(LENGTHS)
    sinks = torch.randn(H, dtype=torch.float64)
    for extra in ({"window": 5, "softcap": 3.0, "sinks": sinks}, {"causal": False}):
        out = prefix_attention(q, k, v, pk, pv, cu_seqlens=cu, backend=backend, **kw, **extra)
        c, outs = cu.tolist(), []
        for s in range(len(LENGTHS)):
            a, b = c[s], c[s + 1]
            outs.append(attention64(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], pk, pv,
                                    prefix_index=kw["prefix_index"][s : s + 1],
                                    prefix_lengths=kw["prefix_lengths"], **extra))  # fmt: skip
        torch.testing.assert_close(out, torch.cat(outs, 2), atol=1e-10, rtol=1e-10)


def test_packed_bad_input() -> None:
    q, k, v, pk, pv, kw = packed_inputs(torch.float32, 16, "bank")
    cu = cu_of(LENGTHS)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        prefix_attention(q, k, v, pk, pv, cu_seqlens=cu + 1, backend="reference", **kw)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        prefix_attention(q, k, v, pk, pv, cu_seqlens=cu.flip(0), backend="reference", **kw)
    with pytest.raises(TypeError, match="cu_seqlens must have dtype"):
        prefix_attention(q, k, v, pk, pv, cu_seqlens=cu.float(), backend="reference", **kw)
    with pytest.raises(ValueError, match="prefix_index names one bank entry per packed"):
        prefix_attention(q, k, v, pk, pv, cu_seqlens=cu[:-1], backend="reference", **kw)
    with pytest.raises(ValueError, match="longer than max_seqlen"):
        prefix_attention(q, k, v, pk, pv, cu_seqlens=cu, max_seqlen=8, backend="reference", **kw)
    with pytest.raises(ValueError, match="key_padding_mask"):
        kpm = torch.ones(1, q.shape[2], dtype=torch.bool)
        prefix_attention(q, k, v, pk, pv, cu_seqlens=cu, key_padding_mask=kpm, **kw)
    with pytest.raises(ValueError, match=r"packed as \[1, H\(kv\), total, D\]"):
        prefix_attention(q.expand(2, -1, -1, -1), k, v, cu_seqlens=cu)
    with pytest.raises(ValueError, match="cache_seqlens"):
        prefix_attention(q, k, v, cu_seqlens=cu, cache_seqlens=torch.tensor([3]))
    with pytest.raises(ValueError, match="cannot be combined with the cache fields"):
        prefix_attention(q, k, v, cu_seqlens=cu, cu_seqlens_q=cu)  # inference's packed queries


# ------------------------------------------------------------------ Hugging Face


transformers = pytest.importorskip("transformers")

import prefixattn  # noqa: E402
from prefixattn import MultiTaskPrefixTuning, PrefixTuning, PromptTuning  # noqa: E402
from prefixattn.testing import single_thread, tiny_gpt2, tiny_llama  # noqa: E402

SEQS = [3, 7, 1, 5, 2]  # one packed row of 5 sequences
MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def hf_batches(lengths=SEQS, seed: int = 0):
    """(padded ids, mask, packed ids [1, total], position_ids [1, total], FA kwargs)."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(2, 128, (n,), generator=g) for n in lengths]
    L = max(lengths)
    ids = torch.full((len(seqs), L), 1)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    cu = cu_of(lengths)
    fa = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=L, max_length_k=L)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    return ids, mask, torch.cat(seqs)[None], pos, fa


def unpad(x: torch.Tensor, lengths=SEQS) -> torch.Tensor:
    """[S, L, ...] padded rows -> [1, total, ...]."""
    return torch.cat([x[i, :n] for i, n in enumerate(lengths)])[None]


@pytest.mark.parametrize(
    "family,backend",
    [(f, b) for f in MODELS for b in ("reference", "sdpa")]
    + [("llama", "triton"), pytest.param("gpt2", "triton", marks=SLOW)],
)
def test_patched_padding_matches_padding_free(family, backend) -> None:
    """transformers' test_sdpa_padding_matches_padding_free_with_position_ids, on the
    patched model (it raised "not a causal mask plus key padding" before): padded logits
    == packed logits, with position_ids only and with the FlashAttention kwargs."""
    model = MODELS[family]()
    prefixattn.patch(model, backend=backend)
    ids, mask, packed, pos, fa = hf_batches()
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits
        free = model(input_ids=packed, position_ids=pos, use_cache=False).logits
        free_fa = model(input_ids=packed, position_ids=pos, **fa).logits
    torch.testing.assert_close(free, unpad(padded), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(free_fa, unpad(padded), atol=2e-5, rtol=1e-5)
    # and the unpatched model's padded logits (independent of prefixattn)
    prefixattn.unpatch(model)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(free, unpad(plain), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("fa_kwargs", [False, True])
def test_bf16_padding_matches_padding_free(family, fa_kwargs) -> None:
    """Upstream's test as written (transformers' test_modeling_common.py,
    attention_mask_padding_matches_padding_free_with_position_ids): a bf16 model, padded
    vs padding-free logits within bf16's eps, with or without the FA kwargs."""
    model = MODELS[family]().to(torch.bfloat16)
    prefixattn.patch(model, backend="sdpa")
    ids, mask, packed, pos, fa = hf_batches()
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        free = model(input_ids=packed, position_ids=pos, use_cache=False,
                     **(fa if fa_kwargs else {})).logits  # fmt: skip
    tol = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(free, unpad(padded), rtol=tol, atol=tol)


def test_two_packed_rows_and_packed_detection() -> None:
    """B = 2 packed rows (the mask function's cu covers both rows)."""
    model = tiny_llama()
    prefixattn.patch(model, backend="reference")
    ids, mask, packed, pos, _ = hf_batches([3, 5, 4, 4])  # rows of 8: [3, 5] and [4, 4]
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits
        two = model(input_ids=packed.view(2, 8), position_ids=pos.view(2, 8), use_cache=False)
    torch.testing.assert_close(two.logits.reshape(1, 16, -1), unpad(padded, [3, 5, 4, 4]),
                               atol=2e-5, rtol=1e-5)  # fmt: skip


def seq_loss(logits: torch.Tensor, ids: torch.Tensor, lengths=SEQS) -> torch.Tensor:
    """Sum of next-token losses within each packed sequence (no cross-sequence pair)."""
    c, total = cu_of(lengths).tolist(), 0.0
    for s in range(len(lengths)):
        a, b = c[s], c[s + 1]
        if b - a > 1:
            total = total + F.cross_entropy(
                logits[0, a : b - 1], ids[0, a + 1 : b], reduction="sum"
            )
    return total


def padded_loss(logits: torch.Tensor, ids: torch.Tensor, lengths=SEQS) -> torch.Tensor:
    return seq_loss(unpad(logits, lengths), unpad(ids, lengths), lengths)


@pytest.mark.parametrize(
    "family,backend",
    [(f, "sdpa") for f in MODELS] + [pytest.param(f, "triton", marks=SLOW) for f in MODELS],
)
def test_prefix_tuning_packed_gradients(family, backend) -> None:
    """PrefixTuning: the packed batch's prefix gradient == the padded batch's; float64
    padded batch (reference backend) as the independent check."""
    torch.manual_seed(0)
    tuner = PrefixTuning(MODELS[family](), 3, backend=backend, init_std=0.5, position_offset=2)
    ids, mask, packed, pos, fa = hf_batches()
    padded_loss(tuner(input_ids=ids, attention_mask=mask).logits, ids).backward()
    g_pad = tuner.prefix.grad.clone()
    tuner.zero_grad()
    seq_loss(tuner(input_ids=packed, position_ids=pos).logits, packed).backward()
    g_free = tuner.prefix.grad.clone()
    tuner.zero_grad()
    seq_loss(tuner(input_ids=packed, position_ids=pos, **fa).logits, packed).backward()
    torch.testing.assert_close(g_free, g_pad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tuner.prefix.grad, g_pad, atol=1e-5, rtol=1e-4)
    t64 = copy.deepcopy(tuner).double()
    t64.zero_grad()
    prefixattn.patch(t64.model, backend="reference")
    padded_loss(t64(input_ids=ids, attention_mask=mask).logits, ids).backward()
    torch.testing.assert_close(g_free.double(), t64.prefix.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "family,backend",
    [(f, b) for f in MODELS for b in ("reference", "sdpa")]
    + [pytest.param(f, "triton", marks=SLOW) for f in MODELS],
)
def test_multitask_packed_tasks_per_sequence(family, backend) -> None:
    """MultiTaskPrefixTuning: a task per packed sequence (ragged P) == the padded mixed
    batch; one task per row expands to the row's sequences."""
    torch.manual_seed(0)
    mt = MultiTaskPrefixTuning(MODELS[family](), {"a": 1, "b": 5, "c": 3}, backend=backend)
    with torch.no_grad():
        mt.bank.normal_()
    tasks = ["b", "a", "c", "b", "a"]
    ids, mask, packed, pos, fa = hf_batches()
    padded_loss(mt(input_ids=ids, attention_mask=mask, tasks=tasks).logits, ids).backward()
    g_pad = mt.bank.grad.clone()
    mt.zero_grad()
    seq_loss(mt(input_ids=packed, position_ids=pos, tasks=tasks).logits, packed).backward()
    torch.testing.assert_close(mt.bank.grad, g_pad, atol=1e-5, rtol=1e-4)
    mt.zero_grad()
    seq_loss(mt(input_ids=packed, position_ids=pos, tasks=tasks, **fa).logits, packed).backward()
    torch.testing.assert_close(mt.bank.grad, g_pad, atol=1e-5, rtol=1e-4)
    assert mt.bank.grad[:, :, 0, :, 1:].abs().sum() == 0  # task a (P = 1): nothing past it
    # one task per row of a 2-row packed batch: every sequence of the row gets it
    ids2, mask2, packed2, pos2, _ = hf_batches([3, 5, 4, 4])
    with torch.no_grad():
        rows = mt(input_ids=packed2.view(2, 8), position_ids=pos2.view(2, 8), tasks=["c", "a"])
        each = mt(input_ids=ids2, attention_mask=mask2, tasks=["c", "c", "a", "a"])
    torch.testing.assert_close(rows.logits.reshape(1, 16, -1), unpad(each.logits, [3, 5, 4, 4]),
                               atol=2e-5, rtol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="one task per packed sequence"):
        mt(input_ids=packed, position_ids=pos, tasks=["a", "b"])


def test_prompt_tuning_refuses_packed_batches() -> None:
    tuner = PromptTuning(tiny_llama(), 3)
    _, _, packed, pos, fa = hf_batches()
    with pytest.raises(ValueError, match="PromptTuning does not train packed"):
        tuner(input_ids=packed, position_ids=pos)
    with pytest.raises(ValueError, match="PromptTuning does not train packed"):
        tuner(input_ids=packed, **fa)


def test_sft_trainer_padding_free_trains_prefix_tuning(tmp_path) -> None:
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from prefixattn.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer(["colour of cat dog bird ? red green blue"])
    torch.manual_seed(0)
    tuner = PrefixTuning(tiny_model(len(tok), arch="llama"), 3, backend="sdpa", init_std=0.5)
    rows = [
        {"prompt": f"colour of {a} ?", "completion": f" {c}"}
        for a in ("cat", "dog", "bird")
        for c in ("red", "green", "blue")
    ]
    cfg = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, padding_free=True, max_length=None,
        report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no",
    )  # fmt: skip
    trainer = trl.SFTTrainer(model=tuner, args=cfg, processing_class=tok,
                             train_dataset=datasets.Dataset.from_list(rows))  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    cu = batch["cu_seq_lens_q"].tolist()
    assert len(cu) == 5  # four sequences in the packed row
    # the packed loss == the same sequences padded (each its own row)
    loss = trainer.compute_loss(tuner, dict(batch))
    lens = [b - a for a, b in itertools.pairwise(cu)]
    L = max(lens)
    ids = torch.zeros(4, L, dtype=torch.long)
    labels = torch.full((4, L), -100)
    mask = torch.zeros(4, L, dtype=torch.long)
    for s, (a, b) in enumerate(itertools.pairwise(cu)):
        ids[s, : b - a], labels[s, : b - a] = batch["input_ids"][0, a:b], batch["labels"][0, a:b]
        mask[s, : b - a] = 1
    ref = tuner(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss, ref, atol=2e-5, rtol=1e-5)
    before = tuner.prefix.detach().clone()
    trainer.train()
    assert not torch.equal(tuner.prefix.detach(), before)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history
               if "loss" in h)  # fmt: skip


def test_pack_batch_trains_like_the_padded_batch() -> None:
    """training.pack_batch (the multi-task demo's mixed run): the packed batch's loss and
    bank gradient == the right-padded batch's."""
    from prefixattn.training import pack_batch, pad_batch

    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(2, 128, (n,), generator=g).tolist() for n in SEQS]
    padded = pad_batch(seqs, [max(n - 2, 0) for n in SEQS], pad_id=1)
    padded["task_ids"] = torch.tensor([0, 2, 1, 0, 2])
    packed = pack_batch(padded)
    assert packed["input_ids"].shape == (1, sum(SEQS)) and "attention_mask" not in packed
    assert packed["cu_seq_lens_q"].tolist() == cu_of(SEQS).tolist()
    torch.manual_seed(0)
    mt = MultiTaskPrefixTuning(tiny_llama(), {"a": 2, "b": 4, "c": 1}, backend="sdpa")
    mt(**padded).loss.backward()
    g_pad = mt.bank.grad.clone()
    mt.zero_grad()
    mt(**packed).loss.backward()
    torch.testing.assert_close(mt.bank.grad, g_pad, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="right-padded"):
        pack_batch({**padded, "attention_mask": padded["attention_mask"].flip(1)})
