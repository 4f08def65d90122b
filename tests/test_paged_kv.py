"""``prefix_attention`` over a paged KV cache (``block_table``), as FlashAttention's
``flash_attn_with_kvcache(..., block_table=...)`` and vLLM's paged attention.

k, v are a block pool [num_blocks, Hkv, block_size, D]; row b's key j lives in block
``block_table[b, j // block_size]`` at offset ``j % block_size``. Every backend against
the independent float64 reference (tests/reference64.py) run row by row on the row's own
keys, gathered here block by block with a Python loop (not with the library's gather):
block sizes 16 and 32, blocks shuffled and shared between rows, lengths 0 / 1 / bs - 1 /
bs / bs + 1 / 2 bs + 3, table entries past a row's last block holding -1, 0 or garbage,
Nq = 1 (decode) and Nq = 3 (a chunk over cached pages), GQA, no prefix / shared / ragged
bank, window / softcap / sinks, a key padding mask, fp16, Triton tiles that span pages.
Bad input: a clear error naming the argument.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import DEVICE, HAS_CUDA
from reference64 import attention64

import prefixattn
from prefixattn.ops.settings import KernelConfig, use_settings

BACKENDS = ["reference", "sdpa", "triton"]
D = 16
NUM_BLOCKS = 10
GARBAGE = 10**6  # a table entry past a row's last block: never read


def _lengths(bs: int) -> list[int]:
    return [0, 1, bs - 1, bs, bs + 1, 2 * bs + 3]


def _case(
    bs: int,
    prefix: str,
    Nq: int,
    H: int = 4,
    Hkv: int = 2,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    dim: int = D,
) -> dict:
    """A paged call: 6 rows of lengths :func:`_lengths`, blocks in shuffled order, row 5's
    first block shared with row 4 (prefix caching), one unused table entry per row at
    least (holding -1, 0 or a garbage id)."""
    g = torch.Generator().manual_seed(seed)
    lengths = _lengths(bs)
    B, M = len(lengths), -(-max(lengths) // bs) + 1  # max_blocks: one entry to spare

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    free = iter(torch.randperm(NUM_BLOCKS, generator=g).tolist())
    table: list[list[int]] = []
    for b, n in enumerate(lengths):
        row = [next(free) for _ in range(-(-n // bs))]
        if b == 5:
            row[0] = table[4][0]  # shared with row 4
        table.append(row + [(-1, 0, GARBAGE)[b % 3]] * (M - len(row)))
    kw: dict = {
        "q": rnd(B, H, Nq, dim),
        "k": rnd(NUM_BLOCKS, Hkv, bs, dim),
        "v": rnd(NUM_BLOCKS, Hkv, bs, dim),
        "cache_seqlens": torch.tensor(lengths, dtype=torch.int32, device=DEVICE),
        "block_table": torch.tensor(table, dtype=torch.int32, device=DEVICE),
    }
    if prefix == "shared":
        kw["prefix_k"], kw["prefix_v"] = rnd(Hkv, 5, dim), rnd(Hkv, 5, dim)
    elif prefix == "per_row":  # one prefix per row, rows seeing 0 to 4 of its 4 keys
        kw["prefix_k"], kw["prefix_v"] = rnd(B, Hkv, 4, dim), rnd(B, Hkv, 4, dim)
        kw["prefix_lengths"] = torch.tensor([4, 0, 1, 4, 3, 2], device=DEVICE)
    elif prefix == "bank":  # a ragged bank: entry lengths 7, 0, 3
        kw["prefix_k"], kw["prefix_v"] = rnd(3, Hkv, 7, dim), rnd(3, Hkv, 7, dim)
        kw["prefix_index"] = torch.tensor([0, 1, 2, 0, 2, 1], device=DEVICE)
        kw["prefix_lengths"] = torch.tensor([7, 0, 3], device=DEVICE)
    return kw


def _row_keys(pool: torch.Tensor, blocks: list[int], n: int) -> torch.Tensor:
    """[1, Hkv, n, D]: a row's first n keys, block after block."""
    if n == 0:
        return pool[:1, :, :0]
    return torch.cat([pool[i] for i in blocks], dim=1)[None, :, :n]


def _expected(kw: dict, **features) -> torch.Tensor:
    """float64, row by row, on the row's own keys gathered block by block."""
    outs = []
    bs = kw["k"].shape[2]
    for b in range(kw["q"].shape[0]):
        n = int(kw["cache_seqlens"][b])
        blocks = kw["block_table"][b].tolist()[: -(-n // bs)]
        row = {
            "q": kw["q"][b : b + 1],
            "k": _row_keys(kw["k"], blocks, n),
            "v": _row_keys(kw["v"], blocks, n),
            "causal": kw.get("causal", True),
            **features,
        }
        if "prefix_k" in kw:
            pk, pv = kw["prefix_k"], kw["prefix_v"]
            if "prefix_index" in kw:
                e = int(kw["prefix_index"][b])
                n_p = int(kw["prefix_lengths"][e])
                pk, pv = pk[e : e + 1, :, :n_p], pv[e : e + 1, :, :n_p]
            elif pk.dim() == 4:  # per row
                n_p = int(kw["prefix_lengths"][b])
                pk, pv = pk[b : b + 1, :, :n_p], pv[b : b + 1, :, :n_p]
            row["prefix_k"], row["prefix_v"] = pk, pv
        if "key_padding_mask" in kw:
            row["key_padding_mask"] = kw["key_padding_mask"][b : b + 1, :n]
        outs.append(attention64(**row))
    return torch.cat(outs)


def _tol(backend: str, dtype: torch.dtype = torch.float32) -> float:
    if dtype == torch.float16:
        return 3e-3
    return 2e-5 if backend != "triton" else 2e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("prefix", ["none", "shared", "per_row", "bank"])
@pytest.mark.parametrize("Nq", [1, 3])
def test_matches_float64_row_by_row(backend: str, bs: int, prefix: str, Nq: int) -> None:
    kw = _case(bs, prefix, Nq)
    got = prefixattn.prefix_attention(**kw, backend=backend)
    tol = _tol(backend)
    torch.testing.assert_close(got.double(), _expected(kw), atol=tol, rtol=tol)
    if prefix == "none":  # a row of length 0 sees nothing: exact zeros
        assert torch.count_nonzero(got[0]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bs", [16, 32])
def test_window_softcap_sinks_and_padding(backend: str, bs: int) -> None:
    kw = _case(bs, "shared", 3, H=4, Hkv=1, seed=1)
    g = torch.Generator().manual_seed(5)
    sinks = torch.randn(4, generator=g).to(DEVICE)
    for features in ({"window": 5}, {"softcap": 2.5, "sinks": sinks}, {"window": bs + 2}):
        got = prefixattn.prefix_attention(**kw, **features, backend=backend)
        tol = _tol(backend)
        torch.testing.assert_close(got.double(), _expected(kw, **features), atol=tol, rtol=tol)
    # a key padding mask over the logical keys [B, max_blocks * block_size]
    M = kw["block_table"].shape[1]
    kw["key_padding_mask"] = (torch.rand(6, M * bs, generator=g) > 0.3).to(DEVICE)
    got = prefixattn.prefix_attention(**kw, backend=backend)
    torch.testing.assert_close(got.double(), _expected(kw), atol=_tol(backend), rtol=_tol(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_bank_and_not_causal(backend: str) -> None:
    kw = _case(16, "bank", 3, dtype=torch.float16, seed=2)
    got = prefixattn.prefix_attention(**kw, backend=backend)
    torch.testing.assert_close(got.double(), _expected(kw), atol=3e-3, rtol=3e-3)
    kw["causal"] = False
    got = prefixattn.prefix_attention(**kw, backend=backend)
    torch.testing.assert_close(got.double(), _expected(kw), atol=3e-3, rtol=3e-3)


@pytest.mark.parametrize(
    ("bs", "tiles"),
    [(16, (16, 16)), (16, (16, 64)), (32, (16, 64)), (32, (32, 16))],
    ids=["bs16-n16", "bs16-n64", "bs32-n64", "bs32-n16"],
)
def test_triton_key_tiles_smaller_and_larger_than_a_block(bs: int, tiles: tuple) -> None:
    """A key tile of BLOCK_N keys may span several pages (BLOCK_N > block_size) or a part
    of one: every key finds its own page."""
    kw = _case(bs, "shared", 3, seed=3)
    with use_settings(fwd=KernelConfig(*tiles, 1, 1)):
        got = prefixattn.prefix_attention(**kw, backend="triton", window=bs + 5)
    want = _expected(kw, window=bs + 5)
    torch.testing.assert_close(got.double(), want, atol=2e-3, rtol=2e-3)


def test_paged_equals_the_contiguous_cache() -> None:
    """The same keys as a slot pool (cache_seqlens only) and as pages: the same output."""
    kw = _case(16, "bank", 1, seed=4)
    bs, M = 16, kw["block_table"].shape[1]
    slots = {}
    for name in ("k", "v"):
        rows = []
        for b, n in enumerate(_lengths(bs)):
            blocks = kw["block_table"][b].tolist()[: -(-n // bs)]
            row = torch.zeros(1, 2, M * bs, D, device=DEVICE)
            row[:, :, :n] = _row_keys(kw[name], blocks, n)
            rows.append(row)
        slots[name] = torch.cat(rows)  # [B, Hkv, M * bs, D]
    for backend in BACKENDS:
        paged = prefixattn.prefix_attention(**kw, backend=backend)
        flat = prefixattn.prefix_attention(**{**kw, "block_table": None, **slots}, backend=backend)
        torch.testing.assert_close(paged, flat, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_names_the_argument(backend: str) -> None:
    attn = functools.partial(prefixattn.prefix_attention, backend=backend)
    kw = _case(16, "none", 1)
    bt, csl = kw["block_table"], kw["cache_seqlens"]
    M = bt.shape[1]
    out_of_range = bt.clone()
    out_of_range[5, 2] = NUM_BLOCKS  # a block row 5 reads
    negative = bt.clone()
    negative[1, 0] = -1
    bad = [
        ({"block_table": bt.float()}, TypeError, "block_table"),
        ({"block_table": bt.tolist()}, TypeError, "block_table"),
        ({"block_table": bt[:3]}, ValueError, "block_table"),
        ({"block_table": bt[:, None]}, ValueError, "block_table"),
        ({"cache_seqlens": None}, ValueError, "cache_seqlens"),
        ({"cache_batch_idx": torch.zeros_like(csl)}, ValueError, "cache_batch_idx"),
        ({"k": kw["k"][:, :, :12], "v": kw["v"][:, :, :12]}, ValueError, "block_size"),
        ({"k": kw["k"][:, :, :8], "v": kw["v"][:, :, :8]}, ValueError, "block_size"),
        ({"dropout_p": 0.1}, ValueError, "dropout_p"),
        ({"key_padding_mask": torch.ones(6, 16, dtype=torch.bool)}, ValueError, "key_padding"),
    ]
    if not HAS_CUDA:  # on CUDA a bad value is a device-side assert (it ends the context)
        bad += [
            ({"block_table": out_of_range}, ValueError, "block_table"),
            ({"block_table": negative}, ValueError, "block_table"),
            ({"cache_seqlens": csl.clone().fill_(M * 16 + 1)}, ValueError, "cache_seqlens"),
        ]
    for change, err, name in bad:
        with pytest.raises(err, match=name):
            attn(**{**kw, **change})
    q = kw["q"].clone().requires_grad_(True)
    with pytest.raises(ValueError, match="block_table"):
        attn(**{**kw, "q": q})
    with torch.no_grad():
        attn(**{**kw, "q": q})  # inference with a leaf that requires grad: fine


def test_refused_under_torch_compile_by_name() -> None:
    """The traced path (torch.compile) refuses a paged call, naming block_table."""
    from prefixattn.ops.call import AttentionCall
    from prefixattn.ops.custom_op import traced_prefix_attention

    kw = _case(16, "none", 1)
    call = AttentionCall(
        kw["q"], kw["k"], kw["v"], cache_seqlens=kw["cache_seqlens"], block_table=kw["block_table"]
    )
    with pytest.raises(ValueError, match="block_table"):
        traced_prefix_attention(call)


@pytest.mark.parametrize(
    "prefix,bs,H,d,nq", [("none", 16, 4, 16, 1), ("shared", 32, 6, 40, 1),
                         ("per_row", 16, 6, 40, 1), ("bank", 32, 4, 16, 1),
                         ("bank", 16, 6, 40, 3), ("none", 16, 4, 16, 3)]
)  # fmt: skip
def test_traced_sdpa_decode_matches_float64(prefix: str, bs: int, H: int, d: int, nq: int) -> None:
    """A paged call traced by torch.compile on the sdpa backend (what the compiled engine
    step runs): every prefix layout, decode (1 query) and chunks (3 queries), matches the
    float64 reference row by row (table entries past a row's blocks hold -1 / 0 /
    garbage); a row that sees nothing (length 0, no prefix) is exact zeros."""
    kw = _case(bs, prefix, nq, H=H, Hkv=2, seed=bs + H, dim=d)
    fn = torch.compile(
        functools.partial(prefixattn.prefix_attention, backend="sdpa"), fullgraph=True
    )
    with torch.no_grad():
        got = fn(**kw)
    torch.testing.assert_close(got.double(), _expected(kw), atol=2e-5, rtol=2e-5)
    if prefix == "none":  # row 0: length 0, no prefix
        assert torch.count_nonzero(got[0]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_steps_reuse_the_plan_and_check_each_table(backend: str) -> None:
    """Decode steps with one signature (one cached plan): lengths grow across a block
    boundary while the table gains blocks; each step matches the reference, and a table
    that points a needed key out of the pool is refused on a plan hit too."""
    kw = _case(16, "shared", 1, seed=6)
    for step in range(3):
        kw["cache_seqlens"] = kw["cache_seqlens"] + 1  # 15 -> 16 -> 17 crosses a block
        kw["q"] = torch.randn_like(kw["q"])
        bt = kw["block_table"].clone()
        for b, n in enumerate(kw["cache_seqlens"].tolist()):
            used = -(-n // 16)
            if used and not 0 <= bt[b, used - 1] < NUM_BLOCKS:
                bt[b, used - 1] = (b + step) % NUM_BLOCKS  # a new block for the new key
        kw["block_table"] = bt
        got = prefixattn.prefix_attention(**kw, backend=backend)
        torch.testing.assert_close(got.double(), _expected(kw), atol=_tol(backend), rtol=2e-3)
    if HAS_CUDA:  # a bad value is a device-side assert there (it ends the context)
        return
    bad = kw["block_table"].clone()
    bad[5, 0] = -3
    with pytest.raises(ValueError, match="block_table"):
        prefixattn.prefix_attention(**{**kw, "block_table": bad}, backend=backend)


@pytest.mark.parametrize("backend", ["triton"])
def test_batch_past_the_grid_limit_is_cut_with_its_table(backend: str) -> None:
    """B * H past the grid limit: the launch is cut into row chunks; each chunk takes its
    rows of the table (and of a per-row prefix) and the whole block pool."""
    kw = _case(16, "per_row", 3, seed=7)
    with use_settings(max_grid_y=8):  # 6 rows x 4 heads: chunks of 2 rows
        got = prefixattn.prefix_attention(**kw, backend=backend)
    torch.testing.assert_close(got.double(), _expected(kw), atol=2e-3, rtol=2e-3)


@pytest.mark.skipif(HAS_CUDA, reason="on CUDA a bad value is a device-side assert")
@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_table_checked_once_per_version(backend: str) -> None:
    """The layers of a step share one table: checked once, and again after any in-place
    change (a block id written out of the pool is refused on the next call)."""
    kw = _case(16, "none", 1, seed=8)
    first = prefixattn.prefix_attention(**kw, backend=backend)
    again = prefixattn.prefix_attention(**kw, backend=backend)  # same tensors: a plan hit
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    kw["block_table"][5, 2] = NUM_BLOCKS + 3  # in place: a new version
    with pytest.raises(ValueError, match="block_table"):
        prefixattn.prefix_attention(**kw, backend=backend)
    kw["block_table"][5, 2] = 1
    kw["cache_seqlens"][2] = 10**4  # in place, another tensor
    with pytest.raises(ValueError, match="cache_seqlens"):
        prefixattn.prefix_attention(**kw, backend=backend)


# ------------------------------------------------------------------------------------------
# the traced CPU decode path (prefixattn/ops/paged_decode.py): reductions over the pages
# ------------------------------------------------------------------------------------------


def _decode_case(prefix: str, P: int, dim: int, H: int, Hkv: int, dtype: torch.dtype) -> dict:
    """A decode call (one query per row) of :func:`_case` with a prefix of P keys: shared,
    one per row or a ragged bank (lengths from 0 to P), on the CPU."""
    kw = _case(16, "none", 1, H=H, Hkv=Hkv, dtype=dtype, seed=P + dim, dim=dim)
    kw = {n: t.cpu() for n, t in kw.items()}
    g = torch.Generator().manual_seed(P * 7 + dim)
    B = kw["q"].shape[0]
    if prefix == "shared":
        shape = (Hkv, P, dim)
    elif prefix == "per_row":
        shape = (B, Hkv, P, dim)
        kw["prefix_lengths"] = torch.randint(0, P + 1, (B,), generator=g)
    elif prefix == "bank":
        shape = (3, Hkv, P, dim)
        kw["prefix_index"] = torch.tensor([0, 1, 2, 0, 2, 1])
        kw["prefix_lengths"] = torch.tensor([P, 0, P // 2])
    if prefix != "none":
        kw["prefix_k"] = torch.randn(*shape, generator=g).to(dtype)
        kw["prefix_v"] = torch.randn(*shape, generator=g).to(dtype)
    return kw


def _decode_call(kw: dict, **features):
    from prefixattn.ops.call import AttentionCall
    from prefixattn.ops.validation import validate

    call = AttentionCall(**kw, **features, backend="sdpa")
    return call, validate(call, check_values=True)


@pytest.mark.parametrize(
    ("prefix", "P"),
    [("none", 0), ("bank", 0)]
    + [(p, n) for p in ("shared", "per_row", "bank") for n in (1, 7, 33)],
)
@pytest.mark.parametrize(("dim", "H", "Hkv"), [(40, 6, 2), (80, 4, 4), (96, 3, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_paged_decode_reductions_match_float64(
    prefix: str, P: int, dim: int, H: int, Hkv: int, dtype: torch.dtype
) -> None:
    """The traced decode path's math (run eagerly here: the same ops Inductor fuses) against
    the float64 reference row by row: every prefix layout with P = 0 / 1 / 7 / 33 (ragged
    lengths down to 0), GQA / MHA / MQA, D = 40 / 80 / 96, float32 / fp16 / bf16 inputs,
    rows of length 0 / 1 / bs - 1 / bs / bs + 1 / 2 bs + 3 and table entries past a row's
    blocks holding -1 / 0 / garbage; with window, soft-capping and sinks, and not causal."""
    from prefixattn.ops import paged_decode

    kw = _decode_case(prefix, P, dim, H, Hkv, dtype)
    sinks = torch.randn(H, generator=torch.Generator().manual_seed(3))
    tol = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    for features in ({}, {"window": 5}, {"softcap": 2.5, "sinks": sinks}, {"causal": False}):
        call, prob = _decode_call(kw, **features)
        assert paged_decode.applies(call, prob)
        got = paged_decode.paged_decode_attention(call, prob)
        assert got.dtype == dtype and got.shape == kw["q"].shape
        want = _expected({**kw, "causal": features.get("causal", True)}, **{
            n: f for n, f in features.items() if n != "causal"
        })  # fmt: skip
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
        if P == 0 and "sinks" not in features:  # row 0 sees nothing: zeros
            assert torch.count_nonzero(got[0]) == 0


def test_paged_decode_applies_only_to_what_it_computes() -> None:
    """Chunks of several queries, packed rows, a key padding mask or dropout keep the
    gather + SDPA path."""
    from prefixattn.ops import paged_decode

    kw = _decode_case("bank", 7, 16, 4, 2, torch.float32)
    call, prob = _decode_call(kw)
    assert paged_decode.applies(call, prob)
    chunk, chunk_prob = _decode_call({**kw, "q": torch.randn(6, 4, 3, 16)})
    assert not paged_decode.applies(chunk, chunk_prob)
    kpm = torch.ones(6, kw["block_table"].shape[1] * 16, dtype=torch.bool)
    masked, masked_prob = _decode_call(kw, key_padding_mask=kpm)
    assert not paged_decode.applies(masked, masked_prob)
    assert not paged_decode.applies(call._replace(dropout_p=0.1), prob)
    assert not paged_decode.applies(call._replace(cu_seqlens_q=torch.arange(7)), prob)


def _traced_ops(fn, **kw) -> str:
    """The code of the FX graph Dynamo hands the backend for ``fn(**kw)``."""
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(fn, backend=backend, fullgraph=True)(**kw)
    return "\n".join(gm.code for gm in graphs)


def test_traced_decode_reads_the_pages_without_sdpa_and_chunks_keep_sdpa() -> None:
    """Under torch.compile a paged CPU decode call traces to the reductions (no SDPA, no
    index_select gather: the pages are indexed where the products read them); a chunk of 3
    queries traces the gather + SDPA path. Both against float64 compiled by Inductor."""
    torch._dynamo.reset()  # other tests compiled prefix_attention for other shapes
    attn = functools.partial(prefixattn.prefix_attention, backend="sdpa")
    kw = _decode_case("bank", 7, 40, 6, 2, torch.float32)
    code = _traced_ops(attn, **kw)
    assert "scaled_dot_product" not in code and "index_select" not in code
    chunk = {**kw, "q": torch.randn(6, 6, 3, 40)}
    assert "scaled_dot_product" in _traced_ops(attn, **chunk)
    sinks = torch.randn(6, generator=torch.Generator().manual_seed(1))
    fn = torch.compile(attn, fullgraph=True)
    with torch.no_grad():
        got = fn(**kw, window=9, softcap=3.0, sinks=sinks)
    want = _expected(kw, window=9, softcap=3.0, sinks=sinks)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_traced_decode_computes_a_rotary_q_once() -> None:
    """Inductor computes a pointwise q (here rotated by a rotary embedding, as every RoPE
    model's) into a buffer before the score loop, with batch and table width dynamic as
    the compiled engine step marks them: the generated score loop reads q, it does not
    recompute cos / sin for every key (the as_strided in paged_decode.py)."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    kw = _decode_case("none", 0, 16, 4, 2, torch.float32)
    pos = (kw["cache_seqlens"].to(torch.int64) - 1)[:, None]  # [B, 1]
    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))

    def step(q, k, v, cache_seqlens, block_table, pos):
        f = pos[:, :, None].float() * inv  # [B, 1, D / 2]
        emb = torch.cat((f, f), -1)  # [B, 1, D]
        cos, sin = emb.cos()[:, None], emb.sin()[:, None]  # [B, 1, 1, D]
        q = q * cos + torch.cat((-q[..., 8:], q[..., :8]), -1) * sin
        return prefixattn.prefix_attention(
            q, k, v, cache_seqlens=cache_seqlens, block_table=block_table, backend="sdpa"
        )

    args = (kw["q"], kw["k"], kw["v"], kw["cache_seqlens"], kw["block_table"], pos)
    for t in (kw["q"], kw["cache_seqlens"], kw["block_table"], pos):
        torch._dynamo.maybe_mark_dynamic(t, 0)
    torch._dynamo.maybe_mark_dynamic(kw["block_table"], 1)
    with torch.no_grad():
        got, code = run_and_get_code(torch.compile(step, fullgraph=True), *args)
    src = "\n".join(code)
    assert ".cos()" in src or "std::cos" in src, "the rotary embedding was not compiled"
    kernels = [k for k in src.split('extern "C"') if "tmp_acc" in k]
    assert kernels, "no reduction kernel was generated"
    for k in kernels:  # cos / sin run before the first reduction loop, never inside one
        body = k.split("tmp_acc", 1)[1]
        assert ".cos()" not in body and "std::cos" not in body, "q recomputed per key"
    want = step(*args)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
