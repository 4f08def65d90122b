"""Direct launches of compiled Triton kernels, bypassing ``JITFunction.run``.

``kernel[grid](*args, **constexprs)`` costs, on every call, Triton's binder (one Python
dict of every parameter), one specialization per argument (``int == 1``, ``% 16``, a
pointer's ``data_ptr() % 16``), a cache key, a dict lookup and, on Triton 3.8+, a launch
metadata object, before the compiled kernel's launcher runs. A call plan that has already
launched a kernel once knows all of that: :class:`DirectKernel` keeps the compiled kernel's
launcher, function handle and packed metadata and calls the launcher with a prepared
argument tuple.

How Triton launches (3.6, 3.8, 3.9; read from their sources):

* ``JITFunction.run`` ends with ``kernel.run(grid_0, grid_1, grid_2, stream,
  kernel.function, kernel.packed_metadata, launch_metadata, enter_hook, exit_hook,
  *bound_args.values())``: every parameter in order, **constexpr slots included** (the
  launcher skips them), the stream of the current device
  (``driver.active.get_current_stream``: ``torch._C._cuda_getCurrentRawStream``).
  ``kernel.run`` is the driver's ``CudaLauncher`` (a Python object), built on first use by
  ``CompiledKernel._init_handles``, which also loads the module (``function``).
* ``CudaLauncher.__call__`` allocates global / profile scratch (only when the compiled
  kernel asks for it) and calls the C ``launch``. The C call differs by version:
  3.6 ``launch(gx, gy, gz, stream, function, coop, pdl, global_scratch, profile_scratch,
  packed_metadata, launch_metadata, enter_hook, exit_hook, *params)`` (a C module
  generated per signature); 3.8+ ``launch(gx, gy, gz, stream, function, coop, pdl,
  packed_metadata, launch_metadata, enter_hook, exit_hook, global_scratch,
  profile_scratch, arg_annotations, kernel_signature, params)`` (one generic C launcher,
  the signature passed as data).
* The launch hooks (``knobs.runtime.launch_enter_hook`` / ``launch_exit_hook``) are
  ``HookChain`` objects, empty unless a profiler adds one; with empty chains the C
  launcher calls nothing, so passing ``None`` (and no launch metadata) is equivalent.

:class:`DirectKernel` calls the C ``launch`` itself when the launcher's call is one of the
two known forms and the kernel needs no scratch memory (``"c"`` mode: one C call per
launch), otherwise the ``CudaLauncher`` object (``"launcher"`` mode). Anything else
(the interpreter, an unknown ``JITFunction.run``, pre-run hooks, launch hooks installed at
capture, argument kinds it does not model) makes :meth:`DirectKernel.capture` launch
normally and return ``None``; a launch hook added later sends each call through the normal
path.

The stream: the normal path asks ``driver.active.get_current_stream(device)`` for the
device current at the call (with torch: ``torch._C._cuda_getCurrentRawStream``, one C
call). A DirectKernel keeps that function and the device index current at capture, and
asks for the stream on every launch (one C call): a launch follows ``torch.cuda.stream``
contexts and CUDA graph capture exactly as the normal path does. The device itself is
not re-read: like Triton's own per-device kernel cache, a DirectKernel belongs to one
device, so the caller keys it on the device and launches with that device current.

Not repeated per launch: ``JITFunction.run``'s check that the kernel's global variables
have not changed since compilation (prefixattn's kernels read only constexpr globals).

What a caller must keep equal between the captured call and a direct one: the kernel's
specialization (:meth:`DirectKernel.matches`): each tensor's dtype and 16-byte alignment of
``data_ptr()``, each int's class (``== 1`` is compiled in as a constant; ``% 16 == 0``;
32- or 64-bit), ``None`` stays ``None``, floats and bools stay so. Sizes and strides come
from the plan's key; what changes per call (new tensors, a dropout seed) is what
``matches`` must see, unless the kernel marks it ``do_not_specialize``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
from typing import Any

_log = logging.getLogger("prefixattn")

# The calls DirectKernel repeats, whitespace removed, as Triton's sources spell them.
_JIT_LAUNCH = (
    "kernel.run(grid_0,grid_1,grid_2,stream,kernel.function,kernel.packed_metadata,"
    "launch_metadata,knobs.runtime.launch_enter_hook,knobs.runtime.launch_exit_hook,"
    "*bound_args.values())"
)
_C_LAUNCH = {
    # Triton 3.6: a C launcher generated per signature, parameters flat
    "flat": (
        "self.launch(gridX,gridY,gridZ,stream,function,self.launch_cooperative_grid,"
        "self.launch_pdl,global_scratch,profile_scratch,*args)"
    ),
    # Triton 3.8+: one C launcher, the signature and the parameters as objects
    "tuple": (
        "self.launch(gridX,gridY,gridZ,stream,function,self.launch_cooperative_grid,"
        "self.launch_pdl,kernel_metadata,launch_metadata,launch_enter_hook,"
        "launch_exit_hook,global_scratch,profile_scratch,self.arg_annotations,"
        "self.kernel_signature,kernel_args)"
    ),
}
_I32 = (-(2**31), 2**31 - 1)
_I64 = (-(2**63), 2**63 - 1)
_U64 = (2**63, 2**64 - 1)


def _squash(src: str) -> str:
    return re.sub(r"\s+", "", src)


@functools.cache
def _detect() -> tuple[bool, str, str | None]:
    """(supported, reason, C call layout or None); logged once."""
    ok, reason, layout = _inspect_triton()
    _log.debug("prefixattn direct launches: %s", reason)
    return ok, reason, layout


def _inspect_triton() -> tuple[bool, str, str | None]:
    try:
        import triton
        from triton.compiler.compiler import CompiledKernel
        from triton.runtime.jit import JITFunction
    except Exception as e:  # Triton missing or broken: nothing to launch directly
        return False, f"Triton is not importable ({type(e).__name__}: {e})", None
    version = getattr(triton, "__version__", "?")
    try:
        run_src = _squash(inspect.getsource(JITFunction.run))
    except (OSError, TypeError) as e:
        return False, f"Triton {version}: JITFunction.run has no readable source ({e})", None
    if _JIT_LAUNCH not in run_src:
        return (
            False,
            f"Triton {version}: JITFunction.run launches differently from the call "
            "DirectKernel repeats (kernel.run(grid..., stream, function, packed_metadata, "
            "launch_metadata, hooks, *params))",
            None,
        )
    if not (
        isinstance(inspect.getattr_static(CompiledKernel, "run", None), property)
        and hasattr(CompiledKernel, "_init_handles")
    ):
        return False, f"Triton {version}: CompiledKernel has no lazy 'run' launcher", None
    layout = None
    try:
        from triton.backends.nvidia.driver import CudaLauncher

        call_src = _squash(inspect.getsource(CudaLauncher.__call__))
        layout = next((name for name, call in _C_LAUNCH.items() if call in call_src), None)
    except Exception as e:  # no NVIDIA backend: the launcher object is still callable
        _log.debug("prefixattn direct launches: NVIDIA launcher not inspected (%s)", e)
    how = (
        f"the C launch function ({layout} argument layout)"
        if layout
        else "the launcher object (its C launch call is not a known form)"
    )
    return True, f"Triton {version}: direct launches call {how}", layout


def direct_launch_supported() -> tuple[bool, str]:
    """Whether this Triton's launch path is the one :class:`DirectKernel` repeats.

    Detected once (cached) from Triton's own sources: ``JITFunction.run``'s call of the
    compiled kernel's launcher, and the NVIDIA launcher's C call (which decides whether a
    direct launch calls the C function itself or the launcher object). Returns
    ``(False, reason)`` when the internals differ; the reason is logged at debug level
    (``logging.getLogger("prefixattn")``) once.
    """
    ok, reason, _ = _detect()
    return ok, reason


def _interpreted(jit_fn: Any) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - every supported Triton has it
        return False
    return isinstance(jit_fn, InterpretedFunction)


def _hooks_idle(hook: Any) -> bool:
    """A launch hook that calls nothing: ``None`` or an empty ``HookChain``."""
    return hook is None or (isinstance(getattr(hook, "calls", None), list) and not hook.calls)


class DirectKernel:
    """A compiled kernel bound for repeated launches with the same signature.

    Built by :meth:`capture` after one normal launch. ``dk(grid, *args)`` launches again
    with new values of the kernel's non-constexpr parameters (in their order in the
    kernel's signature; the constexprs and ``num_warps`` / ``num_stages`` are the
    captured ones), on the current CUDA stream of the device current at capture.
    Nothing is checked per launch except that no launch hook was installed since: the
    caller keys a DirectKernel on everything the kernel was specialized on (see
    :meth:`matches`).

    Attributes: ``mode`` (``"c"``: one call of the C launch function; ``"launcher"``:
    through Triton's ``CudaLauncher`` object), ``layout`` (``"flat"`` for Triton 3.6,
    ``"tuple"`` for 3.8+, ``None`` in launcher mode), ``device`` (the CUDA device index),
    ``kernel`` (Triton's ``CompiledKernel``).
    """

    def __init__(self) -> None:  # use capture()
        raise TypeError("DirectKernel is built by DirectKernel.capture(jit_fn, grid, args, kwargs)")

    @classmethod
    def capture(
        cls,
        jit_fn: Any,
        grid: tuple[int, ...],
        args: tuple,
        kwargs: dict,
        assume_aligned: tuple[str, ...] = (),
        check: tuple[str, ...] | None = None,
    ) -> DirectKernel | None:
        """Launch ``jit_fn[grid](*args, **kwargs)`` through Triton's normal path (compiling
        it if needed; ``kwargs`` hold the constexprs and ``num_warps`` / ``num_stages``)
        and return a DirectKernel that repeats that launch for new argument values of
        the same signature, or ``None`` (after the same normal launch) when direct
        launches are not possible: the interpreter, an unsupported Triton, a kernel
        with pre-run hooks, launch hooks installed, or an argument kind it does not
        model (the reason is logged at debug level).

        ``assume_aligned``: names of pointer parameters whose 16-byte alignment the
        caller guarantees (tensors it allocates itself): :meth:`matches` skips their
        ``data_ptr()`` call when they were aligned at capture. ``check``: names of the
        runtime parameters :meth:`matches` looks at (``None``: all); the others are the
        caller's to keep equal (e.g. sizes and strides that its cache key holds)."""
        ok, _, layout = _detect()
        if _interpreted(jit_fn) or not ok or getattr(jit_fn, "pre_run_hooks", None):
            jit_fn[grid](*args, **kwargs)
            return None
        kernel = jit_fn.run(*args, grid=grid, warmup=False, **kwargs)
        if kernel is None:
            return None
        try:
            return cls._bind(jit_fn, kernel, layout, args, kwargs, assume_aligned, check)
        except _Unsupported as e:
            _log.debug("prefixattn direct launch of %s not used: %s", _name(jit_fn), e)
            return None

    @classmethod
    def _bind(
        cls,
        jit_fn: Any,
        kernel: Any,
        layout: str | None,
        args: tuple,
        kwargs: dict,
        assume_aligned: tuple[str, ...],
        check: tuple[str, ...] | None,
    ) -> DirectKernel:
        from triton import knobs
        from triton.runtime.driver import driver

        rt = knobs.runtime
        if not (_hooks_idle(rt.launch_enter_hook) and _hooks_idle(rt.launch_exit_hook)):
            raise _Unsupported("launch hooks are installed")
        device = driver.active.get_current_device()
        binder = jit_fn.device_caches[device][4]
        bound, spec, _ = binder(*args, **kwargs)
        values = tuple(bound.values())  # every parameter, constexpr slots included
        params = jit_fn.params
        rt_idx = [i for i, p in enumerate(params) if not p.is_constexpr]
        const_idx = [i for i, p in enumerate(params) if p.is_constexpr]
        for i in rt_idx:
            if params[i].annotation_type:
                raise _Unsupported(f"parameter {params[i].name!r} has a type annotation")

        self = object.__new__(cls)
        self.kernel = kernel
        self.device = device
        self._jit_fn = jit_fn
        self._rt = rt
        self._enter = rt.launch_enter_hook
        self._exit = rt.launch_exit_hook
        self._enter_calls = getattr(self._enter, "calls", ())
        self._exit_calls = getattr(self._exit, "calls", ())
        self._get_stream = driver.active.get_current_stream
        launcher = kernel.run  # builds the launcher and loads the module if needed
        self._function = kernel.function
        self._packed = kernel.packed_metadata
        self._rt_names = tuple(params[i].name for i in rt_idx)
        # the normal path's keyword arguments: constexprs and launch options
        self._kwargs = {params[i].name: values[i] for i in const_idx}
        self._kwargs.update({k: v for k, v in kwargs.items() if k not in bound})
        # the launcher takes every parameter: constexprs after the runtime ones append as a
        # tuple; interleaved ones go through a generated function
        if const_idx == list(range(len(rt_idx), len(params))):
            self._tail = tuple(values[i] for i in const_idx)
            self._merge = None
        else:
            self._tail = None
            self._merge = _make_merge(rt_idx, const_idx, values)
        for arg, names in (("assume_aligned", assume_aligned), ("check", check or ())):
            unknown = set(names) - set(self._rt_names)
            if unknown:
                raise ValueError(
                    f"{arg}: {sorted(unknown)} are not runtime parameters of "
                    f"{_name(jit_fn)} (expected some of {list(self._rt_names)})"
                )
        checked = set(self._rt_names if check is None else check)
        self.matches = _make_matches(jit_fn, rt_idx, values, spec, set(assume_aligned), checked)

        scratch = getattr(launcher, "global_scratch_size", 1) or getattr(
            launcher, "profile_scratch_size", 1
        )
        self.layout = None
        self.mode = "launcher"
        self._launch = launcher
        c_launch = getattr(launcher, "launch", None)
        if (
            layout is not None
            and c_launch is not None
            and scratch == 0
            and not getattr(launcher, "gsan_enabled", False)
            and (layout == "flat" or hasattr(launcher, "arg_annotations"))
        ):
            self.mode, self.layout, self._launch = "c", layout, c_launch
            self._coop = launcher.launch_cooperative_grid
            self._pdl = launcher.launch_pdl
            self._annotations = getattr(launcher, "arg_annotations", None)
            self._ksig = getattr(launcher, "kernel_signature", None)
        return self

    def params(self, *args: Any) -> tuple:
        """Every parameter as the launcher takes it: ``args`` (the non-constexpr ones)
        with the captured constexpr values in their slots."""
        return args + self._tail if self._merge is None else self._merge(*args)

    def launch_args(self, grid: tuple[int, ...], *args: Any) -> tuple:
        """The exact positional arguments a direct launch passes to ``self._launch`` on the
        current stream (for tests and debugging; :meth:`__call__` builds the same inline)."""
        gx, gy, gz = (*grid, 1, 1)[:3]
        stream = self._get_stream(self.device)
        p = args + self._tail if self._merge is None else self._merge(*args)
        if self.mode == "launcher":
            return (gx, gy, gz, stream, self._function, self._packed, None, None, None, *p)
        if self.layout == "flat":
            return (gx, gy, gz, stream, self._function, self._coop, self._pdl,
                    None, None, self._packed, None, None, None, *p)  # fmt: skip
        return (gx, gy, gz, stream, self._function, self._coop, self._pdl, self._packed,
                None, None, None, None, None, self._annotations, self._ksig, p)  # fmt: skip

    def __call__(self, grid: tuple[int, ...], *args: Any) -> None:
        """Launch with new values of the non-constexpr parameters (in signature order) on
        the current CUDA stream, without Triton's binder, specialization or cache lookup.
        ``grid``: 1 to 3 ints. A launch hook installed since capture sends the call
        through ``JITFunction.run`` instead."""
        rt = self._rt
        if (
            rt.launch_enter_hook is not self._enter
            or rt.launch_exit_hook is not self._exit
            or self._enter_calls
            or self._exit_calls
        ):
            self._launch_normally(grid, args)
            return
        gx, gy, gz = (*grid, 1, 1)[:3]
        p = args + self._tail if self._merge is None else self._merge(*args)
        if self.mode == "launcher":
            self._launch(
                gx, gy, gz, self._get_stream(self.device), self._function, self._packed,
                None, None, None, *p,
            )  # fmt: skip
        elif self.layout == "tuple":
            self._launch(
                gx, gy, gz, self._get_stream(self.device), self._function, self._coop,
                self._pdl, self._packed, None, None, None, None, None, self._annotations,
                self._ksig, p,
            )  # fmt: skip
        else:
            self._launch(
                gx, gy, gz, self._get_stream(self.device), self._function, self._coop,
                self._pdl, None, None, self._packed, None, None, None, *p,
            )  # fmt: skip

    def _launch_normally(self, grid: tuple[int, ...], args: tuple) -> None:
        """The same launch through ``JITFunction.run`` (hooks see it)."""
        kwargs = dict(zip(self._rt_names, args))
        kwargs.update(self._kwargs)
        self._jit_fn.run(grid=grid, warmup=False, **kwargs)

    def matches(self, *args: Any) -> bool:  # replaced per instance by _make_matches
        """Whether ``args`` (the non-constexpr parameters) specialize as the captured
        ones did: tensors of the same dtype and 16-byte alignment, ints of the same
        class (``== 1``, ``% 16 == 0``, 32/64-bit), ``None`` for ``None``, floats and
        bools. Costs one ``data_ptr()`` call per alignment-specialized tensor."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"DirectKernel({_name(self._jit_fn)}, mode={self.mode}, layout={self.layout})"


class _Unsupported(Exception):
    """Why a captured launch cannot be repeated directly."""


def _name(jit_fn: Any) -> str:
    return getattr(getattr(jit_fn, "fn", None), "__name__", repr(jit_fn))


def _make_merge(rt_idx: list[int], const_idx: list[int], values: tuple):
    """``f(*runtime_args) -> every parameter``, constexpr values in their slots."""
    slots = {i: f"a{j}" for j, i in enumerate(rt_idx)}
    slots.update({i: f"c{i}" for i in const_idx})
    names = ", ".join(f"a{j}" for j in range(len(rt_idx)))
    body = ", ".join(slots[i] for i in range(len(rt_idx) + len(const_idx)))
    ns = {f"c{i}": values[i] for i in const_idx}
    exec(f"def merge({names}):\n    return ({body},)\n", ns)
    return ns["merge"]


def _make_matches(
    jit_fn: Any,
    rt_idx: list[int],
    values: tuple,
    spec: list,
    assume_aligned: set[str],
    checked: set[str],
):
    """A generated ``matches(*args) -> bool`` for the captured specialization ``spec``
    (the binder's ``(type, key)`` per parameter), over the parameters in ``checked``;
    pointers named in ``assume_aligned`` that were aligned at capture are taken as
    aligned."""
    conds, ns = [], {}
    for j, i in enumerate(rt_idx):
        p = jit_fn.params[i]
        v, (ty, key) = values[i], spec[i]
        a = f"a{j}"
        if p.name not in checked:
            continue
        value_spec = not p.do_not_specialize
        align_spec = value_spec and not p.do_not_specialize_on_alignment
        if v is None:
            conds.append(f"{a} is None")
        elif v.__class__ is bool:
            conds.append(f"{a}.__class__ is bool")
        elif v.__class__ is int:
            conds.append(f"{a}.__class__ is int")
            if ty == "constexpr":  # == 1, compiled in
                conds.append(f"{a} == 1")
                continue
            if value_spec:
                conds.append(f"{a} != 1")
            lo, hi = {"i32": _I32, "i64": _I64, "u64": _U64}[ty]
            conds.append(f"{lo} <= {a} <= {hi}")
            if ty == "i64":
                conds.append(f"not ({_I32[0]} <= {a} <= {_I32[1]})")
            if align_spec:
                conds.append(f"{a} % 16 {'==' if key == 'D' else '!='} 0")
        elif v.__class__ is float:
            conds.append(f"{a}.__class__ is float")
        elif hasattr(v, "data_ptr") and hasattr(v, "dtype"):
            ns[f"d{j}"] = v.dtype
            conds.append(f"{a} is not None and {a}.dtype is d{j}")
            if align_spec and not (key == "D" and p.name in assume_aligned):
                conds.append(f"{a}.data_ptr() % 16 {'==' if key == 'D' else '!='} 0")
        else:
            raise _Unsupported(f"parameter {p.name!r} of type {type(v).__name__} is not modelled")
    names = ", ".join(f"a{j}" for j in range(len(rt_idx)))
    body = " and ".join(conds) or "True"
    src = (
        f"def matches({names}):\n"
        f"    try:\n        return {body}\n"
        "    except (AttributeError, TypeError):\n        return False\n"
    )
    exec(src, ns)
    return ns["matches"]
