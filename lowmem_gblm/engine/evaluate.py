"""``lowmem-gblm eval``: streamed perplexity and decoder-linear sparsity, one block on the device at a time.

Protocol (the one published for SparseGPT / Wanda / GBLM on wikitext2): the evaluation documents are
joined with blank lines and tokenized once; the token stream is cut into non-overlapping windows of
``seqlen`` tokens from its start; **the last, partial window is dropped** (calib.data.split_windows).
Every window is scored independently and the loss is the mean next-token cross-entropy over all
``W * (seqlen - 1)`` predicted tokens; perplexity is ``exp`` of it.

Streaming: all windows are embedded into one RAM buffer ``[W, T, D]`` (compute dtype), then each block
is loaded and every window micro-batch runs through it in place (stream.sweep); the head (final norm +
logits) runs in fp32 one window at a time (stream.head.window_nll), optionally in token chunks.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F

from lowmem_gblm.calib.data import eval_windows, load_tokenizer
from lowmem_gblm.calib.images import load_image_folder, load_pixels
from lowmem_gblm.calib.samples import Samples
from lowmem_gblm.config import EvalConfig
from lowmem_gblm.engine.modality import adapter
from lowmem_gblm.engine.run import open_model, partition
from lowmem_gblm.engine.walk import BlockWalk
from lowmem_gblm.errors import InputError
from lowmem_gblm.io.model import StreamedModel
from lowmem_gblm.memory.matmul_peak import achieved_here
from lowmem_gblm.memory.shape import shape_of
from lowmem_gblm.memory.tracker import PhaseTracker
from lowmem_gblm.memory.work import eval_work
from lowmem_gblm.ranks import Ranks, current
from lowmem_gblm.runtime import resolve_device, resolve_dtype
from lowmem_gblm.stream.context import BlockContext
from lowmem_gblm.stream.head import HEAD_DTYPE, auto_head_chunk, window_nll
from lowmem_gblm.stream.store import ActivationStore
from lowmem_gblm.stream.sweep import embed, embed_samples, forward, windows

log = logging.getLogger(__name__)


def _check_ids(model: StreamedModel, ids: torch.Tensor) -> None:
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.shape[1] < 2:
        raise InputError(f"evaluation ids must be an integer tensor [W, T>=2], got {ids.dtype} {list(ids.shape)}")
    vocab = int(model.config.vocab_size)
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise InputError(f"evaluation ids fall outside the model's vocabulary (size {vocab})")


def streamed_perplexity(model: StreamedModel, ids: torch.Tensor, device: torch.device | str, dtype: torch.dtype,
                        batch_size: int = 1, prefetch: bool = True, head_chunk: int | None = None,
                        progress: bool = False, ranks: Ranks | None = None,
                        chunk_windows: int | None = None) -> dict:
    """Perplexity of a StreamedModel on windows ids [W, T]: dict(ppl, nll, tokens, windows, seqlen).

    With several ``ranks`` each holds its chunks of the windows (stream.partition); every window's NLL is
    gathered and summed in window order, so the numbers do not depend on the number of ranks."""
    _check_ids(model, ids)
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    ranks = ranks or Ranks()
    device = torch.device(device)
    t0 = time.perf_counter()
    w, t = ids.shape
    part = partition(w, chunk_windows, ranks)
    local = ids[part.local_windows]  # [W_local, T]
    hidden = ActivationStore("cpu").new((part.nlocal, t, model.hidden_size), dtype, exact=True)  # in place
    embed(model, local, hidden, dtype)
    ctx = BlockContext.build(model, t, device, dtype)
    BlockWalk(model, device, dtype, "eval", part.nlocal, progress and ranks.writer, prefetch).run(
        lambda step: forward(step.take(), ctx, hidden, hidden, device, dtype, part, batch_size, step.bar.windows))
    norm, head = model.load_head(device, HEAD_DTYPE)  # head: [V, D] fp32
    if head_chunk is None:
        head_chunk = auto_head_chunk(head.shape[0], t)
    mine = {n: window_nll(norm, head, hidden.get(k)[0], local[k, 1:].to(device), head_chunk)
            for k, n in enumerate(part.local_windows)}
    every = {n: v for nlls in ranks.all_objects(mine, "gathering the windows' NLL") for n, v in nlls.items()}
    total = sum(every[n] for n in range(w))
    count = w * (t - 1)
    nll = total / count
    result = {"ppl": math.exp(nll), "nll": nll, "tokens": count, "windows": int(w), "seqlen": int(t),
              "head_chunk": head_chunk}
    log.info("perplexity %.4f (nll %.5f over %d tokens, %d windows x %d) in %.1fs on %s/%s",
             result["ppl"], nll, count, w, t, time.perf_counter() - t0, device, dtype)
    return result


@torch.no_grad()
def streamed_features(model: StreamedModel, samples: Samples, device: torch.device | str, dtype: torch.dtype,
                      batch_size: int = 1, prefetch: bool = True, progress: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A vision transformer on images, one block on the device at a time: (final features [N, F] fp32, the
    classifier's logits [N, classes] fp32, None for a backbone). The features are what the classifier reads
    (io.model.ClassifierHead: final layernorm, then the CLS token, or CLS and the patch mean)."""
    device = torch.device(device)
    n, t = len(samples), model.seqlen(samples)
    hidden = ActivationStore("cpu").new((n, t, model.hidden_size), dtype, exact=True)  # in place
    embed_samples(model, samples, hidden, dtype)
    ctx = BlockContext.build(model, t, device, dtype)
    BlockWalk(model, device, dtype, "eval", n, progress, prefetch).run(
        lambda step: forward(step.take(), ctx, hidden, hidden, device, dtype, None, batch_size, step.bar.windows))
    head = model.load_classifier(device, HEAD_DTYPE)
    features, logits = [], []
    for s, count in windows(n, batch_size):
        h = hidden.get(s, count).to(device=device, dtype=HEAD_DTYPE)  # [B, T, D]
        features.append(head.features(h).cpu())
        if head.classifier is not None:
            logits.append(head.classifier(features[-1].to(device)).cpu())
    hidden.release()
    return torch.cat(features), (torch.cat(logits) if logits else None)


def evaluate_images(config: EvalConfig) -> dict:
    """``lowmem-gblm eval --images/--pixels``: top-1 accuracy (when the images have labels and the model a
    classifier), and with ``--reference`` the mean cosine similarity of each image's final features to the
    reference model's; the checkpoint's sparsity."""
    model = open_model(config.model_dir)
    adapter(model).refuse_eval(model, config.model_dir, "--images")
    if config.images:
        pixels, labels, _ = load_image_folder(config.images, model.root,
                                              renumber=config.renumber_labels or not model.num_labels)
    else:
        pixels, labels = load_pixels(config.pixels)
    samples = Samples.of_pixels(pixels, labels)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device, model.checkpoint_dtype())
    result: dict = {"images": len(samples), "top1": None, "feature_cosine": None}
    with PhaseTracker("eval", device) as tracker:
        features, logits = streamed_features(model, samples, device, dtype, config.batch_size, config.prefetch,
                                             config.progress)
        if logits is not None and labels is not None:
            if int(labels.max()) >= logits.shape[1] or int(labels.min()) < 0:
                raise InputError(f"labels run from {int(labels.min())} to {int(labels.max())}; the model has "
                                 f"{logits.shape[1]} classes")
            result["top1"] = float((logits.argmax(dim=1) == labels).float().mean())
        if config.reference:
            reference = open_model(config.reference)
            if reference.family.name != model.family.name:
                raise InputError(f"--reference {config.reference} is a {reference.family.name} model, "
                                 f"{config.model_dir} "
                                 f"a {model.family.name}: compare a pruned model with its own dense one")
            dense, _ = streamed_features(reference, samples, device, dtype, config.batch_size, config.prefetch,
                                         config.progress)
            result["feature_cosine"] = float(F.cosine_similarity(features, dense, dim=1).mean())
            result["reference"] = config.reference
    result["sparsity"] = checkpoint_sparsity(model)["overall"]
    result["phases"] = [tracker.stats.to_dict()]
    log.info("images: %d, top-1 %s, feature cosine %s", len(samples), result["top1"], result["feature_cosine"])
    return result


def checkpoint_sparsity(model: StreamedModel) -> dict:
    """Exact zeros in every 2-D weight under the decoder blocks, read block by block.

    Returns dict(overall=fraction of zeros over all those weights, per_linear={name: fraction},
    zeros=int, total=int).
    """
    per_linear: dict[str, float] = {}
    zeros = total = 0
    for i in range(model.num_blocks):
        names = [n for n in model.block_names(i)
                 if n.endswith(".weight") and len(model.stored_shape(n)) == 2]
        for name, tensor in model.read_tensors(names).items():
            z = int((tensor == 0).sum())
            per_linear[name] = z / tensor.numel()
            zeros += z
            total += tensor.numel()
    if total == 0:
        raise InputError(f"{model.root}: no 2-D weights found under the decoder blocks")
    return {"overall": zeros / total, "per_linear": per_linear, "zeros": zeros, "total": total}


def evaluate_checkpoint(config: EvalConfig, model: StreamedModel | None = None) -> dict:
    """Streamed perplexity of a checkpoint folder on a text source (windows cut with the checkpoint's own
    tokenizer), its decoder-linear sparsity and the measured peaks of the phase. ``model``: the folder, already
    opened."""
    if not config.data:
        raise InputError("perplexity needs --data (an evaluation text)")
    model = model or open_model(config.model_dir)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and config.seqlen > max_pos:
        raise InputError(f"--seqlen {config.seqlen} exceeds the model's context ({max_pos} positions)")
    tokenizer = load_tokenizer(config.model_dir)
    ids = eval_windows(tokenizer, config.data, config.seqlen, config.max_windows, model.family.bos_per_window)
    device = resolve_device(config.device)
    ranks = current(device.type)
    device = ranks.device(device)
    dtype = resolve_dtype(config.dtype, device, model.checkpoint_dtype())
    with PhaseTracker("eval", device) as tracker:
        result = streamed_perplexity(model, ids, device, dtype, config.batch_size, config.prefetch,
                                     config.head_chunk, config.progress, ranks, config.chunk_windows)
    result["sparsity"] = checkpoint_sparsity(model)["overall"]
    result["data"] = config.data
    result["phases"] = [tracker.stats.to_dict() | _work(model, ids, device, dtype, tracker.stats.seconds)]
    return result


def _work(model, ids: torch.Tensor, device: torch.device, dtype: torch.dtype, seconds: float) -> dict:
    """{"work": counted matmul FLOPs and bytes, achieved fraction of the measured peak} (memory.work); empty if
    it cannot be counted: the report loses a field, never the result."""
    try:
        work = eval_work(shape_of(model), int(ids.shape[0]), int(ids.shape[1]), dtype)
        return {"work": achieved_here(work, seconds, device, dtype)}
    except Exception as exc:  # noqa: BLE001 (accounting only)
        log.warning("eval: could not count the work (%s: %s)", type(exc).__name__, exc)
        return {}
