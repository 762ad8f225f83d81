"""Importance scores as small pure functions: (W, statistics) -> scores [out, in], fp32, higher = keep."""

from __future__ import annotations

import torch

SCORE_DTYPE = torch.float32  # every score is computed in fp32, whatever the weight dtype


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """|W|."""
    return weight.to(SCORE_DTYPE).abs()


def wanda_score(weight: torch.Tensor, scaler_row: torch.Tensor) -> torch.Tensor:
    """|W| * sqrt(scaler_row) with scaler_row_j = (1/N) sum_n sum_t x_{n,t,j}^2. weight [out, in], scaler [in]."""
    return weight.to(SCORE_DTYPE).abs() * torch.sqrt(scaler_row.to(SCORE_DTYPE)).reshape(1, -1)


def gblm_score(
    weight: torch.Tensor, scaler_row: torch.Tensor, grad_norm: torch.Tensor, alpha: float
) -> torch.Tensor:
    """GBLM-Pruner: |W| * sqrt(scaler_row) + alpha * |W| * G, G the l1 or l2 gradient norm over samples.

    With alpha = 0 this is bit-for-bit Wanda's score (adding +0.0 changes nothing).
    """
    w_abs = weight.to(SCORE_DTYPE).abs()
    grad_term = w_abs * grad_norm.to(SCORE_DTYPE)
    grad_term.mul_(alpha)  # alpha * (|W| * G), in place: two [out, in] temporaries in all, not four
    return w_abs.mul_(torch.sqrt(scaler_row.to(SCORE_DTYPE)).reshape(1, -1)).add_(grad_term)
