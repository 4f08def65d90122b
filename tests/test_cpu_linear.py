"""oneDNN-packed linear layers for CPU serving (``serve/engine/cpu_linear.py``).

Values against a float64 ``x @ W^T + b`` on awkward shapes; the rules that send a call
to the module's own forward (gradients, autocast dtypes, empty input); a weight changed
in place is repacked; ``revert`` gives the modules back exactly; the engine packs while
it runs, says so in its metrics, reverts at stop, and its greedy rows still equal the
rows generated alone with plain ``nn.Linear``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from prefixattn.serve.engine.cpu_linear import PackedLinears, onednn_packing, pack_linears

pytestmark = pytest.mark.skipif(
    onednn_packing(torch.float32) is not None,
    reason=f"oneDNN cannot pack float32 here: {onednn_packing(torch.float32)}",
)


@pytest.fixture(params=["python", "c++"])
def op_kernels(request: pytest.FixtureRequest) -> Iterator[str]:
    """Which kernels serve the ops (``prefixattn::onednn_linear[_group]``) in the test:
    the Python ones, or the C++ ones (``cpu_linear_ops.cpp``, built here; skipped only on
    a machine with no C++ compiler, where they cannot be built)."""
    from prefixattn.serve.engine import cpu_linear

    if request.param == "c++":
        _require_native()
    ext = cpu_linear._NATIVE[0] if cpu_linear._NATIVE else None
    if ext is not None:
        ext.set_enabled(request.param == "c++")
    try:
        yield request.param
    finally:
        if ext is not None:
            ext.set_enabled(True)


def _native_calls() -> tuple[int, int]:
    """(calls the C++ kernels served, calls they handed to Python) so far."""
    from prefixattn.serve.engine.cpu_linear import native_linear_stats

    st = native_linear_stats() or {"native_calls": 0, "python_calls": 0}
    return st["native_calls"], st["python_calls"]


def _check_served(before: tuple[int, int], op_kernels: str, native: int, python: int) -> None:
    """Since ``before``: the C++ kernels served ``native`` calls and handed ``python`` to
    the Python kernel (with the C++ kernels: exactly; with the Python ones: none native)."""
    got = tuple(b - a for a, b in zip(before, _native_calls()))
    if op_kernels == "c++":
        assert got == (native, python), got
    else:
        assert got[0] == 0, got


def cxx_compiler() -> bool:
    """A C++ compiler here (the C++ kernels can be built)."""
    return shutil.which(os.environ.get("CXX", "c++")) is not None


def _require_native() -> None:
    """The C++ kernels loaded; skipped only where no C++ compiler exists."""
    from prefixattn.serve.engine import cpu_linear

    if (why := cpu_linear.native_linear_ops()) is not None:
        if not cxx_compiler():
            pytest.skip(f"no C++ compiler: {why}")
        pytest.fail(f"the C++ kernels did not load: {why}")


def _model(k: int, n: int, bias: bool) -> nn.Sequential:
    torch.manual_seed(k * 1000 + n)
    return nn.Sequential(nn.Linear(k, n, bias=bias), nn.GELU(), nn.Linear(n, k, bias=bias))


def _ref(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    l1, l2 = model[0], model[2]
    x64 = x.double()
    h = x64 @ l1.weight.double().T + (l1.bias.double() if l1.bias is not None else 0)
    h = torch.nn.functional.gelu(h)
    return h @ l2.weight.double().T + (l2.bias.double() if l2.bias is not None else 0)


@pytest.mark.parametrize("k,n", [(40, 96), (96, 80), (80, 40)])
@pytest.mark.parametrize("rows", [(1,), (17,), (113,), (1, 7), (2, 17)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_values_against_float64(k: int, n: int, rows: tuple, bias: bool) -> None:
    model = _model(k, n, bias)
    x = torch.randn(*rows, k)
    with torch.no_grad(), pack_linears(model) as packed:
        assert packed.num_packed == 2 and packed.active
        y = model(x)
        assert packed.packed_calls == 2 and packed.plain_calls == 0, packed.stats()
    assert y.shape == (*rows, k) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), _ref(model, x), rtol=2e-5, atol=2e-5)
    assert not packed.active and "forward" not in model[0].__dict__


def test_training_and_other_dtypes_take_the_modules_own_forward() -> None:
    model = _model(40, 96, True)
    x = torch.randn(5, 40)
    with pack_linears(model) as packed:
        y = model(x)  # grad enabled, weights require grad: nn.Linear itself
        assert packed.plain_calls == 2 and packed.packed_calls == 0
        y.sum().backward()
        assert model[0].weight.grad is not None
        g = model[0].weight.grad.clone()
        with torch.no_grad():
            model(x.double().float())  # packed now
            assert packed.packed_calls == 2
            model(torch.empty(0, 40))  # empty input: plain
            assert packed.plain_calls == 4
    model.zero_grad()
    model(x).sum().backward()  # the same gradient as through the packed module's fallback
    torch.testing.assert_close(model[0].weight.grad, g, rtol=0, atol=0)


def test_bf16_input_on_fp32_weights_is_plain() -> None:
    model = _model(40, 96, False)
    with torch.no_grad(), pack_linears(model) as packed:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(torch.randn(3, 40))
        assert y.dtype == torch.bfloat16 and packed.packed_calls == 0 and packed.plain_calls == 2


def test_weight_changed_in_place_is_repacked() -> None:
    model = _model(40, 96, True)
    x = torch.randn(4, 40)
    with torch.no_grad(), pack_linears(model) as packed:
        model(x)
        model[0].weight.mul_(-0.5)  # an optimizer step / a loaded state dict, in place
        model[2].weight = nn.Parameter(torch.randn(40, 96))  # replaced
        y = model(x)
        assert packed.repacks == 2, packed.stats()
    torch.testing.assert_close(y.double(), _ref(model, x), rtol=2e-5, atol=2e-5)


def test_subclasses_and_wrapped_modules_are_left_alone() -> None:
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(8, 8), MyLinear(8, 8), nn.Linear(8, 8))
    mine = model[2].forward
    model[2].forward = lambda x: mine(x) * 2  # somebody's hook
    handle = PackedLinears(model)
    assert handle.num_packed == 1 and set(handle.skipped) == {"1", "2"}, handle.skipped
    handle.revert()
    assert "forward" in model[2].__dict__  # theirs stays
    with pytest.raises(ValueError, match="batch_hint"):
        pack_linears(model, batch_hint=0)


def test_transformers_conv1d_is_packed_transposed() -> None:
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(3)
    model = nn.Sequential(Conv1D(96, 40), nn.GELU(), Conv1D(40, 96))  # GPT-2's layout
    for m in (model[0], model[2]):
        nn.init.normal_(m.bias)
    x = torch.randn(2, 17, 40)
    with torch.no_grad(), pack_linears(model) as packed:
        assert packed.num_packed == 2, packed.skipped
        y = model(x)
        assert packed.packed_calls == 2 and packed.plain_calls == 0, packed.stats()
    x64 = x.double()
    h = torch.nn.functional.gelu(x64 @ model[0].weight.double() + model[0].bias.double())
    ref = h @ model[2].weight.double() + model[2].bias.double()
    torch.testing.assert_close(y.double(), ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("conv1d", [False, True])
def test_compiled_graph_reads_the_packed_weights(conv1d: bool, op_kernels: str) -> None:
    from prefixattn.serve.engine import cpu_linear

    if conv1d:
        pytest.importorskip("transformers")
        from transformers.pytorch_utils import Conv1D

        model = nn.Sequential(Conv1D(96, 40), nn.GELU(), Conv1D(40, 96))
    else:
        model = _model(40, 96, True)
    x = torch.randn(5, 40)
    with torch.no_grad():
        want = model(x)  # nn.Linear / Conv1D themselves
        with pack_linears(model) as packed:
            fn = torch.compile(model, fullgraph=True, backend="inductor")
            fn(x)  # compiles
            before, calls = cpu_linear.OP_FALLBACKS[0], _native_calls()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
                got = fn(x)
            counts = {e.key: e.count for e in p.key_averages()}
            assert cpu_linear.OP_FALLBACKS[0] == before, "the op fell back to torch's linear"
            _check_served(calls, op_kernels, native=2, python=0)
            # both layers ran as the op, over their packed copies
            assert counts.get("prefixattn::onednn_linear") == 2, counts
            assert counts.get("mkldnn::_linear_pointwise") == 2, counts
            assert packed.packed_calls == 0  # the graph, not the eager forward, ran
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # nn.Linear / transformers' Conv1D
def test_engine_packs_while_running_and_reverts(arch: str) -> None:
    pytest.importorskip("transformers")
    import copy

    from test_engine import alone, prompts, request, run

    from prefixattn import PrefixTuning, TaskBank
    from prefixattn.serve.engine import Engine
    from prefixattn.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model(len(tok), arch=arch)
    bank = TaskBank(model)
    bank.add_base("base")
    torch.manual_seed(7)
    bank.add("p7", PrefixTuning(copy.deepcopy(model), 7, init="random"))
    eng = Engine(bank, tok, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64,
                 cpu_linear="onednn")  # fmt: skip
    ps = prompts(len(tok), [1, 17, 5, 30])
    reqs = [request(t, p, max_tokens=5) for t in ("p7", "base") for p in ps]
    run(eng, reqs)
    lin = eng.metrics()["linear"]
    assert lin["path"] == "onednn-packed" and lin["packed_calls"] > 0, lin
    assert lin["plain_calls"] == 0 and not lin["active"], lin
    # the originals of the frozen weights were released while it ran (restored at stop:
    # the rows generated alone below read them)
    assert lin["weights_released"] >= 4 * model.config.num_hidden_layers, lin
    # every projection of every layer and the LM head (GPT-2's are Conv1D)
    layers = model.config.num_hidden_layers
    assert lin["modules_packed"] > 4 * layers, lin
    # llama: q/k/v and gate/up of each layer as one packed weight, one GEMM per call of
    # the group (GPT-2's c_attn is one weight already: no groups)
    assert lin["groups"] == (2 * layers if arch == "llama" else 0), lin
    if arch == "llama":
        assert lin["group_gemms"] > 0 and lin["sibling_hits"] == 3 * lin["group_gemms"] // 2, lin
    linears = [m for m in bank.model.modules()
               if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]  # fmt: skip
    assert linears and not any("forward" in m.__dict__ for m in linears)
    for r in reqs:  # nn.Linear again, each row alone
        want = alone(bank, r.task, r.prompt_ids, 5, tok.eos_token_id)
        assert r.sink.ids == want, (r.task, len(r.prompt_ids))


def test_engine_cpu_linear_argument() -> None:
    pytest.importorskip("transformers")
    from prefixattn import TaskBank
    from prefixattn.serve.engine import Engine
    from prefixattn.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    bank = TaskBank(tiny_model(len(tok), arch="llama"))
    bank.add_base("base")
    with pytest.raises(ValueError, match="cpu_linear"):
        Engine(bank, tok, cpu_linear="mkl")
    eng = Engine(bank, tok, cpu_linear="torch")
    eng.start()
    eng.stop()
    assert eng.metrics()["linear"] == {"path": "torch"}


def test_bf16_model_packs_only_where_onednn_can() -> None:
    pytest.importorskip("transformers")
    from test_engine import request, run

    from prefixattn import TaskBank
    from prefixattn.serve.engine import Engine
    from prefixattn.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    bank = TaskBank(tiny_model(len(tok), arch="llama").to(torch.bfloat16))
    bank.add_base("base")
    why = onednn_packing(torch.bfloat16)
    if why is not None:  # this CPU: an error for "onednn" naming the reason
        with pytest.raises(ValueError, match="cpu_linear='onednn'"):
            Engine(bank, tok, cpu_linear="onednn")
    eng = Engine(bank, tok, max_num_seqs=2, max_model_len=32)  # "auto"
    reqs = [request("base", [5, 9, 2], max_tokens=3)]
    run(eng, reqs)
    assert len(reqs[0].sink.ids) == 3
    lin = eng.metrics()["linear"]
    assert lin["path"] == ("torch" if why else "onednn-packed"), (lin, why)
    assert (lin["modules_skipped"] > 0) == (why is not None), lin


# ----------------------------------------------------------------- sibling groups


class _Attn(nn.Module):
    """q/k/v (Nq != Nk, biases on two of three) and a gated MLP, as HF layers call them;
    ``order`` is the order the projections are called in."""

    def __init__(self, k: int = 40, nq: int = 48, nk: int = 24, order: str = "qkv") -> None:
        super().__init__()
        torch.manual_seed(k + nq + nk)
        self.q_proj = nn.Linear(k, nq, bias=True)
        self.k_proj = nn.Linear(k, nk, bias=False)
        self.v_proj = nn.Linear(k, nk, bias=True)
        self.gate_proj = nn.Linear(k, 80, bias=False)
        self.up_proj = nn.Linear(k, 80, bias=False)
        self.order = order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = {c: getattr(self, f"{c}_proj")(x) for c in self.order}
        mlp = torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x)
        return torch.cat([out["q"], out["k"] * 2, out["v"], mlp], -1)

    def ref(self, x: torch.Tensor) -> torch.Tensor:
        def lin(m: nn.Linear) -> torch.Tensor:
            y = x.double() @ m.weight.double().T
            return y + m.bias.double() if m.bias is not None else y

        mlp = torch.nn.functional.silu(lin(self.gate_proj)) * lin(self.up_proj)
        return torch.cat([lin(self.q_proj), lin(self.k_proj) * 2, lin(self.v_proj), mlp], -1)


@pytest.mark.parametrize("rows", [(1,), (17,), (2, 17), (113,)])
@pytest.mark.parametrize("dims", [(40, 48, 24), (96, 96, 32), (80, 80, 80)])
def test_sibling_groups_one_gemm_values_against_float64(rows: tuple, dims: tuple) -> None:
    m = _Attn(*dims)
    x = torch.randn(*rows, dims[0])
    with torch.no_grad(), pack_linears(m) as packed:
        st = packed.stats()
        assert st["groups"] == 2 and st["modules_grouped"] == 5, st
        y = m(x)
        st = packed.stats()
        # one GEMM per group; the siblings took their columns of it
        assert st["group_gemms"] == 2 and st["sibling_hits"] == 3, st
        assert st["packed_calls"] == 5 and st["plain_calls"] == 0, st
    torch.testing.assert_close(y.double(), m.ref(x), rtol=2e-5, atol=2e-5)
    assert not any("forward" in c.__dict__ for c in m.children())


def test_sibling_on_another_input_or_a_changed_input_runs_its_own_gemm() -> None:
    m = _Attn()
    x, x2 = torch.randn(5, 40), torch.randn(5, 40)
    with torch.no_grad(), pack_linears(m) as packed:
        q = m.q_proj(x)
        k2 = m.k_proj(x2)  # another input: not q's GEMM
        x.add_(1.0)  # changed in place after q's GEMM: v must see the new values
        v = m.v_proj(x)
        assert packed.group_gemms == 3 and packed.sibling_hits == 0, packed.stats()
        # the same member twice on one input: the second is a fresh GEMM, still right
        k_a, k_b = m.k_proj(x2), m.k_proj(x2)
    torch.testing.assert_close(q, torch.nn.functional.linear(x - 1.0, m.q_proj.weight,
                                                             m.q_proj.bias))  # fmt: skip
    torch.testing.assert_close(k2, x2 @ m.k_proj.weight.T)
    torch.testing.assert_close(v, torch.nn.functional.linear(x, m.v_proj.weight, m.v_proj.bias))
    torch.testing.assert_close(k_a, k_b, rtol=0, atol=0)


def _same_version(old: torch.Tensor, values: torch.Tensor) -> nn.Parameter:
    """A new parameter of ``values`` whose version counter reads as ``old``'s."""
    new = nn.Parameter(values)
    with torch.no_grad():
        while new._version < old._version:
            new.add_(0)
    assert new._version == old._version and new is not old
    return new


def test_sibling_weight_changed_or_replaced_is_repacked() -> None:
    m = _Attn()
    x = torch.randn(3, 40)

    def changes() -> list:
        return [
            lambda: m.k_proj.weight.mul_(-2.0),  # in place
            lambda: setattr(m.up_proj, "weight", nn.Parameter(torch.randn(80, 40))),  # replaced
            lambda: m.v_proj.bias.add_(3.0),  # a bias in place
            # a bias replaced by one of the same version (0): its pointer shows it
            lambda: setattr(m.q_proj, "bias", _same_version(m.q_proj.bias, torch.randn(48))),
        ]

    with torch.no_grad(), pack_linears(m) as packed:
        m(x)
        for i, change in enumerate(changes(), 1):
            change()
            y = m(x)
            assert packed.repacks == i, packed.stats()
            torch.testing.assert_close(y.double(), m.ref(x), rtol=2e-5, atol=2e-5)


def test_group_op_serves_the_packed_copy_only_while_it_is_current(op_kernels: str) -> None:
    """The op the compiled graph calls (it sees tensors, not modules): the packed group's
    one GEMM while weights and biases are the packed ones, unchanged; a weight or bias
    changed in place, or replaced (a new tensor, version 0 like the old one), gives the
    new values (torch's linear, counted), never the stale packed copy."""
    from prefixattn.serve.engine import cpu_linear

    m = _Attn()
    x = torch.randn(5, 40)
    mods = [m.q_proj, m.k_proj, m.v_proj]

    def call() -> tuple[torch.Tensor, int]:
        before, (native, _) = cpu_linear.OP_FALLBACKS[0], _native_calls()
        y = cpu_linear.onednn_linear_group(x, [p.weight for p in mods], [p.bias for p in mods])
        want = torch.cat([x.double() @ p.weight.double().T
                          + (p.bias.double() if p.bias is not None else 0) for p in mods], -1)  # fmt: skip
        torch.testing.assert_close(y.double(), want, rtol=2e-5, atol=2e-5)
        fell_back = cpu_linear.OP_FALLBACKS[0] - before
        # the C++ kernel serves exactly the calls the packed copy can serve
        want_native = int(op_kernels == "c++" and fell_back == 0)
        assert _native_calls()[0] - native == want_native
        return y, fell_back

    with torch.no_grad(), pack_linears(m):
        assert call()[1] == 0  # the group's one GEMM
        m.v_proj.bias.add_(1.0)
        assert call()[1] == 3
    with torch.no_grad(), pack_linears(m):
        assert call()[1] == 0
        m.q_proj.bias = _same_version(m.q_proj.bias, torch.randn(48))
        assert call()[1] == 3
    with torch.no_grad(), pack_linears(m):
        m.k_proj.weight.mul_(-1.0)
        assert call()[1] == 3


def test_cpp_kernels_serve_current_packed_weights_without_entering_python() -> None:
    """The C++ kernels (what a compiled step's C++ wrapper calls with the GIL released)
    serve a group, a single weight and a transposed (``Conv1D``) weight whose packed copy
    is current without calling into Python at all (the Python kernels are swapped for
    ones that raise, and the values still come); every other call (a weight changed in
    place, a bias replaced, an empty input) goes to the Python kernel; the mirrored
    entries leave with the packing."""
    pytest.importorskip("transformers")
    _require_native()
    from transformers.pytorch_utils import Conv1D

    from prefixattn.serve.engine import cpu_linear

    ext = cpu_linear._NATIVE[0]
    m = _Attn()
    m.o_proj = nn.Linear(48, 40, bias=True)
    m.c_proj = Conv1D(40, 48)  # weight [in, out]: packed transposed
    nn.init.normal_(m.c_proj.bias)
    mods = [m.q_proj, m.k_proj, m.v_proj]
    x = torch.randn(7, 40)
    xo = torch.randn(7, 48)
    x64, xo64 = x.double(), xo.double()

    def calls() -> dict[str, torch.Tensor]:
        return {
            "group": cpu_linear.onednn_linear_group(
                x, [p.weight for p in mods], [p.bias for p in mods]
            ),
            "single": cpu_linear.onednn_linear(xo, m.o_proj.weight, m.o_proj.bias),
            "conv1d": cpu_linear.onednn_linear(xo, m.c_proj.weight, m.c_proj.bias, True),
        }

    def want() -> dict[str, torch.Tensor]:
        return {
            "group": torch.cat(
                [
                    x64 @ p.weight.double().T + (p.bias.double() if p.bias is not None else 0)
                    for p in mods
                ],
                -1,
            ),
            "single": xo64 @ m.o_proj.weight.double().T + m.o_proj.bias.double(),
            "conv1d": xo64 @ m.c_proj.weight.double() + m.c_proj.bias.double(),
        }

    def python_called(*args: object) -> None:
        raise AssertionError("the C++ kernel called into Python")

    before = ext.stats()
    with torch.no_grad(), pack_linears(m):
        entries = ext.stats()
        # mirrored: two groups (q/k/v, gate/up), two single weights (o_proj, c_proj)
        added = (entries["groups"] - before["groups"], entries["singles"] - before["singles"])
        assert added == (2, 2), entries
        ext.set_fallbacks(python_called, python_called)
        try:
            n0 = _native_calls()
            got = calls()
            assert tuple(b - a for a, b in zip(n0, _native_calls())) == (3, 0)
        finally:
            ext.set_fallbacks(cpu_linear._onednn_linear_impl, cpu_linear._onednn_linear_group_impl)
        for k, v in want().items():
            torch.testing.assert_close(got[k].double(), v, rtol=2e-5, atol=2e-5, msg=k)
        # changed or replaced since packing, or nothing to multiply: the Python kernel
        m.k_proj.weight.mul_(-1.0)
        m.o_proj.bias = _same_version(m.o_proj.bias, torch.randn(40))  # the call's bias: used
        m.c_proj.weight.add_(0.5)
        n0 = _native_calls()
        got = calls()
        assert tuple(b - a for a, b in zip(n0, _native_calls())) == (1, 2)  # o_proj: native
        for k, v in want().items():
            torch.testing.assert_close(got[k].double(), v, rtol=2e-5, atol=2e-5, msg=k)
        n0 = _native_calls()
        empty = cpu_linear.onednn_linear(xo[:0], m.o_proj.weight, m.o_proj.bias)
        assert empty.shape == (0, 40) and _native_calls()[1] - n0[1] == 1
    after = ext.stats()
    assert (after["groups"], after["singles"]) == (before["groups"], before["singles"])


def test_cpp_kernels_not_built_say_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """``PREFIXATTN_NATIVE_LINEAR=0`` keeps the Python kernels; a failed build (no
    compiler, no headers) is a reason, not an error: the Python kernels serve the ops."""
    from torch.utils import cpp_extension

    from prefixattn.serve.engine import cpu_linear

    monkeypatch.setenv(cpu_linear.NATIVE_ENV, "0")
    assert cpu_linear._load_native() == "PREFIXATTN_NATIVE_LINEAR=0"
    monkeypatch.setenv(cpu_linear.NATIVE_ENV, "1")

    def no_compiler(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Error building extension\nc++: command not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    loaded = list(cpu_linear._NATIVE)
    why = cpu_linear._load_native()
    assert why == "building cpu_linear_ops.cpp failed: c++: command not found"
    assert loaded == cpu_linear._NATIVE  # nothing new registered


def test_siblings_that_cannot_share_a_weight_are_packed_alone() -> None:
    m = _Attn()
    m.v_proj = nn.Linear(24, 24)  # another in_features: q/k/v not a group
    m.up_proj = type("MyLinear", (nn.Linear,), {})(40, 80)  # a subclass: its own forward
    with pack_linears(m) as packed:
        st = packed.stats()
        assert st["groups"] == 0 and st["modules_grouped"] == 0, st
        assert st["modules_packed"] == 4 and st["modules_skipped"] == 1, st


@pytest.mark.parametrize("order", ["qkv", "vqk"])
def test_compiled_siblings_run_as_one_group_op(order: str, op_kernels: str) -> None:
    """The pass merges the five ops that read x into one group op, which runs the two
    groups it holds (q/k/v, gate/up: two GEMMs); whatever order the projections are
    called in, the values are right (Inductor may reorder the graph's nodes: with q/k/v
    out of the group's order they run as torch's linear, counted)."""
    from prefixattn.serve.engine import cpu_linear
    from prefixattn.serve.engine.cpu_linear import GroupSiblingLinears

    m = _Attn(order=order)
    x = torch.randn(6, 40)
    with torch.no_grad(), pack_linears(m) as packed:
        opts = {"post_grad_custom_post_pass": GroupSiblingLinears()}
        fn = torch.compile(m, fullgraph=True, backend="inductor", options=opts)
        fn(x)
        before, calls = cpu_linear.OP_FALLBACKS[0], _native_calls()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
            got = fn(x)
        counts = {e.key: e.count for e in p.key_averages()}
        assert counts.get("prefixattn::onednn_linear_group") == 1, counts
        assert "prefixattn::onednn_linear" not in counts, counts
        fell_back = cpu_linear.OP_FALLBACKS[0] - before
        assert fell_back == 0 if order == "qkv" else fell_back in (0, 3), fell_back
        # two groups in one op: two GEMMs, concatenated; q/k/v out of the group's order:
        # each alone, and none has a packed copy of its own (the Python kernel)
        _check_served(calls, op_kernels, native=int(not fell_back), python=int(bool(fell_back)))
        assert counts.get("mkldnn::_linear_pointwise") == (1 if fell_back else 2), counts
        assert packed.packed_calls == 0
    torch.testing.assert_close(got.double(), m.ref(x), rtol=2e-5, atol=2e-5)
    # reverted: the group op finds no packed copies and computes each linear (counted)
    mods = [getattr(m, f"{c}_proj") for c in ("q", "k", "v", "gate", "up")]
    before = cpu_linear.OP_FALLBACKS[0]
    with torch.no_grad():
        again = cpu_linear.onednn_linear_group(x, [p.weight for p in mods], [p.bias for p in mods])
    assert cpu_linear.OP_FALLBACKS[0] - before == 5
    want = torch.cat([x.double() @ p.weight.double().T
                      + (p.bias.double() if p.bias is not None else 0) for p in mods], -1)  # fmt: skip
    torch.testing.assert_close(again.double(), want, rtol=2e-5, atol=2e-5)


# ------------------------------------------------------------ released originals


class _Tied(nn.Module):
    """_Attn's projections, an untied head, and a head tied to an embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = _Attn()
        self.emb = nn.Embedding(30, 40)
        self.head = nn.Linear(40, 30, bias=False)
        self.tied = nn.Linear(40, 30, bias=False)
        self.tied.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.attn(x), self.head(x), self.tied(x)], -1)


def _weights(m: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("rows", [(1,), (17,), (2, 7)])
def test_released_weights_same_values_and_restored_exactly(rows: tuple) -> None:
    from prefixattn.serve.engine import cpu_linear

    for p in (m := _Tied()).parameters():
        p.requires_grad_(False)
    before = _weights(m)
    entries = (len(cpu_linear._REGISTRY), len(cpu_linear._GROUPS))
    x = torch.randn(*rows, 40)
    with torch.no_grad():
        want = m(x)
        with pack_linears(m, release_weights=True) as packed:
            st = packed.stats()
            # q/k/v, gate/up and the untied head; the tied head keeps its weight
            assert st["weights_released"] == 6, st
            # 4 bytes a value: q 48x40, k and v 24x40, gate and up 80x40, head 30x40
            assert st["released_bytes"] == 4 * 40 * (48 + 24 + 24 + 80 + 80 + 30), st
            assert m.tied.weight.stride() == (40, 1) and m.emb.weight is m.tied.weight
            assert m.attn.q_proj.weight.shape == (48, 40)  # a stub of the same shape
            assert m.attn.q_proj.weight.stride() == (0, 0)
            got = m(x)
            # the module's own math where the packed path does not apply (autocast
            # and gradients here): over a dense copy of the weight, not the stub
            xg = x.clone().requires_grad_(True)
            with torch.enable_grad():
                yg = m.attn.k_proj(xg)
                yg.sum().backward()
            auto = torch.nn.functional.linear(x, before["head.weight"])
            with torch.autocast("cpu", dtype=torch.bfloat16):
                yb = m.head(x)
            assert packed.plain_calls == 2, packed.stats()
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(yg, x @ before["attn.k_proj.weight"].T)
    torch.testing.assert_close(xg.grad, before["attn.k_proj.weight"].sum(0).expand_as(x))
    torch.testing.assert_close(yb.float(), auto, rtol=2e-2, atol=2e-2)
    after = _weights(m)
    assert all(torch.equal(after[n], before[n]) for n in before)  # restored exactly
    assert all(p.stride() == (p.shape[1], 1) for p in m.parameters() if p.dim() == 2)
    # no packed copy left registered (under a released weight's old pointer, another
    # tensor allocated there could be served it)
    assert (len(cpu_linear._REGISTRY), len(cpu_linear._GROUPS)) == entries


def test_released_weights_default_off_and_weight_gradients_refused() -> None:
    m = _Tied()  # trainable parameters (what from_pretrained gives)
    with pack_linears(m) as packed:  # default: the originals stay
        assert packed.stats()["weights_released"] == 0
        assert m.attn.q_proj.weight.stride() == (40, 1)
    x = torch.randn(3, 40)
    with pack_linears(m, release_weights=True) as packed:
        assert packed.stats()["weights_released"] == 6
        with torch.no_grad():
            y = m.head(x)  # serving: packed
        with pytest.raises(RuntimeError, match="gradient"):
            m.head(x)  # wants head.weight's gradient: never silently without it
        with pytest.raises(RuntimeError, match="gradient"):
            m.attn.v_proj(x)
    torch.testing.assert_close(y, x @ m.head.weight.detach().T, rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="release_weights"):
        pack_linears(m, release_weights=1)  # type: ignore[arg-type]


def test_released_weight_changed_in_place_is_an_error_and_replacing_works(op_kernels: str) -> None:
    m = _Attn()
    for p in m.parameters():
        p.requires_grad_(False)
    x = torch.randn(4, 40)
    with torch.no_grad(), pack_linears(m, release_weights=True) as packed:
        with pytest.raises(RuntimeError):  # torch refuses writes into the stub itself
            m.k_proj.weight.add_(1.0)
        # and were its version bumped some other way, it is refused, never served stale
        w = m.k_proj.weight
        torch._C._autograd._unsafe_set_version_counter((w,), (w._version + 1,))
        with pytest.raises(RuntimeError, match="release_weights"):
            m.k_proj(x)
        with pytest.raises(RuntimeError, match="release_weights"):
            torch.ops.prefixattn.onednn_linear(x, m.k_proj.weight, None, False)
        packed.revert()
    m = _Attn()
    for p in m.parameters():
        p.requires_grad_(False)
    with torch.no_grad(), pack_linears(m, release_weights=True) as packed:
        old = m.up_proj.weight
        m.up_proj.weight = nn.Parameter(torch.randn(80, 40), requires_grad=False)
        y = m(x)  # repacked over the new weight
        assert packed.repacks == 1
    # reverted: every weight has its values again (the ref reads them)
    torch.testing.assert_close(y.double(), m.ref(x), rtol=2e-5, atol=2e-5)
    assert old.stride() == (40, 1)  # the replaced original got its values back


def test_compiled_graph_over_released_weights(op_kernels: str) -> None:
    from prefixattn.serve.engine import cpu_linear
    from prefixattn.serve.engine.cpu_linear import GroupSiblingLinears

    m = _Tied()
    for p in m.parameters():
        p.requires_grad_(False)
    x = torch.randn(6, 40)
    with torch.no_grad():
        want = m(x)
        with pack_linears(m, release_weights=True):
            opts = {"post_grad_custom_post_pass": GroupSiblingLinears()}
            fn = torch.compile(m, fullgraph=True, backend="inductor", options=opts)
            fn(x)
            before, calls = cpu_linear.OP_FALLBACKS[0], _native_calls()
            got = fn(x)
            assert cpu_linear.OP_FALLBACKS[0] == before
            # one op reads x: q/k/v and gate/up groups, the head and the tied head alone
            _check_served(calls, op_kernels, native=1, python=0)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_the_pass_keys_inductors_cache_by_its_own_source_and_the_schemas(monkeypatch) -> None:
    """``GroupSiblingLinears.uuid()``: stable, and it follows the pass's own source (a
    graph the pass rewrote differently is not served from the cache); it is not the
    whole file's hash (the ops' run-time bodies are not in the compiled graph)."""
    import inspect

    from prefixattn.serve.engine import cpu_linear

    cpu_linear._pass_hash.cache_clear()
    first = cpu_linear.GroupSiblingLinears().uuid()
    assert first == cpu_linear.GroupSiblingLinears().uuid() and len(first) == 64
    real = inspect.getsource

    def edited(obj: object) -> str:
        src = real(obj)
        return src + "\n# edited" if obj is cpu_linear.GroupSiblingLinears else src

    try:
        monkeypatch.setattr(inspect, "getsource", edited)
        cpu_linear._pass_hash.cache_clear()
        assert cpu_linear.GroupSiblingLinears().uuid() != first
        monkeypatch.setattr(inspect, "getsource", real)
        cpu_linear._pass_hash.cache_clear()
        assert cpu_linear.GroupSiblingLinears().uuid() == first
    finally:
        cpu_linear._pass_hash.cache_clear()
