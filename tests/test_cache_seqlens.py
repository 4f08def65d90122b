"""``prefix_attention`` over a KV-cache pool: per-row key lengths (``cache_seqlens``) and
per-row slots (``cache_batch_idx``), as FlashAttention's ``flash_attn_with_kvcache``.

Every backend against the independent float64 reference (tests/reference64.py) run row by
row on that row's own keys (``k[slot, :, :length]``): lengths 0, 1, 17 and the pool's
max, slots out of order and repeated, GQA, no prefix / a shared prefix / a ragged bank,
Nq = 1 (decode) and Nq = 3 (a chunk), with and without a key padding mask. Bad input: a
clear error naming the argument.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import DEVICE
from reference64 import attention64

import prefixattn

NMAX = 33
BACKENDS = ["reference", "sdpa", "triton"]
# fp32: the suite's tolerance (tests/helpers.py TOL) for every backend. The Triton kernel
# runs fp32 with true fp32 products (input_precision "ieee" unless the user allows TF32),
# so it needs no more than the others: measured max |error| vs float64 over this file's
# cases, 4e-7 (Triton interpreter) as the reference and sdpa backends.
FP32_TOL = 2e-5


def _case(prefix: str, Nq: int, H: int, Hkv: int, dtype: torch.dtype, kpm: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, S, D = 5, 4, 16

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    kw: dict = {
        "q": rnd(B, H, Nq, D),
        "k": rnd(S, Hkv, NMAX, D),
        "v": rnd(S, Hkv, NMAX, D),
        # lengths 0, 1, 17, max; slots out of order and repeated (rows 0 and 3 share slot 2)
        "cache_seqlens": torch.tensor([17, 0, NMAX, 1, 9], dtype=torch.int32, device=DEVICE),
        "cache_batch_idx": torch.tensor([2, 0, 3, 2, 1], dtype=torch.int32, device=DEVICE),
    }
    if prefix == "shared":
        kw["prefix_k"], kw["prefix_v"] = rnd(Hkv, 1, D), rnd(Hkv, 1, D)
    elif prefix == "bank":  # a ragged bank: entry lengths 7, 0, 3
        kw["prefix_k"], kw["prefix_v"] = rnd(3, Hkv, 7, D), rnd(3, Hkv, 7, D)
        kw["prefix_index"] = torch.tensor([0, 1, 2, 0, 2], device=DEVICE)
        kw["prefix_lengths"] = torch.tensor([7, 0, 3], device=DEVICE)
    if kpm:
        m = torch.rand(B, NMAX, generator=g) > 0.3
        kw["key_padding_mask"] = m.to(DEVICE)
    return kw


def _expected(kw: dict) -> torch.Tensor:
    """float64, row by row, on the row's own keys k[slot, :, :length]."""
    outs = []
    for b in range(kw["q"].shape[0]):
        s, n = int(kw["cache_batch_idx"][b]), int(kw["cache_seqlens"][b])
        row = {
            "q": kw["q"][b : b + 1],
            "k": kw["k"][s : s + 1, :, :n],
            "v": kw["v"][s : s + 1, :, :n],
            "causal": kw.get("causal", True),
        }
        if "prefix_k" in kw:
            pk, pv = kw["prefix_k"], kw["prefix_v"]
            if "prefix_index" in kw:
                e = int(kw["prefix_index"][b])
                n_p = int(kw["prefix_lengths"][e])
                pk, pv = pk[e : e + 1, :, :n_p], pv[e : e + 1, :, :n_p]
            row["prefix_k"], row["prefix_v"] = pk, pv
        if "key_padding_mask" in kw:
            row["key_padding_mask"] = kw["key_padding_mask"][b : b + 1, :n]
        outs.append(attention64(**row))
    return torch.cat(outs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prefix", ["none", "shared", "bank"])
@pytest.mark.parametrize("Nq", [1, 3])
@pytest.mark.parametrize("heads", [(4, 2), (2, 2)], ids=["gqa", "mha"])
def test_matches_float64_row_by_row(backend: str, prefix: str, Nq: int, heads) -> None:
    dtype = torch.float32
    for kpm in (False, True):
        kw = _case(prefix, Nq, *heads, dtype, kpm)
        got = prefixattn.prefix_attention(**kw, backend=backend)
        want = _expected(kw)
        torch.testing.assert_close(got.double(), want, atol=FP32_TOL, rtol=FP32_TOL)
        # a row with no visible key (length 0, no prefix) outputs exact zeros
        if prefix == "none":
            assert torch.count_nonzero(got[1]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_and_not_causal(backend: str) -> None:
    kw = _case("bank", 2, 4, 2, torch.float16, False, seed=3)
    kw["causal"] = False
    got = prefixattn.prefix_attention(**kw, backend=backend)
    torch.testing.assert_close(got.double(), _expected(kw), atol=3e-3, rtol=3e-3)


def test_without_cache_batch_idx_row_b_reads_slot_b() -> None:
    kw = _case("none", 1, 4, 2, torch.float32, False)
    kw["cache_batch_idx"] = None
    kw["k"], kw["v"] = kw["k"].repeat(2, 1, 1, 1)[:5], kw["v"].repeat(2, 1, 1, 1)[:5]
    for backend in BACKENDS:
        got = prefixattn.prefix_attention(**kw, backend=backend)
        want = _expected({**kw, "cache_batch_idx": torch.arange(5)})
        torch.testing.assert_close(got.double(), want, atol=FP32_TOL, rtol=FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_names_the_argument(backend: str) -> None:
    attn = functools.partial(prefixattn.prefix_attention, backend=backend)
    kw = _case("none", 1, 4, 2, torch.float32, False)
    bad = [
        ({"cache_seqlens": kw["cache_seqlens"].float()}, TypeError, "cache_seqlens"),
        ({"cache_seqlens": kw["cache_seqlens"][:3]}, ValueError, "cache_seqlens"),
        ({"cache_seqlens": kw["cache_seqlens"] + NMAX}, ValueError, "cache_seqlens"),
        ({"cache_seqlens": kw["cache_seqlens"] - 5}, ValueError, "cache_seqlens"),
        ({"cache_batch_idx": kw["cache_batch_idx"] + 4}, ValueError, "cache_batch_idx"),
        ({"cache_batch_idx": kw["cache_batch_idx"].float()}, TypeError, "cache_batch_idx"),
        ({"cache_batch_idx": kw["cache_batch_idx"][:2]}, ValueError, "cache_batch_idx"),
        ({"cache_batch_idx": None}, ValueError, "cache_batch_idx"),  # 4 slots, 5 rows
        ({"dropout_p": 0.1}, ValueError, "dropout_p"),
    ]
    for change, err, name in bad:
        with pytest.raises(err, match=name):
            attn(**{**kw, **change})
    q = kw["q"].clone().requires_grad_(True)
    with pytest.raises(ValueError, match="cache_seqlens"):
        attn(**{**kw, "q": q})
    with torch.no_grad():
        attn(**{**kw, "q": q})  # inference with a leaf that requires grad: fine
