"""Call plans: what a call's *signature* determines, computed once and cached.

A signature is everything that validation and launch set-up depend on: the shapes,
strides, dtypes and devices of the tensors, the flags and scalars, and the backend. The
first call with a signature validates it and builds a :class:`CallPlan`; a repeated call
builds the key (:func:`signature_key`), looks the plan up, checks the one value that can
change with the same signature (the range of ``prefix_index``, without a device sync),
allocates its outputs and launches:

    prefix_attention(q, k, v, ...)
      key = signature_key(...)            shapes, strides, dtypes, devices, flags
      plan = _PLANS[key]                  miss: validate(...), CallPlan(...)
      plan.forward(...)                   2 allocations, 1 launch
      plan.backward(...)                  grads + 1 workspace, 1-2 launches (fused)
                                          or 4-5 (split, large problems)

A plan launches each kernel through a :class:`KernelLaunch`: the first launch chooses
the config (autotuning on CUDA, see ``launch.py``), the second is captured as a direct
launch of the compiled kernel where Triton allows it (``direct.py``), and later ones pass
only the new tensors and seed. The cache is bounded (:data:`MAX_PLANS`), keyed by device
(so safe across devices), cleared by ``launch.forced_config`` and :func:`clear_plans`;
dict operations are atomic under the GIL, and a plan built twice by two threads is
harmless.
"""

from __future__ import annotations

import dataclasses
import operator
import weakref

import torch

from . import launch as L
from .validation import (
    PREFIX_NONE,
    AttnProblem,
    check_index_range,
    check_lengths_range,
    validate,
)

MAX_PLANS = 512
_PLANS: dict[tuple, CallPlan] = {}


def clear_plans() -> None:
    """Forget every cached plan (tests that swap kernels or limits call it)."""
    _PLANS.clear()


def lookup_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    prefix_index: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    sm_scale: float | None,
    dropout_p: float,
    backend: str,
    prefix_lengths: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    prefix_window: str = "all",
) -> CallPlan:
    """The call's plan: cached, or validated and built (bad input raises here).

    The key: the shapes, strides, dtypes and devices of the tensors, the flags, the
    scalars with their types (so ``causal=1`` never hits a plan made for ``True``) and
    the backend. Arguments that are not tensors fail to make a key and go to validation,
    which names them. On a hit the one value check left is the range of ``prefix_index``,
    once per index tensor (and again after an in-place change): every layer of a model
    gets the same index tensor.
    """
    pk, pv, pidx, kpm, plen = prefix_k, prefix_v, prefix_index, key_padding_mask, prefix_lengths
    try:
        feats = None  # window, soft-capping, sinks: part of the key only when one is used
        if window is not None or softcap is not None or sinks is not None or prefix_window != "all":
            feats = (
                window, window.__class__, softcap, softcap.__class__, prefix_window,
                None if sinks is None else (sinks.__class__, sinks.shape, sinks.dtype, sinks.device),
            )  # fmt: skip
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
            dropout_p, dropout_p.__class__, backend, feats,
        )  # fmt: skip
        plan = _PLANS.get(key)
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
        return plan
    prob = validate(
        q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask,
        causal, sm_scale, dropout_p, backend, prefix_lengths=prefix_lengths,
        window=window, softcap=softcap, sinks=sinks, prefix_window=prefix_window,
    )  # fmt: skip
    from .attention import resolve_backend

    resolved = resolve_backend(backend, q)
    if resolved == "triton":
        L.check_triton_device(q)
    plan = CallPlan(
        prob, resolved, causal, float(dropout_p), prefix_index is not None,
        prefix_lengths is not None,
    )  # fmt: skip
    if plan.check_index:  # validate() checked these tensors' values
        plan.index_seen = (weakref.ref(prefix_index), prefix_index._version)
    if plan.check_lengths:
        plan.lengths_seen = (weakref.ref(prefix_lengths), prefix_lengths._version)
    if key is not None:
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
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

    def __init__(self, spec: L.LaunchSpec) -> None:
        names = L.kernel_params(spec.attr)
        n_ptr = 0
        while n_ptr < len(names) and names[n_ptr] in L.DYNAMIC_PARAMS and names[n_ptr] != "seed":
            n_ptr += 1
        rest = names[n_ptr:]
        if [n for n in rest if n in L.DYNAMIC_PARAMS] not in ([], ["seed"]):
            raise AssertionError(f"{spec.attr}: tensor parameters must come first")
        self.spec, self.attr = spec, spec.attr
        self.ptrs = operator.itemgetter(*names[:n_ptr])
        self.seeded = "seed" in rest
        cut = rest.index("seed") if self.seeded else len(rest)
        self.mid = tuple(spec.vals[n] for n in rest[:cut])
        self.tail = tuple(spec.vals[n] for n in rest[cut + 1 :])
        self.kernel = getattr(L._kernels(), spec.attr)
        self.direct = None
        self.bound = None  # kernel[grid]: Triton's launcher for this grid
        self.capture = False
        self.grid: tuple | None = None
        self.kw: dict | None = None

    @classmethod
    def first(cls, spec: L.LaunchSpec, q: torch.Tensor) -> KernelLaunch:
        """Build from the spec of the current call and launch it (choosing the config)."""
        self = cls(spec)
        cfg, grid = L.launch_now(spec, q)
        if spec.name not in L.CONFIG_LISTS:
            self.grid, self.kw = grid, spec.consts
        elif cfg is not None:
            self.grid = grid
            self.kw = {**cfg.tiles(), **spec.consts}
            self.kw.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if self.kw is not None:
            self.bound = self.kernel[self.grid]
            self.capture = not L.kernels_interpreted()
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
                self.direct = _capture(self.kernel, self.grid, args, self.kw)  # launches
                return
        bound = self.bound
        if bound is not None:
            bound(*args, **self.kw)
        else:  # the autotuner kept its choice to itself: its own path
            vals = {**self.spec.vals, **ptrs, "seed": seed}
            L.launch_now(dataclasses.replace(self.spec, vals=vals), ptrs["Q"])


def _capture(kernel, grid: tuple, args: tuple, kw: dict):  # -> DirectKernel | None
    """Launch through Triton's normal path and return a direct launcher of the compiled
    kernel for later calls, or None after the same launch (then the normal path it is:
    ``direct.py`` falls back by itself where Triton's internals differ). The plan keeps
    the specialization equal itself: sizes and strides are in its key, the seed is not
    specialized, and it checks the tensors' alignment per call (``check=()``)."""
    from .direct import DirectKernel

    return DirectKernel.capture(kernel, grid, args, kw, check=())


@dataclasses.dataclass
class _BackwardPlan:
    lay: L.BackwardLayout
    needs: tuple[bool, bool, bool, bool]
    launches: list[KernelLaunch] | None = None


class CallPlan:
    """The cached part of every call with one signature: the validated problem, the
    resolved backend, and (Triton) the forward's and each backward variant's launches."""

    def __init__(
        self,
        prob: AttnProblem,
        backend: str,
        causal: bool,
        dropout_p: float,
        has_index: bool,
        has_lengths: bool = False,
    ) -> None:
        self.prob, self.backend, self.causal, self.dropout_p = prob, backend, causal, dropout_p
        self.check_index = has_index and prob.B > 0
        self.check_lengths = has_lengths and prob.T > 0
        # (weakref, version) of the last prefix_index / prefix_lengths tensor checked
        self.index_seen: tuple | None = None
        self.lengths_seen: tuple | None = None
        self.empty = prob.B * prob.H * prob.Nq == 0
        self.chunked = len(L._batch_chunks(prob, None)) > 1
        self.has_p = prob.prefix_mode != PREFIX_NONE
        self.out_shape = (prob.B, prob.H, prob.Nq, prob.D)
        self.lse_shape = (prob.B, prob.H, prob.Nq)
        self.fwd: KernelLaunch | None = None
        self.bwd: dict[tuple, _BackwardPlan] = {}

    def aligned(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        prefix_k: torch.Tensor | None,
        prefix_v: torch.Tensor | None,
        prefix_index: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
    ) -> bool:
        """Whether the caller's tensors start at 16-byte aligned addresses (Triton
        specializes pointers on it; a view with an odd storage offset may not)."""
        a = q.data_ptr() | k.data_ptr() | v.data_ptr()
        if self.has_p:
            a |= prefix_k.data_ptr() | prefix_v.data_ptr()
            if prefix_index is not None:
                a |= prefix_index.data_ptr()
        if key_padding_mask is not None:
            a |= key_padding_mask.data_ptr()
        return not a & 15

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        prefix_k: torch.Tensor | None,
        prefix_v: torch.Tensor | None,
        prefix_index: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        seed: int,
        prefix_lengths: torch.Tensor | None = None,
        sinks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(out [B, H, Nq, D], lse [B, H, Nq] fp32, aligned) of the Triton forward;
        ``aligned``: the inputs' alignment (:meth:`aligned`), for the backward.
        ``sinks``: [H] attention sinks (read as a dense vector)."""
        if sinks is not None and not sinks.is_contiguous():
            sinks = sinks.contiguous()
        if self.chunked:
            out, lse = L.attention_forward(
                q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask,
                self.causal, self.dropout_p, seed, self.prob, prefix_lengths=prefix_lengths,
                sinks=sinks,
            )  # fmt: skip
            return out, lse, False
        out = torch.empty(self.out_shape, device=q.device, dtype=q.dtype)
        lse = torch.empty(self.lse_shape, device=q.device, dtype=torch.float32)
        if self.empty:
            return out, lse, False
        mode = self.prob.prefix_mode
        ptrs = L.pointer_args(
            q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, mode, prefix_lengths
        )
        ptrs["Out"], ptrs["LSE"] = out, lse
        aligned = self.aligned(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask)
        if prefix_lengths is not None:
            aligned = aligned and not prefix_lengths.data_ptr() & 15
        if sinks is not None:
            ptrs["SINKS"] = sinks
            aligned = aligned and not sinks.data_ptr() & 15
        else:
            ptrs["SINKS"] = q
        fl = self.fwd
        if fl is not None:
            fl(ptrs, seed, aligned)
            return out, lse, aligned
        x = L._Inputs(
            q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, prefix_lengths, sinks
        )
        spec = L.forward_spec(x, out, lse, self.causal, self.dropout_p, seed, self.prob)
        self.fwd = KernelLaunch.first(spec, q)
        return out, lse, aligned

    def backward(
        self,
        do: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        prefix_k: torch.Tensor | None,
        prefix_v: torch.Tensor | None,
        prefix_index: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        out: torch.Tensor,
        lse: torch.Tensor,
        seed: int,
        needs: tuple[bool, bool, bool, bool],
        aligned: bool = False,
        prefix_lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, ...]:
        """(dq, dk, dv, dprefix_k, dprefix_v) of the Triton backward; ``needs`` = (q, k,
        v, prefix) flags. Variants (needs, dO's strides; the backward layout is read when
        one is set up) are cached. ``aligned``: the forward's inputs were 16-byte aligned
        (:meth:`aligned`); dO is checked here."""
        prob = self.prob
        if self.chunked:
            return L.attention_backward(
                do, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse,
                self.causal, self.dropout_p, seed, prob, needs, prefix_lengths=prefix_lengths,
            )  # fmt: skip
        needs = (needs[0], needs[1], needs[2], needs[3] and prefix_k is not None)
        key = (needs, do.stride())
        bp = self.bwd.get(key)
        if bp is None:  # PREFIXATTN_BWD is read here, when a variant is set up
            lay = L.backward_layout(prob, q, needs[3], out.is_contiguous(), None)
            bp = self.bwd[key] = _BackwardPlan(lay, needs)
        lay = bp.lay
        grads = L.backward_buffers(q, k, v, prefix_k, prefix_v, prob, needs, lay.ws_numel)
        if self.empty:
            return grads[:5]
        ws = grads[5]
        grads = grads[:5]
        x = (q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, prefix_lengths)
        ptrs = L.backward_pointers(x, do, out, lse, grads, ws, prob, needs, lay)
        launches = bp.launches
        if launches is not None:
            aligned = aligned and not do.data_ptr() & 15
            for kl in launches:
                kl(ptrs, seed, aligned)
            return grads
        specs = L.backward_specs(
            L._Inputs(*x), do, out, lse, grads, ws, self.causal, self.dropout_p, seed, prob,
            needs, lay,
        )  # fmt: skip
        if needs[3] and lay.reduce and self.has_p:
            specs.append(L.reduce_spec(ptrs, prob, lay))
        bp.launches = [KernelLaunch.first(spec, q) for spec in specs]
        return grads


__all__ = ["MAX_PLANS", "CallPlan", "KernelLaunch", "clear_plans", "lookup_plan"]
