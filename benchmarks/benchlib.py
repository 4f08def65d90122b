"""Shared machinery of the benchmark suite: shapes, FLOP counts, the implementations that
are compared, the correctness gate and the timing / memory helpers.

Every benchmarked implementation computes the same thing, prefix attention as defined by
:func:`prefixattn.prefix_attention`: every query sees all P prefix keys, and query i sees
sequence key j iff ``j <= i + Nk - Nq`` (causal, aligned bottom-right).

Implementations (the ``impl`` parameter; the names are stable across runs and machines):

``prefixattn``
    this library's Triton kernel (``backend="triton"``); the prefix stays in its own
    buffer.
``concat_eager``
    ``torch.cat`` of the prefix (expanded to the batch) with K/V, GQA heads repeated, then
    matmul, masked softmax (fp32, as Hugging Face's eager attention does), matmul.
``concat_sdpa``
    ``torch.cat`` + ``F.scaled_dot_product_attention`` with
    ``torch.nn.attention.bias.causal_lower_right(Nq, P + Nk)``. Over the concatenated keys
    that bias is exactly the prefix-aware mask (query i sees concatenated key c iff
    ``c <= i + (P + Nk) - Nq``: all P prefix keys and sequence keys ``j <= i + Nk - Nq``)
    and PyTorch dispatches it to its flash / memory-efficient kernels.
``flex``
    FlexAttention over the concatenated K/V with a prefix-aware ``mask_mod``; on CUDA
    ``torch.compile(flex_attention)``, with the block mask built once per shape outside
    the timed region.
``gather_concat_sdpa`` / ``gather_concat_eager`` (serving)
    the concat paths above for a bank of prefixes: each row's prefix is gathered with
    ``bank[prefix_index]`` and concatenated with its K/V.
"""

from __future__ import annotations

import functools
import gc
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from prefixattn import prefix_attention

# prefixattn runs PREFIXATTN_BWD=auto (the default: fused backward for small problems,
# split above launch.FUSED_BWD_MAX_WORK); prefixattn_fused / prefixattn_split force one
# layout (backward modes only: their forward is prefixattn's)
KERNEL_IMPLS = (
    "prefixattn", "prefixattn_fused", "prefixattn_split", "concat_eager", "concat_sdpa", "flex",
)  # fmt: skip
SERVING_IMPLS = ("prefixattn", "gather_concat_sdpa", "gather_concat_eager")
E2E_IMPLS = (
    "prefixattn",
    "peft_sdpa",
    "peft_eager",
    "prefixattn_ckpt",
    "prefixattn_compiled",
    "prefixattn_compiled_cg",
    "peft_sdpa_compiled",
    "prefixattn_chunked_loss",
)
MODES = ("fwd", "bwd", "fwd_bwd")
# backward is counted as 2.5x the forward FLOPs (the FlashAttention convention)
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --------------------------------------------------------------------------------------
# session settings (filled by conftest.py)
# --------------------------------------------------------------------------------------


@dataclass
class BenchSettings:
    """What conftest.py decided for this session."""

    grid: str  # "core" | "full": the GPU grid
    smoke: bool  # smoke mode: CPU smoke rows run, GPU rows skip
    smoke_reason: str
    cuda: bool
    rounds: int | None  # --bench-rounds
    budget_s: float  # --bench-budget-s (0 = none)
    start: float  # time.monotonic() at configure
    command: str
    gemm: dict[str, Any] | None = None  # filled by the gemm_peak fixture
    outcomes: list[dict[str, str]] = field(default_factory=list)  # skipped / failed rows

    def rounds_for(self, suite: str) -> int:
        """Timed rounds per row: kernel 10, serving 20, e2e 5 (``--bench-rounds`` overrides
        kernel and serving, e2e gets half of it); 2 in smoke mode."""
        if self.smoke:
            return 2
        base = {"kernel": 10, "serving": 20, "e2e": 10}[suite]
        if self.rounds:
            base = self.rounds
        return max(1, base // 2) if suite == "e2e" else base


SETTINGS_KEY = pytest.StashKey[BenchSettings]()


def device_info() -> dict[str, Any]:
    """Name, compute capability, SM count and memory of the CUDA device (or the CPU)."""
    if not torch.cuda.is_available():
        return {"type": "cpu", "name": "cpu", "torch_threads": torch.get_num_threads()}
    p = torch.cuda.get_device_properties(0)
    return {
        "type": "cuda",
        "name": p.name,
        "capability": f"{p.major}.{p.minor}",
        "sm_count": p.multi_processor_count,
        "memory_gib": round(p.total_memory / 2**30, 1),
        "count": torch.cuda.device_count(),
    }


# --------------------------------------------------------------------------------------
# shapes and FLOPs
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttnShape:
    """One attention problem: q [B, H, Nq, D], k/v [B, Hkv, Nk, D], a prefix of P keys.

    ``bank`` > 0 means a bank of that many prefixes [T, Hkv, P, D] indexed per row
    (serving); otherwise one shared prefix [Hkv, P, D] (prefix tuning). ``inference``
    rows run without autograd (decode); the others record the graph like training does.
    """

    family: str
    B: int
    H: int
    Hkv: int
    Nq: int
    Nk: int
    P: int
    D: int
    dtype: str
    bank: int = 0
    inference: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def id(self) -> str:
        """A stable, human-readable id, e.g. ``gpt2s-B8-H12-N1024-P64-D64-bf16``."""
        heads = f"H{self.H}" if self.Hkv == self.H else f"H{self.H}kv{self.Hkv}"
        seq = f"N{self.Nk}" if self.Nq == self.Nk else f"q{self.Nq}-k{self.Nk}"
        bank = f"-T{self.bank}" if self.bank else ""
        return f"{self.family}-B{self.B}-{heads}-{seq}-P{self.P}{bank}-D{self.D}-{self.dtype}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def visible_sequence_pairs(Nq: int, Nk: int, causal: bool = True) -> int:
    """Number of (query, sequence key) pairs the mask lets through.

    Causal is bottom-right aligned: query i sees ``min(Nk, max(0, i + Nk - Nq + 1))`` keys,
    so Nq == Nk gives N (N + 1) / 2 (the "causal half") and Nq == 1 the whole cache.
    """
    if not causal:
        return Nq * Nk
    off = Nk - Nq
    return sum(min(Nk, max(0, i + off + 1)) for i in range(Nq))


def attention_flops(shape: AttnShape, mode: str) -> float:
    """Model FLOPs of one call: 4 B H D (Nq P + visible sequence pairs) for the forward
    (QK^T and PV, 2 FLOPs per multiply-add; the prefix columns counted fully, the causal
    part only where visible), times 2.5 for backward and 3.5 for forward + backward.

    The same count is used for every implementation, so TFLOP/s compare like speed-ups.
    """
    fwd = (
        4.0
        * shape.B
        * shape.H
        * shape.D
        * (shape.Nq * shape.P + visible_sequence_pairs(shape.Nq, shape.Nk))
    )
    return fwd * MODE_FLOP_FACTOR[mode]


# --------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------


@dataclass
class AttnInputs:
    """The tensors of one benchmarked call (leaves that need gradients in training rows)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pk: torch.Tensor
    pv: torch.Tensor
    prefix_index: torch.Tensor | None
    dout: torch.Tensor | None
    leaves: tuple[torch.Tensor, ...] = field(default_factory=tuple)
    seed: int = 0

    def detached(self) -> AttnInputs:
        """The same values without autograd (an inference call)."""
        d = [t.detach() for t in (self.q, self.k, self.v, self.pk, self.pv)]
        return AttnInputs(*d, self.prefix_index, None, (), self.seed)


def make_inputs(shape: AttnShape, device: torch.device | str, seed: int = 0) -> AttnInputs:
    """Random inputs for ``shape`` (standard normal, so scores are O(1) after scaling)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    dt = shape.torch_dtype
    grad = not shape.inference

    def rnd(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, device=device, dtype=dt).requires_grad_(grad)

    q = rnd(shape.B, shape.H, shape.Nq, shape.D)
    k = rnd(shape.B, shape.Hkv, shape.Nk, shape.D)
    v = rnd(shape.B, shape.Hkv, shape.Nk, shape.D)
    pre = (shape.bank,) if shape.bank else ()
    pk = rnd(*pre, shape.Hkv, shape.P, shape.D)
    pv = rnd(*pre, shape.Hkv, shape.P, shape.D)
    idx = None
    if shape.bank:
        idx = torch.randint(0, shape.bank, (shape.B,), generator=gen, device=device)
    dout = None
    if not shape.inference:
        dout = torch.randn(q.shape, generator=gen, device=device, dtype=dt)
    leaves = () if shape.inference else (q, k, v, pk, pv)
    return AttnInputs(q, k, v, pk, pv, idx, dout, leaves, seed)


# --------------------------------------------------------------------------------------
# implementations
# --------------------------------------------------------------------------------------


def _row_prefix(pk: torch.Tensor, B: int, prefix_index: torch.Tensor | None) -> torch.Tensor:
    """[B, Hkv, P, D] per-row prefix: a shared prefix expanded (no copy until the cat), a
    bank gathered with ``prefix_index`` (a copy, as a user's gather would make)."""
    if prefix_index is not None:
        return pk[prefix_index]
    if pk.dim() == 3:
        return pk.unsqueeze(0).expand(B, -1, -1, -1)
    return pk


def concat_kv(x: AttnInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V with each row's prefix in front: [B, Hkv, P + Nk, D] (two real copies)."""
    B = x.q.shape[0]
    kc = torch.cat([_row_prefix(x.pk, B, x.prefix_index), x.k], dim=2)
    vc = torch.cat([_row_prefix(x.pv, B, x.prefix_index), x.v], dim=2)
    return kc, vc


@functools.cache
def _eager_hidden_mask(Nq: int, P: int, Nk: int, device: torch.device) -> torch.Tensor:
    """bool [Nq, P + Nk], True = masked out (cached per shape, built outside timing)."""
    i = torch.arange(Nq, device=device)[:, None]
    c = torch.arange(P + Nk, device=device)[None, :]
    return c > i + (P + Nk - Nq)


def concat_eager(x: AttnInputs) -> torch.Tensor:
    """cat + matmul / masked softmax (fp32) / matmul, GQA heads repeated (HF eager)."""
    q = x.q
    _, H, Nq, D = q.shape
    kc, vc = concat_kv(x)
    Hkv, Nkc = kc.shape[1], kc.shape[2]
    if Hkv != H:
        kc = kc.repeat_interleave(H // Hkv, dim=1)
        vc = vc.repeat_interleave(H // Hkv, dim=1)
    scores = torch.matmul(q, kc.transpose(-1, -2)) * (1.0 / math.sqrt(D))
    hidden = _eager_hidden_mask(Nq, x.pk.shape[-2], Nkc - x.pk.shape[-2], q.device)
    scores = scores.masked_fill(hidden, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, vc)


def _sdpa_concat(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, gqa: str) -> torch.Tensor:
    from torch.nn.attention.bias import causal_lower_right

    H, Hkv = q.shape[1], kc.shape[1]
    kwargs: dict[str, Any] = {}
    if Hkv != H:
        if gqa == "enable_gqa":
            kwargs["enable_gqa"] = True
        else:
            kc = kc.repeat_interleave(H // Hkv, dim=1)
            vc = vc.repeat_interleave(H // Hkv, dim=1)
    Nq, Nkc = q.shape[2], kc.shape[2]
    # Nq == 1 sees every key: no mask is the same mask and the cheapest dispatch
    mask = causal_lower_right(Nq, Nkc) if Nq > 1 else None
    return F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, **kwargs)


@functools.cache
def sdpa_gqa_mode(device: torch.device, dtype: torch.dtype) -> str:
    """``"enable_gqa"`` when sdpa with ``causal_lower_right`` and ``enable_gqa=True`` runs
    and matches the repeated-heads result (forward and gradients) on this device / torch,
    else ``"repeat_interleave"``.

    PyTorch's ``CausalBias`` dispatch calls the flash / efficient kernels directly, and
    whether it forwards ``enable_gqa`` there depends on the version, so it is probed once
    on a small problem rather than assumed.
    """
    gen = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(1, 4, 24, 64, generator=gen, device=device, dtype=dtype).requires_grad_()
    kc = torch.randn(1, 2, 40, 64, generator=gen, device=device, dtype=dtype).requires_grad_()
    vc = torch.randn(1, 2, 40, 64, generator=gen, device=device, dtype=dtype).requires_grad_()
    try:
        a = _sdpa_concat(q, kc, vc, "enable_gqa")
        ga = torch.autograd.grad(a.float().sum(), (q, kc, vc))
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return "repeat_interleave"
    b = _sdpa_concat(q, kc, vc, "repeat_interleave")
    gb = torch.autograd.grad(b.float().sum(), (q, kc, vc))
    ok = all(
        torch.allclose(s.float(), t.float(), atol=2e-2, rtol=2e-2)
        for s, t in zip((a, *ga), (b, *gb))
    )
    return "enable_gqa" if ok else "repeat_interleave"


def concat_sdpa(x: AttnInputs) -> torch.Tensor:
    """cat + ``F.scaled_dot_product_attention(attn_mask=causal_lower_right(Nq, P+Nk))``."""
    kc, vc = concat_kv(x)
    gqa = "same_heads"
    if kc.shape[1] != x.q.shape[1]:
        gqa = sdpa_gqa_mode(x.q.device, x.q.dtype)
    return _sdpa_concat(x.q, kc, vc, gqa)


_FLEX_MASKS: dict[tuple[int, int, int, str], Any] = {}
_FLEX_COMPILED: Callable[..., torch.Tensor] | None = None


def flex_block_mask(Nq: int, Nk: int, P: int, device: torch.device) -> Any:
    """The prefix-aware BlockMask over [P + Nk] keys, built once per shape and reused (the
    same ``mask_mod`` object keeps torch.compile's guards stable across modes)."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (Nq, Nk, P, str(device))
    if key not in _FLEX_MASKS:
        off = Nk - Nq

        def prefix_causal(b, h, q_idx, kv_idx):
            return (kv_idx < P) | (kv_idx - P <= q_idx + off)

        _FLEX_MASKS[key] = create_block_mask(
            prefix_causal, B=None, H=None, Q_LEN=Nq, KV_LEN=P + Nk, device=device
        )
    return _FLEX_MASKS[key]


def compiled_flex() -> Callable[..., torch.Tensor]:
    """``torch.compile(flex_attention, dynamic=False)``, one per process, with dynamo's
    recompile limits raised so that every benchmarked shape gets its own compiled kernel
    (instead of silently falling back to the slow eager path after 8 shapes)."""
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        import torch._dynamo.config as dcfg
        from torch.nn.attention.flex_attention import flex_attention

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dcfg, name):
                setattr(dcfg, name, max(getattr(dcfg, name), 256))
        if hasattr(dcfg, "accumulated_recompile_limit"):
            dcfg.accumulated_recompile_limit = max(dcfg.accumulated_recompile_limit, 4096)
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED


def flex(x: AttnInputs, compiled: bool = True) -> torch.Tensor:
    """cat + FlexAttention with the prefix-aware block mask (GQA via ``enable_gqa``).

    ``compiled=False`` (CPU smoke only) runs flex_attention's unfused eager path.
    """
    from torch.nn.attention.flex_attention import flex_attention

    kc, vc = concat_kv(x)
    Nq, Nk, P = x.q.shape[2], x.k.shape[2], x.pk.shape[-2]
    bm = flex_block_mask(Nq, Nk, P, x.q.device)
    gqa = kc.shape[1] != x.q.shape[1]
    if compiled:
        return compiled_flex()(x.q, kc, vc, block_mask=bm, enable_gqa=gqa)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*without torch.compile", category=UserWarning)
        return flex_attention(x.q, kc, vc, block_mask=bm, enable_gqa=gqa)


def prefixattn_call(x: AttnInputs, backend: str = "triton") -> torch.Tensor:
    """This library's fused kernel: the prefix is read from its own buffer."""
    return prefix_attention(
        x.q, x.k, x.v, x.pk, x.pv, prefix_index=x.prefix_index, causal=True, backend=backend
    )


def impl_fn(impl: str, device: torch.device) -> Callable[[AttnInputs], torch.Tensor]:
    """The callable for an ``impl`` name (kernel and serving names)."""
    on_cuda = device.type == "cuda"
    if impl in ("prefixattn", "prefixattn_fused", "prefixattn_split"):
        # backend="triton": CUDA, or the interpreter on CPU; the caller sets the backward layout (ops.settings.use_settings)
        return prefixattn_call
    if impl in ("concat_eager", "gather_concat_eager"):
        return concat_eager
    if impl in ("concat_sdpa", "gather_concat_sdpa"):
        return concat_sdpa
    if impl == "flex":
        return functools.partial(flex, compiled=on_cuda)
    raise ValueError(f"unknown impl {impl!r}")


# --------------------------------------------------------------------------------------
# correctness gate
# --------------------------------------------------------------------------------------

# max |got - ref| / max |ref|, per dtype: a correct bf16 / fp16 implementation stays well
# inside these; a wrong mask, scale or prefix handling is off by O(0.1 .. 1).
TOLERANCES = {
    "bf16": {"out": 3e-2, "grad": 6e-2},
    "fp16": {"out": 1e-2, "grad": 3e-2},
    "fp32": {"out": 2e-3, "grad": 5e-3},
}


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().float(), ref.detach().float()
    if not torch.isfinite(got).all():
        return math.inf
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


_REF_CACHE: dict[tuple, dict[str, torch.Tensor]] = {}


def reference_rows(x: AttnInputs, shape: AttnShape, rows: Sequence[int]) -> dict[str, torch.Tensor]:
    """fp32 ``backend="reference"`` results row by row (so the [Nq, P + Nk] score matrix is
    materialised for one row at a time): outputs of ``rows``; for training shapes also
    dq / dk / dv of ``rows[0]`` and the shared prefix gradients summed over **all** rows.

    Cached for the last (shape, seed), so the impls and modes of one shape share it.
    """
    with_grads = not shape.inference and x.dout is not None
    key = (shape, tuple(rows), with_grads, x.seed)
    if key in _REF_CACHE:
        return _REF_CACHE[key]
    _REF_CACHE.clear()
    res: dict[str, torch.Tensor] = {}
    outs = []
    all_rows = range(shape.B) if with_grads else rows
    dpk = dpv = None
    for b in all_rows:
        idx = None if x.prefix_index is None else int(x.prefix_index[b])
        pk = x.pk if idx is None else x.pk[idx]
        pv = x.pv if idx is None else x.pv[idx]
        t = [
            a.detach()[sl].float().requires_grad_(with_grads)
            for a, sl in (
                (x.q, slice(b, b + 1)),
                (x.k, slice(b, b + 1)),
                (x.v, slice(b, b + 1)),
                (pk, slice(None)),
                (pv, slice(None)),
            )
        ]
        with torch.set_grad_enabled(with_grads):
            o = prefix_attention(*t, causal=True, backend="reference")
        if b in rows:
            outs.append(o.detach())
        if with_grads:
            g = torch.autograd.grad(o, t, x.dout[b : b + 1].float())
            if b == rows[0]:
                res["dq"], res["dk"], res["dv"] = g[0], g[1], g[2]
            dpk = g[3] if dpk is None else dpk + g[3]
            dpv = g[4] if dpv is None else dpv + g[4]
        del o, t
    res["out"] = torch.cat(outs)
    if with_grads:
        res["dpk"], res["dpv"] = dpk, dpv
    _REF_CACHE[key] = res
    return res


def check_impl(
    fn: Callable[[AttnInputs], torch.Tensor],
    x: AttnInputs,
    shape: AttnShape,
    with_grads: bool,
    rows: Sequence[int] = (0,),
) -> dict[str, float]:
    """Run ``fn`` once at the benchmarked shape and compare the output (``rows``) and, when
    ``with_grads``, all five gradients with the fp32 reference. Raises AssertionError (so a
    fast-but-wrong implementation cannot produce a row); returns the errors.

    The call records the autograd graph whenever the inputs require grad (as the timed
    calls do), so compiled implementations see the same graph here as when timed.
    """
    out = fn(x)
    errs: dict[str, float] = {}
    got: dict[str, torch.Tensor] = {"out": out.detach()[list(rows)]}
    if with_grads:
        grads = torch.autograd.grad(out, x.leaves, x.dout, allow_unused=True)
        dq, dk, dv, dpk, dpv = (
            torch.zeros_like(t) if g is None else g for g, t in zip(grads, x.leaves)
        )
        r0 = rows[0]
        got.update(dq=dq[r0 : r0 + 1], dk=dk[r0 : r0 + 1], dv=dv[r0 : r0 + 1], dpk=dpk, dpv=dpv)
    del out
    ref = reference_rows(x, shape, rows)
    tol = TOLERANCES[shape.dtype]
    bad = []
    for name, g in got.items():
        errs[name] = _rel_err(g, ref[name])
        limit = tol["out"] if name == "out" else tol["grad"]
        if not errs[name] <= limit:
            bad.append(f"{name}: max err / max |ref| = {errs[name]:.3g} > {limit:g}")
    assert not bad, f"result differs from the fp32 reference at {shape.id}: " + "; ".join(bad)
    errs["tol_out"], errs["tol_grad"] = tol["out"], tol["grad"]
    return errs


# --------------------------------------------------------------------------------------
# timing and memory
# --------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device, leak_bytes: int = 512 * 2**20) -> None:
    """Give GPU memory back between rows. A full ``gc.collect()`` costs 0.1-0.3 s once
    torch / transformers are loaded, so it runs only when more than ``leak_bytes`` are
    still allocated (objects in reference cycles, e.g. a wrapped model)."""
    if device.type != "cuda":
        gc.collect()
        return
    if torch.cuda.memory_allocated(device) > leak_bytes:
        gc.collect()
    torch.cuda.empty_cache()


def run_pedantic(
    benchmark: Any,
    step: Callable[..., Any],
    device: torch.device,
    *,
    setup: Callable[[], tuple] | None = None,
    rounds: int,
    warmup_rounds: int = 1,
) -> list[float]:
    """Time ``step`` with ``benchmark.pedantic`` (one call per round, ``setup`` untimed
    before each) and return per-round times in ms of the measured rounds.

    On CUDA each round records CUDA events around ``step`` and synchronises inside the
    timed callable, so pytest-benchmark's own (wall-clock) statistics include the device
    work too; the returned list is the event-measured device time. On CPU it is
    ``perf_counter`` time. With ``--benchmark-disable`` pytest-benchmark calls the target
    once, and the list has that one time.
    """
    times: list[float] = []
    cuda = device.type == "cuda"

    def target(*state: Any) -> None:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(*state)
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step(*state)
            times.append((time.perf_counter() - t0) * 1e3)

    def make_args() -> tuple[tuple, dict]:
        state = setup() if setup is not None else ()
        synchronize(device)  # the setup's kernels must not run inside the timed region
        return state, {}

    benchmark.pedantic(target, setup=make_args, rounds=rounds, warmup_rounds=warmup_rounds)
    return times[-rounds:] if len(times) > rounds else times


def peak_memory(run_once: Callable[[], Any], device: torch.device) -> dict[str, int | None]:
    """Peak allocated bytes of one call (``torch.cuda.max_memory_allocated`` reset just
    before it), absolute and above what was allocated before the call."""
    if device.type != "cuda":
        return {"peak_mem_bytes": None, "peak_mem_extra_bytes": None}
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = run_once()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return {"peak_mem_bytes": int(peak), "peak_mem_extra_bytes": int(peak - base)}


def timing_summary(times_ms: list[float]) -> dict[str, Any]:
    """Median / min / mean of the per-round times (ms)."""
    if not times_ms:
        return {"time_ms": None}
    return {
        "time_ms": statistics.median(times_ms),
        "time_ms_min": min(times_ms),
        "time_ms_mean": statistics.fmean(times_ms),
        "times_ms": [round(t, 6) for t in times_ms],
    }


def measure_gemm_tflops(device: torch.device, n: int = 8192, reps: int = 5) -> dict[str, Any]:
    """The device's measured dense bf16 GEMM throughput: an n^3 matmul, 10 calls per
    CUDA-event sample after warm-up, median over ``reps`` samples."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, generator=gen, device=device, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        torch.matmul(a, b, out=c)
    torch.cuda.synchronize(device)
    per_call = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            torch.matmul(a, b, out=c)
        end.record()
        torch.cuda.synchronize(device)
        per_call.append(start.elapsed_time(end) / 10)
    ms = statistics.median(per_call)
    flops = 2.0 * n**3
    del a, b, c
    free_memory(device)
    return {
        "gemm_n": n,
        "gemm_dtype": "bf16",
        "gemm_ms": ms,
        "gemm_tflops": flops / (ms * 1e-3) / 1e12,
        "gemm_tflops_best": flops / (min(per_call) * 1e-3) / 1e12,
    }


# --------------------------------------------------------------------------------------
# one attention row (kernel and serving suites)
# --------------------------------------------------------------------------------------


def capture_cuda_graph(step: Callable[[], Any]) -> Callable[[], Any]:
    """Capture ``step`` (already warmed up) in a CUDA graph; return its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _mode_callables(
    fn: Callable[[AttnInputs], torch.Tensor], x: AttnInputs, mode: str
) -> tuple[Callable[[], tuple] | None, Callable[..., Any]]:
    """(setup, step) of a mode: the timed ``step`` gets what ``setup`` returned."""
    if mode in ("fwd", "fwd_graph"):  # fwd_graph: captured in a CUDA graph by the caller
        return None, lambda: fn(x)
    if mode == "bwd":

        def setup() -> tuple:
            return (fn(x),)

        def bwd(out: torch.Tensor) -> Any:
            return torch.autograd.grad(out, x.leaves, x.dout)

        return setup, bwd
    if mode == "fwd_bwd":
        return None, lambda: torch.autograd.grad(fn(x), x.leaves, x.dout)
    raise ValueError(f"unknown mode {mode!r}")


def bench_attention_row(
    benchmark: Any,
    *,
    suite: str,
    shape: AttnShape,
    impl: str,
    mode: str,
    device: torch.device,
    rounds: int,
    gemm: dict[str, Any] | None,
    smoke: bool,
    check_rows: Sequence[int] = (0,),
) -> dict[str, Any]:
    """Check, warm up, measure memory and time one (shape, impl, mode) row; everything lands
    in ``benchmark.extra_info`` (returned too)."""
    info = benchmark.extra_info
    info.update(
        suite=suite,
        impl=impl,
        mode=mode,
        case=shape.id,
        shape=shape.as_dict(),
        smoke=smoke,
        device=device_info()["name"] if device.type == "cuda" else "cpu",
    )
    benchmark.group = f"{'SMOKE ' if smoke else ''}{suite} {shape.id} {mode}"
    fn = impl_fn(impl, device)
    x = make_inputs(shape, device)
    if mode not in ("fwd", "fwd_graph") and not x.leaves:
        raise ValueError(f"{shape.id} is an inference shape: mode {mode!r} has no backward")
    if impl == "flex":
        info["compiled"] = device.type == "cuda"
        if device.type == "cpu":
            # FlexAttention has no backward on CPU (torch 2.13 raises NotImplementedError as
            # soon as an input requires grad): smoke runs only its inference forward.
            try:
                fn(x)
            except NotImplementedError as err:
                if mode != "fwd":
                    pytest.skip(f"flex on CPU: {err}")
                x = x.detached()
                info["grad"] = False
    if impl == "concat_sdpa" and shape.Hkv != shape.H:
        info["gqa"] = sdpa_gqa_mode(device, shape.torch_dtype)
    elif impl in ("concat_eager", "gather_concat_eager") and shape.Hkv != shape.H:
        info["gqa"] = "repeat_interleave"
    elif impl == "flex" and shape.Hkv != shape.H:
        info["gqa"] = "enable_gqa"

    setup, step = _mode_callables(fn, x, mode)

    def once() -> Any:
        return step(*(setup() if setup else ()))

    # 1. first call: Triton autotuning / torch.compile happen here
    synchronize(device)
    t0 = time.perf_counter()
    once()
    synchronize(device)
    info["first_call_s"] = round(time.perf_counter() - t0, 3)
    # 2. correctness gate at the benchmarked shape, before any timing
    info["check"] = check_impl(
        fn, x, shape, with_grads=mode != "fwd" and bool(x.leaves), rows=check_rows
    )
    # 3. warm-up, peak memory (forward + backward for the bwd mode), timing
    for _ in range(2):
        once()
    info.update(peak_memory(once, device))
    if mode == "fwd_graph" and device.type == "cuda":
        # How a server runs decode: the whole step captured once, replayed per token, so
        # the time is the device work without per-launch host overhead (both impls alike).
        step = capture_cuda_graph(step)
        info["cuda_graph"] = True
    times = run_pedantic(benchmark, step, device, setup=setup, rounds=rounds, warmup_rounds=1)
    info.update(timing_summary(times))
    info["timer"] = "cuda_event" if device.type == "cuda" else "perf_counter"
    info["flops"] = attention_flops(shape, "fwd" if mode == "fwd_graph" else mode)
    if info.get("time_ms"):
        info["tflops"] = info["flops"] / (info["time_ms"] * 1e-3) / 1e12
        if gemm:
            info["gemm_tflops"] = gemm["gemm_tflops"]
            info["gemm_share"] = info["tflops"] / gemm["gemm_tflops"]
    return dict(info)
