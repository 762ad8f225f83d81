"""OWL's per-block sparsity (Yin et al., "Outlier Weighed Layerwise Sparsity", 2024) as pure functions.

A block's *outlier ratio* is the share of its linears' Wanda scores |W_ij| * ||X_j|| (the dense model's
activations) above M times their mean over the whole block. Blocks with more outliers are pruned less:

    D_l    = outlier ratio of block l
    N_l    = 2 * lambda * (D_l - min D) / (max D - min D)          in [0, 2 lambda]
    keep_l = (1 - target) + N_l - mean(N)                           (OWL's layer density)
    s_l    = 1 - keep_l                                             mean over blocks = target exactly

so every s_l lies within 2 * lambda of the target; with equal-sized blocks (every decoder block of a
model has the same parameters) the mean over parameters is the target too.
"""

from __future__ import annotations

import torch

from lowmem_gblm.errors import UsageError
from lowmem_gblm.score import SCORE_DTYPE, wanda_score


def outlier_ratio(weights: list[torch.Tensor], scalers: list[torch.Tensor], m: float) -> float:
    """Share of the block's Wanda scores above ``m`` times their mean (over all the block's linears). weights
    [out, in] each, scalers [in] each (scaler_row: mean over windows of sum_t x^2)."""
    total = count = 0.0
    for w, s in zip(weights, scalers, strict=True):  # the block's mean first: one linear at a time
        score = wanda_score(w, s)
        total += float(score.sum(dtype=torch.float64))
        count += score.numel()
    mean = total / count
    above = sum(int((wanda_score(w, s) > m * mean).sum()) for w, s in zip(weights, scalers, strict=True))
    return above / count


def owl_sparsities(ratios: list[float], target: float, lam: float) -> list[float]:
    """Per-block sparsity from the blocks' outlier ratios (module doc); their mean is ``target``."""
    d = torch.tensor(ratios, dtype=torch.float64)
    spread = float(d.max() - d.min())
    norm = torch.zeros_like(d) if spread == 0 else (d - d.min()) / spread * (2 * lam)
    keep = (1 - target) + norm - norm.mean()
    sparsity = (1 - keep).tolist()
    if min(sparsity) < 0 or max(sparsity) >= 1:
        raise UsageError(f"--owl-lambda {lam:g} moves a block's sparsity outside [0, 1) around --sparsity {target:g}; "
                         "lower --owl-lambda")
    return sparsity


__all__ = ["SCORE_DTYPE", "outlier_ratio", "owl_sparsities"]
