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
* a weight changed in place or replaced since it was packed (``_version`` / identity)
  is packed again before the call: the packed copy never serves stale weights.

The packed copies add the linear weights' bytes once more (the originals stay: tied
embeddings and the bank read them).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["PackedLinears", "onednn_linear", "onednn_packing", "pack_linears"]

log = logging.getLogger(__name__)

# the M a packed layout is tuned for (oneDNN's hint; any M is served): a decode step's rows
BATCH_HINT = 16


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


def _is_conv1d(mod: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's projections): a linear layer with its weight
    stored transposed, [in, out], ``y = x @ W + b``."""
    return type(mod).__name__ == "Conv1D" and type(mod).__module__.startswith("transformers")


# weight.data_ptr() -> its packed state, for the compiled path's op (which sees tensors,
# not modules); entries added and removed by the PackedLinears that made them
_REGISTRY: dict[int, _Packed] = {}
# calls of the op that found no current packed copy (ran torch's linear, the same math)
OP_FALLBACKS = [0]


@torch.library.custom_op("prefixattn::onednn_linear", mutates_args=())
def onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool = False
) -> torch.Tensor:
    """``x @ weight^T + bias`` over ``weight``'s oneDNN-packed copy (registered by a
    :class:`PackedLinears`): what a packed module's forward becomes in a
    ``torch.compile`` graph, an opaque call Inductor keeps (it sees ``weight`` as a graph
    input, never the packed copy). A weight without a current packed copy (reverted,
    changed in place) or an empty ``x``: ``torch.nn.functional.linear`` (counted in
    :data:`OP_FALLBACKS`). ``transposed``: ``weight`` is [in, out] (transformers'
    ``Conv1D``), else [out, in]."""
    st = _REGISTRY.get(weight.data_ptr())
    if st is None or st.version != weight._version or x.numel() == 0:
        OP_FALLBACKS[0] += 1
        return torch.nn.functional.linear(x, weight.t() if transposed else weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, st.packed, bias, "none", [], "")


@onednn_linear.register_fake
def _(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool = False
) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[1] if transposed else weight.shape[0])


class PackedLinears:
    """The packed ``nn.Linear`` modules of one model (see the module docstring); made by
    :func:`pack_linears`. A context manager: leaving it reverts."""

    def __init__(self, model: nn.Module, batch_hint: int = BATCH_HINT) -> None:
        self.batch_hint = batch_hint
        self.packed_calls = 0
        self.plain_calls = 0
        self.repacks = 0
        self.skipped: dict[str, str] = {}  # module name -> why it was left alone
        self._modules: list[nn.Module] = []  # the packed ones
        self._state: dict[int, _Packed] = {}
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
            self._state[id(mod)] = self._pack(w, conv1d)
            mod.forward = self._forward_of(mod, conv1d)  # type: ignore[method-assign]
            self._modules.append(mod)
        self.num_packed = len(self._modules)

    @property
    def active(self) -> bool:
        """Whether the modules run packed now (False after :meth:`revert`)."""
        return bool(self._modules)

    def _pack(self, w: torch.Tensor, transposed: bool, old: _Packed | None = None) -> _Packed:
        if old is not None:
            _REGISTRY.pop(old.weight.data_ptr(), None)
        with torch.no_grad():
            w2 = w.detach().t().contiguous() if transposed else w.detach()  # [out, in]
            packed = torch.ops.mkldnn._reorder_linear_weight(w2, self.batch_hint)
        st = _REGISTRY[w.data_ptr()] = _Packed(w, w._version, packed)
        return st

    def _forward_of(
        self, mod: nn.Module, transposed: bool
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        plain = type(mod).forward.__get__(mod)
        state = self._state

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

    def revert(self) -> None:
        """Give every module its own ``forward`` back and drop the packed copies."""
        for mod in self._modules:
            mod.__dict__.pop("forward", None)
        for st in self._state.values():
            if _REGISTRY.get(st.weight.data_ptr()) is st:
                del _REGISTRY[st.weight.data_ptr()]
        self._modules.clear()
        self._state.clear()

    def stats(self) -> dict[str, Any]:
        """The path and counts (for metrics): modules packed / skipped, calls each way."""
        return {
            "path": "onednn-packed" if self.num_packed else "torch",
            "active": self.active,
            "modules_packed": self.num_packed,
            "modules_skipped": len(self.skipped),
            "packed_calls": self.packed_calls,
            "plain_calls": self.plain_calls,
            "repacks": self.repacks,
        }

    def __enter__(self) -> PackedLinears:
        return self

    def __exit__(self, *exc: object) -> None:
        self.revert()


def pack_linears(model: nn.Module, batch_hint: int = BATCH_HINT) -> PackedLinears:
    """Run ``model``'s CPU ``nn.Linear`` modules over oneDNN-packed weights (inference;
    see the module docstring). Returns the handle that reverts it; logs how many modules
    were packed and why any were not."""
    if not isinstance(batch_hint, int) or batch_hint < 1:
        raise ValueError(f"batch_hint must be an int >= 1, got {batch_hint!r}")
    handle = PackedLinears(model, batch_hint)
    reasons = sorted(set(handle.skipped.values()))
    log.info(
        "linear layers: %d packed for oneDNN, %d left to nn.Linear%s",
        handle.num_packed, len(handle.skipped), f" ({'; '.join(reasons)})" if reasons else "",
    )  # fmt: skip
    return handle
