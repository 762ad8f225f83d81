"""Sparsity patterns and keep-mask selection.

One vocabulary: ``keep`` is a bool tensor shaped like the weight, True where the weight stays.
Scores are "higher is more important"; selection drops the lowest scores with a *stable* sort,
so ties (common in quantized checkpoints) break by column index, deterministically.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lowmem_gblm.errors import UsageError

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """``unstructured`` (per output row, or per matrix) or ``N:M`` (N kept in every M input columns)."""

    kind: str  # "unstructured" | "nm"
    sparsity: float
    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, pattern: str, sparsity: float | None) -> Pattern:
        text = pattern.strip().lower()
        if text == "unstructured":
            if sparsity is None:
                raise UsageError("--sparsity is required with --pattern unstructured (e.g. --sparsity 0.5)")
            if not 0.0 < float(sparsity) < 1.0:
                raise UsageError(f"--sparsity must be in (0, 1), got {sparsity}")
            return cls("unstructured", float(sparsity))
        match = _NM.match(text)
        if not match:
            raise UsageError(f"--pattern must be 'unstructured' or 'N:M' like 2:4, got {pattern!r}")
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise UsageError(f"--pattern {pattern}: need 0 < N < M (N weights kept in every M), got N={n} M={m}")
        implied = 1.0 - n / m
        if sparsity is not None and not abs(float(sparsity) - implied) <= 1e-9:  # NaN is refused too
            raise UsageError(
                f"--pattern {n}:{m} keeps {n} of {m} weights (sparsity {implied:g}); "
                f"--sparsity {sparsity} contradicts it: drop --sparsity or set it to {implied:g}"
            )
        return cls("nm", implied, n, m)

    def __str__(self) -> str:
        return "unstructured" if self.kind == "unstructured" else f"{self.n}:{self.m}"

    def check_columns(self, in_features: int, name: str) -> None:
        if self.kind == "nm" and in_features % self.m:
            raise UsageError(
                f"--pattern {self}: {name} has {in_features} input columns, not a multiple of M={self.m}; "
                "choose an M that divides every linear's input size"
            )


def select_keep(score: torch.Tensor, pattern: Pattern, scope: str = "row") -> torch.Tensor:
    """Keep-mask from scores. score: [out, in] -> keep: [out, in] bool.

    scope ``row``: drop ``int(in * sparsity)`` lowest per output row (Wanda/GBLM comparison group).
    scope ``matrix``: drop ``int(numel * sparsity)`` lowest of the whole matrix (published magnitude).
    N:M patterns always compare within each group of M consecutive input columns of one row.
    """
    out_f, in_f = score.shape
    keep = torch.ones_like(score, dtype=torch.bool)
    if scope not in ("row", "matrix"):
        raise UsageError(f"unknown comparison scope {scope!r}: use 'row' or 'matrix'")
    if pattern.kind == "nm" or scope == "row":
        # rows are independent: sort a band of rows at a time (the sort's values and int64 indices
        # would otherwise be 3x the score's size)
        step = max(1, SORT_BAND // max(in_f, 1))
        for r in range(0, out_f, step):
            _keep_rows(score[r:r + step], keep[r:r + step], pattern)
        return keep
    k = int(score.numel() * pattern.sparsity)  # matrix scope: one comparison over every entry
    drop = torch.sort(score.reshape(-1), stable=True).indices[:k]
    keep.view(-1)[drop] = False
    return keep


SORT_BAND = 1 << 22  # score elements sorted at once by select_keep


def _keep_rows(score: torch.Tensor, keep: torch.Tensor, pattern: Pattern) -> None:
    """Clear the dropped entries of a band of rows in ``keep`` (a view into the full mask)."""
    rows, in_f = score.shape
    if pattern.kind == "nm":
        groups = score.reshape(rows, in_f // pattern.m, pattern.m)  # [rows, in/M, M]
        drop = torch.sort(groups, dim=-1, stable=True).indices[..., : pattern.m - pattern.n]
        keep.view(rows, in_f // pattern.m, pattern.m).scatter_(-1, drop, False)
        return
    k = int(in_f * pattern.sparsity)
    drop = torch.sort(score, dim=1, stable=True).indices[:, :k]  # [rows, k]
    keep.scatter_(1, drop, False)


def flip_fraction(keep: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """|keep XOR other| / numel: the share of entries whose keep decision differs between two masks of one weight
    (a 0-dim float64 tensor in [0, 1]; with the same number kept per comparison group, half are kept-to-pruned
    and half pruned-to-kept)."""
    return (keep ^ other).sum(dtype=torch.float64) / max(keep.numel(), 1)
