"""The host path of a call: cached call plans, deterministic host counts (Python-level
calls, launches, allocations) pinned with a small margin, and no host-device sync.

The counts run with every Triton launch replaced by a counting no-op
(``prefixattn.profiling.no_launches``), on the GPU path (``path="cuda"``: configs chosen,
plans built, as after a GPU's first calls) and on the interpreter path CI runs. They are
properties of the code, not timings: a change that adds host work fails here.
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import DEVICE
from helpers import Case, make_inputs

import prefixattn
from prefixattn.ops import args, plan
from prefixattn.ops.settings import use_settings
from prefixattn.profiling import count_calls, count_host_work, no_launches, syncing_ops

# Issue targets (CI machine): inference forward <= 40 calls, 1 launch, 2 allocations
# (out, lse); forward + backward incl. torch.autograd.grad <= 120 calls, <= 3 launches,
# outputs + gradients + one workspace. The pins leave a small margin under the targets.
FWD_CALLS, FWD_BWD_CALLS = 40, 120
LAUNCHES = {  # (fwd, fwd + bwd) launches by prefix layout (fused backward: small shapes)
    "shared": (1, 3),  # fwd, _attn_bwd, _prefix_grad_reduce
    "row": (1, 2),  # the prefix programs write a per-row gradient directly
    "bank": (1, 3),
}
ALLOCS = {"shared": (2, 8), "row": (2, 7), "bank": (2, 8)}  # row: no workspace


def _inputs(prefix: str) -> tuple[dict, torch.Tensor, list[torch.Tensor]]:
    c = Case(B=2, H=2, Hkv=2, Nq=16, Nk=16, P=4, D=64, prefix=prefix, T=3)
    kw = make_inputs(c, torch.float32, DEVICE)
    leaves = [kw[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    return kw, torch.ones(c.B, c.H, c.Nq, c.D, device=DEVICE), leaves


@pytest.mark.parametrize("path", ["cuda", "interpreter"])
@pytest.mark.parametrize("prefix", ["shared", "row", "bank"])
def test_host_counts(prefix: str, path: str) -> None:
    kw, gout, leaves = _inputs(prefix)

    def fwd() -> None:
        with torch.no_grad():
            prefixattn.prefix_attention(**kw, backend="triton")

    def fwd_bwd() -> None:
        out = prefixattn.prefix_attention(**kw, backend="triton")
        torch.autograd.grad(out, leaves, gout)

    with no_launches(path) as launches:
        f = count_host_work(fwd, launches)
        fb = count_host_work(fwd_bwd, launches)
    assert f.calls <= FWD_CALLS, f
    assert fb.calls <= FWD_BWD_CALLS, fb
    assert (f.launches, fb.launches) == LAUNCHES[prefix]
    assert (f.allocations, fb.allocations) == ALLOCS[prefix]


def test_counts_see_the_work() -> None:
    """The counters are live: the first call (validation, plan set-up) costs far more
    than a repeated one, and a split backward launches more kernels."""
    kw, gout, leaves = _inputs("shared")

    def fwd() -> None:
        with torch.no_grad():
            prefixattn.prefix_attention(**kw, backend="triton")

    with no_launches("cuda") as launches:
        first = count_calls(fwd)
        count_calls(fwd)  # launch 2 captures a direct launch where Triton allows
        again = count_calls(fwd)
        assert first > 2 * again, (first, again)
        with use_settings(backward="split"):
            out = prefixattn.prefix_attention(**kw, backend="triton")
            n0 = launches[0]
            torch.autograd.grad(out, leaves, gout)
            assert launches[0] - n0 == 5  # Delta, dQ, dK/dV, prefix partials, reduce


@pytest.mark.parametrize("prefix", ["shared", "row", "bank"])
def test_no_host_device_sync(prefix: str) -> None:
    """No op that makes the host wait for the device (a host read of a device value, a
    data-dependent output size) in forward or backward: the range check of prefix_index
    is ``torch._assert_async``. First call (validation, set-up) and repeated calls."""
    kw, gout, leaves = _inputs(prefix)

    def fwd_bwd() -> None:
        out = prefixattn.prefix_attention(**kw, backend="triton")
        torch.autograd.grad(out, leaves, gout)

    with no_launches("cuda"):
        for _ in range(3):
            assert syncing_ops(fwd_bwd) == []
        # a new index tensor with the same signature is checked again, still without sync
        if prefix == "bank":
            kw["prefix_index"] = kw["prefix_index"].flip(0)
            assert syncing_ops(fwd_bwd) == []


def test_dropout_seed_is_drawn_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropout's seed comes from torch's CPU generator (a host op, never a device read),
    even when the default device is another one."""
    seen = []
    real = torch.randint

    def spy(*args, **kwargs):
        seen.append(kwargs.get("device"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "randint", spy)
    args.new_seed()
    assert seen == ["cpu"]


# --------------------------------------------------------------------------------------
# the plan cache
# --------------------------------------------------------------------------------------


def test_plan_is_reused_and_keyed_by_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    c = Case(B=2, H=2, Hkv=1, Nq=7, Nk=9, P=3, D=16, prefix="bank", T=2, pad="left")
    kw = make_inputs(c, torch.float32, DEVICE)
    calls = []
    real = plan.validate
    monkeypatch.setattr(plan, "validate", lambda *a, **k: calls.append(1) or real(*a, **k))
    ref = prefixattn.prefix_attention(**kw, backend="triton")
    fresh = {n: (t.detach().clone() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    again = prefixattn.prefix_attention(**fresh, backend="triton")
    assert len(calls) == 1 and torch.equal(again, ref)  # new tensors, same signature: a hit
    prefixattn.prefix_attention(**{**kw, "causal": False}, backend="triton")
    prefixattn.prefix_attention(**{**kw, "q": kw["q"].transpose(0, 1).contiguous().transpose(0, 1)}, backend="triton")  # fmt: skip
    assert len(calls) == 3  # another flag, other strides: new plans
    with use_settings():
        prefixattn.prefix_attention(**kw, backend="triton")
    assert len(calls) == 4  # other settings: a plan of their own


def test_bad_values_fail_on_a_cached_plan() -> None:
    """A hit skips validation of what the key covers, never of values or types."""
    c = Case(B=2, H=2, Hkv=2, Nq=5, Nk=5, P=3, D=16, prefix="bank", T=2)
    kw = make_inputs(c, torch.float32, DEVICE)
    prefixattn.prefix_attention(**kw, backend="triton")
    with pytest.raises(ValueError, match="prefix_index"):
        prefixattn.prefix_attention(**{**kw, "prefix_index": torch.tensor([0, 2])}, backend="triton")  # fmt: skip
    idx = kw["prefix_index"].clone()
    prefixattn.prefix_attention(**{**kw, "prefix_index": idx}, backend="triton")
    idx[1] = 5  # an in-place change of a tensor already checked is checked again
    with pytest.raises(ValueError, match="prefix_index"):
        prefixattn.prefix_attention(**{**kw, "prefix_index": idx}, backend="triton")
    with pytest.raises(TypeError, match="causal"):
        prefixattn.prefix_attention(**{**kw, "causal": 1}, backend="triton")
    with pytest.raises(TypeError, match="q"):
        prefixattn.prefix_attention(**{**kw, "q": kw["q"].tolist()}, backend="triton")
    with pytest.raises(TypeError, match="sm_scale"):
        prefixattn.prefix_attention(**kw, backend="triton", sm_scale=[0.5])


def test_plan_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan, "MAX_PLANS", 3)
    x = torch.randn(1, 1, 4, 16, device=DEVICE)
    for n in range(1, 8):
        prefixattn.prefix_attention(x[..., :n, :], x[..., :n, :], x[..., :n, :], backend="reference")  # fmt: skip
        assert len(plan.PLANS) <= 3


def test_plans_across_threads() -> None:
    """Threads sharing plans (and building them concurrently) each get their launches.
    Triton's CPU interpreter is not thread-safe, so the launches are counting stubs here
    (the GPU path); the values of concurrent calls are checked on the reference path."""
    kw, gout, leaves = _inputs("bank")
    errors: list[BaseException] = []
    n_threads, n_calls = 4, 10

    def work() -> None:
        try:
            for _ in range(n_calls):
                out = prefixattn.prefix_attention(**kw, backend="triton")
                torch.autograd.grad(out, leaves, gout)
        except BaseException as e:  # reported below
            errors.append(e)

    with no_launches("cuda") as launches:
        threads = [threading.Thread(target=work) for _ in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not errors, errors
    assert launches[0] == n_threads * n_calls * LAUNCHES["bank"][1]

    ref = prefixattn.prefix_attention(**kw, backend="reference").detach()
    plan.clear_plans()
    outs: list[torch.Tensor] = []

    def ref_work() -> None:
        with torch.no_grad():
            outs.append(prefixattn.prefix_attention(**kw, backend="reference"))

    threads = [threading.Thread(target=ref_work) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(outs) == n_threads and all(torch.equal(o, ref) for o in outs)
