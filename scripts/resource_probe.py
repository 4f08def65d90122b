"""Compile the kernels for a CUDA GPU on a machine without one, and report each
candidate config's registers, spill stack and shared memory.

Triton lowers a kernel all the way to a cubin without a driver when it is given the
target (here a stand-in driver that only names it); ``cuobjdump`` (shipped with Triton)
reads the register count and stack size from the cubin. Nothing runs: these are
resource facts of the generated code, not timings. They show which configs spill
registers to local memory (stack > 0), the usual reason a tile is slow, and they prove
that every kernel lowers for the GPU, which the CPU interpreter never checks.

Integer arguments are specialized as a real launch specializes them: the head-dim
strides (and the key mask's) are 1, the other strides and every pointer are multiples
of 16.

    python scripts/resource_probe.py                  # every kernel and config, D=64,128
    python scripts/resource_probe.py --kernels bwd --d 64 --json out.json
    python scripts/resource_probe.py --kernels fwd --variants cache paged16 paged128

``--variants`` (the forward only): ``plain`` (the default), ``cache`` (a KV-cache pool:
``cache_seqlens`` and ``cache_batch_idx`` read in place), ``paged<N>`` (a paged cache,
``block_table`` with block size N: below the tile's BLOCK_N a key tile looks up one block
per key, from BLOCK_N up one per tile), ``varlen_paged16`` (packed rows, ``cu_seqlens_q``,
over pages of 16).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# pointers that are not of the input dtype
_PTR_TYPES = {
    "LSE": "*fp32",
    "Delta": "*fp32",
    "DPK": "*fp32",
    "DPV": "*fp32",
    "PIDX": "*i64",
    "PLEN": "*i64",
    "KPM": "*u8",
    "SINKS": "*fp32",
    "CSL": "*i32",
    "CBI": "*i32",
    "BT": "*i32",
    "CUQ": "*i32",
}
_FLOAT_ARGS = ("sm_scale", "dropout_p", "softcap")
# non-pointer upper-case arguments (sizes, flags)
_INT_PREFIXES = ("H", "HKV", "GROUP", "N_", "TUNE_", "NEED_")
KERNEL_NAMES = ("fwd", "dkdv", "dq", "prefix_dkdv", "bwd")
# the forward's inference variants (constexprs on top of kernel_flags; see the docstring)
VARIANTS = {
    "plain": {},
    "cache": {"HAS_CSL": True, "HAS_CBI": True},
    **{f"paged{n}": {"HAS_CSL": True, "PAGE_SIZE": n} for n in (16, 32, 64, 128)},
    # packed rows (cu_seqlens_q) over pages of 16
    "varlen_paged16": {"HAS_CSL": True, "PAGE_SIZE": 16, "IS_VARLEN": True},
}


@dataclass
class Resources:
    kernel: str
    config: str
    D: int
    dtype: str
    regs: int
    stack: int  # bytes of per-thread stack: > 0 means spilled registers
    shared: int  # bytes of shared memory per program
    compile_s: float
    variant: str = "plain"  # the forward's inference variant (VARIANTS)


def _use_target(arch: int) -> None:
    import triton
    from triton.backends.compiler import GPUTarget

    class _TargetOnly:  # what triton.compile asks of the driver when given no GPU
        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

    triton.runtime.driver.set_active(_TargetOnly())


def _signature(fn, dtype: str, constexprs: dict) -> tuple[dict, dict, dict]:
    sig, attrs, consts = {}, {}, dict(constexprs)
    defaults = inspect.signature(fn.fn).parameters
    for i, (name, p) in enumerate(zip(fn.arg_names, fn.params)):
        if p.is_constexpr:
            sig[name] = "constexpr"
            if name not in consts and defaults[name].default is not inspect.Parameter.empty:
                consts[name] = defaults[name].default  # a feature flag left off
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        elif name.startswith("stride_"):
            if name.endswith("d") or name in ("stride_kpmn", "stride_btn"):
                sig[name] = "constexpr"  # an int equal to 1 is specialized as a constant
                consts[name] = 1
            elif name == "stride_btz":  # max_blocks: any int
                sig[name] = "i32"
            else:
                sig[name] = "i32"
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name[:1].isupper() and not name.startswith(_INT_PREFIXES) and name != "D":
            sig[name] = _PTR_TYPES.get(name, f"*{dtype}")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
    return sig, attrs, consts


def kernel_flags(name: str, D: int) -> dict:
    """Constexprs of a typical prefix-tuning call: causal, shared prefix, no padding mask,
    no dropout."""
    block_d = max(16, 1 << (D - 1).bit_length())
    common = dict(D=D, BLOCK_D=block_d, HAS_DROPOUT=False, INPUT_PRECISION="ieee")
    flags = dict(IS_CAUSAL=True, PREFIX_MODE=1, HAS_PLEN=False, HAS_KPM=False)
    # the split backward kernels are _attn_bwd with KIND (what the launcher passes: the
    # fused kind's constexprs and the flags a kind does not read fixed)
    unread = dict(IS_CAUSAL=False, PREFIX_MODE=0, HAS_PLEN=False, HAS_KPM=False)
    split = dict(BLOCK_M2=0, BLOCK_N2=0, BLOCK_NP=16, HAS_DELTA=True)
    per_kernel = {
        "fwd": flags,
        "dkdv": {**unread, "IS_CAUSAL": True, **split, "KIND": 1},
        "dq": {**flags, **split, "KIND": 2},
        "prefix_dkdv": {**unread, "PREFIX_MODE": 1, **split, "KIND": 3},
        "bwd": {**flags, "BLOCK_NP": 64, "HAS_DELTA": False, "KIND": 0},
    }
    return {**common, **per_kernel[name]}


def probe(
    name: str, cfg, D: int, dtype: str = "bf16", arch: int = 90, variant: str = "plain"
) -> Resources:
    """Compile kernel ``name`` with KernelConfig ``cfg`` for sm_<arch>; read its resources.
    ``variant``: the forward's inference variant (:data:`VARIANTS`)."""
    import triton
    from triton.compiler import ASTSource

    from prefixattn.ops import kernels

    _use_target(arch)
    fn = getattr(kernels.DEFAULT_SOURCE.module(), kernels.TUNED_KERNELS[name][0])
    flags = {**kernel_flags(name, D), **(VARIANTS[variant] if name == "fwd" else {})}
    sig, attrs, consts = _signature(fn, dtype, {**flags, **cfg.tiles()})
    t0 = time.perf_counter()
    compiled = triton.compile(
        ASTSource(fn, sig, consts, attrs),
        target=triton.backends.compiler.GPUTarget("cuda", arch, 32),
        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
    )
    secs = time.perf_counter() - t0
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        text = subprocess.run(
            [tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True
        ).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", text)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource usage for {fn.__name__}:\n{text}")
    tiles = "x".join(str(v) for v in cfg.tiles().values())
    return Resources(
        kernel=name,
        config=f"{tiles} w{cfg.num_warps} s{cfg.num_stages}",
        D=D,
        dtype=dtype,
        regs=int(m[1]),
        stack=int(m[2]),
        shared=int(compiled.metadata.shared),
        compile_s=round(secs, 2),
        variant=variant if name == "fwd" else "plain",
    )


def _probe_job(job: tuple) -> Resources:
    name, cfg, D, dtype, arch, *variant = job
    return probe(name, cfg, D, dtype, arch, *variant)


def to_markdown(rows: list[Resources], arch: int, argv: list[str]) -> str:
    """The rows as a Markdown table, with the versions and the command."""
    import platform

    import torch
    import triton

    lines = [
        f"# Kernel resources for sm_{arch} (compiled without a GPU)",
        "",
        f"- command: `python scripts/resource_probe.py {' '.join(argv)}`".rstrip() + "",
        f"- versions: python {platform.python_version()}, triton {triton.__version__}, "
        f"torch {torch.__version__}",
        "- what: registers per thread, stack bytes per thread (> 0: registers spilled to "
        "local memory) and shared memory per program, read from the cubin with cuobjdump. "
        "Flags: causal, shared prefix, no padding mask, no dropout, bf16; head-dim strides "
        "specialized to 1. Not timings: a config that spills is usually slow, and the "
        "autotuner on the GPU still decides.",
        "- limits on sm_90: 255 registers per thread, 227 KiB shared memory per program.",
        "",
        "| kernel | variant | config (tiles, warps, stages) | D | registers | stack B | "
        "shared KiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        spill = f"**{r.stack}**" if r.stack else "0"
        lines.append(
            f"| {r.kernel} | {r.variant} | {r.config} | {r.D} | {r.regs} | {spill} | "
            f"{r.shared / 1024:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", nargs="+", default=list(KERNEL_NAMES), choices=KERNEL_NAMES)
    ap.add_argument("--d", nargs="+", type=int, default=[64, 128], help="head dims")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument(
        "--variants", nargs="+", default=["plain"], choices=list(VARIANTS),
        help="the forward's inference variants (other kernels: plain only)",
    )  # fmt: skip
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    ap.add_argument("--json", help="also write the rows as JSON to this file")
    ap.add_argument("--markdown", help="also write the rows as a Markdown table to this file")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences a Triton 3.9 notice
    from concurrent.futures import ProcessPoolExecutor

    from prefixattn.ops import settings

    jobs = [
        (name, cfg, D, args.dtype, args.arch, variant)
        for name in args.kernels
        for variant in (args.variants if name == "fwd" else ["plain"])
        for cfg in settings.CONFIG_LISTS[name]
        for D in args.d
    ]
    print(
        f"{'kernel':12} {'variant':9} {'config':22} {'D':>4} {'regs':>5} {'stack':>6} {'shared':>7}"
    )
    rows = []
    with ProcessPoolExecutor(max(1, args.jobs)) as pool:
        for r in pool.map(_probe_job, jobs):
            rows.append(r)
            flag = "  SPILLS" if r.stack else ""
            print(
                f"{r.kernel:12} {r.variant:9} {r.config:22} {r.D:>4} {r.regs:>5} {r.stack:>6} "
                f"{r.shared:>7}{flag}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(to_markdown(rows, args.arch, argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
