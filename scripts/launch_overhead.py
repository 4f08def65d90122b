"""Host cost of one Triton launch: ``JITFunction.run`` against a ``DirectKernel``
(``prefixattn/ops/direct.py``), on a machine with or without a GPU.

Without a GPU the kernels are compiled for sm_90 by Triton's own compiler (a stand-in
driver that names the target, as ``scripts/resource_probe.py`` does); Triton's real
``CudaLauncher`` is built, and only the final C ``launch`` function (and loading the
cubin) is stubbed. Everything before it, Triton's binder, specialization, cache lookup
and launcher object, runs as on a GPU host. The stub is ``"".format``, a C function that
takes any arguments, so neither path pays for a Python stub.

Per launch, for a toy kernel and prefixattn's ``_attn_fwd`` (54 parameters), it reports the
Python-level calls (``sys.setprofile`` 'call' + 'c_call' events) and host microseconds
(best of ``--repeats`` runs of ``--launches`` launches) of: ``jit_run``
(``kernel[grid](*args, **constexprs)``), ``direct`` (``DirectKernel.__call__``),
``direct_with_matches`` (``matches`` over every argument, then the launch) and
``direct_with_matches_tensors_seed`` (``matches`` over the tensors and the seed only, what
a call plan keyed on sizes and strides needs). These are host timings of this machine's
CPU, not kernel timings.

    python scripts/launch_overhead.py [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import sys
import time
import types
from collections.abc import Callable, Iterator
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("launch_overhead.py compiles for the GPU: unset TRITON_INTERPRET")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences a Triton 3.9 notice

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

FAKE_FUNCTION = 0xF00D  # the "CUfunction" load_binary returns
FAKE_STREAM = 0x5EA  # the current stream of device 0


@triton.jit(do_not_specialize=["seed"])
def toy_kernel(X, Y, Out, n, scale, BLOCK: tl.constexpr, seed, HAS_Y: tl.constexpr, stride_x):
    """out = x * scale + seed (+ y): a pointer that may be None, an int that may be 1,
    a float, an unspecialized seed and constexprs between the runtime parameters."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(X + offs * stride_x, mask=m)
    if HAS_Y:
        x += tl.load(Y + offs, mask=m)
    tl.store(Out + offs, x * scale + seed, mask=m)


class _KernelArg:
    """Stands in for the C ``PyKernelArg`` that Triton 3.8+ annotates a signature with."""

    def __init__(self, nested_tuple, type) -> None:
        self.nested_tuple, self.type = nested_tuple, type

    def __eq__(self, other) -> bool:
        return isinstance(other, _KernelArg) and (self.nested_tuple, self.type) == (
            other.nested_tuple,
            other.type,
        )

    __hash__ = None


@contextlib.contextmanager
def stand_in_driver(launch: Callable, arch: int = 90) -> Iterator[types.SimpleNamespace]:
    """Make Triton compile for sm_<arch> and launch through its real ``CudaLauncher``,
    with ``launch`` in place of the C launch function and no module loading. The driver's
    device and stream queries are C builtins, as torch's are on a GPU host."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia import driver as nv
    from triton.runtime.driver import driver

    utils = types.SimpleNamespace(
        launch=launch,
        load_binary=lambda name, kernel, shared, device: (1, FAKE_FUNCTION, 64, 0, 1024),
        unload_module=lambda module: None,
        get_device_properties=lambda device: {
            "max_shared_mem": 232448,
            "multiprocessor_count": 132,
            "max_num_regs": 65536,
            "warpSize": 32,
        },
        build_signature_metadata=tuple,  # Triton 3.8+: the C signature, kept as data
    )
    stand_in = types.SimpleNamespace(
        utils=utils,
        launcher_cls=nv.CudaLauncher,
        get_current_target=lambda: GPUTarget("cuda", arch, 32),
        get_current_device=itertools.repeat(0).__next__,
        get_current_stream={0: FAKE_STREAM}.__getitem__,
        get_device_capability=lambda device=None: divmod(arch, 10),
    )
    patches = [
        mock.patch.object(nv, name, value, create=True)
        for name, value in (
            ("PyKernelArg", _KernelArg),
            ("ARG_CONSTEXPR", "constexpr"),
            ("ARG_KERNEL", "kernel"),
            ("ARG_TUPLE", "tuple"),
        )
    ]
    if hasattr(nv, "compile_module_from_src"):  # Triton 3.6: one C module per signature
        patches += [
            mock.patch.object(
                nv, "compile_module_from_src", lambda **kw: types.SimpleNamespace(launch=launch)
            ),
            mock.patch.object(nv, "library_dirs", list),  # it looks for libcuda
        ]
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        saved = driver._active  # None until a driver was made: no GPU driver to reset to
        driver.set_active(stand_in)
        try:
            yield stand_in
        finally:
            driver._active = saved


def forward_launch_args(dtype=None, gen_seed: int = 0, dropout_seed: int = 0) -> tuple:
    """(jit_fn, grid, args, kwargs) of the ``_attn_fwd`` launch that prefixattn makes for a
    small shared-prefix call (B=2, H=4, Hkv=2, Nq=Nk=17, D=64, CPU tensors: nothing
    runs), with the default config's tiles; built by ``forward.forward_spec``.
    ``gen_seed`` seeds the random inputs, ``dropout_seed`` is the kernel's seed argument."""
    import torch

    from prefixattn.ops import forward, settings, validation
    from prefixattn.ops.call import AttentionCall

    dtype = dtype or torch.float16
    g = torch.Generator().manual_seed(gen_seed)
    q = torch.randn(2, 4, 17, 64, generator=g).to(dtype)
    k = torch.randn(2, 2, 17, 64, generator=g).to(dtype)
    v = torch.randn(2, 2, 17, 64, generator=g).to(dtype)
    pk = torch.randn(2, 7, 64, generator=g).to(dtype)
    pv = torch.randn(2, 7, 64, generator=g).to(dtype)
    call = AttentionCall(q, k, v, pk, pv, settings=settings.current_settings())
    prob = validation.validate(call)
    out, lse = forward.forward_outputs(q, prob)
    spec = forward.forward_spec(call, out, lse, dropout_seed, prob)
    cfg = settings.CONFIG_LISTS["fwd"][0]
    kwargs = {**spec.consts, **cfg.tiles()}
    kwargs.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    kernel = spec.kernel()
    return kernel, spec.grid(cfg.tiles()), spec.args(), kwargs


def toy_launch_args(n: int = 100, seed: int = 7) -> tuple:
    """(jit_fn, grid, args, kwargs) of a ``toy_kernel`` launch (CPU tensors); the
    parameters after the first constexpr go by keyword. A DirectKernel of it takes
    ``(X, Y, Out, n, scale, seed, stride_x)``."""
    import torch

    x, out = torch.randn(n), torch.empty(n)
    kwargs = {"BLOCK": 64, "seed": seed, "HAS_Y": False, "stride_x": 1, "num_warps": 1}
    return toy_kernel, (triton.cdiv(n, 64),), (x, None, out, n, 0.5), kwargs


def runtime_args(fn, args: tuple, kwargs: dict) -> tuple:
    """The values of ``fn``'s non-constexpr parameters, in order, from a launch's
    ``args`` and ``kwargs`` (what a DirectKernel call takes)."""
    named = dict(zip(fn.arg_names, args), **kwargs)
    return tuple(named[p.name] for p in fn.params if not p.is_constexpr)


def count_calls(fn: Callable[[], None]) -> int:
    """Python-level calls of ``fn()``: 'call' and 'c_call' profile events, ``fn`` itself
    and the profiler switch excluded."""
    n = 0

    def prof(frame, event, arg):
        nonlocal n
        if event in ("call", "c_call"):
            n += 1

    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return n - 2  # fn's own call and the c_call of sys.setprofile(None)


def per_launch_us(fn: Callable[[], None], launches: int, repeats: int) -> float:
    for _ in range(100):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(launches):
            fn()
        best = min(best, time.perf_counter() - t0)
    return best / launches * 1e6


def measure(launches: int = 2000, repeats: int = 7) -> dict:
    """Calls and host microseconds per launch, normal path vs DirectKernel."""
    import torch

    from prefixattn.ops.direct import DirectKernel, direct_launch_supported

    rows = {}
    with stand_in_driver("".format):
        for name, (fn, grid, args, kwargs) in (
            ("toy", toy_launch_args()),
            ("attn_fwd", forward_launch_args()),
        ):
            dk = DirectKernel.capture(fn, grid, args, kwargs)
            assert dk is not None, direct_launch_supported()
            rt_args = runtime_args(fn, args, kwargs)

            def normal(fn=fn, grid=grid, args=args, kwargs=kwargs) -> None:
                fn[grid](*args, **kwargs)

            def direct(dk=dk, grid=grid, args=rt_args) -> None:
                dk(grid, *args)

            def direct_checked(dk=dk, grid=grid, args=rt_args) -> None:
                if dk.matches(*args):
                    dk(grid, *args)

            # a plan's check: only the tensors and the seed (its key holds the rest)
            names = [p.name for p in fn.params if not p.is_constexpr]
            varying = tuple(
                n for n, a in zip(names, rt_args) if isinstance(a, torch.Tensor) or n == "seed"
            )
            dk_v = DirectKernel.capture(fn, grid, args, kwargs, check=varying)

            def direct_checked_varying(dk=dk_v, grid=grid, args=rt_args) -> None:
                if dk.matches(*args):
                    dk(grid, *args)

            rows[name] = {
                "params": len(fn.params),
                "mode": f"{dk.mode}/{dk.layout}",
                "calls": {
                    "jit_run": count_calls(normal),
                    "direct": count_calls(direct),
                    "direct_with_matches": count_calls(direct_checked),
                    "direct_with_matches_tensors_seed": count_calls(direct_checked_varying),
                },
                "us_per_launch": {
                    "jit_run": round(per_launch_us(normal, launches, repeats), 2),
                    "direct": round(per_launch_us(direct, launches, repeats), 2),
                    "direct_with_matches": round(
                        per_launch_us(direct_checked, launches, repeats), 2
                    ),
                    "direct_with_matches_tensors_seed": round(
                        per_launch_us(direct_checked_varying, launches, repeats), 2
                    ),
                },
            }
    return {
        "what": "host cost per launch with the C launch stubbed ('\"\".format'); sm_90 "
        "kernels compiled without a GPU",
        "versions": {
            "python": platform.python_version(),
            "triton": triton.__version__,
            "torch": torch.__version__,
        },
        "cpu": platform.processor() or platform.machine(),
        "launches": launches,
        "repeats": repeats,
        "kernels": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--launches", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", help="also write the result to this file")
    args = ap.parse_args(argv)
    result = measure(args.launches, args.repeats)
    result["command"] = "python scripts/launch_overhead.py " + " ".join(argv or sys.argv[1:])
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
