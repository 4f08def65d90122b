"""CPU runtime settings that must be made before torch is first imported (no torch here).

PyTorch's CPU wheels run their intra-op thread pool on GNU OpenMP (``libgomp``), whose
threads *spin* (busy-wait) for a while after each parallel region before they sleep. Two
such processes on the same cores starve each other: each one's spinning threads hold the
cores the other one's working threads need, and a training step can slow tenfold (measured
in ``benchmarks/results/contention-cpu-20261202.md``). With ``OMP_WAIT_POLICY=PASSIVE`` idle
threads sleep at once, so a second job costs a share of the cores, not the whole of them.

``libgomp`` reads the variable once, when it is loaded (when torch is imported), so
:func:`prefer_passive_omp_wait` is called at the top of ``prefixattn/__init__.py``: every
entry point (the ``prefixattn`` console script, ``python -m prefixattn``, the scripts,
``import prefixattn`` before ``import torch``) gets it. A value the user set is never changed.
"""

from __future__ import annotations

import os
import sys

OMP_WAIT_POLICY = "OMP_WAIT_POLICY"


def prefer_passive_omp_wait() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the user set it or torch is already loaded.

    Returns:
        ``True`` when this call set the variable (it then takes effect when torch is
        imported); ``False`` when the user's value stands or torch's OpenMP runtime has
        already started (setting it then would change nothing in this process).
    """
    if OMP_WAIT_POLICY in os.environ or "torch" in sys.modules:
        return False
    os.environ[OMP_WAIT_POLICY] = "PASSIVE"
    return True
