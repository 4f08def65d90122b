"""Mixed precision: ``torch.autocast`` bf16 / fp16 and bf16 models, on every path.

Under autocast a RoPE model hands the attention float32 ``q``, ``k`` (the rotary
embedding follows the float32 hidden states) and a bf16 ``v`` (an autocast linear), and
a tuner's prefix is a float32 parameter. ``prefix_attention`` follows SDPA's autocast
policy: cast q, k, v and the prefix to the autocast dtype, run with autocast off, output in
that dtype; float32 prefix parameters get float32 gradients.

- the kernel call: mixed inputs under autocast = the call on the inputs cast first
  (bitwise), against the float64 reference (tests/reference64.py) on the cast inputs, per
  backend (the Triton interpreter's bf16 ``tl.dot`` is broken: Triton under fp16 on CPU);
  mixed dtypes outside autocast stay a TypeError naming the argument;
- ``torch.compile``: the custom op declares the same autocast rule (compiled = eager);
- the family matrix: every family of docs/model-families.md x {autocast bf16, autocast
  fp16, bf16 model} x {PrefixTuning, PromptTuning, MultiTaskPrefixTuning}: forward +
  backward and a short generate; loss, logits and prefix gradients against the fp32 run of
  the same model and inputs;
- TRL's ``SFTTrainer`` with its default ``SFTConfig`` (bf16 autocast) and
  ``Trainer(bf16=True)`` train a tiny Llama.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from conftest import HAS_CUDA, gpu_only
from helpers import TOL, Case, make_inputs, run_with_grads
from reference64 import attention64, rel_err

import prefixattn

transformers = pytest.importorskip("transformers")

from test_families import FAMILIES, SPECIAL  # noqa: E402 - one list of the families

from prefixattn import MultiTaskPrefixTuning, PrefixTuning, PromptTuning  # noqa: E402
from prefixattn.testing import single_thread  # noqa: E402

T = transformers
LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


# --------------------------------------------------------------------------------------
# the kernel call
# --------------------------------------------------------------------------------------

# the Triton interpreter's bf16 tl.dot is broken: Triton runs fp16 on CPU (bf16 on a GPU)
BACKEND_DTYPES = [("sdpa", "bf16"), ("sdpa", "fp16"), ("reference", "bf16"),
                  ("reference", "fp16"), ("triton", "fp16")] + (
    [("triton", "bf16")] if HAS_CUDA else [])  # fmt: skip
KCASES = [
    Case(B=2, H=4, Hkv=2, Nq=17, Nk=17, P=7, D=40, prefix="shared", pad="left"),
    Case(B=3, H=2, Hkv=1, Nq=5, Nk=13, P=1, D=16, prefix="bank", T=2),
    Case(B=2, H=2, Hkv=2, Nq=9, Nk=9, P=33, D=16, prefix="row", pad="right"),
]
DEV = "cuda" if HAS_CUDA else "cpu"


def rope_like_inputs(case: Case, low: torch.dtype) -> dict:
    """A RoPE layer's inputs under autocast: q, k float32, v in the autocast dtype, the
    prefix float32 (a tuner's master weights); all leaves requiring grad."""
    kw = make_inputs(case, torch.float32, DEV)
    kw["v"] = kw["v"].detach().to(low).requires_grad_(True)
    return kw


@pytest.mark.parametrize("case", KCASES, ids=[c.id() for c in KCASES])
@pytest.mark.parametrize(("backend", "low"), BACKEND_DTYPES)
def test_autocast_call_is_the_call_on_cast_inputs(case: Case, backend: str, low: str) -> None:
    dtype = LOW[low]
    kw = rope_like_inputs(case, dtype)

    def under_autocast(**kw):
        with torch.autocast(DEV, dtype=dtype):
            return prefixattn.prefix_attention(**kw, backend=backend)

    out, g, grads = run_with_grads(under_autocast, kw)
    assert out.dtype == dtype, "the output has the autocast dtype, as SDPA's"
    for name, t in grads.items():  # gradients in each input's own dtype (through the cast)
        assert t.dtype == kw[name].dtype, name
        assert torch.isfinite(t).all() and t.abs().sum() > 0, name

    # the same as casting first and calling outside autocast (bitwise)
    cast = {n: (t.detach().to(dtype).requires_grad_(True) if n in grads else t)
            for n, t in kw.items()}  # fmt: skip
    out_c, _, grads_c = run_with_grads(
        lambda **kw: prefixattn.prefix_attention(**kw, backend=backend), cast, grad_out=g
    )
    assert torch.equal(out, out_c)
    for name, t in grads.items():
        assert torch.equal(t, grads_c[name].to(t.dtype)), name

    # and right: the float64 reference on the cast inputs
    ref_kw = {n: (t.detach().double().requires_grad_(True) if n in grads else t)
              for n, t in cast.items()}  # fmt: skip
    ref_out, _, ref_grads = run_with_grads(attention64, ref_kw, grad_out=g.double())
    tol_o, tol_g = TOL[dtype]
    assert rel_err(out, ref_out) < tol_o
    for name in ("prefix_k", "prefix_v", "q"):
        err = rel_err(grads[name], ref_grads[name])
        assert err < tol_g, f"d{name}: rel err {err:.2e}"


@pytest.mark.parametrize("backend", ["sdpa", "reference", "triton"])
def test_mixed_dtypes_outside_autocast_are_a_type_error(backend: str) -> None:
    kw = rope_like_inputs(KCASES[0], torch.float16)
    with pytest.raises(TypeError, match=r"v must have the dtype of q \(torch.float32\)"):
        prefixattn.prefix_attention(**kw, backend=backend)
    kw = make_inputs(KCASES[0], torch.float16, DEV)
    kw["prefix_k"] = kw["prefix_k"].float()
    with pytest.raises(TypeError, match="prefix_k must have the dtype of q"):
        prefixattn.prefix_attention(**kw, backend=backend)


def test_autocast_leaves_float64_alone() -> None:
    """Autocast never casts float64 (as for SDPA): an all-float64 call stays exact."""
    kw = make_inputs(KCASES[0], torch.float64, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = prefixattn.prefix_attention(**kw, backend="reference")
    assert out.dtype == torch.float64
    assert rel_err(out, attention64(**kw)) < 1e-12


@pytest.mark.parametrize(("backend", "low"), BACKEND_DTYPES)
def test_autocast_with_window_softcap_and_sinks(backend: str, low: str) -> None:
    """The family features under autocast: sinks ([H] logits, read in float32) keep their
    dtype and get a float32 gradient; q, k, v and the prefix are cast."""
    dtype = LOW[low]
    case = Case(B=2, H=4, Hkv=2, Nq=9, Nk=13, P=3, D=16, prefix="shared", pad="left")
    kw = rope_like_inputs(case, dtype)
    sinks = torch.randn(4, device=DEV, requires_grad=True)
    feats = dict(window=4, softcap=5.0)
    with torch.autocast(DEV, dtype=dtype):
        out = prefixattn.prefix_attention(**kw, **feats, sinks=sinks, backend=backend)
    out.float().sum().backward()
    assert out.dtype == dtype and sinks.grad.dtype == torch.float32
    assert kw["prefix_k"].grad.dtype == torch.float32 and torch.isfinite(sinks.grad).all()
    names = ("q", "k", "v", "prefix_k", "prefix_v")
    ref_kw = {n: (t.detach().to(dtype).double() if n in names else t) for n, t in kw.items()}
    ref = attention64(**ref_kw, **feats, sinks=sinks.detach().double())
    assert rel_err(out, ref) < TOL[dtype][0]


# --------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------


def test_compiled_custom_op_agrees_with_eager_under_autocast() -> None:
    """The compiled Triton path (the ``prefixattn::fwd`` custom op, interpreted on CPU)
    under autocast fp16 = eager, values and gradients; and the op itself declares the
    autocast rule: called directly under autocast on float32 inputs, it casts them."""
    from prefixattn.ops import custom_op

    torch._dynamo.reset()
    case = Case(B=2, H=2, Hkv=1, Nq=6, Nk=6, P=3, D=16, prefix="shared", pad="left")
    kw = rope_like_inputs(case, torch.float16)

    def f(**kw):
        with torch.autocast(DEV, dtype=torch.float16):
            return prefixattn.prefix_attention(**kw, backend="triton")

    out_e, g, grads_e = run_with_grads(f, kw)
    out_c, _, grads_c = run_with_grads(torch.compile(f, fullgraph=True, backend="aot_eager"),
                                       kw, grad_out=g)  # fmt: skip
    assert out_c.dtype == out_e.dtype == torch.float16
    torch.testing.assert_close(out_c, out_e, atol=2e-3 if HAS_CUDA else 0.0, rtol=0.0)
    for name, ge in grads_e.items():
        assert grads_c[name].dtype == kw[name].dtype, name
        torch.testing.assert_close(grads_c[name], ge, atol=2e-3 if HAS_CUDA else 0.0, rtol=0), name

    # the op's own autocast rule, eager and compiled: = the op on inputs cast first
    fields = {n: kw.get(n) for n in custom_op.TENSOR_FIELDS}
    args = (*fields.values(), True, 0.25, 0.0, 0)

    def op(*args):
        with torch.autocast(DEV, dtype=torch.float16):
            return torch.ops.prefixattn.fwd(*args)[0]

    halves = [t.detach().half() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
              for t in args]  # fmt: skip
    want = torch.ops.prefixattn.fwd(*halves)[0]
    for fn in (op, torch.compile(op, fullgraph=True, backend="aot_eager")):
        got = fn(*args)
        assert got.dtype == torch.float16
        torch.testing.assert_close(got, want, atol=0.0, rtol=0.0)
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------
# the family matrix
# --------------------------------------------------------------------------------------

PRECISIONS = ["autocast-bf16", "autocast-fp16", "model-bf16"]
KINDS = ["prefix", "prompt", "multitask"]
TASKS = ["a", "b", "a"]  # the multi-task rows
# relative norm error vs fp32 (logits, prefix gradients) and relative loss difference
MATRIX_TOL = {"bf16": (0.05, 0.12, 0.02), "fp16": (0.01, 0.03, 0.005)}


# Where the model itself, not the attention, is what bf16 would flip: gpt-oss's top-2 of
# 4 experts (a discontinuous routing) routes every token to all 4; Granite's attention
# multiplier 1.0 (4x 1/sqrt(D)) on std-0.2 weights is a near-argmax softmax, 0.5 is still
# a custom scale.
SMOOTH = {"gpt_oss": {"num_experts_per_tok": 4}, "granite": {"attention_multiplier": 0.5}}


def _family_model(family: str) -> torch.nn.Module:
    """The family's tiny config (tests/test_families.py), with weights of std 0.2 (logits
    that depend on the input, so the prefix matters), fp32, eval."""
    model_name, config_name, kw, _ = FAMILIES[family]
    torch.manual_seed(0)
    over = {**SPECIAL, "initializer_range": 0.2, **SMOOTH.get(family, {})}
    cfg = getattr(T, config_name)(**{**kw, **over})
    model = getattr(T, model_name)._from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".sinks"):
                p.copy_(torch.randn(p.shape) * 0.5)
    return model


def _tuner(kind: str, model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)
    if kind == "prefix":
        return PrefixTuning(model, 3, backend="sdpa", init_std=1.0)
    if kind == "prompt":
        return PromptTuning(model, 3, init="random", seed=1)
    mt = MultiTaskPrefixTuning(model, {"a": 3, "b": 2}, backend="sdpa")
    with torch.no_grad():
        mt.bank.normal_(0.0, 1.0)
    return mt


def _precision(precision: str):
    if precision.startswith("autocast"):
        return torch.autocast("cpu", dtype=LOW[precision.split("-")[1]])
    return torch.autocast("cpu", enabled=False)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch of 3 rows (9, 6, 3 tokens)."""
    from prefixattn.testing import left_padded_batch

    return left_padded_batch([9, 6, 3], seed=1)


def _step(tuner: torch.nn.Module, kind: str, precision: str) -> tuple:
    """Loss, logits and the trainable parameters' gradients of one forward + backward."""
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    extra = {"tasks": TASKS} if kind == "multitask" else {}
    with _precision(precision):
        out = tuner(input_ids=ids, attention_mask=mask, labels=labels, **extra)
    out.loss.backward()
    params = [p for p in tuner.parameters() if p.requires_grad]
    return out.loss.detach().float(), out.logits.detach().float(), params


@functools.cache
def _fp32_run(family: str, kind: str) -> tuple:
    tuner = _tuner(kind, _family_model(family))
    loss, logits, params = _step(tuner, kind, "fp32")
    return loss, logits, [p.grad.clone() for p in params]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_and_generates(family: str, kind: str, precision: str) -> None:
    loss32, logits32, grads32 = _fp32_run(family, kind)
    model = _family_model(family)
    if precision == "model-bf16":
        model = model.to(torch.bfloat16)
    tuner = _tuner(kind, model)
    loss, logits, params = _step(tuner, kind, precision)
    tol_logits, tol_grad, tol_loss = MATRIX_TOL[precision.split("-")[1]]

    assert torch.isfinite(loss)
    assert abs(loss - loss32) <= tol_loss * loss32, f"loss {loss:.4f} vs fp32 {loss32:.4f}"
    valid = _batch()[1].bool()
    err = rel_err(logits[valid], logits32[valid])
    assert err < tol_logits, f"logits: rel err {err:.3e} vs fp32"
    assert params and len(params) == len(grads32)
    for p, g32 in zip(params, grads32):
        assert p.dtype == torch.float32, "tuner parameters stay float32 master weights"
        assert p.grad is not None and p.grad.dtype == torch.float32
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
        err = rel_err(p.grad, g32)
        assert err < tol_grad, f"prefix gradient: rel err {err:.3e} vs fp32"

    # a short greedy generate; its first token is the argmax of the same precision's
    # forward (up to a near tie: a cached decode may round differently)
    ids = _batch()[0][:1, -6:]  # the unpadded row
    extra = {"tasks": "b"} if kind == "multitask" else {}
    tuner.eval()
    with torch.no_grad(), _precision(precision):
        gen = tuner.generate(input_ids=ids, max_new_tokens=3, do_sample=False, **extra)
        last = tuner(input_ids=ids, **extra).logits[0, -1].float()
    assert gen.shape == (1, ids.shape[1] + 3) and torch.equal(gen[:, : ids.shape[1]], ids)
    first = int(gen[0, ids.shape[1]])
    assert last[first] >= last.max() - 0.02 * last.abs().max(), "generate disagrees with forward"


def test_the_matrix_covers_the_documented_families() -> None:
    """Every family in docs/model-families.md's table is in the matrix."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "model-families.md").read_text()
    table = [line.split("|") for line in doc.splitlines() if line.startswith("| ")]
    documented = {cells[2].strip().strip("`") for cells in table if "`" in cells[2]}
    assert len(documented) >= 14, documented
    assert documented <= {spec[0] for spec in FAMILIES.values()}


# --------------------------------------------------------------------------------------
# Trainer / SFTTrainer on a Llama-family model
# --------------------------------------------------------------------------------------


def _tiny_llama_and_tokenizer():
    from prefixattn.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer(["colour of cat dog bird ? red green blue"])
    return tiny_model(len(tok), arch="llama"), tok


def _rows() -> list[dict]:
    return [{"prompt": f"colour of {a} ?", "completion": f" {c}"}
            for a in ("cat", "dog", "bird") for c in ("red", "green", "blue")]  # fmt: skip


def _trained(tuner: torch.nn.Module, trainer) -> None:
    before = {n: p.detach().clone() for n, p in tuner.named_parameters() if p.requires_grad}
    trainer.train()
    log = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(log) == 2 and all(torch.isfinite(torch.tensor(log))), log
    for n, p in tuner.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32, n
            assert not torch.equal(p.detach(), before[n]), f"{n} did not train"


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_sft_trainer_default_config_trains_llama(kind: str, tmp_path: Path) -> None:
    """TRL's default SFTConfig trains in bf16 mixed precision (bf16=True unless fp16):
    on CPU that is CPU autocast, the path that used to crash on every RoPE model."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    model, tok = _tiny_llama_and_tokenizer()
    torch.manual_seed(0)
    tuner = (PrefixTuning(model, 3, backend="sdpa", init_std=0.5) if kind == "prefix"
             else PromptTuning(model, 3, init="vocab", seed=0))  # fmt: skip
    cfg = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                        logging_steps=1)  # fmt: skip
    assert cfg.bf16 and not cfg.fp16, "TRL's default is bf16 mixed precision"
    trainer = trl.SFTTrainer(model=tuner, args=cfg, processing_class=tok,
                             train_dataset=datasets.Dataset.from_list(_rows()))  # fmt: skip
    _trained(tuner, trainer)


def test_trainer_bf16_trains_llama(tmp_path: Path) -> None:
    """``Trainer(bf16=True)``: transformers' mixed precision (CPU autocast with use_cpu)."""
    datasets = pytest.importorskip("datasets")
    from transformers import Trainer, TrainingArguments

    model, tok = _tiny_llama_and_tokenizer()
    torch.manual_seed(0)
    tuner = PrefixTuning(model, 3, backend="sdpa", init_std=0.5)
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(8):
        ids = torch.randint(4, len(tok), (7,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids, "attention_mask": [1] * 7})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                             bf16=True, use_cpu=True, save_strategy="no", report_to="none",
                             logging_steps=1, disable_tqdm=True, seed=7)  # fmt: skip
    trainer = Trainer(model=tuner, args=args, train_dataset=datasets.Dataset.from_list(rows))
    _trained(tuner, trainer)


# --------------------------------------------------------------------------------------
# GPU: the Triton kernel under CUDA autocast
# --------------------------------------------------------------------------------------


@gpu_only
@pytest.mark.parametrize("low", ["bf16", "fp16"])
def test_llama_prefix_tuning_under_cuda_autocast(low: str) -> None:
    """The Triton kernel (backend auto on CUDA) under CUDA autocast: float32 prefix
    gradients, the loss of the fp32 run within the matrix's tolerance."""
    torch.manual_seed(1)
    pt = PrefixTuning(_family_model("llama").cuda(), 3, init_std=1.0)
    ids, mask = (t.cuda() for t in _batch())
    labels = ids.masked_fill(mask == 0, -100)
    with torch.autocast("cuda", dtype=LOW[low]):
        out = pt(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert pt.prefix.grad.dtype == torch.float32 and torch.isfinite(pt.prefix.grad).all()
    assert pt.prefix.grad.abs().sum() > 0
    with torch.no_grad():
        loss32 = pt(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    assert abs(out.loss.item() - loss32) <= MATRIX_TOL[low][2] * loss32


@gpu_only
@pytest.mark.parametrize("low", ["bf16", "fp16"])
def test_inductor_under_cuda_autocast_matches_eager(low: str) -> None:
    """Inductor compiles the kernels (the triton_ops, autocast rule included) under CUDA
    autocast with a RoPE layer's mixed inputs: eager's values within the dtype's tolerance,
    and the float64 reference on the cast inputs."""
    dtype = LOW[low]
    case = Case(B=3, H=8, Hkv=2, Nq=100, Nk=100, P=20, D=64, prefix="bank", T=2, pad="left")
    kw = rope_like_inputs(case, dtype)

    def f(**kw):
        with torch.autocast("cuda", dtype=dtype):
            return prefixattn.prefix_attention(**kw, backend="triton")

    out_e, g, grads_e = run_with_grads(f, kw)
    out_c, _, grads_c = run_with_grads(torch.compile(f, fullgraph=True), kw, grad_out=g)
    assert out_c.dtype == dtype
    tol_o, tol_g = TOL[dtype]
    assert rel_err(out_c, out_e) < tol_o
    for name, ge in grads_e.items():
        assert grads_c[name].dtype == kw[name].dtype, name
        assert rel_err(grads_c[name], ge) < tol_g, name
    ref_kw = {n: (t.detach().to(dtype).double() if n in grads_e else t) for n, t in kw.items()}
    assert rel_err(out_c, attention64(**ref_kw)) < tol_o


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_autocast_keeps_every_cache_input(backend: str) -> None:
    """Under autocast the call is re-made on cast inputs: the KV-cache inputs (a paged pool
    read through ``block_table``, packed query rows ``cu_seqlens_q``) must reach it. The
    autocast call equals the same call on inputs cast by hand, outside autocast."""
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, D, bs = 2, 4, 2, 16, 16
    kpool = torch.randn(6, Hkv, bs, D, generator=g).bfloat16()
    vpool = torch.randn(6, Hkv, bs, D, generator=g).bfloat16()
    table = torch.tensor([[3, 0], [1, 4]], dtype=torch.int32)
    lens = torch.tensor([5, 20], dtype=torch.int32)
    pk, pv = (torch.randn(Hkv, 3, D, generator=g) for _ in range(2))  # float32 prefix
    q = torch.randn(B, H, 1, D, generator=g)  # float32, as out of a rotary embedding
    packed_q = torch.randn(1, H, 3, D, generator=g)  # row 0: 1 query, row 1: 2 queries
    cu = torch.tensor([0, 1, 3], dtype=torch.int32)
    for query, extra in ((q, {}), (packed_q, {"cu_seqlens_q": cu})):
        kw = dict(cache_seqlens=lens, block_table=table, backend=backend, **extra)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            got = prefixattn.prefix_attention(query, kpool, vpool, pk, pv, **kw)
        with torch.no_grad():
            want = prefixattn.prefix_attention(
                query.bfloat16(), kpool, vpool, pk.bfloat16(), pv.bfloat16(), **kw
            )
        assert got.dtype == torch.bfloat16 and got.shape == query.shape
        torch.testing.assert_close(got, want, rtol=0, atol=0)
