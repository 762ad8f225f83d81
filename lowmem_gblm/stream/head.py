"""The model head on streamed hidden states: per-sample next-token loss and its gradient, in token chunks.

RMSNorm, the head matmul and cross-entropy all act on each token separately, so splitting the T
tokens of a window into chunks is exact: the loss is the sum of the chunk losses (each scaled by
1/(T-1)) and the gradient w.r.t. the hidden states is the chunks' gradients side by side. Chunking
bounds the logits ([chunk, vocab] in fp32, plus their log-softmax and gradient) instead of
[T, vocab]: for LLaMA (vocab 32000) at T = 2048 a whole window's fp32 logits are 262 MB, and
cross-entropy's backward holds three such tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LOSS_DTYPE = torch.float32  # logits are upcast before the softmax, as the published code does


def head_loss_and_grad(norm: nn.Module, head_weight: torch.Tensor, hidden: torch.Tensor, ids: torch.Tensor,
                       chunk: int | None = None, need_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean next-token cross-entropy of one window and its gradient w.r.t. the last hidden state.

    hidden: [1, T, D] (compute dtype); ids: [1, T]; head_weight: [V, D].
    Returns (loss: scalar fp32, grad: [1, T, D] in hidden's dtype, or None when ``need_grad`` is False).
    ``chunk``: tokens per head call (None: all T at once).
    """
    t = hidden.shape[1]
    chunk = t if chunk is None else max(1, min(int(chunk), t))
    predicted = t - 1  # the last position has no next token
    grad = torch.zeros_like(hidden) if need_grad else None
    loss = torch.zeros((), dtype=LOSS_DTYPE, device=hidden.device)
    for s in range(0, predicted, chunk):
        e = min(s + chunk, predicted)
        h = hidden[:, s:e].detach()  # [1, c, D]
        if need_grad:
            h.requires_grad_(True)
        with torch.set_grad_enabled(need_grad):
            logits = F.linear(norm(h), head_weight)  # [1, c, V]
            part = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).to(LOSS_DTYPE),
                                   ids[0, s + 1:e + 1].to(logits.device), reduction="sum") / predicted
            del logits
            if need_grad:
                (g,) = torch.autograd.grad(part, h)
                grad[:, s:e] = g
                del g
        loss = loss + part.detach()
        del part, h
    return loss, grad
