"""Moved to :mod:`prefixattn.testing` (test support is not part of the ``hf`` glue).

This alias keeps ``from prefixattn.hf.testing import ...`` working for code written before
the move; nothing in the library imports either module. New code: ``prefixattn.testing``.
"""

from __future__ import annotations

from ..testing import *  # noqa: F403
from ..testing import __all__ as __all__
