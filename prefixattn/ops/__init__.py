"""The kernel path of prefixattn: validation, launchers, autograd, reference."""

from .attention import prefix_attention

__all__ = ["prefix_attention"]
