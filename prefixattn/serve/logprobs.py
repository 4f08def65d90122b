"""Log-probabilities of chosen tokens and their top alternatives, from raw logits.

Shared by the engines (the static batcher and the continuous one): OpenAI and vLLM report
log-softmax of the model's raw logits, before temperature and top-p.
"""

from __future__ import annotations

import torch

from .request import TokenOut


def token_outs(logits: torch.Tensor, token_ids: list[int], k: int) -> list[TokenOut]:
    """One :class:`TokenOut` per row: ``token_ids[r]``'s log-probability under
    ``logits[r]`` and the ``k`` most likely tokens (descending; ``k = 0``: none).

    Arguments:
        logits: raw logits [R, V] (any float dtype; computed in float32).
        token_ids: R token ids.
        k: how many alternatives per row (0 <= k <= V).
    """
    if logits.dim() != 2 or logits.shape[0] != len(token_ids):
        raise ValueError(
            f"logits must be [R, V] with R = len(token_ids) = {len(token_ids)}, "
            f"got {tuple(logits.shape)}"
        )
    if not 0 <= k <= logits.shape[1]:
        raise ValueError(f"k must be in [0, {logits.shape[1]}], got {k}")
    lp = torch.log_softmax(logits.float(), dim=-1)  # [R, V]
    ids = torch.tensor(token_ids, dtype=torch.long, device=lp.device)  # [R]
    chosen = lp.gather(1, ids[:, None])[:, 0].tolist()  # [R]
    if k:
        vals, idx = lp.topk(k, dim=-1)  # [R, k]
        tops = [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
    else:
        tops = [[] for _ in token_ids]
    return [TokenOut(t, c, top) for t, c, top in zip(token_ids, chosen, tops)]
