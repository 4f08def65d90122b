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

Serving is the exception (:func:`serving_openmp_env`): a decode step is hundreds of short
parallel regions, and a thread woken for each costs the step a third of its time on a
2-core CPU; ``prefixattn serve`` re-executes itself on Intel OpenMP with a 1 ms spin where
it can (docs/serving-engine.md, "CPU threads").
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
    if OMP_WAIT_POLICY in os.environ or KMP_BLOCKTIME in os.environ or "torch" in sys.modules:
        return False  # KMP_BLOCKTIME: Intel OpenMP's own wait setting (serving_openmp_env)
    os.environ[OMP_WAIT_POLICY] = "PASSIVE"
    _SET_BY_US.add(OMP_WAIT_POLICY)
    return True


# --------------------------------------------------------------- serving on the CPU

KMP_BLOCKTIME = "KMP_BLOCKTIME"
# "intel" (the default: Intel OpenMP where it is installed) or "gnu" (torch's own)
SERVE_OMP = "PREFIXATTN_SERVE_OMP"
# set in the environment of the re-executed server (no second re-exec; says what ran)
SERVE_OMP_MARK = "PREFIXATTN_SERVE_OMP_ACTIVE"
# milliseconds an Intel OpenMP thread spins after a parallel region before it sleeps
SERVE_BLOCKTIME_MS = "1"
_OMP_RUNTIMES = ("libiomp", "libgomp", "libomp")
_SET_BY_US: set[str] = set()  # variables this module set (not the user)


def intel_openmp_library() -> str | None:
    """``libiomp5.so`` of the ``intel-openmp`` wheel installed in this Python, or None."""
    from importlib import metadata

    try:
        files = metadata.distribution("intel-openmp").files or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == "libiomp5.so":
            path = os.path.realpath(str(f.locate()))
            return path if os.path.isfile(path) else None
    return None


def serving_openmp_env(
    env: dict[str, str], library: str | None, platform: str, machine: str,
    set_by_us: frozenset[str] = frozenset(),
) -> tuple[dict[str, str] | None, str]:  # fmt: skip
    """The environment to run ``prefixattn serve`` in on the CPU, or None to stay as is;
    and why.

    A serving step is a few hundred short parallel regions (one per GEMM and fused
    kernel). torch's GNU OpenMP with ``OMP_WAIT_POLICY=PASSIVE`` (prefixattn's default,
    :func:`prefer_passive_omp_wait`) puts its worker to sleep after each one and wakes it
    for the next; Intel OpenMP (``libiomp5``, which vLLM's CPU guide preloads too) with a
    short spin (``KMP_BLOCKTIME=1``: a thread spins at most 1 ms before it sleeps, so an
    idle server does not spin) keeps it awake through a step. The runtime is chosen when
    the process starts (``LD_PRELOAD``), so the server re-executes itself with it.

    Arguments:
        env: the current environment.
        library: the path of ``libiomp5.so`` (:func:`intel_openmp_library`), or None.
        platform, machine: ``sys.platform``, ``platform.machine()``.
        set_by_us: variables prefixattn set itself (a PASSIVE wait policy it chose is
            dropped; where the user set ``OMP_WAIT_POLICY``, nothing changes).

    Set ``PREFIXATTN_SERVE_OMP=gnu`` to keep torch's own runtime.
    """
    if env.get(SERVE_OMP_MARK):
        return None, f"Intel OpenMP ({env[SERVE_OMP_MARK]})"
    choice = env.get(SERVE_OMP, "intel")
    if choice not in ("intel", "gnu"):
        raise ValueError(f"{SERVE_OMP}: expected 'intel' or 'gnu', got {choice!r}")
    if choice == "gnu":
        return None, f"GNU OpenMP ({SERVE_OMP}=gnu)"
    if platform != "linux" or machine.lower() not in ("x86_64", "amd64"):
        return None, "GNU OpenMP (Intel OpenMP is preloaded on x86-64 Linux only)"
    preload = env.get("LD_PRELOAD", "")
    if any(rt in preload for rt in _OMP_RUNTIMES):
        return None, "the OpenMP runtime LD_PRELOAD names"
    if OMP_WAIT_POLICY in env and OMP_WAIT_POLICY not in set_by_us:
        # the user's choice stands (Intel OpenMP with PASSIVE waits was the slowest here)
        return None, f"GNU OpenMP ({OMP_WAIT_POLICY}={env[OMP_WAIT_POLICY]} set by the user)"
    if library is None:
        return None, "GNU OpenMP (no intel-openmp installed: pip install intel-openmp)"
    new = dict(env)
    new["LD_PRELOAD"] = library + (os.pathsep + preload if preload else "")
    new.pop(OMP_WAIT_POLICY, None)  # prefixattn's PASSIVE default: a short spin instead
    new.setdefault(KMP_BLOCKTIME, SERVE_BLOCKTIME_MS)  # the user's value stands
    new[SERVE_OMP_MARK] = f"{library}, {KMP_BLOCKTIME}={new[KMP_BLOCKTIME]}"
    return new, f"Intel OpenMP ({new[SERVE_OMP_MARK]})"


def reexec_for_serving() -> str:
    """Re-execute this process (the same interpreter, flags and arguments: the same
    command, PID kept) in :func:`serving_openmp_env`'s environment when it gives one
    (never returns then); else return which OpenMP runtime runs and why."""
    import platform

    env, why = serving_openmp_env(dict(os.environ), intel_openmp_library(), sys.platform,
                                  platform.machine(), frozenset(_SET_BY_US))  # fmt: skip
    if env is None:
        return why
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
    raise AssertionError("unreachable: execve returned")  # pragma: no cover
