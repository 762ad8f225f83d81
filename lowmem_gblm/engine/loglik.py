"""Streamed log-likelihood of continuations: many token sequences of different lengths scored block by block.

Each request is a token sequence ``tokens`` [L] and the number ``cont`` of its last tokens to score; the
model reads ``tokens[:-1]`` and position ``L-1-cont+j`` predicts ``tokens[L-cont+j]`` (lm-evaluation-harness's
causal scoring, ``HFLM._loglikelihood_tokens``). The answer per request is (Σ log p, greedy), greedy when
every scored token is the argmax.

Streaming: the requests are sorted longest first (as lm-eval sorts them) and cut into batches of
``batch_size``; each batch is right-padded to its longest member and embedded into its own RAM buffer
[B, L_b, D]. The batches are grouped into passes of at most ``pass_tokens`` padded tokens; a pass loads
every block once and runs all its batches through it in place (stream.sweep.forward), then the head
scores only the continuation positions (stream.head.continuation_logprob). With causal attention a real
position never attends to a later one, so the right padding changes no real position's output and
no attention mask is needed (a test compares padded and unpadded results).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from lowmem_gblm.engine.walk import BlockWalk, Step
from lowmem_gblm.errors import InputError
from lowmem_gblm.io.model import StreamedModel
from lowmem_gblm.stream.context import BlockContext
from lowmem_gblm.stream.head import HEAD_DTYPE, continuation_logprob
from lowmem_gblm.stream.store import ActivationStore
from lowmem_gblm.stream.sweep import embed, forward

log = logging.getLogger(__name__)

PAD_ID = 0  # right padding (any in-vocabulary id: padded positions are never read)
DEFAULT_PASS_TOKENS = 1 << 18  # padded tokens held per pass: 0.6 GB of fp32 hidden states at D = 576


@dataclass(frozen=True)
class Batch:
    """Requests (indices into the caller's list) right-padded to ``length`` input positions."""

    members: tuple[int, ...]
    length: int


def input_length(tokens: list[int]) -> int:
    """Positions the model reads for a request: every token but the last."""
    return len(tokens) - 1


def plan_batches(lengths: list[int], batch_size: int, pass_tokens: int) -> list[list[Batch]]:
    """Passes of batches: requests sorted by input length, longest first (ties by index), ``batch_size`` per
    batch, each batch as long as its first member; a pass holds at most ``pass_tokens`` padded tokens (always
    at least one batch)."""
    order = sorted(range(len(lengths)), key=lambda k: (-lengths[k], k))
    batches = [Batch(tuple(order[s:s + batch_size]), lengths[order[s]]) for s in range(0, len(order), batch_size)]
    passes: list[list[Batch]] = []
    held = pass_tokens + 1
    for batch in batches:
        size = len(batch.members) * batch.length
        if held + size > pass_tokens:
            passes.append([])
            held = 0
        passes[-1].append(batch)
        held += size
    return passes


def padded_ids(requests: list[list[int]], batch: Batch) -> torch.Tensor:
    """[B, L]: the batch's model inputs (each request without its last token), right-padded with PAD_ID."""
    ids = torch.full((len(batch.members), batch.length), PAD_ID, dtype=torch.long)
    for row, k in enumerate(batch.members):
        inp = requests[k][:-1]
        ids[row, :len(inp)] = torch.tensor(inp, dtype=torch.long)
    return ids


def check_requests(model: StreamedModel, requests: list[list[int]], conts: list[int]) -> None:
    if len(requests) != len(conts):
        raise ValueError(f"{len(requests)} requests but {len(conts)} continuation lengths")
    vocab = int(model.config.vocab_size)
    for tokens, cont in zip(requests, conts, strict=True):
        if not 1 <= cont <= len(tokens) - 1:
            raise InputError(f"a request of {len(tokens)} tokens cannot score {cont} continuation token(s) "
                             "(it needs at least one token of context)")
        if min(tokens) < 0 or max(tokens) >= vocab:
            raise InputError(f"request token ids fall outside the model's vocabulary (size {vocab})")


def streamed_loglikelihoods(model: StreamedModel, requests: list[list[int]], conts: list[int],
                            device: torch.device | str, dtype: torch.dtype, batch_size: int = 1,
                            pass_tokens: int = DEFAULT_PASS_TOKENS, prefetch: bool = True,
                            head_chunk: int | None = None, progress: bool = False) -> list[tuple[float, bool]]:
    """(Σ log p of the last ``conts[k]`` tokens of ``requests[k]``, greedy) per request, in request order.

    The caller truncates: a request must fit the model's context (``len - 1`` positions)."""
    check_requests(model, requests, conts)
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    device = torch.device(device)
    t0 = time.perf_counter()
    passes = plan_batches([input_length(r) for r in requests], batch_size, pass_tokens)
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    norm, head = model.load_head(device, HEAD_DTYPE)  # head: [V, D] fp32
    for p, batches in enumerate(passes):
        hidden = run_pass(model, requests, batches, device, dtype, prefetch, progress)
        for batch, buf in zip(batches, hidden, strict=True):
            for row, k in enumerate(batch.members):
                n, c = input_length(requests[k]), conts[k]
                h = buf.get(row)[0, n - c:n]  # [c, D]: the positions that predict the continuation
                targets = torch.tensor(requests[k][-c:], dtype=torch.long, device=device)
                results[k] = continuation_logprob(norm, head, h, targets, head_chunk)
        log.info("loglikelihood pass %d/%d: %d requests in %d batches", p + 1, len(passes),
                 sum(len(b.members) for b in batches), len(batches))
    log.info("scored %d requests in %d pass(es) in %.1fs on %s/%s", len(requests), len(passes),
             time.perf_counter() - t0, device, dtype)
    return results


def run_pass(model: StreamedModel, requests: list[list[int]], batches: list[Batch], device: torch.device,
             dtype: torch.dtype, prefetch: bool, progress: bool) -> list:
    """Embed every batch of the pass into its own RAM buffer [B, L_b, D], then stream every block once over
    all of them (in place). Returns the buffers (the last block's outputs)."""
    store = ActivationStore("cpu")
    hidden = []
    for batch in batches:
        ids = padded_ids(requests, batch)  # [B, L]
        buf = store.new((ids.shape[0], ids.shape[1], model.hidden_size), dtype, exact=True)
        embed(model, ids, buf, dtype)
        hidden.append(buf)
    contexts = {n: BlockContext.build(model, n, device, dtype) for n in sorted({b.length for b in batches})}

    def visit(step: Step) -> None:
        block = step.take()
        for j, (batch, buf) in enumerate(zip(batches, hidden, strict=True)):
            forward(block, contexts[batch.length], buf, buf, device, dtype, batch_size=len(batch.members))
            step.bar.windows(j + 1)

    BlockWalk(model, device, dtype, "loglikelihood", len(batches), progress, prefetch).run(visit)
    return hidden
