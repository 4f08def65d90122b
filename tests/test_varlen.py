"""``prefix_attention`` over packed rows (``cu_seqlens_q``), as FlashAttention's
``flash_attn_varlen_func``: q is [1, H, total_q, D], row b's q_len_b queries are the last
of its ``cache_seqlens[b]`` keys. Every backend against the float64 reference
(tests/reference64.py) run row by row on the row's own queries and keys: row lengths
1 / 3 / 0 / 5 / 2 (a decode step, prefill chunks, an empty row, a row with more queries
than keys), keys per row [B, Hkv, Nk, D], a slot pool (``cache_batch_idx``) or pages
(``block_table``), no prefix / shared / ragged bank, GQA, window / softcap / sinks.
Bad input: a clear error naming the argument.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import DEVICE, HAS_CUDA
from reference64 import attention64

import prefixattn

BACKENDS = ["reference", "sdpa", "triton"]
D, NK, BS = 16, 24, 16
Q_LENS = [1, 3, 0, 5, 2]
K_LENS = [9, 3, 17, 24, 1]  # row 4: 2 queries over 1 key (query 0 sees no key)


def _case(keys: str, prefix: str, H: int = 4, Hkv: int = 2, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B = len(Q_LENS)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    cu = [0]
    for n in Q_LENS:
        cu.append(cu[-1] + n)
    kw: dict = {
        "q": rnd(1, H, cu[-1], D),
        "cu_seqlens_q": torch.tensor(cu, dtype=torch.int32, device=DEVICE),
        "cache_seqlens": torch.tensor(K_LENS, dtype=torch.int32, device=DEVICE),
    }
    if keys == "rows":
        kw["k"], kw["v"] = rnd(B, Hkv, NK, D), rnd(B, Hkv, NK, D)
    elif keys == "slots":  # 3 slots, rows 1 and 3 share slot 0
        kw["k"], kw["v"] = rnd(3, Hkv, NK, D), rnd(3, Hkv, NK, D)
        kw["cache_batch_idx"] = torch.tensor([2, 0, 1, 0, 2], dtype=torch.int32, device=DEVICE)
        kw["cache_seqlens"] = torch.tensor([9, 3, 17, 24, 1], dtype=torch.int32, device=DEVICE)
    else:  # pages of 16 keys, shuffled; rows 2 and 3 share their first block
        kw["k"], kw["v"] = rnd(8, Hkv, BS, D), rnd(8, Hkv, BS, D)
        table = [[5, -1], [0, -1], [3, 6], [3, 1], [7, 2]]
        kw["block_table"] = torch.tensor(table, dtype=torch.int32, device=DEVICE)
    if prefix == "shared":
        kw["prefix_k"], kw["prefix_v"] = rnd(Hkv, 3, D), rnd(Hkv, 3, D)
    elif prefix == "bank":  # a ragged bank: entry lengths 7, 0, 3
        kw["prefix_k"], kw["prefix_v"] = rnd(3, Hkv, 7, D), rnd(3, Hkv, 7, D)
        kw["prefix_index"] = torch.tensor([0, 1, 2, 0, 2], device=DEVICE)
        kw["prefix_lengths"] = torch.tensor([7, 0, 3], device=DEVICE)
    return kw


def _row_kv(kw: dict, name: str, b: int, n: int) -> torch.Tensor:
    """[1, Hkv, n, D]: row b's first n keys (or values)."""
    t = kw[name]
    if "block_table" in kw:
        blocks = kw["block_table"][b].tolist()[: -(-n // BS)]
        if not blocks:
            return t[:1, :, :0]
        return torch.cat([t[i] for i in blocks], dim=1)[None, :, :n]
    slot = int(kw["cache_batch_idx"][b]) if "cache_batch_idx" in kw else b
    return t[slot : slot + 1, :, :n]


def _expected(kw: dict, **features) -> torch.Tensor:
    cu = kw["cu_seqlens_q"].tolist()
    outs = []
    for b in range(len(cu) - 1):
        n = int(kw["cache_seqlens"][b])
        row = {
            "q": kw["q"][:, :, cu[b] : cu[b + 1]],
            "k": _row_kv(kw, "k", b, n),
            "v": _row_kv(kw, "v", b, n),
            "causal": kw.get("causal", True),
            **features,
        }
        if "prefix_k" in kw:
            pk, pv = kw["prefix_k"], kw["prefix_v"]
            if "prefix_index" in kw:
                e = int(kw["prefix_index"][b])
                n_p = int(kw["prefix_lengths"][e])
                pk, pv = pk[e : e + 1, :, :n_p], pv[e : e + 1, :, :n_p]
            row["prefix_k"], row["prefix_v"] = pk, pv
        outs.append(attention64(**row))
    return torch.cat(outs, dim=2)  # [1, H, total_q, D]


def _tol(backend: str) -> float:
    return 2e-5 if backend != "triton" else 2e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keys", ["rows", "slots", "pages"])
@pytest.mark.parametrize("prefix", ["none", "shared", "bank"])
def test_matches_float64_row_by_row(backend: str, keys: str, prefix: str) -> None:
    kw = _case(keys, prefix)
    got = prefixattn.prefix_attention(**kw, backend=backend)
    assert got.shape == kw["q"].shape
    tol = _tol(backend)
    torch.testing.assert_close(got.double(), _expected(kw), atol=tol, rtol=tol)
    if prefix == "none":  # row 4's first query sees no key: exact zeros
        assert torch.count_nonzero(got[:, :, 9]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_softcap_sinks_fp16_and_not_causal(backend: str) -> None:
    kw = _case("pages", "shared", Hkv=1, seed=1)
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    for features in ({"window": 4}, {"softcap": 2.5, "sinks": sinks}):
        got = prefixattn.prefix_attention(**kw, **features, backend=backend)
        tol = _tol(backend)
        torch.testing.assert_close(got.double(), _expected(kw, **features), atol=tol, rtol=tol)
    kw = _case("slots", "bank", dtype=torch.float16, seed=3)
    kw["causal"] = False
    got = prefixattn.prefix_attention(**kw, backend=backend)
    torch.testing.assert_close(got.double(), _expected(kw), atol=3e-3, rtol=3e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_names_the_argument(backend: str) -> None:
    attn = functools.partial(prefixattn.prefix_attention, backend=backend)
    kw = _case("rows", "none")
    cu = kw["cu_seqlens_q"]
    bad = [
        ({"cu_seqlens_q": cu.float()}, TypeError, "cu_seqlens_q"),
        ({"cu_seqlens_q": cu.tolist()}, TypeError, "cu_seqlens_q"),
        ({"cu_seqlens_q": cu[None]}, ValueError, "cu_seqlens_q"),
        ({"cu_seqlens_q": cu[:-1]}, ValueError, "cache_seqlens|cu_seqlens_q"),  # B = 4
        ({"cache_seqlens": None}, ValueError, "cache_seqlens"),
        ({"q": kw["q"].expand(2, -1, -1, -1)}, ValueError, "q"),
        ({"dropout_p": 0.1}, ValueError, "dropout_p"),
    ]
    if not HAS_CUDA:  # on CUDA a bad value is a device-side assert (it ends the context)
        bad += [
            ({"cu_seqlens_q": cu + 1}, ValueError, "cu_seqlens_q"),  # does not start at 0
            ({"cu_seqlens_q": cu.flip(0)}, ValueError, "cu_seqlens_q"),
            ({"cu_seqlens_q": torch.tensor([0, 4, 2, 6, 11, 11]).int()}, ValueError, "cu_seq"),
        ]
    for change, err, name in bad:
        with pytest.raises(err, match=name):
            attn(**{**kw, **change})
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        attn(**{**kw, "q": kw["q"].clone().requires_grad_(True)})


def test_triton_rows_longer_than_a_query_tile() -> None:
    """Query tiles of 16: a row of 20 queries takes two programs, the rows of 1 and 3
    queries one (their second program returns at once), over a slot-per-row cache."""
    from prefixattn.ops.settings import KernelConfig, use_settings

    g = torch.Generator().manual_seed(4)
    kw = {
        "q": torch.randn(1, 2, 24, D, generator=g).to(DEVICE),
        "k": torch.randn(3, 1, 40, D, generator=g).to(DEVICE),
        "v": torch.randn(3, 1, 40, D, generator=g).to(DEVICE),
        "cu_seqlens_q": torch.tensor([0, 1, 21, 24], dtype=torch.int32, device=DEVICE),
        "cache_seqlens": torch.tensor([7, 33, 3], dtype=torch.int32, device=DEVICE),
    }
    with use_settings(fwd=KernelConfig(16, 16, 1, 1)):
        got = prefixattn.prefix_attention(**kw, backend="triton")
    torch.testing.assert_close(got.double(), _expected(kw), atol=2e-3, rtol=2e-3)


def _step_case(seed: int = 5) -> dict:
    """A serving step's shape: decode rows (1 query) and prefill chunks (7 and 20 queries,
    two of 7) in an order that puts rows of one length apart, over shuffled shared pages,
    a ragged bank, GQA."""
    g = torch.Generator().manual_seed(seed)
    q_lens = [1, 7, 1, 20, 7, 1]
    k_lens = [40, 7, 17, 52, 30, 1]
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    table = [[4, 0, 7], [9, -1, -1], [4, 5, -1], [1, 2, 3, 6][:4], [8, 10, -1], [11, -1, -1]]
    M = max(len(t) for t in table)
    table = [t + [-1] * (M - len(t)) for t in table]

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(DEVICE)

    return {
        "q": rnd(1, 4, cu[-1], D),
        "k": rnd(12, 2, BS, D),
        "v": rnd(12, 2, BS, D),
        "cu_seqlens_q": torch.tensor(cu, dtype=torch.int32, device=DEVICE),
        "cache_seqlens": torch.tensor(k_lens, dtype=torch.int32, device=DEVICE),
        "block_table": torch.tensor(table, dtype=torch.int32, device=DEVICE),
        "prefix_k": rnd(3, 2, 6, D),
        "prefix_v": rnd(3, 2, 6, D),
        "prefix_index": torch.tensor([0, 1, 2, 1, 0, 2], device=DEVICE),
        "prefix_lengths": torch.tensor([6, 2, 0], device=DEVICE),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_serving_step_with_rows_of_one_length_apart(backend: str) -> None:
    """Decode rows and chunks mixed, rows of one query count not adjacent (the sdpa
    backend's CPU path groups them by query count: its gathered-token branch), with a
    window and with soft-capping + sinks (a hybrid model's two kinds of layer)."""
    kw = _step_case()
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    tol = _tol(backend)
    for features in ({}, {"window": 5}, {"softcap": 3.0, "sinks": sinks}):
        got = prefixattn.prefix_attention(**kw, **features, backend=backend)
        torch.testing.assert_close(got.double(), _expected(kw, **features), atol=tol, rtol=tol)


def test_paged_row_layout_is_computed_once_per_tensors() -> None:
    """The sdpa backend's CPU row layout (gather indices, groups) is built once for the
    tensors every layer of a step shares, and again after an in-place change of one of
    them (a new step reusing a buffer): the result then matches the new values."""
    from prefixattn.ops.call import AttentionCall
    from prefixattn.ops.paged_rows import paged_rows

    kw = _step_case(seed=7)
    kw = {k: v.cpu() for k, v in kw.items()}
    call = AttentionCall(**kw, backend="sdpa")
    first = paged_rows(call)
    assert paged_rows(call) is first  # the next layer: the same layout
    assert sorted(g.nq for g in first.groups) == [1, 7, 20]
    ones = next(g for g in first.groups if g.nq == 1)
    assert ones.q_span is None and ones.tokens.tolist() == [0, 8, 36]  # rows 0, 2, 5
    # rows 0 and 2 swap their keys in place: a new layout, and the output follows
    kw["block_table"][[0, 2]] = kw["block_table"][[2, 0]].clone()
    kw["cache_seqlens"][[0, 2]] = kw["cache_seqlens"][[2, 0]].clone()
    assert paged_rows(AttentionCall(**kw, backend="sdpa")) is not first
    got = prefixattn.prefix_attention(**kw, backend="sdpa")
    torch.testing.assert_close(got.double(), _expected(kw), atol=2e-5, rtol=2e-5)


def test_decode_rows_of_very_different_lengths_are_split_and_exact() -> None:
    """Decode rows of 1 and ~20 blocks: the sdpa CPU path cuts them into two groups (the
    short rows gather 1 block each, not 20) and the output still equals the float64
    reference row by row."""
    from prefixattn.ops.call import AttentionCall
    from prefixattn.ops.paged_rows import paged_rows

    g = torch.Generator().manual_seed(9)
    k_lens = [300, 5, 290, 3, 310, 16, 17]
    need = [-(-n // BS) for n in k_lens]
    perm = torch.randperm(sum(need), generator=g).tolist()
    table, at = [], 0
    for n in need:
        table.append(perm[at : at + n] + [-1] * (max(need) - n))
        at += n
    kw = {
        "q": torch.randn(1, 4, len(k_lens), D, generator=g),
        "k": torch.randn(sum(need), 2, BS, D, generator=g),
        "v": torch.randn(sum(need), 2, BS, D, generator=g),
        "cu_seqlens_q": torch.arange(len(k_lens) + 1, dtype=torch.int32),
        "cache_seqlens": torch.tensor(k_lens, dtype=torch.int32),
        "block_table": torch.tensor(table, dtype=torch.int32),
        "prefix_k": torch.randn(2, 2, 5, D, generator=g),
        "prefix_v": torch.randn(2, 2, 5, D, generator=g),
        "prefix_index": torch.tensor([0, 1, 1, 0, 1, 0, 0]),
        "prefix_lengths": torch.tensor([5, 3]),
    }
    layout = paged_rows(AttentionCall(**kw, backend="sdpa"))
    assert sorted(g.rows.tolist() for g in layout.groups) == [[0, 2, 4], [1, 3, 5, 6]]
    assert sorted(g.m for g in layout.groups) == [2, 20]
    got = prefixattn.prefix_attention(**kw, backend="sdpa")
    torch.testing.assert_close(got.double(), _expected(kw), atol=2e-5, rtol=2e-5)
