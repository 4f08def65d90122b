"""README.md stays in step with the code: its list of upstream xfails equals the tests'."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from test_peft_upstream import CASE_IDS, KNOWN_PEFT, KNOWN_UPSTREAM_XFAILS

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- upstream-xfails:start -->", "<!-- upstream-xfails:end -->"


def readme_xfails(text: str) -> tuple[str, dict[str, set[str]]]:
    """``(peft minor version, {transformers minor: case ids})`` from the README's list.

    The list sits between ``START`` and ``END``: a line ``PEFT 0.21:``, then one bullet
    per version, ``- transformers 5.24: `prefix-gpt2`, `prompt-llama` ``.
    """
    if START not in text or END not in text:
        raise ValueError(f"README.md: no {START} ... {END} block")
    block = text.split(START, 1)[1].split(END, 1)[0]
    peft_ver = re.search(r"PEFT (\d+\.\d+)", block)
    table: dict[str, set[str]] = {}
    for ver, cases in re.findall(r"^- transformers (\d+\.\d+)[^:]*:(.*)$", block, re.M):
        table[ver] = set(re.findall(r"`([a-z0-9-]+)`", cases))
    return (peft_ver.group(1) if peft_ver else ""), table


def test_readme_lists_exactly_the_known_upstream_xfails() -> None:
    peft_ver, table = readme_xfails(README.read_text())
    assert peft_ver == KNOWN_PEFT
    assert table == KNOWN_UPSTREAM_XFAILS
    for cases in table.values():
        assert cases <= set(CASE_IDS), f"unknown case ids in README.md: {cases - set(CASE_IDS)}"


def test_the_parser_sees_a_missing_case() -> None:
    text = (
        f"{START}\nWith PEFT 0.21:\n- transformers 5.10: `prompt-gpt2`\n"
        f"- transformers 5.24 (every case): `prefix-gpt2`, `prompt-llama`\n{END}"
    )
    assert readme_xfails(text) == (
        "0.21",
        {"5.10": {"prompt-gpt2"}, "5.24": {"prefix-gpt2", "prompt-llama"}},
    )
    assert readme_xfails(text)[1] != KNOWN_UPSTREAM_XFAILS
    with pytest.raises(ValueError, match="block"):
        readme_xfails("no list here")
