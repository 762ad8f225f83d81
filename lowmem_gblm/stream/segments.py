"""Segment checkpoints for the gradient sweep: which block inputs the forward keeps, and in which order the
reverse walk recomputes the others.

With ``k`` (``--checkpoint-every``) the forward keeps the input of every k-th block (0, k, 2k, ...) and the
head's input; the reverse walk takes the blocks segment by segment from the top: for a segment of blocks
c..e-1 it first runs blocks c..e-2 forward again from the kept input of block c, keeping their outputs (the
inputs of c+1..e-1) until the segment is walked. k = 1 keeps every input and recomputes nothing. The
recomputed inputs are the same bytes the first forward produced (the same blocks on the same stored input,
in the same batches), so the gradients do not depend on k.
"""

from __future__ import annotations

import math


def kept_boundaries(last: int, k: int) -> list[int]:
    """Block inputs the forward keeps when it runs blocks 0..last-1: every k-th, and ``last`` (the head's input,
    or the input of the highest block still to walk when resuming)."""
    return sorted(set(range(0, last, k)) | {last})


def segments(start: int, kept: list[int]) -> list[tuple[int, int]]:
    """(c, e) of each reverse segment, top first, for walking blocks start-1..0: blocks e-1..c, block c's input
    kept, the inputs of c+1..e-1 recomputed from it."""
    firsts = [c for c in kept if c < start]
    return list(zip(firsts, firsts[1:] + [start], strict=True))[::-1]


def boundaries_held(num_blocks: int, k: int) -> tuple[int, int]:
    """(boundaries alive during the head, most alive at once during the reverse walk) of a whole sweep."""
    kept = kept_boundaries(num_blocks, k)
    alive = len(kept) - 1  # the head's input goes once the head is done
    peak = 0
    for c, e in segments(num_blocks, kept):
        peak = max(peak, alive + (e - c - 1))  # the segment's checkpoints below it, plus its recomputed inputs
        alive -= 1  # block c's kept input goes with the segment
    return len(kept), peak


def recomputed_blocks(num_blocks: int, k: int) -> int:
    """Block forwards the reverse walk runs again: every block but the last of each segment."""
    return sum(e - c - 1 for c, e in segments(num_blocks, kept_boundaries(num_blocks, k)))


def candidates(num_blocks: int) -> list[int]:
    """Candidate k in the order the planner tries them: 1 (no recompute), then growing up to ~sqrt(L)*2,
    past which more recompute buys no fewer boundaries."""
    limit = min(num_blocks, 2 * math.isqrt(num_blocks) + 2)
    return list(range(1, max(limit, 1) + 1))
