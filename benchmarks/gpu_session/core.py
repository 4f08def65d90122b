"""Stage 1, the CUDA correctness core: direct launches on a real driver, the CUDA-graph
capture tests, and the value of every backend feature in bf16 with the fused and the
split backward, each against the independent float64 reference of the tests.

Only the public ``prefix_attention`` API is called; the backward layout is chosen with
``PREFIXATTN_BWD`` (read when a call plan's backward is set up, so the plans are
cleared between layouts: :func:`backward_layout`).
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from .common import Skip, StepContext

ROOT = Path(__file__).resolve().parents[2]


def _tests_on_path() -> None:
    """tests/helpers.py and tests/reference64.py (the float64 reference) importable."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)


def device_dtype(ctx: StepContext) -> tuple[str, Any]:
    """(device, dtype) of the checks. On the GPU the kernels run with the first config of
    each list (``PREFIXATTN_AUTOTUNE=0``): autotuning every feature's specialization would
    compile every candidate on a fresh machine (minutes); each candidate's values are
    tests/test_gpu.py's business, the tuned configs pass the headline rows' gate."""
    import torch

    from prefixattn.ops.settings import ACTIVE

    os.environ["PREFIXATTN_AUTOTUNE"] = "0"  # for child processes (pytest_graphs)
    ACTIVE.settings = ACTIVE.settings.replace(autotune=False)  # for this process
    if ctx.dry:
        return "cpu", torch.float32
    if not torch.cuda.is_available():
        raise Skip("no CUDA device (run with --dry-run on a CPU machine)")
    return "cuda", torch.bfloat16


@contextmanager
def backward_layout(mode: str) -> Iterator[None]:
    """The backward layout ``mode`` (``Settings.backward``) for the calls inside: a new
    Settings object, so no plan made under another layout is reused."""
    from prefixattn.ops.settings import use_settings

    with use_settings(backward=mode):
        yield


def compare64(
    kw: dict, dtype: Any, grads: bool = True, ref_extra: dict | None = None
) -> dict[str, Any]:
    """``backend="triton"`` on ``kw`` vs the float64 reference (``ref_extra``: keywords
    for the reference only): relative-norm errors of the output and each gradient, the
    tolerances, and whether all are inside them. A KV-cache pool call (``cache_seqlens`` /
    ``cache_batch_idx`` / ``block_table``: inference only, ``grads`` False) is compared
    with the reference row by row on each row's own keys (``helpers.pool_attention64``)."""
    import torch

    _tests_on_path()
    from helpers import DIFF_NAMES, TOL, pool_attention64, run_with_grads
    from reference64 import attention64, rel_err

    pool = any(kw.get(n) is not None for n in ("cache_seqlens", "cache_batch_idx", "block_table"))
    if pool and grads:
        raise ValueError("a KV-cache pool call (cache_seqlens / block_table) has no backward")
    reference = pool_attention64 if pool else attention64

    import prefixattn

    def triton(**k: Any) -> torch.Tensor:
        return prefixattn.prefix_attention(**k, backend="triton")

    ref_kw = {
        n: (t.detach().double().requires_grad_(grads) if n in DIFF_NAMES else t)
        for n, t in kw.items()
    }
    ref_kw.update(ref_extra or {})
    tol_o, tol_g = TOL[dtype]
    errors: dict[str, float | None] = {}
    if grads:
        out, g, got = run_with_grads(triton, kw)
        ref, _, want = run_with_grads(reference, ref_kw, grad_out=g.double())
    else:
        with torch.no_grad():
            out = triton(**{n: (t.detach() if torch.is_tensor(t) else t) for n, t in kw.items()})
        ref, got, want = reference(**ref_kw), {}, {}
    errors["out"] = rel_err(out, ref) if torch.isfinite(out).all() else float("inf")
    ok = errors["out"] < tol_o
    for n, gr in got.items():
        r = want[n]
        if not torch.isfinite(gr).all():
            errors["d" + n] = float("inf")
            ok = False
        elif r.numel() == 0 or r.abs().max() == 0:  # exact gradient 0: rounding residue only
            errors["d" + n] = float(gr.abs().max()) if gr.numel() else 0.0
            ok = ok and errors["d" + n] <= tol_g
        else:
            errors["d" + n] = rel_err(gr, r)
            ok = ok and errors["d" + n] < tol_g
    return {"ok": bool(ok), "errors": errors, "tol_out": tol_o, "tol_grad": tol_g}


# --------------------------------------------------------------------------------------
# direct launches
# --------------------------------------------------------------------------------------


def direct_launches(ctx: StepContext) -> None:
    """The same call signature launched again and again with new tensors (the direct
    launch path reuses the captured launcher with new pointers), then with tensors whose
    data pointers are not 16-byte aligned (another specialization: must not reuse it);
    every call's values against float64."""
    import torch

    _tests_on_path()
    from helpers import Case, make_inputs

    device, dtype = device_dtype(ctx)
    try:
        from prefixattn.ops.direct import direct_launch_supported

        supported, reason = direct_launch_supported()
    except ImportError as e:  # moved by a refactor: recorded, the checks still run
        supported, reason = None, f"prefixattn.ops.direct not importable: {e}"
    ctx.write("check", name="direct launch supported", ok=supported is not False,
              errors={}, detail=reason, supported=supported)  # fmt: skip
    if ctx.dry:
        c = Case(B=2, H=2, Hkv=1, Nq=7, Nk=9, P=3, D=16, prefix="bank", T=2, pad="left")
    else:
        c = Case(B=3, H=4, Hkv=2, Nq=70, Nk=90, P=17, D=64, prefix="bank", T=3, pad="left")
    for grads in (True,) if ctx.dry else (False, True):
        label = "fwd+bwd" if grads else "fwd"
        with ctx.part(f"direct {label}"):
            worst: dict[str, float] = {}
            oks = []
            # call 1 tunes, 2 captures, 3+ launch directly (the interpreter never does)
            for seed in range(2 if ctx.dry else 4):
                r = compare64(make_inputs(c, dtype, device, seed=seed), dtype, grads)
                oks.append(r["ok"])
                for k, v in r["errors"].items():
                    worst[k] = max(worst.get(k, 0.0), v)
            ctx.write("check", name=f"direct launch, new tensors, {label}", ok=all(oks),
                      errors=worst, calls=len(oks), tol_out=r["tol_out"],
                      tol_grad=r["tol_grad"])  # fmt: skip
        with ctx.part(f"direct misaligned {label}"):
            kw = make_inputs(c, dtype, device, seed=9)
            for n in ("q", "k", "v"):  # one element in: data_ptr % 16 != 0
                t = kw[n].detach()
                buf = torch.empty(t.numel() + 1, device=device, dtype=dtype)
                buf[1:].copy_(t.reshape(-1))
                kw[n] = buf[1:].view(t.shape).requires_grad_(grads)
            r = compare64(kw, dtype, grads)
            ctx.write("check", name=f"direct launch, misaligned pointers, {label}", **r)


# --------------------------------------------------------------------------------------
# CUDA-graph capture tests (pytest, recorded test by test)
# --------------------------------------------------------------------------------------

# the CUDA-graph capture tests, the autotuned path, the memory test; and (issue 29) the
# family features over many key blocks (window + softcap + sinks, ragged bank, NaN-poisoned
# blocks left of the window, dsinks; bf16, fused and split backward), the KV-cache pool
# with every feature (bf16 and fp16, Nq 1 and 4) and the same paged (bf16, blocks of 16
# and 64 keys). The rest (each feature alone, paged fp16, every forward config on the
# pool) runs with the whole file.
GRAPH_TESTS = (
    "cuda_graph or autotuned_path or never_expanded or (family_long_sequence and all and "
    "bfloat16) or (kv_pool_matches and all) or (paged_kv_matches and all and bfloat16)"
)


class _Recorder:
    """pytest plugin: one ``test`` record per test as it finishes."""

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when != "call" and report.passed:
            return  # set-up / tear-down that passed: the call's record says it
        reason = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            reason = report.longrepr[2]
        elif report.failed:
            reason = report.longreprtext[-1500:]
            self.ctx.problems += 1
        self.ctx.write("test", nodeid=report.nodeid, outcome=report.outcome,
                       duration_s=round(report.duration, 3), when=report.when,
                       reason=reason)  # fmt: skip


def pytest_graphs(ctx: StepContext) -> None:
    """tests/test_gpu.py's CUDA-graph tests (forward + backward with both backward layouts
    and both prefix kinds; a mixed-task decode step), the autotuned path in both layouts,
    the no-expanded-prefix memory test, and the family / KV-pool tests of
    :data:`GRAPH_TESTS`. In the dry run they skip (they need CUDA) and their skip reasons
    are recorded."""
    import pytest

    os.environ["PREFIXATTN_AUTOTUNE"] = "0"  # test_autotuned_path_is_correct turns it on
    args = ["tests/test_gpu.py", "-k", GRAPH_TESTS, "-q", "-p", "no:cacheprovider",
            "-o", "addopts=", "--rootdir", str(ROOT)]  # fmt: skip
    os.chdir(ROOT)
    rc = pytest.main(args, plugins=[_Recorder(ctx)])
    ctx.write("check", name="pytest " + " ".join(args[:3]), ok=int(rc) in (0, 5), errors={},
              exit_code=int(rc))  # fmt: skip


# --------------------------------------------------------------------------------------
# the feature table
# --------------------------------------------------------------------------------------


def features(ctx: StepContext) -> None:
    """Every line of :data:`features.FEATURES`, with the fused and the split backward."""
    import torch

    _tests_on_path()
    from helpers import Case, make_inputs

    import prefixattn

    from .features import BASE, DRY_BASE, FEATURES

    device, dtype = device_dtype(ctx)
    accepted = set(inspect.signature(prefixattn.prefix_attention).parameters)
    for i, feat in enumerate(FEATURES):
        # both backward layouts where the line says so (each compiles its own kernels); the
        # dry run: both for the first line, "auto" after (plumbing)
        both = feat.both_layouts if not ctx.dry else i == 0
        layouts = ("fused", "split") if both else ("auto",)
        unknown = sorted((set(feat.call) | ({"block_table"} if feat.paged else set())) - accepted)
        if unknown:
            ctx.write("skip", name=f"feature {feat.name}",
                      reason=f"prefix_attention takes no {unknown} here")  # fmt: skip
            continue
        over = feat.dry_case if (ctx.dry and feat.dry_case is not None) else feat.case
        case = replace(Case(**(DRY_BASE if ctx.dry else BASE)), **over)
        for layout in layouts if feat.grads else ("fwd",):
            with (
                ctx.part(f"feature {feat.name} {layout}"),
                backward_layout(layout if layout != "fwd" else "auto"),
            ):
                kw = make_inputs(case, dtype, device, seed=3, noncontiguous=feat.noncontiguous)
                for k, v in feat.call.items():
                    kw[k] = v(case, device) if callable(v) else v
                if feat.paged:
                    from helpers import page_pool

                    kw = page_pool(kw, feat.paged, seed=3)
                r = compare64(kw, dtype, feat.grads)
                ctx.write("check", name=f"feature: {feat.name}", layout=layout,
                          dtype=str(dtype).replace("torch.", ""), case=case.id(), **r)  # fmt: skip
        if device == "cuda":
            torch.cuda.empty_cache()
    dropout(ctx, device, dtype)


def dropout(ctx: StepContext, device: str, dtype: Any) -> None:
    """Attention dropout, forward and all gradients, against the float64 reference run
    with the kernel's own keep mask: read back under the same seed with one-hot values
    (then output column c is P[c] / (1 - p) where kept, 0 where dropped), as
    tests/test_dropout.py does; with the fused and the split backward."""
    import torch

    _tests_on_path()
    from helpers import Case, make_inputs

    import prefixattn

    p, seed = 0.2, 123
    if ctx.dry:
        c = Case(B=2, H=2, Hkv=1, Nq=4, Nk=6, P=2, D=16, prefix="shared")
    else:
        c = Case(B=2, H=4, Hkv=2, Nq=12, Nk=20, P=8, D=64, prefix="bank", T=2, pad="left")
    n = c.P + c.Nk  # one-hot values need P + Nk <= D
    for layout in ("auto",) if ctx.dry else ("fused", "split"):
        with ctx.part(f"dropout {layout}"), backward_layout(layout):
            kw = {k: (t.detach() if torch.is_tensor(t) else t)
                  for k, t in make_inputs(c, dtype, device, seed=5).items()}  # fmt: skip
            eye = torch.eye(c.D, device=device, dtype=dtype)
            kw["prefix_v"] = eye[: c.P].expand(kw["prefix_v"].shape).contiguous()
            kw["v"] = eye[c.P : n].expand(c.B, c.Hkv, c.Nk, c.D).contiguous()
            torch.manual_seed(seed)
            keep = prefixattn.prefix_attention(**kw, dropout_p=p, backend="triton")[..., :n] != 0
            kw = make_inputs(c, dtype, device, seed=5)
            kw["dropout_p"] = p
            torch.manual_seed(seed)  # the same Philox seed: the same mask
            r = compare64(kw, dtype, True, ref_extra={"keep": keep})
            ctx.write("check", name="feature: dropout 0.2", layout=layout,
                      dtype=str(dtype).replace("torch.", ""), case=c.id(),
                      keep_rate=float(keep.float().mean()), **r)  # fmt: skip
