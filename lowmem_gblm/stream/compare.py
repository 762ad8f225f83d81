"""A pruned block's output against the dense block's on the same inputs (``prune_report.json``'s output error).

The prune sweep keeps a copy of the block's dense weights on the device while it prunes, then runs every batch
of windows through the pruned block (the next block's inputs, as always) and through the dense weights, and
accumulates, per chunk of windows (stream.partition, folded in chunk order like the statistics):

    part = [ sum (Y_pruned - Y_dense)^2 , sum Y_dense^2 ]        float64, over the chunk's windows, tokens, features

so the relative output error sqrt(part_0 / part_1) = ||Y_pruned - Y_dense||_F / ||Y_dense||_F is the same for 1
or several processes. No weight or store is read again: the copy is made from the weights already on the
device; the cost is one more forward per block and one block's linears on the device.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from lowmem_gblm.stream.context import BlockContext, run_block

ERROR_DTYPE = torch.float64  # the two sums of squares
DIFF_DTYPE = torch.float32  # Y_pruned - Y_dense is formed in fp32 whatever the compute dtype


def dense_copy(block: nn.Module, params: Iterable[str]) -> dict[str, torch.Tensor]:
    """Copies of the block's parameters ``params`` (names in the block) as they are now, on their device."""
    return {name: block.get_parameter(name).detach().clone() for name in sorted(set(params))}


def error_sums(y: torch.Tensor, y_dense: torch.Tensor) -> torch.Tensor:
    """[sum (y - y_dense)^2, sum y_dense^2] as a float64 [2] tensor (y, y_dense: [B, T, D], any float dtype)."""
    d = y.to(DIFF_DTYPE) - y_dense.to(DIFF_DTYPE)
    ref = y_dense.to(DIFF_DTYPE)
    return torch.stack([(d * d).sum(dtype=ERROR_DTYPE), (ref * ref).sum(dtype=ERROR_DTYPE)])


class OutputError:
    """Accumulates ``error_sums`` of one chunk of windows into ``part`` (a [2] float64 tensor on the device)."""

    def __init__(self, block: nn.Module, ctx: BlockContext, dense: dict[str, torch.Tensor], device: torch.device):
        self.block, self.ctx, self.dense = block, ctx, dense
        self.part = torch.zeros(2, dtype=ERROR_DTYPE, device=device)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """x: the batch the pruned block turned into y; the dense weights run on the same x."""
        y_dense = run_block(self.block, self.ctx, x, self.dense)
        self.part += error_sums(y, y_dense)


def relative_error(sq_error: float, sq_dense: float) -> float:
    """sqrt(sq_error / sq_dense): in [0, inf); 0 when both are 0 (nothing in, nothing out), inf for an error on a
    zero output."""
    if sq_dense > 0:
        return math.sqrt(sq_error / sq_dense)
    return 0.0 if sq_error == 0 else math.inf


def output_error_entry(sums: torch.Tensor) -> dict[str, float]:
    """The manifest's and report's record of one block: {"relative", "sq_error", "sq_dense"}."""
    sq_error, sq_dense = (float(v) for v in sums.cpu())
    return {"relative": relative_error(sq_error, sq_dense), "sq_error": sq_error, "sq_dense": sq_dense}
