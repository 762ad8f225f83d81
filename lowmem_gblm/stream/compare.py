"""A pruned block's output against the dense block's on the same inputs (``prune_report.json``'s output error).

The prune sweep's statistics forward runs the dense block on the block's inputs anyway; it writes those dense
outputs into the buffer that is about to receive the next block's inputs (for a method without statistics, such
as magnitude, one dense forward does it). The pruned block's forward then reads each batch's dense output back
just before it overwrites it with the pruned output, and accumulates, per chunk of windows (stream.partition,
folded in chunk order like the statistics):

    part = [ sum (Y_pruned - Y_dense)^2 , sum Y_dense^2 ]        float64, over the chunk's windows, tokens, features

so the relative output error sqrt(part_0 / part_1) = ||Y_pruned - Y_dense||_F / ||Y_dense||_F is the same for 1
or several processes. No weight is read again and no forward is added (magnitude: one); the cost is one more
write and read of the activation buffer. With a lossy ``--store-dtype`` (bfloat16, int8) Y_dense is the stored,
rounded one.
"""

from __future__ import annotations

import math

import torch

ERROR_DTYPE = torch.float64  # the two sums of squares
DIFF_DTYPE = torch.float32  # Y_pruned - Y_dense is formed in fp32 whatever the compute dtype


def error_sums(y: torch.Tensor, y_dense: torch.Tensor) -> torch.Tensor:
    """[sum (y - y_dense)^2, sum y_dense^2] as a float64 [2] tensor (y, y_dense: [B, T, D], any float dtype)."""
    d = y.to(DIFF_DTYPE) - y_dense.to(DIFF_DTYPE)
    ref = y_dense.to(DIFF_DTYPE)
    return torch.stack([(d * d).sum(dtype=ERROR_DTYPE), (ref * ref).sum(dtype=ERROR_DTYPE)])


class OutputError:
    """Accumulates ``error_sums`` of one chunk of windows into ``part`` (a [2] float64 tensor on the device); the
    dense outputs are read from ``dense`` (an activation buffer holding them, before the pruned ones replace them)."""

    def __init__(self, dense, device: torch.device):
        self.dense, self.device = dense, device
        self.part = torch.zeros(2, dtype=ERROR_DTYPE, device=device)

    def __call__(self, n: int, y: torch.Tensor) -> None:
        """y: the pruned block's outputs of windows n..n+B-1."""
        y_dense = self.dense.get(n, y.shape[0]).to(device=self.device)
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
