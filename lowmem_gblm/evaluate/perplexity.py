"""Streamed perplexity and checkpoint sparsity: one decoder block on the device at a time.

Protocol (the one published for SparseGPT / Wanda / GBLM on wikitext2): the evaluation documents
are joined with blank lines and tokenized once; the token stream is cut into non-overlapping
windows of ``seqlen`` tokens from its start; **the last, partial window is dropped**. Every window
is scored independently (no context carried over) and the loss is the mean next-token cross-entropy
over all ``W * (seqlen - 1)`` predicted tokens; perplexity is ``exp`` of it.

Streaming: all windows are embedded into one CPU buffer ``[W, T, D]`` (in the compute dtype), then
each block is loaded, every window micro-batch runs through it on the device (overwriting the
buffer in place) and the block is freed. The head (final norm + logits) runs in fp32, one window
at a time, so the largest transient is one ``[T, vocab]`` fp32 logits tensor.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F

from lowmem_gblm.calib.data import load_documents, tokenize_joined
from lowmem_gblm.errors import InputError
from lowmem_gblm.stream.context import BlockContext, run_block

log = logging.getLogger(__name__)

HEAD_DTYPE = torch.float32  # logits and the loss are always computed in fp32


def split_windows(stream: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """[L] -> [W, T] non-overlapping windows from the start; the partial tail is dropped."""
    if seqlen < 2:
        raise InputError(f"--seqlen must be at least 2 to predict a token, got {seqlen}")
    count = stream.numel() // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count < 1:
        raise InputError(
            f"evaluation text has {stream.numel()} tokens, fewer than one window of --seqlen {seqlen}"
        )
    return stream[: count * seqlen].reshape(count, seqlen)


def eval_windows(tokenizer, source: str, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Evaluation windows [W, T] of a source (see ``load_documents``), standard protocol."""
    documents = load_documents(source)
    if not documents:
        raise InputError(f"--eval {source}: no text found")
    ids = split_windows(tokenize_joined(tokenizer, documents), seqlen, max_windows)
    log.info("eval %s: %d windows of %d tokens", source, ids.shape[0], seqlen)
    return ids


def _check_ids(model, ids: torch.Tensor) -> None:
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.shape[1] < 2:
        raise InputError(
            f"evaluation ids must be an integer tensor [W, T>=2], got {ids.dtype} {list(ids.shape)}"
        )
    vocab = int(model.config.vocab_size)
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise InputError(f"evaluation ids fall outside the model's vocabulary (size {vocab})")


def _batches(count: int, batch_size: int):
    for start in range(0, count, batch_size):
        yield start, min(start + batch_size, count)


@torch.no_grad()
def embed_windows(model, ids: torch.Tensor, device: torch.device, dtype: torch.dtype,
                  batch_size: int) -> torch.Tensor:
    """ids [W, T] -> CPU hidden states [W, T, D] in ``dtype``."""
    weight, local = model.load_embedding_rows(ids, device, dtype)  # [U, D]: the rows ids use
    hidden = torch.empty(*ids.shape, weight.shape[1], dtype=dtype)
    for s, e in _batches(ids.shape[0], batch_size):
        hidden[s:e] = F.embedding(local[s:e].to(device), weight).cpu()
    del weight
    return hidden


@torch.no_grad()
def run_blocks(model, hidden: torch.Tensor, device: torch.device, dtype: torch.dtype,
               batch_size: int, prefetch: bool = True) -> None:
    """Push every window through every block, one block on the device at a time; ``hidden`` in place.
    ``prefetch``: read the next block on a background thread (same result)."""
    from lowmem_gblm.io.prefetch import BlockReader

    ctx = BlockContext.build(model, hidden.shape[1], device, dtype)
    with BlockReader(model, [(i, None) for i in range(model.num_blocks)], device, dtype, prefetch) as reader:
        for i in range(model.num_blocks):
            t0 = time.perf_counter()
            block = reader.next(i)
            for s, e in _batches(hidden.shape[0], batch_size):
                hidden[s:e] = run_block(block, ctx, hidden[s:e].to(device)).cpu()  # [b, T, D]
            del block
            log.debug("eval block %d/%d: %.2fs", i + 1, model.num_blocks, time.perf_counter() - t0)


@torch.no_grad()
def head_nll(model, hidden: torch.Tensor, ids: torch.Tensor, device: torch.device) -> tuple[float, int]:
    """(sum of next-token NLL, number of predicted tokens) over all windows; fp32 head."""
    norm, head = model.load_head(device, HEAD_DTYPE)  # head: [V, D]
    total, count = 0.0, 0
    for w in range(hidden.shape[0]):
        h = norm(hidden[w].to(device=device, dtype=HEAD_DTYPE))  # [T, D]
        logits = h[:-1] @ head.T  # [T-1, V]
        target = ids[w, 1:].to(device)
        total += float(F.cross_entropy(logits, target, reduction="sum"))
        count += target.numel()
    return total, count


def streamed_perplexity(model, ids: torch.Tensor, device: torch.device | str, dtype: torch.dtype,
                        batch_size: int = 1, prefetch: bool = True) -> dict:
    """Perplexity of a StreamedModel on windows ids [W, T]: dict(ppl, nll, tokens, windows, seqlen)."""
    _check_ids(model, ids)
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    device = torch.device(device)
    t0 = time.perf_counter()
    hidden = embed_windows(model, ids, device, dtype, batch_size)
    run_blocks(model, hidden, device, dtype, batch_size, prefetch)
    total, count = head_nll(model, hidden, ids, device)
    nll = total / count
    result = {"ppl": math.exp(nll), "nll": nll, "tokens": count, "windows": int(ids.shape[0]),
              "seqlen": int(ids.shape[1])}
    log.info("perplexity %.4f (nll %.5f over %d tokens, %d windows x %d) in %.1fs on %s/%s",
             result["ppl"], nll, count, ids.shape[0], ids.shape[1], time.perf_counter() - t0, device, dtype)
    return result


def checkpoint_sparsity(model) -> dict:
    """Exact zeros in every 2-D weight under the decoder blocks, read block by block.

    Returns dict(overall=fraction of zeros over all those weights, per_linear={name: fraction},
    zeros=int, total=int).
    """
    per_linear: dict[str, float] = {}
    zeros = total = 0
    for i in range(model.num_blocks):
        names = [n for n in model.block_names(i)
                 if n.endswith(".weight") and len(model.index.tensors[n].shape) == 2]
        for name, tensor in model.index.read(names).items():
            z = int((tensor == 0).sum())
            per_linear[name] = z / tensor.numel()
            zeros += z
            total += tensor.numel()
    if total == 0:
        raise InputError(f"{model.root}: no 2-D weights found under the decoder blocks")
    return {"overall": zeros / total, "per_linear": per_linear, "zeros": zeros, "total": total}


def evaluate_checkpoint(model_dir: str, data: str, seqlen: int, max_windows: int | None = None,
                        device: str = "auto", dtype: str = "auto", batch_size: int = 1,
                        prefetch: bool = True) -> dict:
    """Streamed perplexity of a checkpoint folder on a text source, plus its decoder-linear sparsity
    and the measured peaks of the phase. The windows use the checkpoint's own tokenizer."""
    from transformers import AutoTokenizer

    from lowmem_gblm.io.model import StreamedModel
    from lowmem_gblm.memory.tracker import PhaseTracker, limit_heap_retention
    from lowmem_gblm.runtime import resolve_device, resolve_dtype, storage_dtype

    limit_heap_retention()
    model = StreamedModel.open(model_dir)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if seqlen < 2:
        raise InputError(f"--seqlen must be >= 2, got {seqlen}")
    if max_pos is not None and seqlen > max_pos:
        raise InputError(f"--seqlen {seqlen} exceeds the model's context ({max_pos} positions)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:
        raise InputError(f"cannot load the tokenizer from {model_dir} ({exc})") from exc
    ids = eval_windows(tokenizer, data, seqlen, max_windows)
    if ids.shape[0] == 0:
        raise InputError(f"--data {data}: less than one full window of {seqlen} tokens")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, storage_dtype(model.index.tensors[model.block_names(0)[0]].dtype))
    with PhaseTracker("eval", dev) as tracker:
        result = streamed_perplexity(model, ids, dev, dt, batch_size, prefetch)
    sparsity = checkpoint_sparsity(model)
    result["sparsity"] = sparsity["overall"]
    result["data"] = data
    result["phases"] = [tracker.stats.to_dict()]
    return result
