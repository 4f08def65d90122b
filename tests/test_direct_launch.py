"""Direct launches of compiled Triton kernels (``prefixattn/ops/direct.py``).

On CPU the kernels run under Triton's interpreter, where ``DirectKernel.capture`` must
launch normally and return None (values checked against the float64 reference). The
compiled path is checked without a GPU in a subprocess (``TRITON_INTERPRET`` unset): the
kernels are compiled for sm_90 by Triton's own compiler behind a stand-in driver
(``scripts/launch_overhead.py``), Triton's real ``CudaLauncher`` is built, and only the C
launch function is replaced by a recorder. The tuple ``JITFunction.run`` hands to it must
equal, element by element, the one a DirectKernel passes, for the captured tensors and for
new ones of the same signature; ``matches`` must agree with Triton's own binder on which
argument changes alter the specialization.
"""

from __future__ import annotations

import logging
import os
import sys
from unittest import mock

import pytest
import torch
import triton
import triton.language as tl
from helpers import Case, check_against_float64, make_inputs, run_compiled_triton_script

import prefixattn
from prefixattn.ops import direct, kernels
from prefixattn.ops.direct import DirectKernel, direct_launch_supported

_TRITON = tuple(int(x) for x in triton.__version__.split(".")[:2])


@triton.jit
def _add_kernel(X, Y, Out, n, scale, BLOCK: tl.constexpr, HAS_Y: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(X + offs, mask=m)
    if HAS_Y:
        x += tl.load(Y + offs, mask=m)
    tl.store(Out + offs, x * scale, mask=m)


def test_feature_detection_names_the_triton_layout() -> None:
    ok, reason = direct_launch_supported()
    assert ok, reason
    assert triton.__version__ in reason
    layout = direct._detect()[2]
    if _TRITON >= (3, 8):
        assert layout == "tuple", reason
    elif _TRITON == (3, 6):
        assert layout == "flat", reason


def test_unknown_triton_internals_fall_back_with_a_logged_reason(caplog) -> None:
    direct._detect.cache_clear()
    try:
        with (
            mock.patch.object(direct, "_JIT_LAUNCH", "kernel.run(something_else)"),
            caplog.at_level(logging.DEBUG, logger="prefixattn"),
        ):
            ok, reason = direct_launch_supported()
            assert direct_launch_supported() == (ok, reason)  # cached: logged once
        assert not ok
        assert "JITFunction.run" in reason
        logged = [r.getMessage() for r in caplog.records if r.name == "prefixattn"]
        assert len(logged) == 1 and reason in logged[0]
    finally:
        direct._detect.cache_clear()
    assert direct_launch_supported()[0]


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="checks the interpreter's fallback"
)
@pytest.mark.parametrize("has_y", [False, True])
def test_interpreter_capture_launches_and_returns_none(has_y: bool) -> None:
    g = torch.Generator().manual_seed(3)
    n = 113
    x, y = torch.randn(n, generator=g), torch.randn(n, generator=g)
    out = torch.full((n,), float("nan"))
    dk = DirectKernel.capture(
        _add_kernel, (triton.cdiv(n, 32),), (x, y if has_y else None, out, n, 0.75),
        {"BLOCK": 32, "HAS_Y": has_y},
    )  # fmt: skip
    assert dk is None
    want = (x.double() + (y.double() if has_y else 0)) * 0.75
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="checks the interpreter's fallback"
)
@pytest.mark.parametrize("prefix", ["shared", "bank"])
def test_interpreter_kernels_through_capture_match_float64(prefix: str) -> None:
    """Every launch of a forward + backward goes through DirectKernel.capture: each
    returns None under the interpreter and the results are the reference's."""
    captured = []

    def run_config(kernel, grid_fn, cfg, args, kwargs):
        tiles = cfg.tiles()
        kw = {**kwargs, **tiles, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        captured.append(DirectKernel.capture(kernel, grid_fn(tiles), args, kw))

    case = Case(B=2, H=4, Hkv=2, Nq=17, Nk=33, P=7, D=40, prefix=prefix, pad="left")
    kw = make_inputs(case, torch.float32, "cpu", seed=5)
    with mock.patch.object(kernels, "_run_config", run_config):
        check_against_float64(
            lambda **a: prefixattn.prefix_attention(**a, backend="triton"), kw, torch.float32
        )
    assert len(captured) >= 2  # fwd, dq, dkdv, prefix partials (split) or fwd, bwd (fused)
    assert all(dk is None for dk in captured)


# ----------------------------------------------------------------------------------
# Compiled for sm_90 without a GPU (subprocess)


def _walk_diff(a, b, path: str, out: list[str]) -> None:
    """Differences between two launcher argument tuples: tensors by identity, the rest by
    equality, tuples element by element."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        if len(a) != len(b):
            out.append(f"{path}: length {len(a)} != {len(b)}")
            return
        for i, (x, y) in enumerate(zip(a, b)):
            _walk_diff(x, y, f"{path}[{i}]", out)
    elif isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if a is not b:
            out.append(f"{path}: different tensor objects")
    elif type(a) is not type(b) or a != b:
        out.append(f"{path}: {a!r} != {b!r}")


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A tensor like ``t`` whose data pointer is one element past a 16-byte boundary."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype)[1:]  # storage offset 1 element
    return flat.as_strided(t.shape, t.stride())


def _compiled_checks() -> dict:
    """Runs in a process where Triton compiles for the GPU; returns what the tests assert."""
    import launch_overhead as lo
    from triton import knobs

    rec: list[tuple] = []

    def c_launch(*args) -> None:  # stands in for the C launch function
        rec.append(args)

    def last() -> tuple:
        assert len(rec) == 1, f"{len(rec)} launches recorded"
        return rec.pop()

    res: dict = {}
    with lo.stand_in_driver(c_launch):
        layout = direct._detect()[2]
        hooks = {8, 9, 10} if layout == "tuple" else {10, 11, 12}
        n_params = 15 if layout == "tuple" else None

        def split(t: tuple) -> tuple[tuple, tuple]:
            """(every element but the launch metadata and hooks, those three)."""
            keep = tuple(x for i, x in enumerate(t) if i not in hooks)
            return keep, tuple(t[i] for i in sorted(hooks))

        def compare(normal: tuple, directed: tuple) -> list[str]:
            diffs: list[str] = []
            a, hooks_n = split(normal)
            b, hooks_d = split(directed)
            _walk_diff(a, b, "launch", diffs)
            # the normal path passes empty hook chains and their metadata; calling none
            # is what passing None does
            _metadata, enter, exit_ = hooks_n
            if enter.calls or exit_.calls:
                diffs.append("normal path had active hooks")
            if hooks_d != (None, None, None):
                diffs.append(f"direct hooks {hooks_d!r}")
            return diffs

        for name, make in (("attn_fwd", lo.forward_launch_args), ("toy", lo.toy_launch_args)):
            fn, grid, args, kwargs = make()
            r: dict = {"layout": layout}
            dk = DirectKernel.capture(fn, grid, args, kwargs)
            normal0 = last()
            r["mode"] = dk.mode
            rt_args = lo.runtime_args(fn, args, kwargs)
            dk(grid, *rt_args)
            direct0 = last()
            r["same_args"] = compare(normal0, direct0)
            r["launch_args_same"] = []
            _walk_diff(dk.launch_args(grid, *rt_args), direct0, "launch", r["launch_args_same"])
            # independent expectations on the recorded tuple
            params = direct0[n_params] if n_params else direct0[13:]
            bound = dict(zip(fn.arg_names, args), **kwargs)
            r["grid"] = list(direct0[:3])
            r["want_grid"] = list((*grid, 1, 1)[:3])
            r["stream_fn"] = [direct0[3] == lo.FAKE_STREAM, direct0[4] == lo.FAKE_FUNCTION]
            packed = direct0[7] if layout == "tuple" else direct0[9]
            r["packed"] = list(packed)
            r["num_warps"] = kwargs["num_warps"]
            r["params_ok"] = len(params) == len(fn.params) and all(
                (params[i] is bound[p.name]) if isinstance(params[i], torch.Tensor)
                else params[i] == bound[p.name]
                for i, p in enumerate(fn.params)
            )  # fmt: skip
            _, spec, _ = fn.device_caches[0][4](**bound)
            if layout == "tuple":  # constexpr slots (and ints == 1, None) are skipped
                ann = [a.type for a in direct0[13]]
                r["annotations_ok"] = ann == [
                    "constexpr" if s[0] == "constexpr" else "kernel" for s in spec
                ]
            # new tensors and values, same signature: no recompile, same tuple
            fn2, grid2, args2, kwargs2 = make(gen_seed=11) if name == "attn_fwd" else make(n=100)
            rt2 = lo.runtime_args(fn2, args2, kwargs2)
            n_compiled = len(fn.device_caches[0][0])
            fn[grid2](*args2, **kwargs2)
            normal1 = last()
            dk(grid2, *rt2)
            direct1 = last()
            r["same_args_new_tensors"] = compare(normal1, direct1)
            params1 = direct1[n_params] if n_params else direct1[13:]
            r["new_tensors_differ"] = params1[0] is not params[0]
            r["recompiled"] = len(fn.device_caches[0][0]) != n_compiled
            r["matches"] = _matches_vs_binder(fn, dk, rt2, kwargs2, name)
            # launcher mode: the CudaLauncher object gets the tuple, builds the C call
            with mock.patch.object(direct, "_detect", lambda: (True, "test", None)):
                dk_l = DirectKernel.capture(fn, grid2, args2, kwargs2)
            last()
            dk_l(grid2, *rt2)
            r["launcher_mode"] = [dk_l.mode, compare(normal1, last())]
            # a launch hook: the next direct call goes through JITFunction.run
            seen = []
            knobs.runtime.launch_enter_hook.add(seen.append)
            try:
                dk(grid2, *rt2)
                hooked = last()
                r["hooked_call_sees_hook"] = seen.append in hooked[min(hooks) + 1].calls
                r["capture_with_hook"] = DirectKernel.capture(fn, grid2, args2, kwargs2)
                last()
            finally:
                knobs.runtime.launch_enter_hook.remove(seen.append)
            # Python-level calls of one launch, counting the C launch as the one C call it
            # is: the recorder's events (its call and list.append) less one
            stub_extra = lo.count_calls(lambda: c_launch(1)) - 1
            r["calls_direct"] = lo.count_calls(lambda dk=dk, g=grid2, a=rt2: dk(g, *a)) - stub_extra
            r["calls_jit_run"] = (
                lo.count_calls(lambda f=fn, g=grid2, a=args2, k=kwargs2: f[g](*a, **k)) - stub_extra
            )
            rec.clear()
            if name == "attn_fwd":  # outputs the caller allocates: no data_ptr() check
                dk_a = DirectKernel.capture(
                    fn, grid2, args2, kwargs2, assume_aligned=("Out", "LSE")
                )
                last()
                i_out = dk._rt_names.index("Out")
                bad_out = (*rt2[:i_out], _misaligned(rt2[i_out]), *rt2[i_out + 1 :])
                r["assume_aligned"] = [
                    dk_a.matches(*rt2), dk_a.matches(*bad_out), dk.matches(*bad_out)
                ]  # fmt: skip
                r["calls_matches"] = [
                    lo.count_calls(lambda m=m, a=rt2: m(*a)) for m in (dk.matches, dk_a.matches)
                ]
                # only what changes between calls of one plan: the tensors and the seed
                varying = ("Q", "K", "V", "PK", "PV", "Out", "LSE", "seed")
                dk_c = DirectKernel.capture(fn, grid2, args2, kwargs2, check=varying)
                last()
                i_q, i_nq = dk._rt_names.index("Q"), dk._rt_names.index("N_Q")
                bad_q = (*rt2[:i_q], _misaligned(rt2[i_q]), *rt2[i_q + 1 :])
                nq32 = (*rt2[:i_nq], 32, *rt2[i_nq + 1 :])
                r["check_subset"] = [
                    dk_c.matches(*rt2), dk_c.matches(*bad_q), dk_c.matches(*nq32),
                    dk.matches(*nq32),
                ]  # fmt: skip
                r["calls_matches"].append(lo.count_calls(lambda m=dk_c.matches, a=rt2: m(*a)))
                try:
                    DirectKernel.capture(fn, grid2, args2, kwargs2, assume_aligned=("Outt",))
                    r["bad_name"] = None
                except ValueError as e:
                    r["bad_name"] = str(e)
            rec.clear()
            res[name] = r
    return res


def _matches_vs_binder(fn, dk: DirectKernel, rt: tuple, kwargs: dict, name: str) -> list:
    """[variant, dk.matches, Triton's binder gives the captured specialization] for
    argument changes that do and do not alter the specialization."""
    names = [p.name for p in fn.params if not p.is_constexpr]
    consts = {p.name: kwargs[p.name] for p in fn.params if p.is_constexpr}
    binder = fn.device_caches[0][4]
    _, want, _ = binder(**dict(zip(names, rt)), **consts)

    def variant(**changes):
        named = dict(zip(names, rt))
        named.update(changes)
        return tuple(named[n] for n in names)

    if name == "attn_fwd":
        q = rt[names.index("Q")]
        variants = {
            "same": variant(),
            "q misaligned": variant(Q=_misaligned(q)),
            "q fp32": variant(Q=q.float()),
            "prefix None": variant(PK=None),
            "N_Q 17->33": variant(N_Q=33),
            "N_Q 17->32": variant(N_Q=32),
            "N_Q 17->1": variant(N_Q=1),
            "N_K 2^31": variant(N_K=2**31),
            "stride_qd 1->2": variant(stride_qd=2),
            "sm_scale other float": variant(sm_scale=0.3),
            "seed 0->12345": variant(seed=12345),
        }
    else:
        x = rt[names.index("X")]
        variants = {
            "same": variant(),
            "x misaligned": variant(X=_misaligned(x)),
            "y tensor": variant(Y=x),
            "scale as int": variant(scale=2),
            "stride_x 1->2": variant(stride_x=2),
            "n 100->116": variant(n=116),
            "n 100->96": variant(n=96),
            "seed 7->16 (do_not_specialize)": variant(seed=16),
            "seed 7->1 (do_not_specialize)": variant(seed=1),
        }
    out = []
    for label, args in variants.items():
        _, spec, _ = binder(**dict(zip(names, args)), **consts)
        out.append([label, dk.matches(*args), spec == want])
    return out


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    import json

    try:
        from triton.backends.nvidia import driver  # noqa: F401
    except Exception as e:  # a Triton build without the NVIDIA backend
        pytest.skip(f"no NVIDIA backend in this Triton build: {e}")
    script = (
        "import json, sys\n"
        "sys.path[:0] = ['tests', 'scripts']\n"
        "import test_direct_launch as t\n"
        "print(json.dumps(t._compiled_checks(), default=repr))\n"
    )
    cache = tmp_path_factory.mktemp("triton_cache")
    res = run_compiled_triton_script(script, TRITON_CACHE_DIR=str(cache))
    json.dumps(res)
    return res


KERNELS = ["attn_fwd", "toy"]


@pytest.mark.parametrize("name", KERNELS)
def test_direct_tuple_equals_jit_run_tuple(compiled: dict, name: str) -> None:
    r = compiled[name]
    assert r["mode"] == "c"
    assert r["same_args"] == []
    assert r["launch_args_same"] == []
    assert r["same_args_new_tensors"] == []
    assert r["new_tensors_differ"]
    assert not r["recompiled"]
    assert r["grid"] == r["want_grid"]
    assert r["stream_fn"] == [True, True]
    assert r["packed"][0] == r["num_warps"] and r["packed"][1] == 1 and r["packed"][2] >= 0
    assert r["params_ok"]
    if r["layout"] == "tuple":
        assert r["annotations_ok"]


@pytest.mark.parametrize("name", KERNELS)
def test_launcher_mode_and_hooks(compiled: dict, name: str) -> None:
    r = compiled[name]
    assert r["launcher_mode"] == ["launcher", []]
    assert r["hooked_call_sees_hook"]
    assert r["capture_with_hook"] is None


@pytest.mark.parametrize("name", KERNELS)
def test_matches_agrees_with_tritons_binder(compiled: dict, name: str) -> None:
    rows = compiled[name]["matches"]
    for label, got, want in rows:
        assert got == want, f"{name} {label}: matches={got}, binder specialization same={want}"
    verdict = {label: got for label, got, _ in rows}
    assert verdict["same"]
    if name == "attn_fwd":
        assert verdict["N_Q 17->33"] and verdict["sm_scale other float"]
        for label in ("q misaligned", "q fp32", "prefix None", "N_Q 17->32", "N_Q 17->1"):
            assert not verdict[label], label
        assert not verdict["N_K 2^31"] and not verdict["stride_qd 1->2"]
        # _attn_fwd does not specialize its dropout seed (do_not_specialize): new seeds
        assert verdict["seed 0->12345"]  # keep the compiled kernel
    else:
        assert verdict["n 100->116"]
        assert verdict["seed 7->16 (do_not_specialize)"]
        assert verdict["seed 7->1 (do_not_specialize)"]
        for label in ("x misaligned", "y tensor", "scale as int", "stride_x 1->2", "n 100->96"):
            assert not verdict[label], label


def test_assume_aligned_skips_the_pointer_check(compiled: dict) -> None:
    """Out and LSE, allocated by the caller, trusted as aligned: a misaligned Out then
    passes ``matches`` (the caller's promise), which the full check refuses; each trusted
    pointer saves one data_ptr() call. A wrong name is a ValueError naming it."""
    r = compiled["attn_fwd"]
    assert r["assume_aligned"] == [True, True, False]
    full, trusted, subset = r["calls_matches"]
    assert full - trusted == 2, r["calls_matches"]
    assert subset == 1 + 7, r["calls_matches"]  # matches + data_ptr() of the 7 tensors
    assert r["bad_name"] and "assume_aligned" in r["bad_name"] and "Outt" in r["bad_name"]


def test_check_subset_leaves_the_rest_to_the_caller(compiled: dict) -> None:
    """``check=`` the tensors and the seed: a misaligned q is refused, a changed N_Q is
    not looked at (the caller's key holds it), while the full check refuses it."""
    assert compiled["attn_fwd"]["check_subset"] == [True, False, True, False]


def test_direct_launch_python_calls(compiled: dict) -> None:
    """One direct launch: DirectKernel.__call__, the stream query and the C launch (the
    toy kernel adds its generated constexpr merge); JITFunction.run makes ~100 for the
    forward kernel's 54 parameters."""
    calls = {n: (compiled[n]["calls_direct"], compiled[n]["calls_jit_run"]) for n in KERNELS}
    assert calls["attn_fwd"][0] <= 4, calls
    assert calls["toy"][0] <= 5, calls
    assert calls["attn_fwd"][1] >= 50, calls
    print(f"\nPython-level calls per launch (direct, JITFunction.run): {calls}", file=sys.stderr)
