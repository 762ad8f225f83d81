"""The calibration (or evaluation) windows cut into fixed chunks, and the chunks dealt to ranks.

The chunks depend on the number of windows and ``--chunk-windows`` only, never on the number of
ranks: chunk j holds windows [j*C, (j+1)*C). Every statistic is summed inside a chunk in window order,
and the chunk sums are added in chunk order (stream.reduce), so 1, 2 or 3 processes produce the same
bytes. Chunk j belongs to rank j mod R; the chunks are processed in *steps*: at step s every rank works
on its chunk s*R + rank (if it has one), then the step's sums are folded on the writing rank.

    windows  0 1 2 3 4 5 6 7 8 9        C = 2, R = 2
    chunks   [0 ][1 ][2 ][3 ][4 ]
    rank 0    0       2       4         steps: 0 -> chunks 0, 1; 1 -> 2, 3; 2 -> 4
    rank 1        1       3

A batch (``--batch-size`` windows per block call) never crosses a chunk, so what each window meets in
a call is the same whatever the number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from lowmem_gblm.errors import UsageError

MAX_CHUNKS = 8  # the automatic chunk size cuts the windows into at most this many chunks (up to 8 ranks busy)
MAX_CHUNK_COUNT = 1 << 16  # chunks are reduction steps with per-chunk bookkeeping: more is a typo, not a run


def auto_chunk(nsamples: int) -> int:
    """Windows per chunk for ``--chunk-windows auto``: ceil(N / MAX_CHUNKS). It depends on N only: not on the
    number of ranks, nor on the batch size (so the gradient files stay the same bytes for every batch size; a
    batch larger than a chunk is cut at the chunk's end)."""
    return max(1, -(-nsamples // MAX_CHUNKS))


@dataclass(frozen=True)
class Partition:
    nsamples: int
    chunk: int  # windows per chunk
    world: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        if self.nsamples < 1 or self.chunk < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"bad partition {self}")
        count = -(-self.nsamples // self.chunk)
        if count > MAX_CHUNK_COUNT:
            raise UsageError(f"--chunk-windows {self.chunk} cuts {self.nsamples} windows into {count} chunks; at most "
                             f"{MAX_CHUNK_COUNT}: pass --chunk-windows {-(-self.nsamples // MAX_CHUNK_COUNT)} or more "
                             "(or leave it out)")

    @cached_property
    def chunks(self) -> list[tuple[int, int]]:
        """(first window, count) of every chunk, in chunk order."""
        return [(s, min(self.chunk, self.nsamples - s)) for s in range(0, self.nsamples, self.chunk)]

    @property
    def steps(self) -> int:
        return -(-len(self.chunks) // self.world)

    def owner(self, j: int) -> int:
        return j % self.world

    def at_step(self, step: int, rank: int | None = None) -> int | None:
        """The chunk ``rank`` (default: this one) works on at ``step``, or None."""
        j = step * self.world + (self.rank if rank is None else rank)
        return j if j < len(self.chunks) else None

    @cached_property
    def mine(self) -> list[int]:
        """This rank's chunks, in order (its k-th chunk is the one of step k)."""
        return list(range(self.rank, len(self.chunks), self.world))

    @cached_property
    def local_offsets(self) -> dict[int, int]:
        """chunk -> where its first window sits in this rank's store."""
        offsets, at = {}, 0
        for j in self.mine:
            offsets[j] = at
            at += self.chunks[j][1]
        return offsets

    @property
    def nlocal(self) -> int:
        """Windows this rank holds."""
        return sum(self.chunks[j][1] for j in self.mine)

    @cached_property
    def local_windows(self) -> list[int]:
        """The global index of each window this rank holds, in its store's order (ascending)."""
        return [n for j in self.mine for n in range(self.chunks[j][0], sum(self.chunks[j]))]

    def locate(self, n: int) -> tuple[int, int]:
        """(owner rank, index in the owner's store) of global window ``n``."""
        j = n // self.chunk
        owner = self.owner(j)
        first = sum(self.chunks[k][1] for k in range(owner, j, self.world))  # the owner's earlier chunks
        return owner, first + n - self.chunks[j][0]

    def batches(self, step: int, batch_size: int) -> list[tuple[int, int]]:
        """(first local window, count) of each call at ``step``: this rank's chunk of that step, ``batch_size``
        windows at a time (empty when the rank has no chunk then)."""
        j = self.at_step(step)
        if j is None:
            return []
        start, size = self.local_offsets[j], self.chunks[j][1]
        return [(start + o, min(batch_size, size - o)) for o in range(0, size, batch_size)]

    def all_batches(self, batch_size: int) -> list[tuple[int, int]]:
        return [b for step in range(self.steps) for b in self.batches(step, batch_size)]
