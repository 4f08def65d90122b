"""Run steps of the GPU session in this process, one after the other:
``python -m benchmarks.gpu_session.step NAME [NAME ...]``.

run.py starts it with the output folder in ``PREFIXATTN_SESSION_OUT`` and the dry-run
switch in ``PREFIXATTN_SESSION_DRY`` (one process per step on the GPU, one per stage in
the dry run). Each finished step gets its ``step`` record here (``ok``, or ``failed``
when it wrote an ``error`` record or a failed check); run.py adds ``timeout`` /
``crashed`` records for steps a killed process did not finish.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path

from .common import StepContext, dry_run
from .run import STEPS, _record, stage_file


def main(argv: list[str] | None = None) -> int:
    names = sys.argv[1:] if argv is None else argv
    by_name = {s.name: s for s in STEPS}
    unknown = [n for n in names if n not in by_name]
    if not names or unknown:
        raise SystemExit(f"usage: python -m benchmarks.gpu_session.step NAME...; steps: "
                         f"{', '.join(by_name)} (unknown: {unknown})")  # fmt: skip
    out = Path(os.environ.get("PREFIXATTN_SESSION_OUT", "."))
    budgets = json.loads(os.environ.get("PREFIXATTN_SESSION_BUDGETS", "{}"))
    rc = 0
    for name in names:
        step = by_name[name]
        path = stage_file(out, step.stage)
        ctx = StepContext(step.name, path, dry_run())
        module, func = step.target.split(":")
        t0 = time.monotonic()
        with ctx.part(step.name):
            fn = getattr(importlib.import_module(f"benchmarks.gpu_session.{module}"), func)
            fn(ctx)
        status = "failed" if ctx.problems else "ok"
        _record(path, step.name, status=status, rc=1 if ctx.problems else 0,
                    wall_s=round(time.monotonic() - t0, 1), budget_s=budgets.get(name),
                    problems=ctx.problems)  # fmt: skip
        print(f"step: {name} {status} ({time.monotonic() - t0:.1f} s)", flush=True)
        rc = rc or (1 if ctx.problems else 0)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
