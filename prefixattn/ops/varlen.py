"""Packed (varlen) self-attention for training: ``prefix_attention(..., cu_seqlens=...)``.

A packed batch holds S sequences one after another in one row (padding-free training, as
``DataCollatorWithFlattening`` and TRL's ``padding_free=True`` build it)::

    cu_seqlens = [0, 3, 4, 8]            (S = 3 sequences, total = 8 tokens)
    q / k / v tokens   0 1 2 | 3 | 4 5 6 7
    sequence           0     | 1 | 2

Each sequence attends causally to itself only, and sees its own prefix (a shared prefix:
every sequence sees it; a bank: ``prefix_index`` [S] names each sequence's entry).

The path, "varlen-unpack" (logged at DEBUG on ``logging.getLogger("prefixattn")``): the
packed q, k, v are scattered into a padded batch [S, H, L, D] (L = the longest sequence,
sequence s in row s, left-aligned, so Nq == Nk per row and the kernel's causal mask is
exactly the sequence's), the ordinary padded call runs on any backend, and the output is
gathered back to [1, H, total, D]. The prefix is never copied: it is read from its own
buffer by the padded call. Padding queries get zero output gradient, so they add exactly
zero to every gradient. The copies are of q, k, v and the output (an index_copy and an
index_select each way: no float atomics on repeated indices, prefix gradients stay
bitwise deterministic). A native varlen kernel (no padding) is future work.
"""

from __future__ import annotations

import logging

import torch

from .validation import _assert_values

_log = logging.getLogger("prefixattn")


def check_packed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: object,
    max_seqlen: object,
    prefix_index: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    has_cache: bool,
) -> None:
    """Check a packed call's layout (the padded call checks everything else)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(
            f"cu_seqlens must be an int32/int64 torch.Tensor of shape [S + 1], got "
            f"{type(cu_seqlens).__name__}"
        )
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(
            f"cu_seqlens must have dtype torch.int32 or torch.int64, got {cu_seqlens.dtype}"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(
            f"cu_seqlens must have shape [S + 1] with S >= 1 sequences, got {list(cu_seqlens.shape)}"
        )
    if has_cache:
        raise ValueError(
            "cu_seqlens (packed training sequences) cannot be combined with the cache fields "
            "(cache_seqlens, cache_batch_idx, block_table, cu_seqlens_q: inference over a KV cache)"
        )
    if key_padding_mask is not None:
        raise ValueError(
            "cu_seqlens and key_padding_mask cannot be combined: a packed batch has no padding "
            "(each sequence's keys are cu_seqlens[s]:cu_seqlens[s + 1])"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[0] != 1:
            shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"with cu_seqlens, {name} must be packed as [1, H(kv), total, D], got {shape}"
            )
    if k.shape[2] != q.shape[2]:
        raise ValueError(
            f"with cu_seqlens, q and k/v hold the same packed tokens: q has {q.shape[2]}, "
            f"k has {k.shape[2]}"
        )
    if cu_seqlens.device != q.device:
        raise ValueError(
            f"cu_seqlens must be on the device of q ({q.device}), got {cu_seqlens.device}"
        )
    S = cu_seqlens.shape[0] - 1
    if prefix_index is not None and (
        not isinstance(prefix_index, torch.Tensor) or prefix_index.shape != (S,)
    ):
        got = list(prefix_index.shape) if isinstance(prefix_index, torch.Tensor) else prefix_index
        raise ValueError(
            f"with cu_seqlens, prefix_index names one bank entry per packed sequence: shape "
            f"[S]=[{S}], got {got}"
        )
    if max_seqlen is not None and (
        isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0
    ):
        raise ValueError(f"max_seqlen must be an int >= 0 (or None), got {max_seqlen!r}")
    total = q.shape[2]
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    ok = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == total) & (lens >= 0).all()
    _assert_values(
        cu_seqlens, ok, f"cu_seqlens must start at 0, not decrease and end at total={total}"
    )
    if max_seqlen is not None:
        _assert_values(
            lens,
            (lens <= max_seqlen).all(),
            f"cu_seqlens has a sequence longer than max_seqlen={max_seqlen}",
        )


def packed_layout(
    cu_seqlens: torch.Tensor, total: int, max_seqlen: int | None
) -> tuple[torch.Tensor, int, int]:
    """(dest [total] int64, S, L): packed token t goes to row-major slot dest[t] of the
    padded [S, L] batch (L = ``max_seqlen``, else the longest sequence: one host sync)."""
    cu = cu_seqlens.to(torch.int64)
    S = cu.shape[0] - 1
    lens = cu[1:] - cu[:-1]  # [S]
    L = int(lens.max()) if max_seqlen is None else max_seqlen
    seg = torch.repeat_interleave(
        torch.arange(S, device=cu.device), lens, output_size=total
    )  # [total]: the sequence of each token
    pos = torch.arange(total, device=cu.device) - cu[seg]  # [total]: position in its sequence
    return seg * L + pos, S, L


def unpack(x: torch.Tensor, dest: torch.Tensor, S: int, L: int) -> torch.Tensor:
    """[1, Hx, total, D] packed -> [S, Hx, L, D] padded (zeros past each sequence)."""
    _, Hx, _, D = x.shape
    buf = x.new_zeros(Hx, S * L, D).index_copy(1, dest, x[0])  # [Hx, S * L, D]
    return buf.view(Hx, S, L, D).transpose(0, 1)  # [S, Hx, L, D]


def repack(out: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    """[S, H, L, D] padded -> [1, H, total, D] packed."""
    S, H, L, D = out.shape
    flat = out.transpose(0, 1).reshape(H, S * L, D)  # [H, S * L, D]
    return flat.index_select(1, dest)[None]  # [1, H, total, D]


def log_path(S: int, L: int, total: int) -> None:
    """Say which path a packed call took (DEBUG; not while torch.compile traces)."""
    if not torch.compiler.is_compiling() and _log.isEnabledFor(logging.DEBUG):
        _log.debug(
            "prefixattn varlen-unpack path: %d packed sequences, %d tokens -> padded [%d, %d] "
            "(%.0f%% padding)", S, total, S, L, 100.0 * (1 - total / max(S * L, 1)),
        )  # fmt: skip


__all__ = ["check_packed", "log_path", "packed_layout", "repack", "unpack"]
