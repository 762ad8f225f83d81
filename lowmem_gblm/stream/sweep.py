"""The one embed + forward over the activation store: every calibration or evaluation window through
the embedding, then through one block at a time. Prune, gradient and eval sweeps all go through here."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lowmem_gblm.stream.context import BlockContext, run_block
from lowmem_gblm.stream.partition import Partition


def embed(model, ids: torch.Tensor, dst, dtype: torch.dtype) -> None:
    """ids [N, T] -> hidden states [N, T, D] in ``dst`` (a store buffer); only the embedding rows the
    windows use are read, on the host."""
    table, local = model.load_embedding_rows(ids, torch.device("cpu"), dtype)  # [U, D]
    for n in range(ids.shape[0]):
        dst.put(n, F.embedding(local[n:n + 1], table))
    del table


@torch.no_grad()
def embed_samples(model, samples, dst, dtype: torch.dtype, batch_size: int = 16) -> None:
    """A run's samples (calib.samples.Samples) -> hidden states [N, T, D] in ``dst``: token windows through the
    embedding rows they use; images through the model's patch embedding, ``batch_size`` at a time, on the host."""
    if samples.kind == "tokens":
        return embed(model, samples.ids, dst, dtype)
    module = model.load_embeddings(torch.device("cpu"), dtype)
    pixels = samples.pixel_values
    for n, count in windows(len(samples), batch_size):
        dst.put(n, module(pixels[n:n + count].to(dtype)))  # [B, T, D]
    del module


def windows(total: int, batch_size: int) -> list[tuple[int, int]]:
    """(first window, count) of each call when ``total`` windows go ``batch_size`` at a time."""
    return [(n, min(batch_size, total - n)) for n in range(0, total, batch_size)]


@torch.no_grad()
def forward(block: nn.Module, ctx: BlockContext, src, dst, device: torch.device, dtype: torch.dtype,
            part: Partition | None = None, batch_size: int = 1, on_windows: Callable[[int], None] | None = None,
            on_step: Callable[[int], None] | None = None,
            on_output: Callable[[int, torch.Tensor], None] | None = None) -> None:
    """Run this rank's windows of ``src`` through ``block``, chunk by chunk, ``batch_size`` windows per call
    (a call never crosses a chunk); write the outputs to ``dst`` (None: statistics hooks only; ``src``
    itself: in place). ``on_windows(k)``: k windows are done; ``on_step(s)``: after step s (every rank calls
    it at every step, with or without a chunk there: statistics are folded then). ``on_output(n, y)``: each
    call's first window and output batch, before y is stored (``dst`` still holds what was there). ``part``
    None: one process, all of ``src`` one chunk."""
    part = part or Partition(len(src), len(src))
    done = 0
    for step in range(part.steps):
        for n, count in part.batches(step, batch_size):
            x = src.get(n, count).to(device=device, dtype=dtype)  # [B, T, D]
            y = run_block(block, ctx, x)
            if on_output is not None:
                on_output(n, y)
            if dst is not None:
                dst.put(n, y)
            done += count
            if on_windows is not None:
                on_windows(done)
        if on_step is not None:
            on_step(step)
