"""The per-feature value table of the correctness core: one line per backend feature.

Each :class:`Feature` is one awkward shape (``case``: fields of ``tests/helpers.Case``,
over :data:`BASE` / :data:`DRY_BASE`) plus extra ``prefix_attention`` keywords
(``call``). The core step runs it through ``backend="triton"`` (bf16 on the GPU, fp32
under the interpreter in the dry run), forward and all five gradients, once with the
fused and once with the split backward (lines marked ``both_layouts``; ``auto`` for the
rest), and compares with the independent float64
reference ``tests/reference64.attention64`` called with the same keywords.

**To add a feature, add one line.** ``call`` values may be a callable ``(case, device) ->
value`` for tensors that depend on the shape. The float64 reference must accept the same
keyword (extend ``tests/reference64.py`` with the feature, as its tests need anyway),
e.g. for the window / softcap / sinks family::

    Feature("sliding window 32", {}, {"window": 32}),
    Feature("logit softcap 30", {}, {"softcap": 30.0}),

A keyword the installed ``prefix_attention`` does not take is recorded as a ``skip`` (so
this table may list features before their branch is merged).

**The serving path** (``cache_seqlens`` / ``cache_batch_idx``: the kernel reads a KV-cache
pool in place, inference only): lines with ``grads=False``, checked against
``tests/helpers.pool_attention64`` (the float64 reference row by row on each row's own
keys). The pool is the case's ``k`` / ``v`` (S = B slots of Nmax = Nk keys); lengths 0, 1,
Nmax and in between, slots out of order with one repeated. Each has a paged twin
(``block_table``: the same pool cut into shuffled blocks of 16 keys, ``Feature.paged``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

# one awkward shape (P, Nq, Nk, D from the tests' list; Nq != Nk; GQA); the dry run's is
# tiny because Triton's interpreter is slow
BASE: dict[str, Any] = dict(B=2, H=4, Hkv=2, Nq=77, Nk=113, P=33, D=64, prefix="shared")
DRY_BASE: dict[str, Any] = dict(B=2, H=2, Hkv=1, Nq=7, Nk=9, P=3, D=16, prefix="shared")


def _ragged_lengths(case: Any, device: Any) -> Any:
    import torch

    T = case.T if case.prefix == "bank" else case.B
    return torch.tensor([(3 * t + 1) % (case.P + 1) for t in range(T)], device=device)


def _window(case: Any, device: Any) -> int:
    return max(2, case.Nk // 3)  # shorter than the sequence: the window's blocks are skipped


def _sinks(case: Any, device: Any) -> Any:
    import torch

    return torch.linspace(-1.0, 1.0, case.H, device=device)  # [H] float32 sink logits


def _cache_seqlens(case: Any, device: Any) -> Any:
    """int32 [B]: Nmax, 0, 1, 2/3 Nmax, 2, ... (a row with no key, one, all of its slot)."""
    import torch

    n = case.Nk
    pick = (n, 0, 1, (2 * n) // 3, min(2, n))
    return torch.tensor([pick[b % len(pick)] for b in range(case.B)], dtype=torch.int32,
                        device=device)  # fmt: skip


def _cache_batch_idx(case: Any, device: Any) -> Any:
    """int32 [B]: slots out of order, the last row reading the first row's slot."""
    import torch

    idx = [(2 * b + 1) % case.B for b in range(case.B)]
    if case.B > 2:
        idx[-1] = idx[0]
    return torch.tensor(idx, dtype=torch.int32, device=device)


POOL = {"cache_seqlens": _cache_seqlens, "cache_batch_idx": _cache_batch_idx}
POOL_CASE = {"B": 5, "Nq": 1, "prefix": "none", "P": 0}  # decode rows over the pool


@dataclass(frozen=True)
class Feature:
    """One line of the table: ``case`` overrides the base shape, ``call`` adds keywords;
    ``dry_case`` overrides the dry run's base instead (default: ``case``);
    ``noncontiguous`` makes strided inputs; ``grads`` False checks the forward only;
    ``both_layouts`` checks the fused and the split backward (else ``auto``, which is the
    fused one at these sizes: each layout compiles its own kernels on a fresh machine);
    ``paged`` > 0 turns the KV-pool line into the same call over a paged cache of that
    block size (``tests/helpers.page_pool``: ``block_table``, blocks shuffled, shared by
    rows that read one slot)."""

    name: str
    case: dict[str, Any] = field(default_factory=dict)
    call: dict[str, Any | Callable[[Any, Any], Any]] = field(default_factory=dict)
    dry_case: dict[str, Any] | None = None
    noncontiguous: bool = False
    grads: bool = True
    both_layouts: bool = False
    paged: int = 0  # block size: the KV pool cut into shuffled blocks (block_table)


FEATURES: tuple[Feature, ...] = (
    Feature("shared prefix", {}, both_layouts=True),
    Feature("per-row prefix", {"prefix": "row"}),
    Feature("bank prefix + prefix_index", {"prefix": "bank", "T": 3}, both_layouts=True),
    Feature(
        "ragged bank (prefix_lengths)",
        {"prefix": "bank", "T": 3},
        {"prefix_lengths": _ragged_lengths},
    ),
    Feature("no prefix (P = 0)", {"prefix": "none", "P": 0}),
    Feature("P = 1", {"P": 1}),
    Feature("GQA 8:2", {"H": 8, "Hkv": 2}, dry_case={"H": 4, "Hkv": 2}, both_layouts=True),
    Feature("MQA 4:1", {"H": 4, "Hkv": 1}, dry_case={"H": 2, "Hkv": 1}),
    Feature("key padding, left", {"pad": "left"}),
    Feature("key padding, random", {"pad": "random", "prefix": "bank"}, both_layouts=True),
    Feature("not causal", {"causal": False}),
    Feature("decode Nq = 1", {"Nq": 1, "prefix": "bank"}, dry_case={"Nq": 1, "prefix": "bank"}),
    Feature("Nq = Nk = 17", {"Nq": 17, "Nk": 17}),
    Feature("head dim 80", {"D": 80}, dry_case={"D": 40}),
    Feature("head dim 96", {"D": 96}, dry_case={"D": 24}),
    Feature("head dim 128", {"D": 128}, dry_case={"D": 32}),
    Feature("sm_scale 0.3", {}, {"sm_scale": 0.3}),
    Feature("non-contiguous inputs", {"prefix": "row"}, noncontiguous=True),
    # model families (issue 20): window / softcap / sinks, alone and together
    Feature("sliding window Nk/3", {}, {"window": _window}),
    Feature(
        "sliding window, prefix sliding",
        {"prefix": "bank", "T": 3},
        {"window": _window, "prefix_window": "sliding"},
    ),
    Feature("logit softcap 30", {}, {"softcap": 30.0}),
    Feature("attention sinks", {}, {"sinks": _sinks}),
    Feature(
        "window + softcap + sinks, ragged bank",
        {"prefix": "bank", "T": 3},
        {"window": _window, "softcap": 20.0, "sinks": _sinks, "prefix_lengths": _ragged_lengths},
        both_layouts=True,
    ),
    # the serving path (issue 29): the KV-cache pool read in place, forward only, alone
    # and with the bank, window, softcap and sinks
    Feature(
        "KV pool: cache_seqlens alone", POOL_CASE, {"cache_seqlens": _cache_seqlens}, grads=False
    ),
    Feature("KV pool: cache_seqlens + cache_batch_idx", POOL_CASE, POOL, grads=False),
    Feature(
        "KV pool: chunk Nq=3, GQA 4:1, shared prefix",
        {**POOL_CASE, "Nq": 3, "H": 4, "Hkv": 1, "prefix": "shared", "P": 33},
        POOL,
        dry_case={**POOL_CASE, "Nq": 3, "prefix": "shared", "P": 3},
        grads=False,
    ),
    Feature(
        "KV pool + ragged bank",
        {**POOL_CASE, "prefix": "bank", "T": 3, "P": 33},
        {**POOL, "prefix_lengths": _ragged_lengths},
        dry_case={**POOL_CASE, "prefix": "bank", "T": 3, "P": 3},
        grads=False,
    ),
    Feature(
        "KV pool + sliding window", {**POOL_CASE, "Nq": 3}, {**POOL, "window": _window}, grads=False
    ),
    Feature("KV pool + softcap 30", POOL_CASE, {**POOL, "softcap": 30.0}, grads=False),
    Feature("KV pool + sinks", POOL_CASE, {**POOL, "sinks": _sinks}, grads=False),
    Feature(
        "KV pool + window + softcap + sinks, ragged bank, key padding",
        {**POOL_CASE, "Nq": 3, "prefix": "bank", "T": 3, "P": 33, "pad": "left"},
        {
            **POOL,
            "window": _window,
            "softcap": 20.0,
            "sinks": _sinks,
            "prefix_lengths": _ragged_lengths,
        },
        dry_case={**POOL_CASE, "Nq": 3, "prefix": "bank", "T": 3, "P": 3, "pad": "left"},
        grads=False,
    ),
)


def _paged(f: Feature, block_size: int = 16) -> Feature:
    """The paged twin of a KV-pool line (the dry run's pool: 40 keys, 3 blocks a slot)."""
    dry = {**(f.dry_case if f.dry_case is not None else f.case), "Nk": 40}
    name = f"paged KV (block {block_size}){f.name.removeprefix('KV pool')}"
    return replace(f, name=name, dry_case=dry, paged=block_size)


# the paged KV cache (block_table, issue 27's kernel; issue 29's rows): the KV-pool lines
# with slots read by two rows (shared blocks), a chunk over a shared prefix, the ragged
# bank, and everything together, again over a block pool (window / softcap / sinks alone
# over pages: tests/test_gpu.py). A checkout whose prefix_attention has no block_table
# records them as skips
PAGED_LINES = (
    "KV pool: cache_seqlens + cache_batch_idx",
    "KV pool: chunk Nq=3, GQA 4:1, shared prefix",
    "KV pool + ragged bank",
    "KV pool + window + softcap + sinks, ragged bank, key padding",
)
FEATURES = FEATURES + tuple(_paged(f) for f in FEATURES if f.name in PAGED_LINES)

DTYPE_GPU = "bfloat16"
DTYPE_DRY = "float32"  # the interpreter's bf16 tl.dot is broken
