"""Mixed precision: :func:`prefixattn.prefix_attention` under ``torch.autocast``.

The policy is PyTorch's own for ``scaled_dot_product_attention`` ("lower precision fp"):
under an autocast region enabled for the device type of ``q``, every floating-point input
tensor on that device type, except float64, is cast to the region's dtype (bf16 or fp16),
and the attention runs with autocast off on those tensors; the output has the autocast
dtype. So the usual mixed inputs of a RoPE model under autocast (``q``, ``k`` float32 out
of the rotary embedding, ``v`` bf16 out of an autocast linear, a float32 prefix) run as one
bf16 call, exactly as stock SDPA attention runs them. The casts are ordinary autograd ops:
float32 prefix parameters (master weights) get float32 gradients.

What is cast: ``q``, ``k``, ``v``, ``prefix_k``, ``prefix_v``. Attention sinks ([H]
logits) keep their dtype (the kernels read them in float32, as the families' eager code
adds them to float32 softmax logits). Outside autocast nothing is cast: inputs of mixed
dtypes are a ``TypeError`` naming the argument (:mod:`.validation`).

The ``torch.compile`` custom ops declare the same policy for their dispatch keys
(``AutocastCPU``, ``AutocastCUDA``; :func:`register_lower_precision_autocast`), so a
compiled graph sees the casts eager mode makes.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "AUTOCAST_DEVICE_TYPES",
    "any_autocast",
    "autocast_cast",
    "autocast_dtype",
    "autocast_off",
    "register_lower_precision_autocast",
]

#: Device types whose autocast the custom ops declare a rule for.
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")

# device types with an autocast mode (a set: Dynamo folds the test; meta tensors have none)
_HAS_AUTOCAST = frozenset(
    d
    for d in ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "mtia", "maia",
              torch._C._get_privateuse1_backend_name())
    if torch._C._is_autocast_available(d)
)  # fmt: skip
#: Whether any autocast region is enabled (a C call: the cheap test of every call).
any_autocast = torch._C._is_any_autocast_enabled


def autocast_dtype(q: object) -> torch.dtype | None:
    """The dtype an active autocast region casts the inputs of a call with query ``q`` to,
    or None (no region enabled for q's device type, or q not a tensor: validation names it)."""
    if not any_autocast() or not isinstance(q, torch.Tensor):
        return None
    device_type = q.device.type
    if device_type not in _HAS_AUTOCAST or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_cast(t: Any, device_type: str, dtype: torch.dtype) -> Any:
    """``t`` cast to ``dtype`` if autocast casts it (a floating-point tensor on
    ``device_type``, not float64); anything else as it is (validation judges it)."""
    if (
        isinstance(t, torch.Tensor)
        and t.is_floating_point()
        and t.dtype != torch.float64
        and t.dtype != dtype
        and t.device.type == device_type
    ):
        return t.to(dtype)
    return t


def autocast_off(device_type: str) -> Any:
    """A context with autocast off: eager, the C guard (~1 us, a fifth of
    ``torch.autocast(enabled=False)``); while Dynamo traces, ``torch.autocast``, which it
    records in the graph."""
    if torch.compiler.is_compiling():
        return torch.autocast(device_type, enabled=False)
    return torch._C._DisableAutocast()


def register_lower_precision_autocast(lib: torch.library.Library, name: str, casts: int) -> None:
    """Declare SDPA's autocast policy for custom op ``lib::name``: under autocast for a
    device type of :data:`AUTOCAST_DEVICE_TYPES`, its first ``casts`` arguments (the
    attention's tensors) are cast as :func:`autocast_cast` does, to the region's dtype
    (read per call: bf16 or fp16), and the op runs with that autocast key excluded.

    ``torch.library.register_autocast`` takes one fixed dtype per device type; this is the
    same registration (a kernel on the ``Autocast<Device>`` key) with the region's dtype.
    """
    op = getattr(getattr(torch.ops, lib.ns), name).default
    for device_type in AUTOCAST_DEVICE_TYPES:
        if not torch._C._is_autocast_available(device_type):
            continue
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset: Any, *args: Any, _dev: str = device_type, _ks: Any = keyset) -> Any:
            dtype = torch.get_autocast_dtype(_dev)
            head = tuple(autocast_cast(a, _dev, dtype) for a in args[:casts])
            with torch._C._ExcludeDispatchKeyGuard(_ks):
                return op(*head, *args[casts:])

        lib.impl(name, kernel, key, with_keyset=True)
