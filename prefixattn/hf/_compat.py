"""Names that moved between the transformers releases prefixattn supports (>= 5.10).

transformers renamed the KV-cache argument and output field ``past_key_values`` to
``cache`` (the old name warns with a ``FutureWarning`` and goes away in 5.40). prefixattn
passes and reads the cache under whichever name the installed release (and the model at
hand) uses, and accepts either name from its callers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["CACHE_NAMES", "cache_arg", "cache_kwarg", "output_cache", "output_cache_field"]

CACHE_NAMES = ("cache", "past_key_values")


def cache_kwarg(forward: Callable[..., Any]) -> str:
    """The keyword under which ``forward`` (a model's ``forward``) takes its KV cache:
    ``"cache"`` on releases that have it, else ``"past_key_values"``."""
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):  # no introspectable signature: the long-standing name
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def cache_arg(kwargs: Mapping[str, Any]) -> tuple[str, Any]:
    """``(name, value)`` of the KV cache a caller passed in ``kwargs`` under either name
    (``("past_key_values", None)`` when neither is given or both are None)."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return name, kwargs[name]
    return "past_key_values", None


def output_cache_field(output_cls: type) -> str:
    """The field of a transformers ``ModelOutput`` class that holds the KV cache."""
    names = getattr(output_cls, "__dataclass_fields__", {})
    return "cache" if "cache" in names else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache of a transformers model output (None when it has none)."""
    return getattr(out, output_cache_field(type(out)), None)
