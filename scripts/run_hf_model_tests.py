"""Run transformers' own model tests with every model patched by prefixattn (and stock).

The upstream test files are not in the pip package: give a transformers checkout (the
tag of the installed version, ``git checkout v$(python -c 'import transformers;
print(transformers.__version__)')``). The script runs pytest in it twice, stock and with
every ``PreTrainedModel`` patched at the end of its ``post_init`` (``prefixattn.patch``;
a model that does not use transformers' attention interface stays stock and is counted),
and prints the pass / fail / skip counts of both runs and the tests that pass stock but
fail patched::

    python scripts/run_hf_model_tests.py PATH/TO/transformers                 # issue 26's tests
    python scripts/run_hf_model_tests.py PATH/TO/transformers --all           # whole files
    python scripts/run_hf_model_tests.py PATH/TO/transformers -k custom_4d    # own selection
    python scripts/run_hf_model_tests.py PATH/TO/transformers --backend reference
    python scripts/run_hf_model_tests.py PATH/TO/transformers --save DIR      # keep the xml

Failures with a known cause (``KNOWN``: padding-free batches, the config check for
"sdpa") are marked as such; the exit status is 1 only for the others. Where no tagged
checkout can be had, a tree with the model / generation test files of a nearby
transformers commit and the ``tests/*.py`` of the installed version's sdist works (see
benchmarks/results/hf-model-tests-patched-20261206.md for how it was assembled).

Nothing of the checkout is copied here. This file is also the pytest plugin the patched
run loads (``-p run_hf_model_tests``, with this directory on ``PYTHONPATH``): its
``pytest_configure`` installs the patching when ``PREFIXATTN_PATCH_BACKEND`` is set.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "gemma2")
# the tests issue 26 names: static-cache generation, the compiled forward, custom 4-D masks
SELECTION = (
    "static_cache or compile_model_forward or custom_4d_attention_mask or cache_implementation"
)
# tests that pass stock and fail patched for a known reason (substring of the test name)
KNOWN = {
    "padding_free": "packed (padding-free) batches: a clear ValueError until varlen lands (issue 28)",
    "test_sdpa_can_dispatch_non_composite_models": (
        'asserts config._attn_implementation == "sdpa"; a patched model says "prefixattn" (by design)'
    ),
    # these build the model with attn_implementation="eager" (for attention weights) and the
    # patched run patches every model over that; prefixattn, like stock sdpa, returns none
    "test_attention_outputs": "forces eager for attention weights; patched gives none, as sdpa",
    "test_assisted_decoding_sample": "forces eager for attention weights; patched gives none, as sdpa",
    "test_retain_grad_hidden_states_attentions": "forces eager for attention weights, as above",
    "test_can_set_attention_dynamically": 'asserts config says "eager" after patching (by design)',
}
ENV = "PREFIXATTN_PATCH_BACKEND"
_skipped: list[str] = []
_patched: list[str] = []


# --------------------------------------------------------------------------------------
# the pytest plugin (loaded in the patched run)
# --------------------------------------------------------------------------------------


def pytest_configure(config: Any) -> None:
    """Patch every model transformers builds, at the end of its ``post_init``."""
    backend = os.environ.get(ENV)
    if not backend:
        return
    from transformers import PreTrainedModel

    import prefixattn

    original = PreTrainedModel.post_init

    def post_init(self: Any) -> None:
        original(self)
        try:
            prefixattn.patch(self, backend=backend)
            _patched.append(type(self).__name__)
        except ValueError:  # no attention interface: stays stock
            _skipped.append(type(self).__name__)

    PreTrainedModel.post_init = post_init


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if os.environ.get(ENV):
        terminalreporter.write_line(f"prefixattn: {len(_patched)} models patched")
    if os.environ.get(ENV) and _skipped:
        names = sorted(set(_skipped))
        terminalreporter.write_line(f"prefixattn: {len(_skipped)} models left stock: {names}")


# --------------------------------------------------------------------------------------
# the runner
# --------------------------------------------------------------------------------------


def _results(xml: Path) -> dict[str, str]:
    """test id -> "passed" | "failed" | "skipped" from a junit xml report."""
    out: dict[str, str] = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        if kinds & {"failure", "error"}:
            out[name] = "failed"
        elif "skipped" in kinds:
            out[name] = "skipped"
        else:
            out[name] = "passed"
    return out


def _run(checkout: Path, files: list[str], select: str | None, backend: str | None,
         extra: list[str], xml: Path) -> dict[str, str]:  # fmt: skip
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parent)
    env["PYTHONPATH"] = os.pathsep.join([here, str(checkout), env.get("PYTHONPATH", "")])
    env.pop(ENV, None)
    env.setdefault("HF_HUB_OFFLINE", "1")  # the pipeline tests' hub downloads skip at once
    if backend:
        env[ENV] = backend
    cmd = [sys.executable, "-m", "pytest", "-p", "run_hf_model_tests", "-p", "no:cacheprovider",
           "-q", "-rN", f"--junitxml={xml}", *files, *extra]  # fmt: skip
    if select:
        cmd += ["-k", select]
    print("+", " ".join(cmd), f"({ENV}={backend})" if backend else "(stock)", flush=True)
    subprocess.run(cmd, cwd=checkout, env=env, check=False)
    return _results(xml)


def _count(res: dict[str, str]) -> str:
    n = {k: sum(v == k for v in res.values()) for k in ("passed", "failed", "skipped")}
    return f"{n['passed']} passed / {n['failed']} failed / {n['skipped']} skipped"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkout", type=Path, help="a transformers git checkout")
    ap.add_argument("--all", action="store_true", help="every test of the files")
    ap.add_argument("-k", dest="select", default=None, help="a pytest -k expression")
    ap.add_argument("--backend", default="auto", help="prefixattn backend (default auto)")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--save", type=Path, default=None, help="keep the junit xml reports here")
    ap.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = ap.parse_args(argv)
    checkout = args.checkout.resolve()
    files = [f"tests/models/{f}/test_modeling_{f}.py" for f in args.families.split(",")]
    missing = [f for f in files if not (checkout / f).is_file()]
    if missing:
        ap.error(f"not in the checkout: {', '.join(missing)}")
    select = None if args.all else (args.select or SELECTION)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) if args.save is None else args.save.resolve()
        out.mkdir(parents=True, exist_ok=True)
        stock = _run(checkout, files, select, None, args.pytest_args, out / "stock.xml")
        patched = _run(checkout, files, select, args.backend, args.pytest_args, out / "patched.xml")
    print(f"stock:   {_count(stock)}")
    print(f"patched: {_count(patched)} (backend={args.backend})")
    broken = sorted(t for t, r in patched.items() if r == "failed" and stock.get(t) == "passed")
    unexplained = []
    for t in broken:
        why = next((r for k, r in KNOWN.items() if k in t), None)
        print(f"  passes stock, fails patched: {t}" + (f"  [known: {why}]" if why else ""))
        if why is None:
            unexplained.append(t)
    print(f"{len(broken)} pass stock and fail patched, {len(unexplained)} of them not known")
    return 1 if unexplained else 0


if __name__ == "__main__":
    raise SystemExit(main())
