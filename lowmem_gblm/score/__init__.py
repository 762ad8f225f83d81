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


def gradient_term(weight: torch.Tensor, grad_norm: torch.Tensor, alpha: float) -> torch.Tensor:
    """GBLM's second term alpha * |W| * G [out, in] fp32, with the same arithmetic as ``gblm_score``'s, so
    ``wanda_score(W, s) + gradient_term(W, G, alpha)`` equals ``gblm_score(W, s, G, alpha)`` bit for bit."""
    term = weight.to(SCORE_DTYPE).abs().mul_(grad_norm.to(SCORE_DTYPE))
    return term.mul_(alpha)


def term_share(part: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """sum(part) / (sum(part) + sum(rest)) over a whole linear, a 0-dim float64 tensor in [0, 1] for non-negative
    terms (0 when both sums are 0). GBLM's gradient share: part = alpha |W| G, rest = |W| sqrt(scaler_row).
    Stays a tensor (no host sync; the planner's fake tensors run through it)."""
    a, b = part.sum(dtype=torch.float64), rest.sum(dtype=torch.float64)
    total = a + b
    return torch.where(total > 0, a / torch.where(total > 0, total, 1.0), 0.0)
