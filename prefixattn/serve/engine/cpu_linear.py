"""The model's linear layers over weights prepacked for oneDNN, for CPU serving.

``nn.Linear`` on the CPU hands its row-major weight to MKL's ``sgemm`` on every call.
For the few rows of a serving step (a decode step is M = batch tokens, 1..64) that
GEMM runs far below the machine's memory bandwidth; oneDNN's matmul over a weight
reordered ONCE into its blocked layout (``torch.ops.mkldnn._reorder_linear_weight``,
then ``torch.ops.mkldnn._linear_pointwise``: the ops Inductor's CPU freezing pass emits
and vLLM's CPU backend calls) reads the weight at close to that bandwidth. Measured on
the 2-core AVX2 machine (fp32, SmolLM2-135M's shapes, 2 threads): the 576 -> 49152 LM
head at M = 8 9.5 ms instead of 25.7 ms, the 576 -> 1536 MLP projection 0.17 ms
instead of 0.48 ms (``benchmarks/results/cpu-linear-*.md``)::

    nn.Linear.forward(x)                        packed forward(x)
      x [.., K] @ W[N, K]^T  (MKL sgemm,          x [.., K] -> oneDNN matmul over
      W re-read row-major every call)             W' = reorder(W) (blocked, made once)

What :func:`pack_linears` does to a model, and how to undo it:

* every ``nn.Linear`` (and transformers' ``Conv1D``, GPT-2's projections, weight stored
  [in, out]) on the CPU whose dtype oneDNN packs on this machine (float32
  everywhere; bfloat16 / float16 only where the CPU has the instructions) gets an
  instance ``forward`` over its packed weight; :meth:`PackedLinears.revert` (or leaving
  the ``with`` block) restores the modules exactly (the class's ``forward`` again);
* a call the packed weight cannot serve runs the module's own ``forward``, by rule,
  never by accident: gradients wanted (``torch.is_grad_enabled()`` and the weight or the
  input requires grad: training is untouched), CPU autocast on, an input of another
  dtype or device, an empty input; each such call is counted (:meth:`PackedLinears.stats`
  ``plain_calls``);
* under ``torch.compile`` a packed module traces as one opaque op,
  ``prefixattn::onednn_linear(x, weight, bias)`` (:func:`onednn_linear`), which finds the
  weight's packed copy at run time: a compiled step fuses the element-wise work around
  the linears and still reads the packed weights (Inductor's own weight packing needs
  ``freezing``, whose compile of SmolLM2 did not finish in 20 minutes here);
* the two ops have C++ kernels too (``cpu_linear_ops.cpp``, built at first use by
  :func:`native_linear_ops`, which the engine's compiled step calls; ~15 s once, then
  torch's extension cache): a call whose weights have a current packed copy runs oneDNN
  with no Python and no GIL (Inductor's C++ wrapper calls the ops through the
  dispatcher, 121 times per SmolLM2 decode step); every other call, and every call
  where they could not be built (no compiler: said once in the log and in the
  compiled step's stats), runs the Python kernel;
* a weight changed in place or replaced since it was packed (``_version`` / identity)
  is packed again before the call: the packed copy never serves stale weights;
* **sibling projections share one GEMM**: the linears of one parent that read the same
  input (``q_proj``/``k_proj``/``v_proj``, ``gate_proj``/``up_proj``: :data:`SIBLINGS`,
  same ``in_features``, dtype and device) are packed as ONE [sum N, K] weight. The first
  sibling called on an input runs the fused GEMM; the others called on that same tensor
  (identity and ``_version``) take their columns of its output; a sibling called on
  another input runs the fused GEMM again (correct, counted in ``group_gemms``). In a
  compiled graph the siblings trace as separate ops, and :class:`GroupSiblingLinears`
  (an Inductor post-grad pass; the engine's compiled step uses it) merges the ops that
  read the same input into one ``prefixattn::onednn_linear_group`` call. A decode step of
  a Llama layer: 4 GEMMs instead of 7 (the small k/v GEMMs ran at half the bandwidth
  of the fused one, ``benchmarks/results/cpu-linear-*.md``), and 90 fewer op calls for
  SmolLM2's 30 layers.

::

    x ─┬─ q_proj ─┐                 x ── [q|k|v] packed ── y[.., :Nq]      -> q
       ├─ k_proj ─┤  one GEMM:                          └─ y[.., Nq:Nq+Nk] -> k
       └─ v_proj ─┘                                     └─ y[.., Nq+Nk:]   -> v

The packed copies add the linear weights' bytes once more (the originals stay: tied
embeddings and the bank read them).
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import shutil
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "SIBLINGS",
    "GroupSiblingLinears",
    "PackedLinears",
    "native_linear_ops",
    "native_linear_stats",
    "onednn_linear",
    "onednn_linear_group",
    "onednn_packing",
    "pack_linears",
]

log = logging.getLogger(__name__)

# the M a packed layout is tuned for (oneDNN's hint; any M is served): a decode step's rows
BATCH_HINT = 16
# while releasing originals: bytes released between two trims of the heap
TRIM_BYTES = 16 * 2**20

# names of sibling nn.Linear children that one forward calls on the same input, in the
# order their outputs are laid side by side in the fused weight
SIBLINGS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),  # Llama, Mistral, Qwen, Gemma, Phi, OLMo, ...
    ("gate_proj", "up_proj"),  # their gated MLPs
)


@functools.cache
def onednn_packing(dtype: torch.dtype) -> str | None:
    """None when oneDNN packs ``dtype`` linear weights on this CPU, else why not."""
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch build has no oneDNN (mkldnn)"
    try:
        w = torch.ones(8, 8, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 8, dtype=dtype), packed, None,
                                               "none", [], "")  # fmt: skip
    except (RuntimeError, AttributeError) as e:  # no op, or no instructions for dtype
        return f"oneDNN cannot pack {dtype} here: {str(e).splitlines()[0]}"
    if y.dtype != dtype or not bool((y == 8).all()):
        return f"oneDNN's packed {dtype} linear gave a wrong value on a probe"
    return None


@dataclass
class _Packed:
    """One module's packed state: the weight it packed (identity and version) and the copy."""

    weight: torch.Tensor
    version: int
    packed: torch.Tensor


def _bias_keys(biases: list[torch.Tensor | None]) -> list[tuple[int, int] | None]:
    """(data pointer, version) of each bias: replaced or changed in place shows."""
    return [None if b is None else (b.data_ptr(), b._version) for b in biases]


class _Group:
    """Sibling linears packed as one weight [sum N, K] (their weights side by side, in
    :data:`SIBLINGS` order), and the last fused output, for the siblings that follow."""

    def __init__(self, modules: list[nn.Module], batch_hint: int) -> None:
        self.modules = modules
        self.batch_hint = batch_hint
        self.sizes = [m.weight.shape[0] for m in modules]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(modules))]
        self.x: weakref.ref | None = None  # the input of the last fused GEMM ...
        self.x_version = -1
        self.y: torch.Tensor | None = None  # ... and its output, until every sibling took it
        self.served: set[int] = set()
        self.pack()

    def pack(self) -> None:
        """(Re)pack the members' current weights; register the group for the op."""
        self.drop()
        mods = self.modules
        self.weights = [m.weight for m in mods]
        self.versions = [w._version for w in self.weights]
        self.key = tuple(w.data_ptr() for w in self.weights)
        with torch.no_grad():
            w = torch.cat([m.weight.detach() for m in mods])  # [sum N, K]
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w, self.batch_hint)
            if all(m.bias is None for m in mods):
                self.bias = None
            else:  # a missing bias adds zeros: exact
                self.bias = torch.cat([
                    m.bias.detach() if m.bias is not None else w.new_zeros(n)
                    for m, n in zip(mods, self.sizes)
                ])  # fmt: skip
        self.biases = [m.bias for m in mods]  # held: no other tensor takes their pointers
        self.bias_keys = _bias_keys(self.biases)
        _GROUPS[self.key] = self

    def serves(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> bool:
        """The op's check (it gets tensors, not modules; looked up by the weights' data
        pointers, which no other tensor can take while the group holds the weights):
        the weights and biases are unchanged since they were packed (their versions)."""
        unchanged = [w._version for w in weights] == self.versions
        return unchanged and _bias_keys(biases) == self.bias_keys

    def current(self) -> bool:
        """The members' weights and biases are the ones packed, unchanged."""
        mods = self.modules
        return all(m.weight is w for m, w in zip(mods, self.weights)) and self.serves(
            self.weights, [m.bias for m in mods]
        )

    def drop(self) -> None:
        """Unregister (and forget the last output)."""
        key = getattr(self, "key", None)
        if key is not None and _GROUPS.get(key) is self:
            del _GROUPS[key]
        self.x = self.y = None
        self.served = set()

    def release(self, ok: Callable[[torch.Tensor], bool]) -> int:
        """Swap the weights ``ok`` allows for stubs (their values live in the packed
        copy); re-register under the stubs' pointers. Returns the bytes freed."""
        freed = 0
        for m in self.modules:
            if ok(m.weight):
                freed += _release(m.weight)
        drop_key = self.key
        if _GROUPS.get(drop_key) is self:
            del _GROUPS[drop_key]
        self.versions = [w._version for w in self.weights]
        self.key = tuple(w.data_ptr() for w in self.weights)
        _GROUPS[self.key] = self
        return freed

    def dense(self, i: int) -> torch.Tensor:
        """Member ``i``'s weight [N_i, K], from the packed copy (exact: a reorder)."""
        return self.packed.to_dense()[self.offsets[i] : self.offsets[i] + self.sizes[i]]

    def restore(self) -> None:
        """Give released weights their values back (from the packed copy)."""
        if any(_is_released(w) for w in self.weights):
            full = self.packed.to_dense()
            for w, o, n in zip(self.weights, self.offsets, self.sizes):
                if _is_released(w):
                    _unrelease(w, full[o : o + n].clone())

    def columns(self, i: int, y: torch.Tensor) -> torch.Tensor:
        """Member ``i``'s columns of a fused output (a view)."""
        return y[..., self.offsets[i] : self.offsets[i] + self.sizes[i]]


# the C++ kernels of the two ops once loaded (one element), and why not, once tried
# (one element): see native_linear_ops
_NATIVE: list[Any] = []
_NATIVE_WHY: list[str] = []
# set to 0 to keep the ops' Python kernels (the C++ ones are then never built or loaded)
NATIVE_ENV = "PREFIXATTN_NATIVE_LINEAR"


class _Mirrored(dict):
    """A registry the native kernels (:func:`native_linear_ops`) read a copy of: every
    entry put or removed here is put or removed there too."""

    def __init__(self, put: Callable[[Any, Any, Any], None], remove: Callable[[Any, Any], None]):
        super().__init__()
        self._put, self._remove = put, remove

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        if _NATIVE:
            self._put(_NATIVE[0], key, value)

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)
        if _NATIVE:
            self._remove(_NATIVE[0], key)

    def pop(self, key: Any, *default: Any) -> Any:
        if key in self:
            value = self[key]
            del self[key]
            return value
        return super().pop(key, *default)

    def sync(self) -> None:
        """Put every entry (the native side was just loaded)."""
        for key, value in self.items():
            self._put(_NATIVE[0], key, value)


def _put_group(ext: Any, key: tuple[int, ...], g: _Group) -> None:
    bias_keys = [k or (0, 0) for k in g.bias_keys]
    ext.put_group(list(key), g.packed, g.bias, list(g.versions),
                  [p for p, _ in bias_keys], [v for _, v in bias_keys])  # fmt: skip


# weights' data_ptrs (SIBLINGS order) -> their group, for the compiled path's group op
_GROUPS: dict[tuple[int, ...], _Group] = _Mirrored(
    _put_group, lambda ext, key: ext.remove_group(list(key))
)
# data_ptr of each released weight's stub (see PackedLinears, ``release_weights``)
_RELEASED: set[int] = set()


def _release(w: torch.Tensor) -> int:
    """Swap ``w``'s data for a stub of its shape (one element of storage, its own, so
    the pointer still names this weight); returns the bytes freed."""
    nbytes = w.numel() * w.element_size()
    w.data = torch.empty(1, dtype=w.dtype, device=w.device).expand(w.shape)
    _RELEASED.add(w.data_ptr())
    return nbytes


def _is_released(w: torch.Tensor) -> bool:
    return w.data_ptr() in _RELEASED and w.stride() == (0,) * w.dim()


def _unrelease(w: torch.Tensor, values: torch.Tensor) -> None:
    _RELEASED.discard(w.data_ptr())
    w.data = values


def _give_back_to_os() -> None:
    """Ask glibc's malloc to return freed memory to the OS (``malloc_trim(0)``): after a
    burst of large frees (the released weights) it keeps the pages otherwise (measured,
    SmolLM2: 1659 MB resident without it, 1234 MB with it). No-op where there is none."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _no_weight_grad(w: torch.Tensor) -> None:
    """A call that wants a released weight's gradient: refused (the dense copy made for
    the call is not the parameter), never a silently missing gradient."""
    if torch.is_grad_enabled() and w.requires_grad:
        raise RuntimeError(
            "this linear weight's values live only in its packed copy "
            "(pack_linears(release_weights=True), the serving engine's default) and the "
            "call wants its gradient: revert the packing (Engine.stop()) before training, "
            "or serve with keep_linear_weights=True (--keep-linear-weights)"
        )


def _changed_released(what: str) -> RuntimeError:
    return RuntimeError(
        f"{what} was changed in place while its values lived only in its packed copy "
        "(pack_linears(release_weights=True), the serving engine's default): revert the "
        "packing (Engine.stop()) before changing weights in place, or assign a new weight"
    )


def _is_conv1d(mod: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's projections): a linear layer with its weight
    stored transposed, [in, out], ``y = x @ W + b``."""
    return type(mod).__name__ == "Conv1D" and type(mod).__module__.startswith("transformers")


# weight.data_ptr() -> its packed state, for the compiled path's op (which sees tensors,
# not modules); entries added and removed by the PackedLinears that made them
_REGISTRY: dict[int, _Packed] = _Mirrored(
    lambda ext, key, st: ext.put_single(key, st.packed, st.version),
    lambda ext, key: ext.remove_single(key),
)
# calls of the op that found no current packed copy (ran torch's linear, the same math)
OP_FALLBACKS = [0]


# The two ops are defined with torch.library.Library rather than ``custom_op``: a call of
# a custom_op goes through its Python autograd wrapper, which cost ~50 us per call here
# (measured: 72-92 us vs 38-44 us per call of an 8x64 linear; a decode step of SmolLM2
# makes 121 calls). They are inference-only (no autograd formula): the packed forward
# sends every call that wants gradients to the module's own forward.
_LIB = torch.library.Library("prefixattn", "FRAGMENT")
_LIB.define("onednn_linear(Tensor x, Tensor weight, Tensor? bias, bool transposed=False) -> Tensor")
_LIB.define("onednn_linear_group(Tensor x, Tensor[] weights, Tensor?[] biases) -> Tensor")


@functools.cache
def _linear_pointwise() -> Any:
    """oneDNN's packed linear, the overload itself (the op packet's lookup costs a few
    microseconds per call: 121 calls per SmolLM2 decode step)."""
    return torch.ops.mkldnn._linear_pointwise.default


def _onednn_linear_impl(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool = False
) -> torch.Tensor:
    st = _REGISTRY.get(weight.data_ptr())
    if st is None or st.version != weight._version or x.numel() == 0:
        if _is_released(weight):
            if st is None or st.version != weight._version:
                raise _changed_released("a linear weight")
            weight, transposed = st.packed.to_dense(), False  # empty x: any dense weight
        OP_FALLBACKS[0] += 1
        return torch.nn.functional.linear(x, weight.t() if transposed else weight, bias)
    return _linear_pointwise()(x, st.packed, bias, "none", [], "")


def _onednn_linear_fake(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool = False
) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[1] if transposed else weight.shape[0])


_LIB.impl("onednn_linear", _onednn_linear_impl, "CompositeExplicitAutograd")
torch.library.register_fake("prefixattn::onednn_linear", _onednn_linear_fake, lib=_LIB)


def onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool = False
) -> torch.Tensor:
    """``x @ weight^T + bias`` over ``weight``'s oneDNN-packed copy (registered by a
    :class:`PackedLinears`), as the op ``prefixattn::onednn_linear``: what a packed
    module's forward becomes in a ``torch.compile`` graph, an opaque call Inductor keeps
    (it sees ``weight`` as a graph input, never the packed copy). A weight without a
    current packed copy (reverted, changed in place, a member of a sibling group run
    alone) or an empty ``x``: ``torch.nn.functional.linear`` (counted in
    :data:`OP_FALLBACKS`). ``transposed``: ``weight`` is [in, out] (transformers'
    ``Conv1D``), else [out, in]. Inference only."""
    return torch.ops.prefixattn.onednn_linear.default(x, weight, bias, transposed)


def _group_plan(weights: list[torch.Tensor]) -> list[_Group | _Packed | None]:
    """How to run ``weights`` side by side: runs of them that are a packed group (in its
    order), single packed weights, and None (no packed copy: torch's linear)."""
    key = [w.data_ptr() for w in weights]
    sizes = sorted({len(k) for k in _GROUPS}, reverse=True)
    plan: list[_Group | _Packed | None] = []
    i = 0
    while i < len(key):
        g = next((_GROUPS[k] for n in sizes if (k := tuple(key[i : i + n])) in _GROUPS), None)
        if g is not None:
            plan.append(g)
            i += len(g.key)
        else:
            plan.append(_REGISTRY.get(key[i]))
            i += 1
    return plan


def _onednn_linear_group_impl(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]
) -> torch.Tensor:
    g = _GROUPS.get(tuple(map(torch.Tensor.data_ptr, weights)))
    if g is not None and x.numel() and g.serves(weights, biases):  # one group, one GEMM
        return _linear_pointwise()(x, g.packed, g.bias, "none", [], "")
    outs, i = [], 0
    for part in _group_plan(weights) if x.numel() else [None] * len(weights):
        n = len(part.key) if isinstance(part, _Group) else 1
        if isinstance(part, _Group) and part.current():
            outs.append(
                torch.ops.mkldnn._linear_pointwise(x, part.packed, part.bias, "none", [], "")
            )
        elif isinstance(part, _Packed) and part.version == weights[i]._version:
            outs.append(
                torch.ops.mkldnn._linear_pointwise(x, part.packed, biases[i], "none", [], "")
            )
        else:  # no current packed copy: torch's linear, counted
            if any(_is_released(w) for w in weights[i : i + n]) and x.numel():
                raise _changed_released("a linear weight")
            OP_FALLBACKS[0] += n
            outs += [torch.nn.functional.linear(x, w, b)
                     for w, b in zip(weights[i : i + n], biases[i : i + n])]  # fmt: skip
        i += n
    return torch.cat(outs, -1)


def _onednn_linear_group_fake(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]
) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], sum(w.shape[0] for w in weights))


_LIB.impl("onednn_linear_group", _onednn_linear_group_impl, "CompositeExplicitAutograd")
torch.library.register_fake("prefixattn::onednn_linear_group", _onednn_linear_group_fake, lib=_LIB)


def onednn_linear_group(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]
) -> torch.Tensor:
    """``cat([x @ w^T + b for w, b in zip(weights, biases)], -1)`` as ONE GEMM over the
    siblings' fused packed weight (a :class:`PackedLinears` group whose weights are
    ``weights`` in this order), as the op ``prefixattn::onednn_linear_group``: what
    :class:`GroupSiblingLinears` makes of sibling :func:`onednn_linear` calls on one
    input. Weights that are not one group (several groups that read the same input, as
    in a parallel attention + MLP block; another order) run as the groups and packed
    weights they hold, outputs concatenated; a weight without a current packed copy
    (reverted, changed in place) or an empty ``x``: ``torch.nn.functional.linear``
    (counted in :data:`OP_FALLBACKS`, one per weight). Inference only."""
    return torch.ops.prefixattn.onednn_linear_group.default(x, weights, biases)


def native_linear_ops() -> str | None:
    """Build (once per source; torch's extension cache keeps it) and load the C++ CPU
    kernels of :func:`onednn_linear` and :func:`onednn_linear_group`
    (``cpu_linear_ops.cpp``). They serve a call whose weights have a current packed
    copy without Python and without the GIL (a compiled step calls the ops from
    Inductor's C++ wrapper: 121 calls per SmolLM2 decode step); every other call runs
    the Python kernel, as before. Returns None when they are loaded, else why not (the
    Python kernels serve the ops then; the reason is logged once). ``PREFIXATTN_NATIVE_LINEAR=0``
    keeps the Python kernels."""
    if _NATIVE:
        return None
    if not _NATIVE_WHY:
        why = _load_native()
        if why is None:
            return None
        _NATIVE_WHY.append(why)
        log.warning("linear ops: the Python kernels serve the packed linears (%s)", why)
    return _NATIVE_WHY[0]


def _load_native() -> str | None:
    if os.environ.get(NATIVE_ENV, "1") == "0":
        return f"{NATIVE_ENV}=0"
    if (why := onednn_packing(torch.float32)) is not None:
        return why
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # pip's ninja (the serve extra) off PATH: a venv
        try:  # run without activating it; torch's builder looks for ninja on PATH
            import ninja

            os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
        except (ImportError, AttributeError):
            pass  # the build says what is missing
    src = Path(__file__).with_name("cpu_linear_ops.cpp")
    t0 = time.perf_counter()
    try:
        ext = cpp_extension.load(
            name="prefixattn_cpu_linear_ops", sources=[str(src)], extra_cflags=["-O2"]
        )
    except Exception as e:  # no compiler, no headers, a build error: the Python kernels
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        return f"building {src.name} failed: {lines[-1] if lines else type(e).__name__}"
    ext.set_fallbacks(_onednn_linear_impl, _onednn_linear_group_impl)
    atexit.register(ext.clear)  # the table's tensors go before the interpreter does
    _NATIVE.append(ext)
    _REGISTRY.sync()  # type: ignore[attr-defined]
    _GROUPS.sync()  # type: ignore[attr-defined]
    log.info("linear ops: C++ kernels loaded in %.1f s", time.perf_counter() - t0)
    return None


def native_linear_stats() -> dict[str, Any] | None:
    """The C++ kernels' counters (calls served natively, calls handed to Python; entries
    mirrored), or None when they are not loaded."""
    return dict(_NATIVE[0].stats()) if _NATIVE else None


@functools.cache
def _pass_hash() -> str:
    """What keys Inductor's cache for graphs the pass ran on: the source of the pass and
    of the helpers it calls, and the ops' schemas. Not the rest of this file: the ops'
    run-time bodies (what a call does with the packed weights) are not in the compiled
    graph, so changing them does not cost a user the next start-up's compile."""
    import hashlib
    import inspect

    parts = [inspect.getsource(f) for f in (GroupSiblingLinears, _group_op, _op_args,
                                            _weight_rows, _fake)]  # fmt: skip
    parts += [str(torch.ops.prefixattn.onednn_linear.default._schema),
              str(torch.ops.prefixattn.onednn_linear_group.default._schema)]  # fmt: skip
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


try:
    from torch._inductor.custom_graph_pass import CustomGraphPass as _PassBase
except ImportError:  # pragma: no cover - older torch
    _PassBase = object  # type: ignore[assignment,misc]


class GroupSiblingLinears(_PassBase):  # type: ignore[misc,valid-type]
    """Inductor post-grad pass: :func:`onednn_linear` calls (not transposed) that read the
    same input node become one :func:`onednn_linear_group` call and a slice per call::

        q = onednn_linear(x, wq, bq)             qkv = onednn_linear_group(x, [wq, wk, wv],
        k = onednn_linear(x, wk, bk)      ->                               [bq, bk, bv])
        v = onednn_linear(x, wv, bv)             q, k, v = qkv[.., 0:Nq], qkv[.., Nq:Nq+Nk], ...

    Which weights are packed groups is known at run time only: the group op runs the
    groups it finds among its weights (q/k/v and gate/up that read one input: two GEMMs). Use it as
    ``torch.compile(fn, options={"post_grad_custom_post_pass": GroupSiblingLinears()})``.
    """

    def __call__(self, graph: torch.fx.Graph) -> None:
        single = torch.ops.prefixattn.onednn_linear.default
        order = {n: i for i, n in enumerate(graph.nodes)}
        by_input: dict[torch.fx.Node, list[torch.fx.Node]] = {}
        for n in graph.nodes:
            if n.op != "call_function" or n.target is not single:
                continue
            args = _op_args(n)
            if args is None or args[3] or not isinstance(args[0], torch.fx.Node):
                continue
            by_input.setdefault(args[0], []).append(n)
        for x, nodes in by_input.items():
            if len(nodes) < 2:
                continue
            first = nodes[0]
            ws = [_op_args(n)[1] for n in nodes]
            bs = [_op_args(n)[2] for n in nodes]
            # every weight / bias must exist before the first call (they are graph inputs)
            if any(isinstance(a, torch.fx.Node) and order[a] > order[first] for a in ws + bs):
                continue
            with graph.inserting_before(first):
                fused = graph.call_function(_group_op(), (x, ws, bs))
                _fake(fused, x, ws, bs)
                start = 0
                for n in nodes:
                    width = n.meta["val"].shape[-1] if "val" in n.meta else None
                    if width is None:
                        width = _weight_rows(n)
                    sl = graph.call_function(
                        torch.ops.aten.slice.Tensor, (fused, -1, start, start + width)
                    )
                    if "val" in fused.meta:
                        sl.meta["val"] = fused.meta["val"][..., start : start + width]
                    start += width
                    n.replace_all_uses_with(sl)
            for n in nodes:
                graph.erase_node(n)

    def uuid(self) -> Any:
        return _pass_hash()


def _group_op() -> Any:
    return torch.ops.prefixattn.onednn_linear_group.default


def _op_args(n: torch.fx.Node) -> tuple | None:
    """(x, weight, bias, transposed) of an :func:`onednn_linear` node."""
    names = ("x", "weight", "bias", "transposed")
    vals = list(n.args) + [None] * (4 - len(n.args))
    for i, name in enumerate(names):
        if name in n.kwargs:
            vals[i] = n.kwargs[name]
    if vals[0] is None or vals[1] is None:
        return None
    vals[3] = bool(vals[3])
    return tuple(vals)


def _weight_rows(n: torch.fx.Node) -> int:
    w = _op_args(n)[1]
    return int(w.meta["val"].shape[0])


def _fake(node: torch.fx.Node, x: Any, ws: list, bs: list) -> None:
    """Set the group node's ``meta['val']`` from its inputs' fake values."""

    def val(a: Any) -> Any:
        return a.meta.get("val") if isinstance(a, torch.fx.Node) else a

    xv = val(x)
    if xv is None or not hasattr(xv, "fake_mode"):
        return
    with xv.fake_mode:
        node.meta["val"] = _group_op()(xv, [val(w) for w in ws], [val(b) for b in bs])


class PackedLinears:
    """The packed ``nn.Linear`` modules of one model (see the module docstring); made by
    :func:`pack_linears`. A context manager: leaving it reverts."""

    def __init__(
        self, model: nn.Module, batch_hint: int = BATCH_HINT, release_weights: bool = False
    ) -> None:
        self.batch_hint = batch_hint
        self.released = 0  # weights whose values live in the packed copy only
        self.released_bytes = 0
        self._trimmed = 0  # released_bytes at the last trim
        self.packed_calls = 0
        self.plain_calls = 0
        self.repacks = 0
        self.group_gemms = 0  # fused GEMMs run by a group's eager forward
        self.sibling_hits = 0  # sibling calls served from that GEMM's output
        self.skipped: dict[str, str] = {}  # module name -> why it was left alone
        self._modules: list[nn.Module] = []  # the packed ones
        self._state: dict[int, _Packed] = {}
        self._conv1d: dict[int, bool] = {}
        self._groups: list[_Group] = []
        packable: dict[int, bool] = {}  # id(module) -> conv1d, for the ones to pack
        for name, mod in model.named_modules():
            conv1d = _is_conv1d(mod)
            if not (conv1d or isinstance(mod, nn.Linear)):
                continue
            w = mod.weight
            why = None
            if not conv1d and type(mod) is not nn.Linear:  # a subclass: its own forward
                why = f"{type(mod).__name__} is not nn.Linear itself"
            elif "forward" in mod.__dict__:  # wrapped by someone else: theirs stays
                why = "the module has an instance forward already"
            elif w.device.type != "cpu":
                why = f"weight on {w.device.type}"
            elif w.dim() != 2 or w.layout != torch.strided:
                why = "weight layout"
            else:
                why = onednn_packing(w.dtype)
            if why is not None:
                self.skipped[name] = why
                continue
            packable[id(mod)] = conv1d
        # released as packed, one weight after another: the peak holds one extra copy,
        # not the model's linear weights twice
        release = self._release_rule(model) if release_weights else None
        grouped: set[int] = set()
        for parent in model.modules():
            children = dict(parent.named_children())
            for names in SIBLINGS:
                mods = [children.get(n) for n in names]
                if not _groupable(mods, packable):
                    continue
                group = _Group(mods, batch_hint)  # type: ignore[arg-type]
                self._groups.append(group)
                if release is not None:
                    self.released_bytes += group.release(release)
                    self._trim_every(TRIM_BYTES)
                for i, m in enumerate(mods):
                    m.forward = self._member_forward(m, group, i)  # type: ignore[union-attr]
                    self._modules.append(m)  # type: ignore[arg-type]
                    grouped.add(id(m))
        for mod in model.modules():
            if id(mod) not in packable or id(mod) in grouped:
                continue
            conv1d = packable[id(mod)]
            st = self._state[id(mod)] = self._pack(mod.weight, conv1d)
            self._conv1d[id(mod)] = conv1d
            mod.forward = self._forward_of(mod, conv1d)  # type: ignore[method-assign]
            self._modules.append(mod)
            if release is not None and release(st.weight):
                del _REGISTRY[st.weight.data_ptr()]
                self.released_bytes += _release(st.weight)
                st.version = st.weight._version
                _REGISTRY[st.weight.data_ptr()] = st
                self._trim_every(TRIM_BYTES)
        self.num_packed = len(self._modules)
        self.num_grouped = len(grouped)
        self.num_groups = len(self._groups)
        if release is not None:
            self.released = sum(_is_released(w) for w in self._weights())
            _give_back_to_os()
            log.info("linear layers: %.0f MB of original weights released (their values in "
                     "the packed copies)", self.released_bytes / 2**20)  # fmt: skip

    def _trim_every(self, nbytes: int) -> None:
        """Give freed pages back to the OS once ``nbytes`` more were released: a packed
        copy (a group's is larger than each original) does not fit the holes the
        originals leave, so without it the peak held both (SmolLM2: 1563 MB peak)."""
        if self.released_bytes - self._trimmed >= nbytes:
            _give_back_to_os()
            self._trimmed = self.released_bytes

    @staticmethod
    def _release_rule(model: nn.Module) -> Callable[[torch.Tensor], bool]:
        """Which packed weights to release: those not tied to another parameter (an LM
        head tied to the embeddings stays)."""
        seen: dict[int, int] = {}
        for _, prm in model.named_parameters(remove_duplicate=False):
            seen[id(prm)] = seen.get(id(prm), 0) + 1

        def ok(w: torch.Tensor) -> bool:
            return seen.get(id(w), 0) == 1 and not _is_released(w)

        return ok

    def _weights(self) -> list[torch.Tensor]:
        return [st.weight for st in self._state.values()] + [
            w for g in self._groups for w in g.weights
        ]

    @property
    def active(self) -> bool:
        """Whether the modules run packed now (False after :meth:`revert`)."""
        return bool(self._modules)

    def _pack(self, w: torch.Tensor, transposed: bool, old: _Packed | None = None) -> _Packed:
        if old is not None:
            if old.weight is w and _is_released(w):
                raise _changed_released("a packed linear weight")
            if _is_released(old.weight):  # replaced: the old one gets its values back
                _unrelease(old.weight, self._dense(old, transposed))
            _REGISTRY.pop(old.weight.data_ptr(), None)
        with torch.no_grad():
            w2 = w.detach().t().contiguous() if transposed else w.detach()  # [out, in]
            packed = torch.ops.mkldnn._reorder_linear_weight(w2, self.batch_hint)
        st = _REGISTRY[w.data_ptr()] = _Packed(w, w._version, packed)
        return st

    @staticmethod
    def _dense(st: _Packed, transposed: bool) -> torch.Tensor:
        """The weight's values from its packed copy, in the module's own layout."""
        w = st.packed.to_dense()  # [out, in]
        return w.t().contiguous() if transposed else w

    def _forward_of(
        self, mod: nn.Module, transposed: bool
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        own = type(mod).forward.__get__(mod)
        state = self._state

        def plain(x: torch.Tensor) -> torch.Tensor:  # the module's math, released or not
            st = state.get(id(mod))
            if st is None or not _is_released(mod.weight) or st.weight is not mod.weight:
                return own(x)
            _no_weight_grad(mod.weight)
            return torch.nn.functional.linear(x, self._dense(st, False), mod.bias)

        def forward(x: torch.Tensor) -> torch.Tensor:
            w = mod.weight
            if (
                x.dtype != w.dtype
                or x.device != w.device
                or torch.is_autocast_enabled("cpu")  # autocast picks the dtype: its linear
                or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))
            ):
                if not torch.compiler.is_compiling():
                    self.plain_calls += 1
                return plain(x)
            if torch.compiler.is_compiling():  # traced: the op (no counters in a graph)
                return torch.ops.prefixattn.onednn_linear(x, w, mod.bias, transposed)
            if x.numel() == 0:
                self.plain_calls += 1
                return plain(x)
            st = state[id(mod)]
            if st.weight is not w or st.version != w._version:
                st = state[id(mod)] = self._pack(w, transposed, st)
                self.repacks += 1
            self.packed_calls += 1
            return torch.ops.mkldnn._linear_pointwise(x, st.packed, mod.bias, "none", [], "")

        return forward

    def _member_forward(
        self, mod: nn.Module, group: _Group, i: int
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """Member ``i`` of ``group``: its columns of the group's fused GEMM over ``x``
        (run now, or taken from the sibling's call on this very ``x``)."""
        own = type(mod).forward.__get__(mod)

        def plain(x: torch.Tensor) -> torch.Tensor:  # the module's math, released or not
            if not _is_released(mod.weight):
                return own(x)
            _no_weight_grad(mod.weight)
            return torch.nn.functional.linear(x, group.dense(i), mod.bias)

        def forward(x: torch.Tensor) -> torch.Tensor:
            w = mod.weight
            if (
                x.dtype != w.dtype
                or x.device != w.device
                or torch.is_autocast_enabled("cpu")
                or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))
            ):
                if not torch.compiler.is_compiling():
                    self.plain_calls += 1
                return plain(x)
            if torch.compiler.is_compiling():  # traced: GroupSiblingLinears fuses siblings
                return torch.ops.prefixattn.onednn_linear(x, w, mod.bias, False)
            if x.numel() == 0:
                self.plain_calls += 1
                return plain(x)
            if not group.current():
                if any(
                    m.weight is w and _is_released(w) and w._version != v
                    for m, w, v in zip(group.modules, group.weights, group.versions)
                ):
                    raise _changed_released(f"the weight of sibling {i} of a group")
                group.restore()  # the members still released get their values back
                group.pack()
                self.repacks += 1
            last = group.x() if group.x is not None else None
            if last is x and group.x_version == x._version and i not in group.served:
                self.sibling_hits += 1
            else:
                group.y = torch.ops.mkldnn._linear_pointwise(
                    x, group.packed, group.bias, "none", [], ""
                )
                group.x, group.x_version, group.served = weakref.ref(x), x._version, set()
                self.group_gemms += 1
            y = group.y
            group.served.add(i)
            if len(group.served) == len(group.modules):  # every sibling took its part
                group.x = group.y = None
            self.packed_calls += 1
            return group.columns(i, y)

        return forward

    def revert(self) -> None:
        """Give every module its own ``forward`` (and released weights their values)
        back and drop the packed copies."""
        for mod in self._modules:
            mod.__dict__.pop("forward", None)
        for st in self._state.values():  # unregistered under the pointer it has now,
            if _REGISTRY.get(st.weight.data_ptr()) is st:  # before a released weight's
                del _REGISTRY[st.weight.data_ptr()]  # values come back (a new pointer)
        for mid, st in self._state.items():
            if _is_released(st.weight):
                _unrelease(st.weight, self._dense(st, self._conv1d.get(mid, False)))
        for g in self._groups:
            g.restore()
            g.drop()
        self._modules.clear()
        self._state.clear()
        self._groups.clear()

    def stats(self) -> dict[str, Any]:
        """The path and counts (for metrics): modules packed / skipped, calls each way."""
        return {
            "path": "onednn-packed" if self.num_packed else "torch",
            "active": self.active,
            "modules_packed": self.num_packed,
            "modules_skipped": len(self.skipped),
            "modules_grouped": self.num_grouped,
            "groups": self.num_groups,
            "packed_calls": self.packed_calls,
            "group_gemms": self.group_gemms,
            "sibling_hits": self.sibling_hits,
            "plain_calls": self.plain_calls,
            "repacks": self.repacks,
            "weights_released": self.released,
            "released_bytes": self.released_bytes,
        }

    def __enter__(self) -> PackedLinears:
        return self

    def __exit__(self, *exc: object) -> None:
        self.revert()


def _groupable(mods: list[nn.Module | None], packable: dict[int, bool]) -> bool:
    """Siblings to pack as one weight: all present, packable plain nn.Linear (not
    Conv1D), one in_features, dtype and device."""
    if any(m is None or packable.get(id(m), True) for m in mods):  # absent / Conv1D
        return False
    ws = [m.weight for m in mods]  # type: ignore[union-attr]
    return len({(w.shape[1], w.dtype, w.device) for w in ws}) == 1


def pack_linears(
    model: nn.Module, batch_hint: int = BATCH_HINT, release_weights: bool = False
) -> PackedLinears:
    """Run ``model``'s CPU ``nn.Linear`` modules over oneDNN-packed weights (inference;
    see the module docstring). Returns the handle that reverts it; logs how many modules
    were packed and why any were not.

    ``release_weights``: free the original of every packed weight not tied to another
    parameter (its values then live in the packed copy only, as vLLM's CPU backend does):
    the model's linear weights are held once, not twice. While packed, such a
    ``module.weight`` is a stub of the right shape and dtype (one element of storage:
    torch refuses writes into it; its values are not the weight's): the module's forward
    and :meth:`PackedLinears.revert` are the ways back to them. The module's own math
    still runs where the packed path does not apply (autocast, an input that wants
    gradients: over a dense copy made for the call); a call that wants the weight's own
    gradient is an error. :meth:`~PackedLinears.revert` restores the values exactly."""
    if not isinstance(batch_hint, int) or batch_hint < 1:
        raise ValueError(f"batch_hint must be an int >= 1, got {batch_hint!r}")
    if not isinstance(release_weights, bool):
        raise ValueError(f"release_weights must be a bool, got {release_weights!r}")
    handle = PackedLinears(model, batch_hint, release_weights)
    reasons = sorted(set(handle.skipped.values()))
    log.info(
        "linear layers: %d packed for oneDNN (%d of them as %d sibling groups), %d left to "
        "nn.Linear%s", handle.num_packed, handle.num_grouped, handle.num_groups,
        len(handle.skipped), f" ({'; '.join(reasons)})" if reasons else "",
    )  # fmt: skip
    return handle
