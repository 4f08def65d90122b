"""What every step of the GPU session shares: its context (device, dtype, dry run), the
JSON-lines record writer, and the timers.

A step never prints its results only: each result is one JSON object appended (and
flushed) to the stage's ``.jsonl`` file as soon as it exists, so a step killed by its
time budget still leaves what it finished. Every record carries ``schema``, ``step``,
``kind`` and ``t_s`` (seconds since the step started); :data:`RECORD_KINDS` lists the
kinds and the fields each must have (the CI dry-run test checks them).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = 1
DRY_ENV = "PREFIXATTN_SESSION_DRY"

# kind -> fields every record of that kind has (beyond schema / step / kind / t_s)
RECORD_KINDS: dict[str, tuple[str, ...]] = {
    "env": ("device", "versions", "dry_run"),
    "step": ("status", "rc", "wall_s", "budget_s"),  # written by run.py per step
    "test": ("nodeid", "outcome", "duration_s"),  # pytest results (core stage)
    "check": ("name", "ok", "errors"),  # a correctness check (values vs float64)
    "skip": ("name", "reason"),  # a part that could not run here, with why
    "error": ("name", "error"),  # a part that raised (the step goes on)
    "gemm": ("tflops", "ms", "n"),
    "row": ("name", "impl", "mode", "time_ms", "times_ms"),  # one timed implementation
    "compare": ("name", "a", "b", "ratio"),  # b's time / a's time, same run, alternating
    "crossover": ("points", "measured_max_work", "current_max_work"),
    "host": ("rows",),
    "e2e": ("impl", "variant", "tokens_per_s", "time_ms", "peak_mem_bytes"),
    "serve": ("variant", "tokens_per_s"),
}


def dry_run() -> bool:
    """True in ``--dry-run`` (CPU, tiny shapes, interpreter): set by run.py per step."""
    return os.environ.get(DRY_ENV, "0") == "1"


@dataclass
class StepContext:
    """One step's output file, start time and mode."""

    step: str
    out_file: Path
    dry: bool
    start: float = field(default_factory=time.monotonic)
    problems: int = 0  # error records and failed checks: the step exits 1

    def write(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Append one record (flushed and synced: it survives a kill right after)."""
        missing = [f for f in RECORD_KINDS[kind] if f not in fields]
        if missing:
            raise ValueError(f"record kind {kind!r} needs fields {missing}")
        rec = {
            "schema": SCHEMA,
            "step": self.step,
            "kind": kind,
            "t_s": round(time.monotonic() - self.start, 3),
            **fields,
        }
        if kind == "error" or (kind == "check" and not fields["ok"]):
            self.problems += 1
        line = json.dumps(_clean(rec), default=_json_default, allow_nan=False)
        with open(self.out_file, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        short = {k: v for k, v in rec.items() if k not in ("schema", "times_ms", "rows")}
        print(f"[{self.step}] {json.dumps(short, default=_json_default)[:400]}", flush=True)
        return rec

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Run one part of a step: an exception becomes an ``error`` record (with the
        traceback's tail) and the step goes on with its next part; a pytest skip
        exception or :class:`Skip` becomes a ``skip`` record."""
        try:
            yield
        except Skip as s:
            self.write("skip", name=name, reason=str(s))
        except Exception as e:
            if type(e).__name__ == "Skipped":  # pytest.skip() inside borrowed helpers
                self.write("skip", name=name, reason=str(e))
                return
            tb = traceback.format_exc(limit=6)
            self.write("error", name=name, error=f"{type(e).__name__}: {e}"[:1000], tb=tb[-3000:])


class Skip(Exception):
    """A part that cannot run here (the message says why)."""


def _clean(o: Any) -> Any:
    """NaN / inf -> None, recursively (JSON has neither)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    return repr(o)


def finite(x: float | None) -> float | None:
    """``x`` or None when not a finite number (JSON has no NaN / inf)."""
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------


def _sync(device: Any) -> None:
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()


def time_once_ms(fn: Callable[[], Any], device: Any, calls: int = 1) -> float:
    """Wall (CPU) or CUDA-event time of ``calls`` calls, per call, in ms."""
    import torch

    if getattr(device, "type", device) == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) * 1e3 / calls


def time_alternating(
    fns: dict[str, Callable[[], Any]],
    device: Any,
    *,
    rounds: int = 7,
    target_ms: float = 25.0,
    warmup: int = 2,
    max_calls: int = 200,
) -> dict[str, dict[str, Any]]:
    """Time several implementations back to back, alternating (A B C A B C ...), so a
    change of clocks or load hits all alike. Each round is ``calls`` calls between two
    CUDA events (``perf_counter`` on the CPU), ``calls`` chosen per implementation so a
    round lasts about ``target_ms``. Returns per name: median / min ms per call, the
    per-round times and ``calls``. The dry run makes one call of each (plumbing only)."""
    if dry_run():
        rounds, warmup, max_calls = 1, 0, 1
    calls: dict[str, int] = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        _sync(device)
        one = max(time_once_ms(fn, device), 1e-3) if max_calls > 1 else 1.0
        calls[name] = int(max(1, min(max_calls, target_ms // one)))
    times: dict[str, list[float]] = {n: [] for n in fns}
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))
        for name in order:
            times[name].append(time_once_ms(fns[name], device, calls[name]))
    return {
        n: {
            "time_ms": statistics.median(t),
            "time_ms_min": min(t),
            "times_ms": [round(x, 6) for x in t],
            "calls": calls[n],
            "timer": "cuda_event" if getattr(device, "type", device) == "cuda" else "perf_counter",
        }
        for n, t in times.items()
    }


def host_ms_per_call(fn: Callable[[], Any], device: Any, calls: int = 20) -> float:
    """Host time one call takes to return (median over ``calls``), the device kept busy:
    on CUDA the calls only enqueue work, so this is the Python + launch cost per call."""
    if dry_run():
        calls = 1
    for _ in range(3 if calls > 1 else 0):
        fn()
    _sync(device)
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    _sync(device)
    return statistics.median(out)


def peak_mem(fn: Callable[[], Any], device: Any) -> int | None:
    """Peak allocated bytes during one call (CUDA), absolute; None on the CPU."""
    import torch

    if getattr(device, "type", device) != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    res = fn()
    torch.cuda.synchronize()
    del res
    return int(torch.cuda.max_memory_allocated())


def versions() -> dict[str, str | None]:
    """Versions of what the numbers depend on (None = not installed)."""
    import platform

    import torch

    out: dict[str, str | None] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": str(torch.backends.cudnn.version())
        if torch.backends.cudnn.is_available()
        else None,
    }
    from importlib import metadata

    for mod in ("triton", "transformers", "peft", "prefixattn", "matplotlib", "fastapi"):
        try:  # the installed distribution's version, without importing it (fast)
            out[mod] = metadata.version(mod)
        except metadata.PackageNotFoundError:
            out[mod] = None
    return out
