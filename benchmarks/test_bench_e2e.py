"""End-to-end benchmark: one prefix-tuning train step of a GPT-2 small architecture.

A GPT-2 small config (12 layers, 12 heads, 768 wide, 50257 vocab: 124M parameters) with
random weights, **bf16 weights** for every implementation (no autocast), dropout off,
``model.train()``. One step = forward with ``labels`` + backward + ``AdamW.step`` on the
prefix only; reported as tokens/s (B * N / step time) and peak memory.

Implementations (``impl``):

``prefixattn``        ``prefixattn.PrefixTuning(model, num_virtual_tokens=P, backend="triton")``
``prefixattn_ckpt``   the same with ``model.gradient_checkpointing_enable(use_reentrant=False)``
                      on the base model before wrapping (PEFT prefix tuning cannot do this)
``peft_sdpa``         PEFT prefix tuning, ``attn_implementation="sdpa"``
``peft_eager``        PEFT prefix tuning, ``attn_implementation="eager"``
``prefixattn_chunked_loss`` ``prefixattn`` with ``chunked_loss=True``: the loss from the last
                      hidden states in chunks of tokens, without the [B, N, V] logits
``*_compiled``        ``prefixattn`` / ``peft_sdpa`` with the model's forward under
                      ``torch.compile`` (Inductor on CUDA; ``aot_eager`` in CPU smoke
                      runs, to keep them short): prefixattn traces without graph breaks
                      (its kernels are custom ops), so Inductor fuses the rest of the
                      layer around them
``prefixattn_compiled_cg`` the same with ``mode="reduce-overhead"`` (CUDA graphs): the step
                      without host launch overhead

``n_positions`` is 2048 rather than GPT-2's 1024: PEFT's prefix shifts the input
positions by P (its prefix sits in the KV cache), so 1024 tokens + P would index past
1024 learned positions. The extra rows of the position table cost nothing per step.
"""

from __future__ import annotations

import copy
import gc
import math
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import pytest
import torch

from benchmarks import benchlib as bl

# PEFT calls a transformers API that transformers 5.2x deprecates; not this suite's concern
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

ARCH = {
    "gpt2-124M": {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50257},
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 32, "vocab_size": 128},
}


@dataclass(frozen=True)
class E2ECase:
    """A train-step shape: ``arch`` from ARCH, batch B, sequence N, prefix P."""

    arch: str
    B: int
    N: int
    P: int
    dtype: str = "bf16"

    @property
    def id(self) -> str:
        return f"{self.arch}-B{self.B}-N{self.N}-P{self.P}-{self.dtype}"


GPU_CASES = {
    "core": [E2ECase("gpt2-124M", 8, 1024, 64)],
    "full": [E2ECase("gpt2-124M", 8, 1024, 16), E2ECase("gpt2-124M", 8, 1024, 64)],
}
SMOKE_CASES = [E2ECase("tiny", 2, 16, 4)]
CASES = {c.id: c for cs in (*GPU_CASES.values(), SMOKE_CASES) for c in cs}
SMOKE_IDS = {c.id for c in SMOKE_CASES}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.function.__name__ != "test_e2e_train_step":
        return
    grid = metafunc.config.stash[bl.SETTINGS_KEY].grid
    params = []
    for cases, smoke in ((GPU_CASES[grid], False), (SMOKE_CASES, True)):
        marks = [pytest.mark.bench_smoke] if smoke else [pytest.mark.bench_gpu]
        if not smoke:
            marks.append(pytest.mark.bench_priority(2))
        for case in cases:
            for impl in bl.E2E_IMPLS:
                params.append(pytest.param(case.id, impl, marks=marks, id=f"{impl}-{case.id}"))
    metafunc.parametrize("case,impl", params)


def load_prefix_tuning() -> Any:
    """``prefixattn.PrefixTuning``, or a skip that says why it is unavailable."""
    try:
        from prefixattn.hf.prefix_tuning import PrefixTuning
    except ImportError as err:
        pytest.skip(f"prefixattn.PrefixTuning unavailable (prefixattn/hf/prefix_tuning.py): {err}")
    return PrefixTuning


def build_base(case: E2ECase, attn_impl: str, device: torch.device) -> Any:
    """A randomly initialised GPT-2 causal LM (frozen, train mode, dropout off)."""
    transformers = pytest.importorskip("transformers")
    arch = ARCH[case.arch]
    n_pos = max(1024, 1024 * math.ceil((case.N + case.P) / 1024))
    cfg = transformers.GPT2Config(
        **arch,
        n_positions=n_pos,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(
            cfg, attn_implementation=attn_impl, dtype=bl.DTYPES[case.dtype]
        )
    model.requires_grad_(False)
    model.train()
    return model


def build(case: E2ECase, impl: str, device: torch.device, info: dict) -> tuple[Any, list]:
    """(wrapped model, trainable parameters) for ``impl``; for prefixattn also checks its
    loss against the same prefix on the reference backend (recorded in ``info``)."""
    if impl.endswith(("_compiled", "_compiled_cg")):
        base_impl, _, how = impl.partition("_compiled")
        wrapped, params = build(case, base_impl, device, info)
        if device.type != "cuda":
            info["compiled"] = "aot_eager"
            return torch.compile(wrapped, backend="aot_eager"), params
        # _cg: Inductor with CUDA graphs (mode="reduce-overhead"): no per-kernel launches
        mode = "reduce-overhead" if how == "_cg" else "default"
        info["compiled"] = f"inductor, mode={mode}"
        return torch.compile(wrapped, mode=mode), params
    if impl.startswith("prefixattn"):
        PrefixTuning = load_prefix_tuning()
        base = build_base(case, "sdpa", device)  # prefixattn patches the attention itself
        if impl == "prefixattn_ckpt":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # renamed in transformers 5.2x
                base.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
        ref_base = copy.deepcopy(base)
        backend = "triton" if device.type == "cuda" else "auto"
        torch.manual_seed(1)
        chunked = impl == "prefixattn_chunked_loss"
        wrapped = PrefixTuning(
            base, num_virtual_tokens=case.P, backend=backend, chunked_loss=chunked
        )
        info["backend"] = backend
        info["chunked_loss"] = chunked
        info["reference_check"] = _reference_loss_check(PrefixTuning, wrapped, ref_base, case)
        del ref_base
        gc.collect()  # the reference copy sits in a reference cycle: free it before measuring
    else:
        peft = pytest.importorskip("peft")
        base = build_base(case, impl.removeprefix("peft_"), device)
        torch.manual_seed(1)
        wrapped = peft.get_peft_model(
            base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=case.P)
        )
        info["attn_implementation"] = base.config._attn_implementation
    params = [p for p in wrapped.parameters() if p.requires_grad]
    assert params, f"{impl}: no trainable parameters"
    info["trainable_params"] = sum(p.numel() for p in params)
    return wrapped, params


def _reference_loss_check(PrefixTuning: Any, wrapped: Any, ref_base: Any, case: E2ECase) -> dict:
    """The benchmarked wrapper's loss on two rows vs the same prefix on backend="reference"."""
    ref = PrefixTuning(ref_base, num_virtual_tokens=case.P, backend="reference")
    ref.load_state_dict(wrapped.state_dict())
    ids = _batch(case, next(wrapped.parameters()).device)[: min(2, case.B)]
    with torch.no_grad():
        got = float(wrapped(input_ids=ids, labels=ids).loss)
        want = float(ref(input_ids=ids, labels=ids).loss)
    del ref, ref_base
    err = abs(got - want) / abs(want)
    assert err <= 1e-2, f"loss {got:.5f} != reference backend loss {want:.5f} (rel err {err:.2g})"
    return {"loss": got, "reference_loss": want, "rel_err": err}


def _batch(case: E2ECase, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(123)
    ids = torch.randint(0, ARCH[case.arch]["vocab_size"], (case.B, case.N), generator=gen)
    return ids.to(device)


def test_e2e_train_step(
    benchmark,
    request: pytest.FixtureRequest,
    bench_settings: bl.BenchSettings,
    case: str,
    impl: str,
) -> None:
    """Forward + backward + AdamW on the prefix: tokens/s and peak memory."""
    c = CASES[case]
    smoke = case in SMOKE_IDS
    device = torch.device("cpu" if smoke else "cuda")
    info = benchmark.extra_info
    info.update(
        suite="e2e",
        impl=impl,
        mode="train_step",
        case=c.id,
        shape=asdict(c),
        smoke=smoke,
        device=bl.device_info()["name"] if device.type == "cuda" else "cpu",
        weights="bf16",
        grad_ckpt=impl == "prefixattn_ckpt",
    )
    benchmark.group = f"{'SMOKE ' if smoke else ''}e2e {c.id} train_step"
    if not smoke:
        request.getfixturevalue("gemm_peak")  # recorded with the session, as for every row
    try:
        _run_train_step(benchmark, bench_settings, c, impl, device, info)
    finally:
        gc.collect()  # PrefixTuning / PEFT wrappers hold reference cycles to the model


def _run_train_step(
    benchmark: Any,
    bench_settings: bl.BenchSettings,
    c: E2ECase,
    impl: str,
    device: torch.device,
    info: dict,
) -> None:
    wrapped, params = build(c, impl, device, info)
    ids = _batch(c, device)
    opt = torch.optim.AdamW(params, lr=1e-3)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        return loss.detach()

    # first step (autotuning happens here), checked: loss near ln(vocab) for random
    # weights, finite non-zero prefix gradients
    bl.synchronize(device)
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = wrapped(input_ids=ids, labels=ids).loss
    loss.backward()
    bl.synchronize(device)
    info["first_call_s"] = round(time.perf_counter() - t0, 3)
    loss0 = float(loss.detach())
    ln_v = math.log(ARCH[c.arch]["vocab_size"])
    assert math.isfinite(loss0) and abs(loss0 - ln_v) < 2.0, f"loss {loss0} (ln V = {ln_v:.2f})"
    gnorm = float(torch.stack([p.grad.float().norm() for p in params if p.grad is not None]).norm())
    assert math.isfinite(gnorm) and gnorm > 0, f"prefix gradient norm {gnorm}"
    info["loss0"], info["prefix_grad_norm0"] = loss0, gnorm
    opt.step()
    for _ in range(2):
        step()
    info.update(bl.peak_memory(step, device))
    rounds = bench_settings.rounds_for("e2e")
    times = bl.run_pedantic(benchmark, step, device, rounds=rounds, warmup_rounds=1)
    info.update(bl.timing_summary(times))
    info["timer"] = "cuda_event" if device.type == "cuda" else "perf_counter"
    info["tokens"] = c.B * c.N
    if info.get("time_ms"):
        info["tokens_per_s"] = c.B * c.N / (info["time_ms"] * 1e-3)
