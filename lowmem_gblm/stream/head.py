"""The model head on streamed hidden states: evaluation loss, optionally in token chunks.

RMSNorm, the head matmul and cross-entropy act on each token separately, so splitting a window's
T-1 predicted positions into chunks bounds the logits ([chunk, vocab] fp32) instead of [T, vocab]:
for LLaMA (vocab 32000) at T = 2048 a whole window's fp32 logits are 262 MB. (The gradient sweep's
head, with its backward, is ``stream.backward.head_windows``.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HEAD_DTYPE = torch.float32  # evaluation logits and loss are computed in fp32
EVAL_LOGITS_BYTES = 256 * 2**20  # eval's default: fp32 logits of one head call stay under this


def auto_head_chunk(vocab: int, seqlen: int) -> int | None:
    """Eval's head chunk when none is asked for: the whole window while its fp32 logits [T-1, V] fit in
    EVAL_LOGITS_BYTES (LLaMA-2's 32k vocabulary at T = 2048: 250 MiB), else the most positions that do
    (a 262k vocabulary: 256 positions per call, 256 MiB instead of 2 GiB at T = 2048)."""
    per_position = vocab * torch.finfo(HEAD_DTYPE).bits // 8
    if (seqlen - 1) * per_position <= EVAL_LOGITS_BYTES:
        return None
    return max(1, EVAL_LOGITS_BYTES // per_position)


@torch.no_grad()
def window_nll(norm: nn.Module, head: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor,
               chunk: int | None = None) -> float:
    """Sum of next-token NLL of one window. hidden: [T, D]; targets: [T-1] (on head's device); head: [V, D]
    (fp32, with ``norm``). ``chunk``: predicted positions per head call (None: all at once)."""
    h = norm(hidden.to(device=head.device, dtype=HEAD_DTYPE))  # [T, D]
    predicted = h.shape[0] - 1
    if chunk is None or chunk >= predicted:
        return float(F.cross_entropy(h[:-1] @ head.T, targets, reduction="sum"))  # logits [T-1, V]
    total = 0.0
    for s in range(0, predicted, chunk):
        e = min(s + chunk, predicted)
        total += float(F.cross_entropy(h[s:e] @ head.T, targets[s:e], reduction="sum"))  # logits [c, V]
    return total


@torch.no_grad()
def continuation_logprob(norm: nn.Module, head: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor,
                         chunk: int | None = None) -> tuple[float, bool]:
    """(Σ log p(target), every target is the argmax) for the hidden states that predict ``targets``.

    hidden: [C, D] (the positions just before each target); targets: [C] (on head's device); head: [V, D]
    fp32. The log-softmax is over the whole vocabulary in fp32, as lm-evaluation-harness scores a
    continuation; ``chunk`` bounds the logits to [chunk, V]."""
    h = norm(hidden.to(device=head.device, dtype=HEAD_DTYPE))  # [C, D]
    total, greedy = 0.0, True
    step = chunk or h.shape[0]
    for s in range(0, h.shape[0], step):
        logp = torch.log_softmax(h[s:s + step] @ head.T, dim=-1)  # [c, V]
        want = targets[s:s + step]
        total += float(logp.gather(1, want.unsqueeze(1)).sum())
        greedy = greedy and bool((logp.argmax(dim=-1) == want).all())
    return total, greedy
