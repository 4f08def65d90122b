"""torch.compile: prefix_attention traces without graph breaks, through registered custom ops.

On CPU the Triton kernels run under the interpreter, where the ``prefixattn::fwd`` /
``prefixattn::bwd`` triton_ops delegate to their opaque twins (interpreted kernels cannot
be traced); :func:`test_gpu_path_traces_without_a_gpu` traces the real GPU path (every
kernel through ``wrap_triton``) in a subprocess without the interpreter. Every test checks
values: compiled against eager, outputs and gradients.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from conftest import HAS_CUDA, gpu_only
from helpers import (
    Case,
    check_against_float64,
    make_inputs,
    run_compiled_triton_script,
    run_with_grads,
)
from reference64 import attention64, rel_err

import prefixattn
from prefixattn.ops import custom_op  # noqa: F401 - registers torch.ops.prefixattn.*
from prefixattn.ops.autograd import PrefixAttentionFunction
from prefixattn.ops.call import AttentionCall
from prefixattn.ops.settings import current_settings

DEVICE = "cuda" if HAS_CUDA else "cpu"
# compiled vs eager, fp32: the same kernels and configs on CPU (exact up to op fusion); on
# a GPU the compiler may autotune another block config (another summation order)
ATOL = 2e-5 if HAS_CUDA else 1e-6


class RecordingBackend:
    """A torch.compile backend: records Dynamo's graphs, then runs ``aot_eager`` (or the
    given backend) on them, so AOT autograd traces the ops and their autograd formulas."""

    def __init__(self, inner: str = "aot_eager") -> None:
        self.graphs: list[torch.fx.GraphModule] = []
        self.inner = inner

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs.append(gm)
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend(self.inner)(gm, example_inputs)

    def ops(self) -> list[str]:
        """Names of the functions called in the graphs (``prefixattn.fwd``, ...)."""
        return [
            str(n.target).removesuffix(".default")
            for g in self.graphs
            for n in g.graph.nodes
            if n.op == "call_function"
        ]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def assert_same(a: torch.Tensor, b: torch.Tensor, what: str, atol: float = 0.0) -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    assert err <= atol, f"{what}: max abs diff {err:.3e} > {atol:.0e}"


def compare(eager_fn, compiled_fn, kw: dict, atol: float = 0.0) -> None:
    """Outputs and the gradients of every differentiable input, eager vs compiled."""
    out_e, g, grads_e = run_with_grads(eager_fn, kw)
    out_c, _, grads_c = run_with_grads(compiled_fn, kw, grad_out=g)
    assert_same(out_c, out_e, "out", atol)
    for name, ge in grads_e.items():
        assert_same(grads_c[name], ge, f"d{name}", atol)


CASES = [
    Case(B=2, H=2, Hkv=2, Nq=9, Nk=9, P=3, D=16, prefix="shared", pad="right"),
    Case(B=3, H=4, Hkv=2, Nq=5, Nk=11, P=4, D=16, prefix="bank", T=2),
    Case(B=2, H=2, Hkv=1, Nq=7, Nk=7, P=2, D=24, prefix="row", causal=False),
    Case(B=2, H=2, Hkv=2, Nq=8, Nk=8, P=0, D=16, prefix="none", pad="left"),
]
IDS = [c.id() for c in CASES]


# --------------------------------------------------------------------------------------
# the function alone
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fullgraph_matches_eager(backend: str, case: Case) -> None:
    """One graph (fullgraph=True), and the eager values exactly (same kernels / ops)."""
    kw = make_inputs(case, torch.float32, DEVICE)

    def f(**kw):
        return prefixattn.prefix_attention(**kw, backend=backend)

    rec = RecordingBackend()
    compare(f, torch.compile(f, fullgraph=True, backend=rec), kw, atol=ATOL)
    assert len(rec.graphs) == 1
    if backend == "triton":
        assert "prefixattn.fwd" in rec.ops()
    else:  # plain tensor ops: nothing opaque left for the compiler
        assert not any("prefixattn" in name for name in rec.ops())


def test_eager_calls_keep_the_autograd_function() -> None:
    """Eager mode does not pay for the custom-op dispatch."""
    kw = make_inputs(CASES[0], torch.float32, DEVICE)
    out = prefixattn.prefix_attention(**kw, backend="triton")
    assert type(out.grad_fn).__name__ == PrefixAttentionFunction.__name__ + "Backward"


def test_dynamic_shapes_reference() -> None:
    """Dynamic sequence length and batch: one graph (nothing in the path specializes on a
    size or reads a tensor value), outputs right for each size (forward only: the
    gradients through AOT autograd are checked above)."""
    rec = RecordingBackend()

    def f(**kw):
        return prefixattn.prefix_attention(**kw, backend="reference")

    cf = torch.compile(f, fullgraph=True, dynamic=True, backend=rec)
    # sizes that differ from each other (Dynamo guards on sizes that happen to be equal)
    compiled = []
    for b, n in ((3, 6), (9, 11)):
        case = Case(B=b, H=4, Hkv=2, Nq=n, Nk=n, P=5, D=16, prefix="bank", T=7, pad="right")
        kw = make_inputs(case, torch.float32, DEVICE, seed=n)
        with torch.no_grad():
            out = cf(**kw)
            ref = attention64(**{name: t.double() if t.is_floating_point() else t
                                 for name, t in kw.items() if isinstance(t, torch.Tensor)},
                              causal=True)  # fmt: skip
        assert rel_err(out, ref) < 1e-5
        compiled.append(len(rec.graphs))
    assert compiled[0] >= 1 and compiled[1] == compiled[0], "a new size recompiled"


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_inductor_matches_eager(backend: str) -> None:
    """Inductor: the reference path fused into generated code, the Triton path as custom
    ops (on CPU the interpreted kernels run as opaque ops)."""
    case = Case(B=2, H=4, Hkv=2, Nq=10, Nk=10, P=3, D=16, prefix="shared", pad="left")
    kw = make_inputs(case, torch.float32, DEVICE)

    def f(**kw):
        return prefixattn.prefix_attention(**kw, backend=backend)

    compare(f, torch.compile(f, fullgraph=True, backend="inductor"), kw, atol=max(ATOL, 2e-6))


def test_dropout_under_compile_uses_the_eager_seed_stream() -> None:
    """With dropout the seed is drawn in the graph (torch.randint on the CPU generator,
    like eager): same torch.manual_seed -> same mask, in forward and in backward."""
    kw = make_inputs(CASES[1], torch.float32, DEVICE)

    def f(**kw):
        return prefixattn.prefix_attention(**kw, dropout_p=0.3, backend="triton")

    rec = RecordingBackend()
    cf = torch.compile(f, fullgraph=True, backend=rec)
    torch.manual_seed(123)
    out_e, g, grads_e = run_with_grads(f, kw)
    torch.manual_seed(123)
    out_c, _, grads_c = run_with_grads(cf, kw, grad_out=g)
    assert "prefixattn.fwd_seeded" in rec.ops()
    assert (out_e == 0).sum() < out_e.numel()  # a real output, not all dropped
    assert_same(out_c, out_e, "out", ATOL)
    for name, ge in grads_e.items():
        assert_same(grads_c[name], ge, f"d{name}", ATOL)
    torch.manual_seed(124)  # another seed: another mask
    assert not torch.allclose(cf(**kw), out_c)


@pytest.mark.parametrize(
    "case,lengths",
    [
        (Case(B=3, H=4, Hkv=2, Nq=6, Nk=9, P=7, D=16, prefix="bank", T=2, pad="left"), [0, 7]),
        (Case(B=2, H=2, Hkv=1, Nq=5, Nk=5, P=3, D=40, prefix="row"), [3, 1]),
    ],
    ids=["bank", "row"],
)
def test_compiled_triton_takes_prefix_lengths(case: Case, lengths: list[int]) -> None:
    """The custom ops take ``prefix_lengths`` as the eager path does: the compiled Triton
    call (fullgraph) has the float64 reference's values and gradients (zero past each
    entry's length), and the eager call's, through ``prefixattn::fwd``."""
    kw = make_inputs(case, torch.float32, DEVICE)
    kw["prefix_lengths"] = torch.tensor(lengths, device=DEVICE)

    def f(**kw):
        return prefixattn.prefix_attention(**kw, backend="triton")

    rec = RecordingBackend()
    cf = torch.compile(f, fullgraph=True, backend=rec)
    check_against_float64(cf, kw, torch.float32)
    assert "prefixattn.fwd" in rec.ops()
    out_e, g, grads_e = run_with_grads(f, kw)
    out_c, _, grads_c = run_with_grads(cf, kw, grad_out=g)
    assert_same(out_c, out_e, "out", ATOL)
    for name, ge in grads_e.items():
        assert_same(grads_c[name], ge, f"d{name}", ATOL)
    for t, n in enumerate(lengths):
        assert torch.equal(
            grads_c["prefix_k"][t, :, n:], torch.zeros_like(grads_c["prefix_k"][t, :, n:])
        )


@pytest.mark.skipif(HAS_CUDA, reason="on CUDA the check is a device-side assert, which ends "
                    "the CUDA context of the test process")  # fmt: skip
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_out_of_range_index_fails_loudly_under_compile(backend: str) -> None:
    """No host sync while compiling, but an out-of-range bank index still raises (an
    in-graph assert; eager mode checks it on the host)."""
    kw = make_inputs(CASES[1], torch.float32, DEVICE)  # a bank of T=2 entries

    def f(**kw):
        return prefixattn.prefix_attention(**kw, backend=backend)

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    cf(**kw)  # compiles with valid indexes
    kw["prefix_index"] = torch.tensor([0, 2, 1], device=DEVICE)
    with pytest.raises(RuntimeError, match="prefix_index"):
        cf(**kw)
    with pytest.raises(ValueError, match="prefix_index"):
        f(**kw)


def test_compiled_errors_name_the_argument() -> None:
    """Validation runs at trace time: without fullgraph Dynamo falls back to eager, which
    raises the usual ValueError."""
    kw = make_inputs(CASES[0], torch.float32, DEVICE)

    def f(q, k, v):
        return prefixattn.prefix_attention(q, k[..., :8], v, backend="reference")

    with pytest.raises(ValueError, match="k must have head dim D=16"):
        torch.compile(f, backend="aot_eager")(kw["q"], kw["k"], kw["v"])


# --------------------------------------------------------------------------------------
# the operators
# --------------------------------------------------------------------------------------


def _op_inputs(grad: bool) -> tuple[dict, float]:
    case = Case(B=2, H=4, Hkv=2, Nq=6, Nk=9, P=3, D=16, prefix="bank", T=3, pad="right")
    kw = make_inputs(case, torch.float32, DEVICE)
    if not grad:
        kw = {n: t.detach() if isinstance(t, torch.Tensor) else t for n, t in kw.items()}
    return kw, 0.25


def _tensors(kw: dict) -> tuple:
    """The ops' leading tensors (the call's, in AttentionCall order)."""
    from prefixattn.ops.call import TENSOR_FIELDS

    return tuple(kw.get(n) for n in TENSOR_FIELDS)


def _fwd_args(kw: dict, sm_scale: float, dropout_p: float, seed):
    return (*_tensors(kw), True, sm_scale, dropout_p, seed)


def _eager(kw: dict, scale: float, seed, monkeypatch) -> tuple[torch.Tensor, list]:
    """The eager autograd function on fresh leaves, with the op's dropout seed."""
    from prefixattn.ops import autograd as ag
    from prefixattn.ops.plan import lookup_plan

    monkeypatch.setattr(ag, "new_seed", lambda: int(seed))
    leaves = [kw[n].detach().requires_grad_(True) for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    call = AttentionCall(*leaves, prefix_index=kw["prefix_index"],
                         prefix_lengths=kw.get("prefix_lengths"),
                         key_padding_mask=kw["key_padding_mask"], sm_scale=scale, dropout_p=0.2,
                         settings=current_settings())  # fmt: skip
    out = PrefixAttentionFunction.apply(*leaves, call, lookup_plan(call))
    return out, leaves


@pytest.mark.parametrize("seeded", [False, True], ids=["fwd", "fwd_seeded"])
def test_opcheck_forward(seeded: bool, monkeypatch) -> None:
    """torch.library.opcheck (schema, fake impl, autograd registration, AOT dispatch with
    dynamic shapes), and the op's output is the eager function's (same seed)."""
    kw, scale = _op_inputs(grad=True)
    op = torch.ops.prefixattn.fwd_seeded if seeded else torch.ops.prefixattn.fwd
    seed = torch.tensor([7]) if seeded else 7
    torch.library.opcheck(op.default, _fwd_args(kw, scale, 0.2, seed))
    out, lse = op(*_fwd_args(kw, scale, 0.2, seed))
    ref, _ = _eager(kw, scale, seed, monkeypatch)
    assert_same(out, ref, "out", ATOL)
    assert lse.dtype == torch.float32 and lse.shape == out.shape[:3]


@pytest.mark.parametrize("seeded", [False, True], ids=["bwd", "bwd_seeded"])
@pytest.mark.parametrize("needs", [(True, True, True, True), (False, False, False, True)])
def test_backward_ops(seeded: bool, needs: tuple, monkeypatch) -> None:
    """opcheck, and the gradients asked for equal the eager function's (same seed); the
    others are empty."""
    kw, scale = _op_inputs(grad=False)
    fwd = torch.ops.prefixattn.fwd_seeded if seeded else torch.ops.prefixattn.fwd
    seed = torch.tensor([7]) if seeded else 7
    out, lse = fwd(*_fwd_args(kw, scale, 0.2, seed))
    do = torch.randn_like(out)
    op = torch.ops.prefixattn.bwd_seeded if seeded else torch.ops.prefixattn.bwd
    args = (do, out, lse, *_tensors(kw), True, scale, 0.2, seed, *needs)
    if all(needs):  # (opcheck compiles: once per op is enough)
        torch.library.opcheck(op.default, args)
    grads = op(*args)
    ref_out, leaves = _eager(kw, scale, seed, monkeypatch)
    ref = torch.autograd.grad(ref_out, leaves, do)
    wanted = (needs[0], needs[1] or needs[2], needs[1] or needs[2], needs[3], needs[3])
    for name, want, got, r in zip(("q", "k", "v", "prefix_k", "prefix_v"), wanted, grads, ref):
        if want:
            assert_same(got, r, f"d{name}", ATOL)
        else:
            assert got.numel() == 0, f"d{name} was not asked for"


# --------------------------------------------------------------------------------------
# a patched model
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gpt2_prefix_tuning_fullgraph(backend: str) -> None:
    """Patched GPT-2 + PrefixTuning: forward (loss) and backward in one graph; the loss and
    the prefix gradient equal eager."""
    pytest.importorskip("transformers")
    from prefixattn.testing import tiny_gpt2

    pt = prefixattn.PrefixTuning(tiny_gpt2().to(DEVICE), 4, init_std=0.5, backend=backend)
    pt.train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 128, (2, 10), generator=gen).to(DEVICE)

    # without it transformers' loss_function logs a warning, which Dynamo cannot trace
    pt.model.loss_type = "ForCausalLM"

    def loss_fn(ids):
        return pt(input_ids=ids, labels=ids).loss

    def step(fn):
        pt.zero_grad(set_to_none=True)
        loss = fn(ids)
        loss.backward()  # AOT autograd compiled the backward graph with the forward
        return loss.detach(), pt.prefix.grad.clone()

    loss_e, grad_e = step(loss_fn)
    rec = RecordingBackend()
    loss_c, grad_c = step(torch.compile(loss_fn, fullgraph=True, backend=rec))
    assert len(rec.graphs) == 1
    n_attn = sum(name.startswith("prefixattn.fwd") for name in rec.ops())
    assert n_attn == (2 if backend == "triton" else 0)  # one per layer
    assert_same(loss_c, loss_e, "loss", 10 * ATOL)
    assert grad_e.abs().max() > 0
    assert_same(grad_c, grad_e, "dprefix", 10 * ATOL)


def test_gpt2_padded_batch_compiles() -> None:
    """A padded batch compiles too (the mask function of prefixattn.hf.patching may break
    the graph once, in front of the layers); the values equal eager."""
    pytest.importorskip("transformers")
    from prefixattn.testing import tiny_gpt2

    pt = prefixattn.PrefixTuning(tiny_gpt2().to(DEVICE), 3, init_std=0.5, backend="reference")
    ids = torch.randint(2, 128, (2, 7), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0

    def logits(ids, mask):
        return pt(input_ids=ids, attention_mask=mask).logits

    ref = logits(ids, mask)
    out = torch.compile(logits, backend="aot_eager")(ids, mask)
    assert_same(out[mask.bool()], ref[mask.bool()], "logits", 10 * ATOL)


# --------------------------------------------------------------------------------------
# the GPU path, traced on CPU
# --------------------------------------------------------------------------------------

_TRACE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from torch._dynamo.backends.common import aot_autograd

    import prefixattn
    from prefixattn.ops import custom_op, kernels, settings

    assert not kernels.DEFAULT_SOURCE.interpreted()

    class FakeDriver:  # lets Triton build the TTIR used for mutation analysis
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(FakeDriver())
    class FakeGpu(kernels.KernelSource):  # the launchers ask the GPU; these are CPU tensors
        def autotune_enabled(self, q, s):
            return True

        def check_device(self, q, s):
            return None

    settings.ACTIVE.settings = settings.Settings.from_env(prefix_splits=2, kernels=FakeGpu())

    graphs = {}
    SPLIT_NAMES = {1: "_dkdv", 2: "_dq", 3: "_prefix_dkdv"}

    def fw(gm, example_inputs):
        graphs["fw"] = gm
        outs = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
        vals = [o.meta["val"] for o in outs]
        return lambda *a: [torch.zeros(v.shape, dtype=v.dtype) for v in vals]

    def bw(gm, example_inputs):
        graphs["bw"] = gm
        outs = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
        vals = [o.meta["val"] if o is not None else None for o in outs]
        return lambda *a: [None if v is None else torch.zeros(v.shape, dtype=v.dtype) for v in vals]

    def f(q, k, v, pk, pv, idx, kpm):
        return prefixattn.prefix_attention(q, k, v, pk, pv, prefix_index=idx,
                                           key_padding_mask=kpm, backend="triton")

    B, H, Hkv, N, D, P, T = 3, 4, 2, 12, 16, 5, 2
    q = torch.randn(B, H, N, D, requires_grad=True)
    k, v = (torch.randn(B, Hkv, N, D, requires_grad=True) for _ in range(2))
    pk, pv = (torch.randn(T, Hkv, P, D, requires_grad=True) for _ in range(2))
    idx = torch.tensor([1, 0, 1])
    kpm = torch.ones(B, N, dtype=torch.bool)
    out = torch.compile(f, fullgraph=True, backend=aot_autograd(fw_compiler=fw, bw_compiler=bw))(
        q, k, v, pk, pv, idx, kpm)
    out.sum().backward()

    def kernels(gm):
        res = []
        for n in gm.graph.nodes:
            if "triton_kernel_wrapper" in str(n.target):
                from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
                kern = kernel_side_table.get_kernel(n.kwargs["kernel_idx"])
                fn = getattr(kern, "fn", kern)
                consts = n.kwargs.get("kwargs", {})  # the launch's arguments by name
                # the split backward's kernels are _attn_bwd launched with KIND = 1, 2, 3
                name = fn.__name__ + SPLIT_NAMES.get(consts.get("KIND", 0), "")
                res.append([name, sorted(n.kwargs.get("tensors_to_clone", []))])
            elif n.op == "call_function" and "prefixattn" in str(n.target):
                res.append([str(n.target), []])
        return res

    print(json.dumps({"fw": kernels(graphs["fw"]), "bw": kernels(graphs["bw"])}))
    """
)


@pytest.mark.parametrize("bwd_mode", ["split", "fused"])
def test_gpu_path_traces_without_a_gpu(bwd_mode: str) -> None:
    """The CUDA path of the triton_ops (every kernel through wrap_triton, autotuned) traced by
    AOT autograd on CPU with fake Triton target: each kernel is a node of the graph and
    only writes its outputs (Triton's own mutation analysis), in both backward modes."""
    got = run_compiled_triton_script(_TRACE_SCRIPT, PREFIXATTN_BWD=bwd_mode)
    assert got["fw"] == [["_attn_fwd", ["LSE", "Out"]]]
    middle = {
        "split": [
            ["_attn_bwd_dq", ["DQ"]],
            ["_attn_bwd_dkdv", ["DK", "DV"]],
            ["_attn_bwd_prefix_dkdv", ["DPK", "DPV"]],
        ],
        "fused": [["_attn_bwd", ["DK", "DPK", "DPV", "DQ", "DV"]]],
    }[bwd_mode]
    # the fused kernel computes Delta itself: no pre-pass
    pre = [["_attn_bwd_preprocess", ["Delta"]]] if bwd_mode == "split" else []
    assert got["bw"] == [*pre, *middle, ["_prefix_grad_reduce", ["GPK", "GPV"]]]


# --------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------


@gpu_only
@pytest.mark.parametrize("bwd_mode", ["split", "fused"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_inductor_on_gpu_matches_eager(dtype: torch.dtype, bwd_mode: str, monkeypatch) -> None:
    """Inductor compiles the kernels themselves (wrap_triton); dynamic shapes; values as
    eager's within the dtype's tolerance; both backward modes."""
    from helpers import TOL

    monkeypatch.setenv("PREFIXATTN_BWD", bwd_mode)

    def f(**kw):
        return prefixattn.prefix_attention(**kw, backend="triton")

    cf = torch.compile(f, fullgraph=True, dynamic=True)
    for n in (100, 157):
        case = Case(B=3, H=8, Hkv=2, Nq=n, Nk=n, P=20, D=64, prefix="bank", T=2, pad="left")
        kw = make_inputs(case, dtype, "cuda", seed=n)
        check_against_float64(cf, kw, dtype)
        out_e, g, _ = run_with_grads(f, kw)
        out_c, _, _ = run_with_grads(cf, kw, grad_out=g)
        assert (out_c.float() - out_e.float()).norm() <= TOL[dtype][0] * out_e.float().norm()


@gpu_only
def test_inductor_on_gpu_dropout_and_prefix_tuning() -> None:
    """Dropout under Inductor (seed drawn in the graph, a fresh mask per call) and a patched
    GPT-2 + PrefixTuning training step compiled by Inductor (loss and prefix gradient as
    eager's)."""
    pytest.importorskip("transformers")
    from prefixattn.testing import tiny_gpt2

    case = Case(B=2, H=4, Hkv=2, Nq=64, Nk=64, P=8, D=64, prefix="shared", pad="right")
    kw = make_inputs(case, torch.float16, "cuda")

    def f(**kw):
        return prefixattn.prefix_attention(**kw, dropout_p=0.2, backend="triton")

    cf = torch.compile(f, fullgraph=True)
    out_1, _, grads = run_with_grads(cf, kw)
    out_2 = cf(**kw)
    assert torch.isfinite(out_1).all() and all(torch.isfinite(g).all() for g in grads.values())
    assert not torch.equal(out_1, out_2)

    pt = prefixattn.PrefixTuning(tiny_gpt2().cuda(), 4, init_std=0.5, backend="triton")
    ids = torch.randint(2, 128, (2, 33), generator=torch.Generator().manual_seed(0)).cuda()

    def loss_fn(ids):
        logits = pt(input_ids=ids).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True)):
        pt.zero_grad(set_to_none=True)
        loss = fn(ids)
        loss.backward()
        results.append((loss.detach(), pt.prefix.grad.clone()))
    (loss_e, grad_e), (loss_c, grad_c) = results
    assert_same(loss_c, loss_e, "loss", 1e-4)
    assert (grad_c - grad_e).norm() <= 1e-4 * grad_e.norm()
