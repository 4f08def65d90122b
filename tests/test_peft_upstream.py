"""PEFT's own ``generate`` against greedy decoding over PEFT's own forward.

The interop tests (test_peft_interop.py, test_prompt_tuning.py, test_gqa_models.py) check
prefixattn's generations against :func:`prefixattn.testing.greedy_reference` over PEFT's
forward (one unpadded row at a time, no cache), because PEFT's ``generate`` does not always
follow its forward: under transformers 5.24 with PEFT 0.21.2 it ignores a prefix-tuning
prefix (GPT-2: the base model's tokens), and its prompt-tuning generate on a left-padded
GPT-2 batch differs from its forward under transformers 5.10. Here each case checks ours
against the reference (a real test) and then PEFT's ``generate``: a disagreement is an
upstream defect, reported as an xfail naming the versions, never as a failure of ours.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from prefixattn import PrefixTuning, PromptTuning  # noqa: E402
from prefixattn.testing import (  # noqa: E402
    greedy_reference,
    left_padded_batch,
    single_thread,
    tiny_gpt2,
    tiny_llama,
    tiny_qwen2,
)

P = 4
NEW = 5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def gpt2() -> torch.nn.Module:
    # GPT-2's default init (std 0.02) makes a tiny random GPT-2 repeat its last token
    # whatever the prefix is: a larger init lets the prefix change the generations
    return tiny_gpt2(initializer_range=0.1)


FAMILIES: dict[str, Callable[[], torch.nn.Module]] = {
    "gpt2": gpt2,
    "llama": tiny_llama,
    "qwen2": tiny_qwen2,
}


def prefix_pair(base: torch.nn.Module, projection: bool) -> tuple:
    cfg = peft.PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=P,
        prefix_projection=projection,
        encoder_hidden_size=24,
    )
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    return pm, PrefixTuning.from_peft(pm, copy.deepcopy(base)).eval()


def prompt_pair(base: torch.nn.Module, projection: bool) -> tuple:
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    with torch.no_grad():  # PEFT's N(0, 1) init is huge for these models: use a sane prompt
        emb = pm.prompt_encoder["default"].embedding.weight
        emb.copy_(torch.randn(emb.shape, generator=torch.Generator().manual_seed(0)) * 0.1)
    return pm, PromptTuning.from_peft(pm, copy.deepcopy(base)).eval()


CASES = [
    ("prefix", "gpt2", False),
    ("prefix", "gpt2", True),
    ("prefix", "llama", False),
    ("prefix", "qwen2", False),
    ("prompt", "gpt2", False),
    ("prompt", "llama", False),
]


CASE_IDS = [f"{m}-{f}{'-proj' if p else ''}" for m, f, p in CASES]

# The cases whose PEFT generate disagrees with PEFT's forward, per transformers minor version,
# with PEFT 0.21 (observed by this test). README.md's "Known upstream xfails" list is
# checked against this table (tests/test_readme.py); on a listed version the test fails
# when the observed set differs, so the table (and the README) cannot go stale.
KNOWN_PEFT = "0.21"
KNOWN_UPSTREAM_XFAILS: dict[str, set[str]] = {
    "5.10": {"prompt-gpt2"},
    "5.17": {"prompt-gpt2"},
    "5.24": set(CASE_IDS),
}


def _known_xfails() -> set[str] | None:
    """The expected xfails for the installed versions; None when they are not tabled."""
    if not peft.__version__.startswith(KNOWN_PEFT + "."):
        return None
    minor = ".".join(transformers.__version__.split(".")[:2])
    return KNOWN_UPSTREAM_XFAILS.get(minor)


@pytest.mark.parametrize("method,family,projection", CASES, ids=CASE_IDS)
def test_peft_generate_against_its_forward(method: str, family: str, projection: bool) -> None:
    base = FAMILIES[family]()
    pm, ours = {"prefix": prefix_pair, "prompt": prompt_pair}[method](base, projection)
    ids, mask = left_padded_batch([6, 3, 5], seed=1)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    ref = greedy_reference(pm, ids, mask, max_new_tokens=NEW)

    # ours: a real check (the same as the interop tests, on these cases)
    assert torch.equal(ours.generate(**kw), ref)
    base_gen = base.generate(**kw)
    assert not torch.equal(base_gen, ref), "the prefix should change the greedy tokens"

    # PEFT's generate: an upstream defect when it disagrees with PEFT's own forward
    theirs = pm.generate(**kw)
    case = CASE_IDS[CASES.index((method, family, projection))]
    known = _known_xfails()
    if torch.equal(theirs, ref):
        assert known is None or case not in known, (
            f"{case}: PEFT's generate now agrees with its forward: remove it from "
            "KNOWN_UPSTREAM_XFAILS and README.md's list"
        )
        return
    assert known is None or case in known, (
        f"{case}: PEFT's generate disagrees with its forward under transformers "
        f"{transformers.__version__}: add it to KNOWN_UPSTREAM_XFAILS and README.md's list"
    )
    rows = [b for b in range(ids.shape[0]) if not torch.equal(theirs[b], ref[b])]
    how = (
        "it returns the base model's tokens: the prefix is ignored"
        if torch.equal(theirs, base_gen)
        else f"rows {rows} differ"
    )
    pytest.xfail(
        f"upstream defect: PEFT {peft.__version__} {method}-tuning generate disagrees with "
        f"greedy decoding over its own forward under transformers {transformers.__version__}, "
        f"torch {torch.__version__} ({how})"
    )
