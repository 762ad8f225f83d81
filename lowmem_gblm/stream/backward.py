"""The gradient sweep's device-side steps, B windows per call: the head's losses and their gradients, and
one block's recomputed forward and backward with each window's weight gradient folded into an fp32
accumulator (exact per window: the batch never sums the windows' gradients).

The engine (engine/gradients.py) walks the blocks with these; the planner (memory/probe.py) runs the
same functions on fake tensors to predict their peaks.

    G = sum_n |g_n|          (l1, default)
    G = sqrt(sum_n g_n^2)    (l2)
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from lowmem_gblm.stream.context import BlockContext, run_block
from lowmem_gblm.stream.stats import ExpertTap, by_expert

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


def head_windows(norm: nn.Module, head: torch.Tensor, samples: torch.Tensor, labels: torch.Tensor,
                 device: torch.device, dtype: torch.dtype,
                 chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """B windows through the final norm and the head. samples: [B, T, D] (stored), labels: [B, T-1] (on device).

    Returns (each window's mean next-token loss [B], fp32; dL_n/dh_n [B, T, D] in ``dtype``). The windows are
    independent, so the gradient of the summed losses is each window's own gradient. ``chunk``: predicted
    positions per head call (None: the whole window): the fp32 logits [B, c, V], their log-softmax and
    gradients are then bounded by the chunk. Everything but the two results is freed when this returns.
    """
    h = as_leaf(samples, device, dtype)  # [B, T, D]
    b, predicted = h.shape[0], h.shape[1] - 1
    with torch.enable_grad():
        if chunk is None or chunk >= predicted:
            logits = F.linear(norm(h), head).to(ACC_DTYPE)  # [B, T, V] fp32
            per_token = F.cross_entropy(logits[:, :-1].reshape(b * predicted, -1), labels.reshape(-1),
                                        reduction="none")
            del logits
            losses = per_token.view(b, predicted).mean(dim=1)  # each window's mean over its T-1 positions
            del per_token
            losses.sum().backward()
            return losses.detach(), h.grad
        losses = torch.zeros(b, dtype=ACC_DTYPE, device=device)
        for s in range(0, predicted, chunk):
            e = min(s + chunk, predicted)
            logits = F.linear(norm(h[:, s:e]), head).to(ACC_DTYPE)  # [B, c, V] fp32
            part = F.cross_entropy(logits.reshape(b * (e - s), -1), labels[:, s:e].reshape(-1),
                                   reduction="none").view(b, e - s).sum(dim=1) / predicted
            del logits
            part.sum().backward()  # h.grad gathers each chunk's positions (zeros elsewhere)
            losses += part.detach()
            del part
    return losses, h.grad


def classifier_windows(head: nn.Module, samples: torch.Tensor, labels: torch.Tensor | None, device: torch.device,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B images through a vision transformer's head (io.model.ClassifierHead: final layernorm, pooling,
    classifier). samples: [B, T, D] (stored); labels: [B] (on device), or None: each image's own predicted class.

    Returns (each image's cross-entropy [B] fp32, dL_n/dh_n [B, T, D] in ``dtype``, the labels used [B]). The
    images are independent, so the gradient of the summed losses is each image's own gradient."""
    h = as_leaf(samples, device, dtype)  # [B, T, D]
    with torch.enable_grad():
        logits = head(h).to(ACC_DTYPE)  # [B, classes] fp32
        if labels is None:  # without labels: the dense model's own prediction (the gradient sweep sees the dense model)
            labels = logits.detach().argmax(dim=-1)
        losses = F.cross_entropy(logits, labels, reduction="none")  # [B]
        losses.sum().backward()
    return losses.detach(), h.grad, labels


def block_windows(block: nn.Module, ctx: BlockContext, linears: dict[str, nn.Linear],
                  accs: dict[str, torch.Tensor], samples: torch.Tensor, incoming: torch.Tensor, grad_norm: str,
                  device: torch.device, dtype: torch.dtype,
                  experts: dict[str, tuple[str, int, slice]] | None = None) -> torch.Tensor:
    """Recompute B windows' block forward (gradient checkpointing), backpropagate ``incoming`` (dL/d output
    [B, T, D]) in one batched call, and fold every window's own weight gradient into the fp32 accumulators.

    GBLM needs sum_n |g_n| or sum_n g_n^2, which the batch's summed gradient would destroy, so autograd
    computes no weight gradient at all: each linear's input x [B, T, in] is kept by a forward hook, and when
    backward reaches the linear's output gradient d [B, T, out], g_n = d_n^T x_n is formed one window at a
    time (the matmul autograd does for one window) and folded in window order, then dropped: at most one
    [out, in] gradient is alive at a time. linears / accs: by unit name. Returns dL/d input [B, T, D].

    ``experts`` (StreamedModel.expert_units, for the stored expert matrices among ``accs``): an ExpertTap keeps
    the routed tokens x_e of each expert's matmul and folds d_e^T x_e, split into the units' rows. The routed
    tokens of several windows are not told apart, so a block with experts runs its windows one at a time.
    """
    groups = by_expert(experts or {}, list(accs))
    if groups and samples.shape[0] > 1:
        return torch.cat([block_windows(block, ctx, linears, accs, samples[n:n + 1], incoming[n:n + 1], grad_norm,
                                        device, dtype, experts) for n in range(samples.shape[0])])
    x = as_leaf(samples, device, dtype)  # [B, T, D]
    inputs: dict[str, torch.Tensor] = {}

    def keep_input(name: str, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        inputs[name] = args[0].detach()
        out.register_hook(partial(fold_windows, name))

    def fold_windows(name: str, grad_out: torch.Tensor) -> None:
        inp, acc = inputs.pop(name), accs[name]
        for n in range(inp.shape[0]):
            accumulate(acc, window_grad(grad_out[n], inp[n]), grad_norm)

    def keep_expert(param: str, e: int, inp: torch.Tensor, out: torch.Tensor) -> None:
        units = groups.get((param, e))
        if units and out.requires_grad:
            out.register_hook(partial(fold_expert, units, inp.detach()))

    def fold_expert(units: list[str], inp: torch.Tensor, grad_out: torch.Tensor) -> None:
        g = window_grad(grad_out, inp)  # [rows of param[e], in]: this window's tokens routed to expert e
        for name in units:
            accumulate(accs[name], g[experts[name][2]], grad_norm)

    hooks = [m.register_forward_hook(partial(keep_input, name)) for name, m in linears.items()]
    try:
        with torch.enable_grad(), contextlib.ExitStack() as stack:
            if groups:
                stack.enter_context(ExpertTap(block, {p for p, _ in groups}, keep_expert))
            y = run_block(block, ctx, x)  # recompute
            y.backward(incoming.to(device=device, dtype=y.dtype))
        del y
    finally:
        for hook in hooks:
            hook.remove()
        inputs.clear()
    return x.grad


def window_grad(grad_out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    """One window's weight gradient of a linear: d^T x, [T, out] x [T, in] -> [out, in] (leading dims folded)."""
    return torch.mm(grad_out.reshape(-1, grad_out.shape[-1]).t(), inp.reshape(-1, inp.shape[-1]))


def grad_accumulators(block: nn.Module, names: list[str], device: torch.device,
                      experts: dict[str, tuple[str, int, slice]] | None = None
                      ) -> tuple[dict[str, nn.Linear], dict[str, torch.Tensor]]:
    """(the linears, zeroed fp32 accumulators of their weights' shapes), by unit name (stored expert matrices:
    their rows of the fused parameter[e]). The weights keep requires_grad False: block_windows forms each
    window's gradient itself."""
    experts = experts or {}
    linears = {name: block.get_submodule(name) for name in names if name not in experts}
    accs = {}
    for name in names:
        if name in experts:
            param, e, rows = experts[name]
            shape = block.get_parameter(param)[e, rows].shape
        else:
            shape = linears[name].weight.shape
        accs[name] = torch.zeros(shape, dtype=ACC_DTYPE, device=device)
    return linears, accs
