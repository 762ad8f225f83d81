"""The gradient sweep's device-side steps, one window at a time: the head's loss and its gradient, and
one block's recomputed forward and backward with each weight gradient folded into an fp32 accumulator.

The engine (engine/gradients.py) walks the blocks with these; the planner (memory/probe.py) runs the
same functions on fake tensors to predict their peaks.

    G = sum_n |g_n|          (l1, default)
    G = sqrt(sum_n g_n^2)    (l2)
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from lowmem_gblm.stream.context import BlockContext, run_block

ACC_DTYPE = torch.float32  # gradient accumulators, logits and loss: fp32 whatever the compute dtype


def accumulate(acc: torch.Tensor, grad: torch.Tensor, grad_norm: str) -> None:
    """acc (fp32) += |g| or g*g. A 16-bit g is widened inside the op (exact), not copied to fp32 first."""
    if grad_norm == "l1":
        acc.add_(grad.abs())
    else:
        acc.addcmul_(grad, grad)


def finish(acc: torch.Tensor, grad_norm: str) -> torch.Tensor:
    """The finished norm G from its accumulator (in place for l2)."""
    return acc if grad_norm == "l1" else acc.sqrt_()


def as_leaf(sample: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A stored sample [1, T, D] as a fresh leaf on ``device`` that requires grad (always a copy)."""
    return sample.to(device=device, dtype=dtype, copy=True).requires_grad_(True)


def head_sample(norm: nn.Module, head: torch.Tensor, sample: torch.Tensor, labels: torch.Tensor,
                device: torch.device, dtype: torch.dtype,
                chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One window through the final norm and the head. sample: [1, T, D] (stored), labels: [T-1] (on device).

    Returns (mean next-token loss, fp32 scalar; dL/dh [1, T, D] in ``dtype``). ``chunk``: predicted
    positions per head call (None: the whole window): the fp32 logits [1, c, V], their log-softmax and
    gradients are then bounded by the chunk; the loss is the chunks' sums over T-1. Everything but the
    two results is freed when this returns.
    """
    h = as_leaf(sample, device, dtype)  # [1, T, D]
    predicted = h.shape[1] - 1
    with torch.enable_grad():
        if chunk is None or chunk >= predicted:
            logits = F.linear(norm(h), head).to(ACC_DTYPE)  # [1, T, V] fp32
            loss = F.cross_entropy(logits[0, :-1], labels)  # mean over the T-1 predicted positions
            del logits
            loss.backward()
            return loss.detach(), h.grad
        loss = torch.zeros((), dtype=ACC_DTYPE, device=device)
        for s in range(0, predicted, chunk):
            e = min(s + chunk, predicted)
            logits = F.linear(norm(h[:, s:e]), head).to(ACC_DTYPE)  # [1, c, V] fp32
            part = F.cross_entropy(logits[0], labels[s:e], reduction="sum") / predicted
            del logits
            part.backward()  # h.grad gathers each chunk's positions (zeros elsewhere)
            loss += part.detach()
            del part
    return loss, h.grad


def block_sample(block: nn.Module, ctx: BlockContext, weights: dict[str, torch.Tensor],
                 accs: dict[str, torch.Tensor], sample: torch.Tensor, incoming: torch.Tensor, grad_norm: str,
                 device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Recompute one sample's block forward (gradient checkpointing), backpropagate ``incoming``
    (dL/d output [1, T, D]), fold each weight's gradient into its fp32 accumulator.

    Each weight's gradient is folded and dropped as soon as backward has produced it (a post-accumulate
    hook), so at most one linear's gradient is alive at a time, not the whole block's.
    weights / accs: linear name -> weight (requires grad) / accumulator. Returns dL/d input [1, T, D].
    """
    x = as_leaf(sample, device, dtype)  # [1, T, D]
    hooks = [w.register_post_accumulate_grad_hook(partial(_fold, accs[name], grad_norm))
             for name, w in weights.items()]
    try:
        with torch.enable_grad():
            y = run_block(block, ctx, x)  # recompute
            y.backward(incoming.to(device=device, dtype=y.dtype))
        del y
    finally:
        for hook in hooks:
            hook.remove()
    return x.grad


def _fold(acc: torch.Tensor, grad_norm: str, weight: torch.Tensor) -> None:
    accumulate(acc, weight.grad, grad_norm)
    weight.grad = None


def grad_accumulators(block: nn.Module, names: list[str], device: torch.device
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights that now require grad, zeroed fp32 accumulators of their shapes), by linear name."""
    modules = dict(block.named_modules())
    weights = {name: modules[name].weight.requires_grad_(True) for name in names}
    accs = {name: torch.zeros(w.shape, dtype=ACC_DTYPE, device=device) for name, w in weights.items()}
    return weights, accs
