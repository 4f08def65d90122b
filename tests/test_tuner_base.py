"""The shared tuner base (prefixattn.hf.tuner), LayerPrefix, and where test support lives."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import prefixattn
from prefixattn import PrefixTuning, PromptTuning
from prefixattn.hf.patching import LayerPrefix, PrefixProvider, set_prefix
from prefixattn.hf.tuner import Tuner, offset_positions
from prefixattn.testing import single_thread, tiny_gpt2

PKG = Path(prefixattn.__file__).parent
ALIAS = PKG / "hf" / "testing.py"  # the old import path, kept as an alias


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    rel = path.relative_to(PKG.parent).with_suffix("")
    package = list(rel.parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join([*base, node.module] if node.module else base)
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def test_library_never_imports_test_support() -> None:
    offenders = [
        str(f.relative_to(PKG))
        for f in PKG.rglob("*.py")
        if f not in (ALIAS, PKG / "testing.py")
        and {"prefixattn.testing", "prefixattn.hf.testing"} & _imported_modules(f)
    ]
    assert offenders == [], f"library modules import test support: {offenders}"


def test_both_tuners_share_the_base() -> None:
    assert issubclass(PrefixTuning, Tuner) and issubclass(PromptTuning, Tuner)
    shared = ("gradient_checkpointing_enable", "from_config", "num_virtual_tokens", "_load")
    for cls in (PrefixTuning, PromptTuning):
        redefined = [n for n in shared if n in vars(cls)]
        assert redefined == [], f"{cls.__name__} redefines {redefined}"


class _TupleProvider(PrefixProvider):
    """An old-style provider that returns a tuple instead of a LayerPrefix."""

    def layer_prefix(self, layer_idx: int, batch_size: int):  # type: ignore[override]
        return torch.zeros(4, 2, 16), torch.zeros(4, 2, 16), None


def test_provider_must_return_layer_prefix() -> None:
    with single_thread():
        pt = PrefixTuning(tiny_gpt2(), 2, backend="reference")
        out = pt.model
        set_prefix(out, _TupleProvider())
        with pytest.raises(TypeError, match="LayerPrefix"):
            out(input_ids=torch.tensor([[3, 4, 5]]))


def test_layer_prefix_fields() -> None:
    k = torch.zeros(3, 4, 2, 16)
    lp = LayerPrefix(k, k, torch.tensor([0, 2]), torch.tensor([2, 1, 0]))
    assert lp.key is k and lp.index.tolist() == [0, 2] and lp.lengths.tolist() == [2, 1, 0]
    with pytest.raises(AttributeError):
        lp.key = k  # frozen: a provider's answer is not edited on the way down


def test_offset_positions_int_and_per_row() -> None:
    ids = torch.zeros(4, 5, dtype=torch.long)
    got = offset_positions({}, ids, 3)["position_ids"]
    assert got.tolist() == [[3, 4, 5, 6, 7]]
    per_row = offset_positions({}, ids, torch.tensor([0, 7]))["position_ids"]  # 2 rows x 2
    want = torch.arange(5)[None] + torch.tensor([0, 0, 7, 7])[:, None]
    assert torch.equal(per_row, want)
    assert offset_positions({"x": 1}, ids, 0) == {"x": 1}
    with pytest.raises(ValueError, match="rows"):
        offset_positions({}, ids, torch.tensor([1, 2, 3]))
