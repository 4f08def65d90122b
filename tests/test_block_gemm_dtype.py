"""The dtype of the CPU chunked soft-capping path's block GEMMs for bf16 / fp16 inputs
(``Settings.cpu_block_gemm``, ops/sdpa_features.py): with the input dtype forced (slow on
an AVX2-only host, so the shapes are small) values and every gradient against the float64
reference; which GEMMs take half-precision operands (recorded at the dispatcher); the
float32 choice computes in float32; what "auto" picks on this host (against the CPU's
flags as /proc/cpuinfo lists them); the path's name; deterministic gradients."""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import pytest
import torch
from helpers import TOL, Case, make_inputs
from reference64 import attention64, rel_err
from torch.utils._python_dispatch import TorchDispatchMode

import prefixattn
from prefixattn.ops import sdpa_features
from prefixattn.ops.settings import Settings, use_settings

NAMES = ("q", "k", "v", "prefix_k", "prefix_v", "sinks")
HALF = (torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 16 query rows: the small shapes run several blocks (and a partial one)."""
    monkeypatch.setattr(sdpa_features, "BLOCK_ELEMS", 1)


# (case, softcap, sinks, window): soft-capping alone and with sinks, GQA, causal + window,
# a P > 0 prefix (shared, per row, a bank), key padding (a fully padded row: with P = 0
# it sees nothing), Nq != Nk, non-causal; N <= 64, D in {40, 80}
GRID = [
    (Case(B=2, H=4, Hkv=2, Nq=40, Nk=48, P=7, D=80, prefix="row", pad="random"), 5.0, True, 20),
    (Case(B=2, H=4, Hkv=1, Nq=33, Nk=33, P=0, D=40, prefix="none", pad="left"), 2.0, False, None),
    (Case(B=2, H=2, Hkv=2, Nq=17, Nk=29, P=13, D=40, prefix="bank", pad="right", T=3),
     30.0, True, 9),
    (Case(B=1, H=4, Hkv=2, Nq=64, Nk=64, P=5, D=80, prefix="shared"), 50.0, False, None),
    (Case(B=2, H=2, Hkv=1, Nq=20, Nk=13, P=7, D=40, prefix="shared", causal=False),
     3.0, True, None),
]  # fmt: skip
IDS = [f"{c.id()}-c{cap}-s{int(s)}-w{w}" for c, cap, s, w in GRID]


def _inputs(case: Case, softcap: float, sinks: bool, window: int | None, dtype) -> dict:
    kw = make_inputs(case, dtype, "cpu")
    kw["softcap"] = softcap
    if window is not None:
        kw["window"] = window
    if sinks:
        g = torch.Generator().manual_seed(7)
        kw["sinks"] = (torch.randn(case.H, generator=g) * 2).requires_grad_(True)
    return kw


def _run(kw: dict, mode: str) -> tuple[torch.Tensor, dict]:
    """prefix_attention (sdpa backend) under ``cpu_block_gemm=mode``: out and grads."""
    with use_settings(cpu_block_gemm=mode):
        out = prefixattn.prefix_attention(**kw, backend="sdpa")
        do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
        names = [n for n in NAMES if n in kw]
        gs = torch.autograd.grad(out, [kw[n] for n in names], do, allow_unused=True)
    return out, {n: torch.zeros_like(kw[n]) if g is None else g for n, g in zip(names, gs)}


class _GemmDtypes(TorchDispatchMode):
    """Records the operand dtypes of every matrix product the dispatcher sees."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.dtype, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if func.overloadpacket.__name__ in (
            "mm",
            "bmm",
            "addmm",
            "addmm_",
            "baddbmm",
            "baddbmm_",
            "addbmm",
        ):
            self.seen.append(tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize(("case", "softcap", "sinks", "window"), GRID, ids=IDS)
def test_half_gemms_match_float64(case, softcap, sinks, window, dtype) -> None:
    """``cpu_block_gemm="input"``: P V, P^T dO, dS K, dS^T Q on bf16 / fp16 operands;
    output and every gradient (the sinks' too) within the dtype's tolerance of float64."""
    kw = _inputs(case, softcap, sinks, window, dtype)
    out, grads = _run(kw, "input")
    ref_kw = {n: (t.detach().double().requires_grad_(True) if n in NAMES else t)
              for n, t in kw.items()}  # fmt: skip
    ref = attention64(**ref_kw)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    names = list(grads)
    ref_gs = torch.autograd.grad(ref, [ref_kw[n] for n in names], do.double(), allow_unused=True)
    tol_o, tol_g = TOL[dtype]
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, ref) < tol_o, f"out: {rel_err(out, ref):.2e}"
    for n, rg in zip(names, ref_gs):
        g = grads[n]
        assert g.dtype == kw[n].dtype and torch.isfinite(g).all(), n
        if rg is None or rg.abs().max() == 0:
            assert g.abs().max() <= tol_g, f"d{n} should be 0"
            continue
        assert rel_err(g, rg) < tol_g, f"d{n}: {rel_err(g, rg):.2e}"


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_which_gemms_are_half(dtype: torch.dtype) -> None:
    """Per block: the forward runs q k^T on float32 and P V on ``dtype`` operands, the
    backward q k^T and dO V^T on float32 and P^T dO, dS K, dS^T Q on ``dtype``;
    ``"float32"`` runs every GEMM on float32 operands."""
    B, H, Hkv, Nq, Nk, D = 2, 4, 2, 40, 40, 40  # 3 blocks of 16 rows
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, n, D, generator=g).to(dtype).requires_grad_(True)
               for h, n in ((H, Nq), (Hkv, Nk), (Hkv, Nk)))  # fmt: skip
    f32 = (torch.float32, torch.float32)
    half = (dtype, dtype)
    for mode, fwd, bwd in (
        ("input", [f32, half], [f32, half, f32, half, half]),
        ("float32", [f32, f32], [f32, f32, f32, f32, f32]),
    ):
        path = sdpa_features.feature_path(True, False, False, "cpu", dtype, mode)
        with _GemmDtypes() as rec:
            out = sdpa_features.feature_attention(path, q, k, v, None, 5.0, is_causal=True)
            n_fwd = len(rec.seen)
            torch.autograd.grad(out, [q, k, v], torch.ones_like(out))
        # a GEMM with a tensor to add to has it first (baddbmm_: float32 dk, dv)
        seen = [s[-2:] for s in rec.seen]
        assert seen[:n_fwd] == fwd * 3, (mode, seen[:n_fwd])
        assert seen[n_fwd:] == bwd * 3, (mode, seen[n_fwd:])


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_float32_choice_computes_in_float32(dtype: torch.dtype) -> None:
    """``"float32"``: the bf16 / fp16 forward is the float32 inputs' forward rounded
    once (bitwise), so nothing of it ran in half precision; "input" is not."""
    case, softcap, sinks, window = GRID[0]
    kw = _inputs(case, softcap, sinks, window, dtype)
    kw32 = {n: (t.detach().float() if n in NAMES else t) for n, t in kw.items()}
    with torch.no_grad():
        with use_settings(cpu_block_gemm="float32"):
            got = prefixattn.prefix_attention(**kw, backend="sdpa")
            want = prefixattn.prefix_attention(**kw32, backend="sdpa").to(dtype)
        with use_settings(cpu_block_gemm="input"):
            half = prefixattn.prefix_attention(**kw, backend="sdpa")
    assert torch.equal(got, want)
    assert not torch.equal(half, want)


def _cpu_flags() -> set[str] | None:
    """The CPU's flags as Linux lists them (/proc/cpuinfo), or None off Linux."""
    info = Path("/proc/cpuinfo")
    if not info.exists():
        return None
    for line in info.read_text().splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return None


def test_auto_choice_on_this_host() -> None:
    """ "auto" takes bf16 GEMMs only where the CPU has bf16 matrix / dot instructions
    (AVX512-BF16 or AMX-BF16 in /proc/cpuinfo on x86) and oneDNN supports bf16 (its check
    alone also passes on AVX512 CPUs that only emulate bf16). On an AVX2-only host
    (this project's CI) neither bf16 nor fp16, and oneDNN agrees."""
    flags = _cpu_flags()
    if flags is None or platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the flags oracle is /proc/cpuinfo on x86")
    onednn = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    want = onednn and bool(flags & {"avx512_bf16", "amx_bf16"})
    assert (torch.bfloat16 in sdpa_features.CPU_FAST_GEMM_DTYPES) == want
    path = sdpa_features.feature_path(True, False, False, "cpu", torch.bfloat16, "auto")
    assert path == (sdpa_features.PATH_CHUNKED_BF16 if want else sdpa_features.PATH_CHUNKED)
    if "avx512f" not in flags:  # AVX2 only (this project's CI host): never bf16 GEMMs
        assert torch.bfloat16 not in sdpa_features.CPU_FAST_GEMM_DTYPES
        assert torch.float16 not in sdpa_features.CPU_FAST_GEMM_DTYPES
        assert not onednn


def test_choice_by_mode_dtype_and_device() -> None:
    f = sdpa_features.block_gemm_dtype
    for dtype in HALF:
        assert f(dtype, "cpu", "input") == dtype
        assert f(dtype, "cpu", "float32") is None
        assert f(dtype, "cpu", "auto") == (
            dtype if dtype in sdpa_features.CPU_FAST_GEMM_DTYPES else None
        )
        assert f(dtype, "cuda", "input") is None  # a CPU setting
    for dtype in (torch.float32, torch.float64, None):
        assert f(dtype, "cpu", "input") is None
    with pytest.raises(ValueError, match="cpu_block_gemm"):
        f(torch.bfloat16, "cpu", "bf16")
    # the path names; sinks alone on the CPU stay on the flash kernel
    fp = sdpa_features.feature_path
    assert fp(True, True, False, "cpu", torch.float16, "input") == sdpa_features.PATH_CHUNKED_FP16
    assert fp(False, True, False, "cpu", torch.bfloat16, "input") == sdpa_features.PATH_SINK
    assert fp(True, False, False, "cpu", torch.float32, "input") == sdpa_features.PATH_CHUNKED
    with use_settings(cpu_block_gemm="input"):  # block_gemm None: the current settings
        assert fp(True, False, False, "cpu", torch.bfloat16) == sdpa_features.PATH_CHUNKED_BF16
        rows = dict(sdpa_features.describe_paths("cpu", torch.bfloat16))
        assert rows["softcap"] == rows["softcap+sinks"] == sdpa_features.PATH_CHUNKED_BF16
    q = torch.zeros(1, 1, 4, 8)
    with pytest.raises(ValueError, match=r"needs q, k, v in torch\.bfloat16"):
        sdpa_features.feature_attention(sdpa_features.PATH_CHUNKED_BF16, q, q, q, None, 5.0)


def test_setting_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for value in ("float32", " Input ", "auto"):
        monkeypatch.setenv("PREFIXATTN_CPU_BLOCK_GEMM", value)
        assert Settings.from_env().cpu_block_gemm == value.strip().lower()
    monkeypatch.setenv("PREFIXATTN_CPU_BLOCK_GEMM", "bf16")
    with pytest.raises(ValueError, match="PREFIXATTN_CPU_BLOCK_GEMM"):
        Settings.from_env()


def test_path_logged_with_gemm_dtype(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sdpa_features, "_seen", set())
    caplog.set_level(logging.DEBUG, logger="prefixattn")
    c = Case(B=1, H=2, Hkv=2, Nq=8, Nk=8, P=3, D=40, prefix="shared")
    for mode in ("input", "float32"):
        with use_settings(cpu_block_gemm=mode), torch.no_grad():
            prefixattn.prefix_attention(**_inputs(c, 5.0, False, None, torch.bfloat16),
                                        backend="sdpa")  # fmt: skip
    msgs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sdpa path:")]
    assert msgs == [
        "sdpa path: chunked exact (query blocks, bf16 GEMMs)",
        "sdpa path: chunked exact (query blocks)",
    ]


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_gemm_grads_deterministic(dtype: torch.dtype) -> None:
    """The same call twice: bitwise the same output and gradients."""
    case, softcap, sinks, window = GRID[2]
    runs = []
    for _ in range(2):
        out, grads = _run(_inputs(case, softcap, sinks, window, dtype), "input")
        runs.append([out, *grads.values()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_fullgraph_compile_with_half_gemms() -> None:
    """Under torch.compile (no graph break) the bf16-GEMM path gives the eager values."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 24, 40, generator=g).bfloat16() for h in (4, 2, 2))

    def f(q, k, v):
        return prefixattn.prefix_attention(q, k, v, softcap=5.0, window=8, backend="sdpa")

    with use_settings(cpu_block_gemm="input"):
        eager = f(q, k, v)
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    assert torch.equal(compiled, eager)
