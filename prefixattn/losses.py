"""Causal-LM loss from the last hidden states, in chunks of tokens: the [B, N, V] logits
(and their fp32 copy, log-softmax and gradient, several GiB for GPT-2's 50257-word
vocabulary at B x N = 8192) are never materialized.

Same value as transformers' ``ForCausalLMLoss`` on ``lm_head(hidden)``: labels shifted by
one, ``ignore_index`` skipped, logits computed in the weight's dtype and upcast to fp32,
mean over the counted tokens (or sum / ``num_items_in_batch``). When gradients are wanted
they are computed in the same pass over each chunk (the loss is the end of the graph),
so the backward costs nothing and the logits are made once.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100
# logits elements per chunk (fp32: 256 MiB), so a chunk is ~1.3k tokens for GPT-2
CHUNK_ELEMENTS = 2**26


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_t (logsumexp(h_t W^T + b) - (h_t W^T + b)[y_t]) * scale, chunk by chunk.

    The loss is a scalar at the end of the graph, so d loss / d logits of a chunk needs only
    that chunk's logits: with ``with_grad`` the gradients of ``hidden`` (and of ``weight``
    / ``bias`` if they require grad) are computed here, in the same pass over each chunk,
    and the backward only scales them by the incoming gradient (it never recomputes the
    logits).
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,  # [T, d]: the rows that have a target
        weight: torch.Tensor,  # [V, d]
        bias: torch.Tensor | None,  # [V]
        targets: torch.Tensor,  # [T] int64
        scale: float,
        chunk: int,
        with_grad: bool,
    ) -> torch.Tensor:
        need_h = with_grad and hidden.requires_grad
        need_w = with_grad and weight.requires_grad
        need_b = with_grad and bias is not None and bias.requires_grad
        f32 = dict(device=weight.device, dtype=torch.float32)
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, **f32) if need_w else None
        db = torch.zeros(weight.shape[0], **f32) if need_b else None
        total = torch.zeros((), **f32)
        for s in range(0, hidden.shape[0], chunk):
            h, t = hidden[s : s + chunk], targets[s : s + chunk]
            logits = _logits(h, weight, bias)  # [c, V] fp32
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if not (need_h or need_w or need_b):
                continue
            # d loss / d logits = (softmax - onehot(target)) * scale, in place
            grad = logits.sub_(lse[:, None]).exp_()
            grad[torch.arange(h.shape[0], device=h.device), t] -= 1.0
            grad = (grad * scale).to(hidden.dtype)  # as autograd does through .float()
            if need_h:
                dh[s : s + chunk] = grad @ weight
            if need_w:
                dw += grad.t().float() @ h.float()
            if need_b:
                db += grad.float().sum(0)
        ctx.save_for_backward(dh, dw, db)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        dh, dw, db = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (
            None if dh is None else dh * grad.to(dh.dtype),
            None if dw is None else (dw * grad).to(w_dtype),
            None if db is None else (db * grad).to(b_dtype),
            None,
            None,
            None,
            None,
        )


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """lm_head(h) in the weight's dtype, upcast to fp32 (as transformers does)."""
    out = h @ weight.t()
    if bias is not None:
        out = out + bias
    return out.float()


def causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy of ``hidden @ weight.T + bias`` without the full logits.

    Arguments:
        hidden: [B, N, d] last hidden states (after the final norm).
        weight: [V, d] output embedding (``model.get_output_embeddings().weight``).
        labels: int [B, N]; position i is predicted from position i - 1 (shifted inside,
            as transformers does); ``ignore_index`` entries do not count.
        bias: optional [V].
        num_items_in_batch: if given, the loss is the sum divided by it (transformers'
            gradient-accumulation convention); otherwise the mean over counted tokens.
        chunk_tokens: tokens per chunk (default: as many as fit 2^26 fp32 logits).

    Returns:
        A scalar fp32 loss; gradients flow to ``hidden`` (and to ``weight`` / ``bias`` if
        they require grad). With grad enabled they are computed here, with the loss (one
        [chunk, V] logits block at a time); the backward only scales them.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape [B, N, d], got {tuple(hidden.shape)}")
    if labels.shape != hidden.shape[:2]:
        raise ValueError(
            f"labels must have shape [B, N]={list(hidden.shape[:2])}, got {list(labels.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"weight must have shape [V, d] with d={hidden.shape[2]}, got {tuple(weight.shape)}"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if chunk_tokens is not None and (not isinstance(chunk_tokens, int) or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    # labels may live elsewhere (transformers moves them to the logits' device too)
    targets = labels[:, 1:].reshape(-1).long().to(hidden.device)  # [B * (N - 1)]
    keep = targets != ignore_index
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]  # [T, d], T counted tokens
    targets = targets[keep]
    if targets.numel():
        lo, hi = (int(x) for x in torch.aminmax(targets))  # one device sync
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(
                f"labels must be in [0, V={weight.shape[0]}) or {ignore_index}, got values in "
                f"[{lo}, {hi}]"
            )
    if num_items_in_batch is None:
        scale = 1.0 / targets.numel() if targets.numel() else float("nan")
    else:
        scale = 1.0 / float(num_items_in_batch)
    chunk = chunk_tokens or max(1, CHUNK_ELEMENTS // weight.shape[0])
    with_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    return _LinearCrossEntropy.apply(h, weight, bias, targets, scale, chunk, with_grad)


# models whose logits are exactly lm_head(last hidden state): no soft-capping or scaling
CHUNKED_LOSS_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")


def check_chunked_loss_support(model: Any) -> None:
    """Raise ``ValueError`` unless ``model``'s loss can be computed by :func:`causal_lm_loss`
    from its base model's last hidden state and its output embedding."""
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in CHUNKED_LOSS_MODEL_TYPES:
        raise ValueError(
            f"chunked_loss=True supports models of type {CHUNKED_LOSS_MODEL_TYPES} (logits = "
            f"lm_head(last hidden state)), got model_type {model_type!r}"
        )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or getattr(model, "base_model", model) is model:
        raise ValueError(
            "chunked_loss=True needs a causal LM with a base model and a linear output "
            f"embedding; {type(model).__name__} has none"
        )
    if getattr(cfg, "pretraining_tp", 1) != 1:
        raise ValueError("chunked_loss=True does not support pretraining_tp != 1")


def chunked_loss_forward(model: Any, input_ids: torch.Tensor | None, kwargs: dict) -> Any:
    """``model(input_ids=..., **kwargs)`` with ``labels``, the loss computed by
    :func:`causal_lm_loss` from ``model.base_model``'s last hidden state: a
    ``CausalLMOutputWithPast`` whose ``logits`` is None."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from .hf._compat import output_cache, output_cache_field

    kwargs = dict(kwargs)
    labels = kwargs.pop("labels")
    num_items = kwargs.pop("num_items_in_batch", None)
    return_dict = kwargs.pop("return_dict", True)
    unsupported = sorted(set(kwargs) & {"logits_to_keep", "shift_labels"})
    if unsupported:
        raise ValueError(f"chunked_loss=True does not take {unsupported}")
    out = model.base_model(input_ids=input_ids, return_dict=True, **kwargs)
    head = model.get_output_embeddings()
    loss = causal_lm_loss(
        out.last_hidden_state, head.weight, labels, head.bias, num_items_in_batch=num_items
    )
    res = CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        hidden_states=out.hidden_states,
        attentions=out.attentions,
        **{output_cache_field(CausalLMOutputWithPast): output_cache(out)},  # renamed in 5.2x
    )
    return res if return_dict else res.to_tuple()
