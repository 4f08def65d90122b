"""Bad input raises ValueError/TypeError naming the argument, on every backend."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, HAS_CUDA

import prefixattn


def good() -> dict:
    B, H, Hkv, N, P, D = 2, 4, 2, 6, 3, 16
    return dict(
        q=torch.randn(B, H, N, D, device=DEVICE),
        k=torch.randn(B, Hkv, N, D, device=DEVICE),
        v=torch.randn(B, Hkv, N, D, device=DEVICE),
        prefix_k=torch.randn(Hkv, P, D, device=DEVICE),
        prefix_v=torch.randn(Hkv, P, D, device=DEVICE),
    )


def bank(kw: dict, idx) -> dict:
    kw["prefix_k"] = torch.randn(3, 2, 3, 16, device=DEVICE)
    kw["prefix_v"] = torch.randn(3, 2, 3, 16, device=DEVICE)
    kw["prefix_index"] = idx
    return kw


OTHER = "cpu" if HAS_CUDA else "meta"

# (id, mutate(kwargs) -> kwargs, exception, words the message must contain)
BAD = [
    ("q-not-tensor", lambda kw: {**kw, "q": kw["q"].tolist()}, TypeError, ["q"]),
    ("q-rank", lambda kw: {**kw, "q": kw["q"][0]}, ValueError, ["q", "[B, H, Nq, D]"]),
    ("k-rank", lambda kw: {**kw, "k": kw["k"][..., None]}, ValueError, ["k", "[B, Hkv, Nk, D]"]),
    ("batch-mismatch", lambda kw: {**kw, "k": kw["k"][:1], "v": kw["v"][:1]}, ValueError, ["k", "B=2"]),
    ("head-dim-mismatch", lambda kw: {**kw, "k": kw["k"][..., :8], "v": kw["v"][..., :8]}, ValueError, ["k", "D=16"]),
    ("v-shape", lambda kw: {**kw, "v": kw["v"][:, :, :5]}, ValueError, ["v", "shape"]),
    ("gqa-divisibility", lambda kw: {**kw, "k": torch.randn(2, 3, 6, 16, device=DEVICE),
        "v": torch.randn(2, 3, 6, 16, device=DEVICE)}, ValueError, ["H=4", "Hkv=3"]),
    ("head-dim-small", lambda kw: {n: t[..., :8] for n, t in kw.items()}, ValueError, ["D", "[16, 256]"]),
    ("head-dim-large", lambda kw: {n: torch.randn(*t.shape[:-1], 272, device=DEVICE) for n, t in kw.items()},
        ValueError, ["D", "[16, 256]"]),
    ("dtype-int", lambda kw: {**kw, "q": kw["q"].long()}, TypeError, ["q", "dtype"]),
    ("dtype-mismatch", lambda kw: {**kw, "k": kw["k"].half()}, TypeError, ["k", "dtype"]),
    ("device-mismatch", lambda kw: {**kw, "v": kw["v"].to(OTHER)}, ValueError, ["v", "device"]),
    ("prefix-v-missing", lambda kw: {**kw, "prefix_v": None}, ValueError, ["prefix_v"]),
    ("prefix-heads", lambda kw: {**kw, "prefix_k": kw["prefix_k"][:1], "prefix_v": kw["prefix_v"][:1]},
        ValueError, ["prefix_k", "Hkv=2"]),
    ("prefix-shape-mismatch", lambda kw: {**kw, "prefix_v": kw["prefix_v"][:, :2]}, ValueError, ["prefix_v"]),
    ("prefix-rank", lambda kw: {**kw, "prefix_k": kw["prefix_k"][0], "prefix_v": kw["prefix_v"][0]},
        ValueError, ["prefix_k"]),
    ("prefix-dtype", lambda kw: {**kw, "prefix_k": kw["prefix_k"].half(), "prefix_v": kw["prefix_v"].half()},
        TypeError, ["prefix_k", "dtype"]),
    ("per-row-batch", lambda kw: {**kw, "prefix_k": torch.randn(3, 2, 3, 16, device=DEVICE),
        "prefix_v": torch.randn(3, 2, 3, 16, device=DEVICE)}, ValueError, ["prefix_k", "B=2", "prefix_index"]),
    ("index-out-of-range", lambda kw: bank(kw, torch.tensor([0, 3], device=DEVICE)), ValueError,
        ["prefix_index", "T=3"]),
    ("index-negative", lambda kw: bank(kw, torch.tensor([-1, 0], device=DEVICE)), ValueError, ["prefix_index"]),
    ("index-dtype", lambda kw: bank(kw, torch.tensor([0.0, 1.0], device=DEVICE)), TypeError,
        ["prefix_index", "int64"]),
    ("index-int32", lambda kw: bank(kw, torch.tensor([0, 1], dtype=torch.int32, device=DEVICE)), TypeError,
        ["prefix_index", "int64"]),
    ("index-shape", lambda kw: bank(kw, torch.tensor([0, 1, 2], device=DEVICE)), ValueError,
        ["prefix_index", "[B]"]),
    ("index-with-shared", lambda kw: {**kw, "prefix_index": torch.tensor([0, 1], device=DEVICE)},
        ValueError, ["prefix_index"]),
    ("index-without-prefix", lambda kw: {"q": kw["q"], "k": kw["k"], "v": kw["v"],
        "prefix_index": torch.tensor([0, 1], device=DEVICE)}, ValueError, ["prefix_index"]),
    ("mask-dtype", lambda kw: {**kw, "key_padding_mask": torch.ones(2, 6, device=DEVICE)}, TypeError,
        ["key_padding_mask", "bool"]),
    ("mask-shape", lambda kw: {**kw, "key_padding_mask": torch.ones(2, 7, dtype=torch.bool, device=DEVICE)},
        ValueError, ["key_padding_mask", "[B, Nk]"]),
    ("mask-not-tensor", lambda kw: {**kw, "key_padding_mask": [[True] * 6] * 2}, TypeError,
        ["key_padding_mask"]),
    ("causal-type", lambda kw: {**kw, "causal": "yes"}, TypeError, ["causal", "bool"]),
    ("scale-negative", lambda kw: {**kw, "sm_scale": -1.0}, ValueError, ["sm_scale"]),
    ("scale-nan", lambda kw: {**kw, "sm_scale": float("nan")}, ValueError, ["sm_scale"]),
    ("scale-type", lambda kw: {**kw, "sm_scale": "0.1"}, TypeError, ["sm_scale"]),
    ("dropout-range", lambda kw: {**kw, "dropout_p": 1.0}, ValueError, ["dropout_p", "[0, 1)"]),
    ("dropout-negative", lambda kw: {**kw, "dropout_p": -0.1}, ValueError, ["dropout_p"]),
    ("dropout-type", lambda kw: {**kw, "dropout_p": None}, TypeError, ["dropout_p"]),
]  # fmt: skip


@pytest.mark.parametrize("backend", ["reference", "auto", "triton", "sdpa"])
@pytest.mark.parametrize("name,mutate,exc,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input(backend: str, name: str, mutate, exc: type, words: list[str]) -> None:
    kw = mutate(good())
    with pytest.raises(exc) as info:
        prefixattn.prefix_attention(**kw, backend=backend)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"message {msg!r} does not mention {w!r}"


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match="backend"):
        prefixattn.prefix_attention(**good(), backend="cuda")


def test_float64_is_reference_only() -> None:
    kw = {n: t.double() for n, t in good().items()}
    out = prefixattn.prefix_attention(**kw, backend="reference")
    assert out.dtype == torch.float64
    with pytest.raises(TypeError, match="q"):
        prefixattn.prefix_attention(**kw, backend="triton")
