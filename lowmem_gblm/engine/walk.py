"""One pass over a model's blocks: the loop every front-to-back sweep shares (the prune sweep, OWL's statistics,
perplexity, image features, zero-shot log-likelihoods), so that each keeps only what it does with one block.

Each block is on the device alone: the next one is read on a background thread while one computes
(``io.prefetch.BlockReader``) and a visit takes its block once, holding the only reference, so it is freed when the
visit returns. One progress bar counts the blocks; with two activation buffers, the outputs a visit writes to
``dst`` are the next block's ``src``. (The gradient sweep walks its own schedule, forward then its segments in
reverse with recomputation, under one reader: engine.gradients.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from lowmem_gblm.engine.progress import PhaseProgress
from lowmem_gblm.io.prefetch import BlockReader
from lowmem_gblm.stream.store import ActivationBuffer


@dataclass
class Step:
    """One block of a walk."""

    i: int  # the block's index
    take: Callable[[], nn.Module]  # the block on the device (call once; the caller holds the only reference)
    bar: PhaseProgress  # ``bar.windows(done)`` within the block; ``bar.block(label)`` to finish it with a label
    src: ActivationBuffer | None = None  # the block's inputs (the previous block's ``dst``)
    dst: ActivationBuffer | None = None  # where its outputs go


@dataclass
class BlockWalk:
    """Blocks in ``schedule`` order (default: every block from its checkpoint; a source per block as
    ``BlockReader`` takes it, e.g. a finished shard) under the progress bar ``phase`` of ``units`` windows."""

    model: object  # io.model.StreamedModel
    device: torch.device
    dtype: torch.dtype
    phase: str
    units: int
    progress: bool = True
    prefetch: bool = True
    schedule: Sequence[tuple[int, object | None]] | None = None

    def run(self, visit: Callable[[Step], object], buffers: tuple[ActivationBuffer, ActivationBuffer] | None = None,
            *, release: bool = False) -> list:
        """``visit(step)`` for every block; returns what each returned, in order. A visit that did not finish its
        block on the bar is finished as "block i". ``buffers``: (src, dst) of the first block, swapped after each;
        ``release``: both released after the last block."""
        schedule = list(self.schedule) if self.schedule is not None else [(i, None)
                                                                          for i in range(self.model.num_blocks)]
        src, dst = buffers if buffers is not None else (None, None)
        out = []
        with BlockReader(self.model, schedule, self.device, self.dtype, self.prefetch) as reader, \
                PhaseProgress(self.phase, len(schedule), self.units, self.progress) as bar:
            for i, _ in schedule:
                finished = bar.done
                out.append(visit(Step(i, partial(reader.next, i), bar, src, dst)))
                if bar.done == finished:
                    bar.block(f"block {i}")
                src, dst = dst, src
        if release:
            for buf in buffers or ():
                buf.release()
        return out
