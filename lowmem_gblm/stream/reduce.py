"""Chunk sums folded in chunk order on the writing rank: the one reduction every statistic goes through.

A statistic (Σx² per input column, SparseGPT's Hessian, GBLM's Σ|g_n| or Σg_n²) is accumulated per
chunk of windows (stream.partition) into a *part*; after every step the writer adds the step's parts
in chunk order to its *total*:

    total = part_0;  total += part_1;  total += part_2; ...       (chunk order, whatever the ranks)

Rank 0 adds its own part, then receives each other rank's part of that step in rank order (= chunk
order) into the same buffer. In a one-process run the fold is local and the same arithmetic, so the
bytes never depend on the number of ranks. Memory: with more than one chunk the writer holds part +
total (2x one statistic set), the other ranks one part; with one chunk the part is the total.
"""

from __future__ import annotations

import torch

from lowmem_gblm.ranks import Ranks
from lowmem_gblm.stream.partition import Partition
from lowmem_gblm.testing_hooks import crash_point


class ChunkFold:
    """Fold named parts (tensors the caller accumulates into and that are zeroed here) into totals."""

    def __init__(self, ranks: Ranks, part: Partition, what: str):
        self.ranks, self.part, self.what = ranks, part, what
        self.totals: dict[str, torch.Tensor] = {}

    def step(self, step: int, parts: dict[str, torch.Tensor]) -> None:
        """Fold every rank's ``parts`` of ``step`` (called by every rank at every step, same names)."""
        ranks, part = self.ranks, self.part
        crash_point("fold")
        for name in sorted(parts):
            p = parts[name]
            if ranks.writer and len(part.chunks) == 1:
                self.totals[name] = p  # the only chunk: its sum is the total, kept as it is (no second copy)
                continue
            if not ranks.writer:
                if part.at_step(step) is not None:
                    ranks.send(p, 0, f"{self.what}: sending chunk {part.at_step(step)}")
                    p.zero_()
                continue
            self._add(name, p)
            for r in range(1, ranks.world):
                j = part.at_step(step, r)
                if j is None:
                    break
                ranks.recv(p, r, f"{self.what}: receiving chunk {j} from rank {r}")
                self._add(name, p)
            p.zero_()

    def _add(self, name: str, p: torch.Tensor) -> None:
        total = self.totals.get(name)
        if total is None:
            self.totals[name] = p.clone()  # the first chunk as it is (0 + x would turn -0.0 into 0.0)
        else:
            total += p

    def result(self, name: str) -> torch.Tensor:
        """The writer's total (every chunk added in chunk order)."""
        return self.totals.pop(name)
