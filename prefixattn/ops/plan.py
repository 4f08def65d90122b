"""Call plans: what a call's *signature* determines, computed once and cached.

A signature is everything that validation and launch set-up depend on: the shapes,
strides, dtypes and devices of the tensors, the flags and scalars, and the backend. The
first call with a signature validates it and builds a :class:`CallPlan`; a repeated call
builds the key (:func:`signature_key`), looks the plan up, checks the one value that can
change with the same signature (the range of ``prefix_index``, without a device sync),
allocates its outputs and launches:

    prefix_attention(q, k, v, ...)
      call = AttentionCall(...)           the inputs, backend and settings (call.py)
      plan = lookup_plan(call)            key: shapes, strides, dtypes, devices, flags,
                                          backend, settings; miss: validate(call)
      plan.forward(call, seed)            2 allocations, 1 launch
      plan.backward(call, ...)            grads + 1 workspace, 1-2 launches (fused)
                                          or 4-5 (split, large problems)

A plan launches each kernel through a :class:`KernelLaunch`: the first launch chooses
the config (autotuning on CUDA, see ``kernels.py``), the second is captured as a direct
launch of the compiled kernel where Triton allows it (``direct.py``), and later ones pass
only the new tensors and seed. The cache is bounded (:data:`MAX_PLANS`), keyed by device
(so safe across devices) and by the call's settings (so a change of settings is a new
plan; :func:`clear_plans` empties the cache);
dict operations are atomic under the GIL, and a plan built twice by two threads is
harmless.
"""

from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass, replace

import torch

from .args import batch_chunks, pointer_args
from .backward import (
    BackwardLayout,
    Needs,
    attention_backward,
    backward_buffers,
    backward_layout,
    backward_pointers,
    backward_specs,
    reduce_spec,
)
from .call import AttentionCall
from .direct import DirectKernel
from .forward import attention_forward, forward_spec
from .kernels import DYNAMIC_PARAMS, LaunchSpec, kernel_params, launch_now, source
from .settings import CONFIG_LISTS
from .validation import (
    PREFIX_NONE,
    AttnProblem,
    check_cache_values,
    check_index_range,
    check_lengths_range,
    validate,
)

MAX_PLANS = 512
PLANS: dict[tuple, CallPlan] = {}


def clear_plans() -> None:
    """Forget every cached plan (plans hold the kernels they launched)."""
    PLANS.clear()


def lookup_plan(call: AttentionCall) -> CallPlan:
    """The call's plan: cached, or validated and built (bad input raises here).

    The key: the shapes, strides, dtypes and devices of the tensors, the flags, the
    scalars with their types (so ``causal=1`` never hits a plan made for ``True``), the
    backend and the settings. Inputs that are not tensors fail to make a key and go to
    validation, which names them. On a hit the value checks left are the ranges of
    ``prefix_index`` and ``prefix_lengths``, once per tensor (and again after an in-place
    change): every layer of a model gets the same index tensor.
    """
    q, k, v, pk, pv, pidx, plen, kpm, sinks, causal, sm_scale, dropout_p = call[:12]
    window, softcap, prefix_window, backend, settings, csl, cbi, bt = call[12:]
    try:
        key = (
            q.__class__, q.shape, q.stride(), q.dtype, q.device,
            k.shape, k.stride(), k.dtype, k.device,
            v.shape, v.stride(), v.dtype, v.device,
            None if pk is None else (pk.shape, pk.stride(), pk.dtype, pk.device),
            None if pv is None else (pv.shape, pv.stride(), pv.dtype, pv.device),
            None if pidx is None else (pidx.__class__, pidx.shape, pidx.dtype, pidx.device),
            None if kpm is None else (kpm.shape, kpm.stride(), kpm.dtype, kpm.device),
            None if plen is None else (plen.__class__, plen.shape, plen.dtype, plen.device),
            causal, causal.__class__, sm_scale, sm_scale.__class__,
            dropout_p, dropout_p.__class__, backend, settings,
            None if csl is None else (csl.__class__, csl.shape, csl.dtype, csl.device),
            None if cbi is None else (cbi.__class__, cbi.shape, cbi.dtype, cbi.device),
            None if sinks is None else (sinks.__class__, sinks.shape, sinks.dtype, sinks.device),
            window, window.__class__, softcap, softcap.__class__, prefix_window,
            None if bt is None else (bt.__class__, bt.shape, bt.stride(), bt.dtype, bt.device),
        )  # fmt: skip
        plan = PLANS.get(key)
    except (AttributeError, TypeError):  # not tensors, or unhashable scalars
        key, plan = None, None
    if plan is not None:
        if pidx is not None and plan.check_index:
            seen = plan.index_seen
            if seen is None or seen[0]() is not pidx or seen[1] != pidx._version:
                check_index_range(pidx, plan.prob.T)
                plan.index_seen = (weakref.ref(pidx), pidx._version)
        if plen is not None and plan.check_lengths:
            seen = plan.lengths_seen
            if seen is None or seen[0]() is not plen or seen[1] != plen._version:
                check_lengths_range(plen, plan.prob.P)
                plan.lengths_seen = (weakref.ref(plen), plen._version)
        if csl is not None or cbi is not None or bt is not None:  # new every decoding step
            check_cache_values(call, plan.prob.Nk, k.shape[0])
        return plan
    prob = validate(call)
    if backend == "triton":
        source(settings).check_device(q, settings)
    plan = CallPlan(call, prob)
    if plan.check_index:  # validate() checked these tensors' values
        plan.index_seen = (weakref.ref(pidx), pidx._version)
    if plan.check_lengths:
        plan.lengths_seen = (weakref.ref(plen), plen._version)
    if key is not None:
        if len(PLANS) >= MAX_PLANS:
            PLANS.clear()
        PLANS[key] = plan
    return plan


class KernelLaunch:
    """One kernel launch of a plan: the kernel, its grid and config, and the constant part
    of its argument tuple. A call passes only what changes: the tensors (by parameter
    name) and the dropout seed; they are the kernel's leading parameters and ``seed``.

    Launch 1 (:meth:`first`) picks the config; launch 2 runs through Triton's normal path
    and captures a direct launch of the compiled kernel (``direct.DirectKernel``) where
    supported; later launches call that directly.
    """

    __slots__ = (
        "attr", "bound", "capture", "direct", "grid", "kernel", "kw", "mid", "ptrs", "seeded",
        "spec", "tail",
    )  # fmt: skip

    def __init__(self, spec: LaunchSpec) -> None:
        names = kernel_params(spec.attr)
        n_ptr = 0
        while n_ptr < len(names) and names[n_ptr] in DYNAMIC_PARAMS and names[n_ptr] != "seed":
            n_ptr += 1
        rest = names[n_ptr:]
        if [n for n in rest if n in DYNAMIC_PARAMS] not in ([], ["seed"]):
            raise AssertionError(f"{spec.attr}: tensor parameters must come first")
        self.spec, self.attr = spec, spec.attr
        self.ptrs = operator.itemgetter(*names[:n_ptr])
        self.seeded = "seed" in rest
        cut = rest.index("seed") if self.seeded else len(rest)
        self.mid = tuple(spec.vals[n] for n in rest[:cut])
        self.tail = tuple(spec.vals[n] for n in rest[cut + 1 :])
        self.kernel = spec.kernel()
        self.direct = None
        self.bound = None  # kernel[grid]: Triton's launcher for this grid
        self.capture = False
        self.grid: tuple | None = None
        self.kw: dict | None = None

    @classmethod
    def first(cls, spec: LaunchSpec, q: torch.Tensor) -> KernelLaunch:
        """Build from the spec of the current call and launch it (choosing the config)."""
        self = cls(spec)
        cfg, grid = launch_now(spec, q)
        if spec.name not in CONFIG_LISTS:
            self.grid, self.kw = grid, spec.consts
        elif cfg is not None:
            self.grid = grid
            self.kw = {**cfg.tiles(), **spec.consts}
            self.kw.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if self.kw is not None:
            self.bound = self.kernel[self.grid]
            self.capture = not source(spec.settings).interpreted()
        return self

    def __call__(self, ptrs: dict, seed: int, aligned: bool = True) -> None:
        """Launch with these tensors (by parameter name) and seed. ``aligned``: every
        tensor's data is 16-byte aligned, as Triton specialized the captured kernel (the
        plan checks the caller's tensors; its own allocations always are): only then
        may the direct launch run, otherwise Triton's normal path re-specializes."""
        args = self.ptrs(ptrs) + self.mid
        if self.seeded:
            args = (*args, seed, *self.tail)
        if aligned:
            direct = self.direct
            if direct is not None:
                direct(self.grid, *args)
                return
            if self.capture:  # launch 2: through Triton, capturing a direct launch
                self.capture = False
                # a direct launcher of the compiled kernel for later calls, or None (then
                # the normal path it is: direct.py falls back where Triton differs). The
                # plan keeps the specialization equal: sizes and strides are in its key,
                # the seed is not specialized, and alignment is checked per call.
                self.direct = DirectKernel.capture(self.kernel, self.grid, args, self.kw, check=())
                return
        bound = self.bound
        if bound is not None:
            bound(*args, **self.kw)
        else:  # the autotuner kept its choice to itself: its own path
            vals = {**self.spec.vals, **ptrs, "seed": seed}
            launch_now(replace(self.spec, vals=vals), ptrs["Q"])


@dataclass
class _BackwardPlan:
    lay: BackwardLayout
    needs: Needs
    launches: list[KernelLaunch] | None = None


class CallPlan:
    """The cached part of every call with one signature: the validated problem, the
    resolved backend, and (Triton) the forward's and each backward variant's launches."""

    def __init__(self, call: AttentionCall, prob: AttnProblem) -> None:
        self.prob, self.backend = prob, call.backend
        self.check_index = call.prefix_index is not None and prob.B > 0
        self.check_lengths = call.prefix_lengths is not None and prob.T > 0
        # (weakref, version) of the last prefix_index / prefix_lengths tensor checked
        self.index_seen: tuple | None = None
        self.lengths_seen: tuple | None = None
        self.empty = prob.B * prob.H * prob.Nq == 0
        self.chunked = len(batch_chunks(prob, call.settings, None)) > 1
        self.has_p = prob.prefix_mode != PREFIX_NONE
        self.dropout = call.dropout_p > 0.0
        self.out_shape = (prob.B, prob.H, prob.Nq, prob.D)
        self.lse_shape = (prob.B, prob.H, prob.Nq)
        self.fwd: KernelLaunch | None = None
        self.bwd: dict[tuple, _BackwardPlan] = {}

    def forward(self, call: AttentionCall, seed: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(out [B, H, Nq, D], lse [B, H, Nq] fp32, aligned) of the Triton forward;
        ``aligned``: whether the inputs start at 16-byte aligned addresses (Triton
        specializes pointers on it; a view with an odd storage offset may not), for the
        backward."""
        q = call.q
        if self.chunked:
            out, lse = attention_forward(call, self.prob, seed)
            return out, lse, False
        out = torch.empty(self.out_shape, device=q.device, dtype=q.dtype)
        lse = torch.empty(self.lse_shape, device=q.device, dtype=torch.float32)
        if self.empty:
            return out, lse, False
        ptrs = pointer_args(call, self.prob.prefix_mode)
        ptrs["Out"], ptrs["LSE"] = out, lse
        a = q.data_ptr() | call.k.data_ptr() | call.v.data_ptr()
        if self.has_p:
            a |= call.prefix_k.data_ptr() | call.prefix_v.data_ptr()
            if call.prefix_index is not None:
                a |= call.prefix_index.data_ptr()
            if call.prefix_lengths is not None:
                a |= call.prefix_lengths.data_ptr()
        if call.key_padding_mask is not None:
            a |= call.key_padding_mask.data_ptr()
        if call.cache_seqlens is not None:
            a |= call.cache_seqlens.data_ptr()
        if call.cache_batch_idx is not None:
            a |= call.cache_batch_idx.data_ptr()
        if call.block_table is not None:
            a |= call.block_table.data_ptr()
        if call.sinks is not None:
            a |= ptrs["SINKS"].data_ptr()
        aligned = not a & 15
        fl = self.fwd
        if fl is not None:
            fl(ptrs, seed, aligned)
            return out, lse, aligned
        self.fwd = KernelLaunch.first(forward_spec(call, out, lse, seed, self.prob), q)
        return out, lse, aligned

    def backward(
        self,
        call: AttentionCall,
        do: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        seed: int,
        needs: Needs,
        aligned: bool = False,
    ) -> tuple[torch.Tensor | None, ...]:
        """(dq, dk, dv, dprefix_k, dprefix_v) of the Triton backward; ``needs`` = (q, k,
        v, prefix) flags. Variants (needs, dO's strides) are cached, each with its layout.
        ``aligned``: the forward's inputs were 16-byte aligned; dO is checked here."""
        prob = self.prob
        if self.chunked:
            return attention_backward(call, prob, do, out, lse, seed, needs)
        needs = (needs[0], needs[1], needs[2], needs[3] and call.prefix_k is not None)
        key = (needs, do.stride())
        bp = self.bwd.get(key)
        if bp is None:
            lay = backward_layout(call, prob, needs[3], out.is_contiguous())
            bp = self.bwd[key] = _BackwardPlan(lay, needs)
        lay = bp.lay
        *grads, ws = backward_buffers(call, prob, needs, lay.ws_numel)
        if self.empty:
            return tuple(grads)
        t = (do, out, lse, grads, ws)
        ptrs = backward_pointers(call, t, prob, needs, lay)
        launches = bp.launches
        if launches is not None:
            aligned = aligned and not do.data_ptr() & 15
            for kl in launches:
                kl(ptrs, seed, aligned)
            return grads
        specs = backward_specs(call, t, seed, prob, needs, lay)
        if needs[3] and lay.reduce and self.has_p:
            specs.append(reduce_spec(ptrs, prob, lay, call))
        bp.launches = [KernelLaunch.first(spec, call.q) for spec in specs]
        return grads


__all__ = ["MAX_PLANS", "PLANS", "CallPlan", "KernelLaunch", "clear_plans", "lookup_plan"]
