"""Score-and-mask methods: magnitude, Wanda, GBLM. Each is a score function plus keep selection."""

from __future__ import annotations

import torch

from lowmem_gblm.errors import UsageError
from lowmem_gblm.mask import flip_fraction, select_keep
from lowmem_gblm.methods import LinearJob, Method, register
from lowmem_gblm.runtime import concrete
from lowmem_gblm.score import gblm_score, gradient_term, magnitude_score, term_share, wanda_score


def overflow_fix(job: LinearJob) -> str:
    """What makes a non-finite score finite: float32 compute when the weights and statistics came in a 16-bit
    dtype; a lower --alpha when a gradient term was added (GBLM); else the inputs themselves overflow."""
    dtype = str(job.weight.dtype).removeprefix("torch.")
    fixes = [f"rerun with --dtype float32 (this run computes in {dtype})"] if job.weight.dtype != torch.float32 else []
    if "gradient" in job.stats:
        fixes.append("lower --alpha (the gradient term's weight)")
    return " or ".join(fixes) or "the checkpoint's weights or activations overflow float32 on this text: check them"


def _apply(job: LinearJob, score: torch.Tensor, scope: str = "row") -> torch.Tensor:
    if concrete(score) and not bool(torch.isfinite(score).all()):  # the mask would be arbitrary
        raise UsageError(f"{job.name}: {int((~torch.isfinite(score)).sum())} score(s) are NaN/Inf (an overflow); "
                         f"{overflow_fix(job)}")
    keep = select_keep(score, job.pattern, scope)
    job.weight.masked_fill_(~keep, 0)
    return keep


def _magnitude(job: LinearJob) -> torch.Tensor:
    return _apply(job, magnitude_score(job.weight), job.options.magnitude_scope)


def _wanda(job: LinearJob) -> torch.Tensor:
    return _apply(job, wanda_score(job.weight, job.stats["scaler_row"]))


def _gblm(job: LinearJob) -> torch.Tensor:
    """GBLM's keep-mask, and two diagnostics of it: the gradient term's share of the linear's summed score, and
    the fraction of keep decisions that differ from Wanda's on the same Σx² (the score without that term, same
    pattern). The score is ``score.gblm_score`` bit for bit (Wanda's term + the gradient term, same arithmetic)."""
    grad = gradient_term(job.weight, job.stats["gradient"], job.options.alpha)  # [out, in] fp32
    score = wanda_score(job.weight, job.stats["scaler_row"])  # Wanda's term, then GBLM's score in place
    job.diagnostics["gradient_share"] = term_share(grad, score)
    wanda_keep = select_keep(score, job.pattern)  # [out, in] bool (a non-finite score is refused by _apply)
    keep = _apply(job, score.add_(grad))
    del grad, score
    job.diagnostics["flipped_vs_wanda"] = flip_fraction(keep, wanda_keep)
    return keep


def _gblm_score(job: LinearJob, weight: torch.Tensor) -> torch.Tensor:
    return gblm_score(weight, job.stats["scaler_row"], job.stats["gradient"], job.options.alpha)


register(Method("magnitude", frozenset(), _magnitude, "|W| per output row (or per matrix)",
                score=lambda job, w: magnitude_score(w)))
register(Method("wanda", frozenset({"scaler_row"}), _wanda, "|W| * sqrt(mean sum x^2) per output row",
                score=lambda job, w: wanda_score(w, job.stats["scaler_row"])))
register(Method("gblm", frozenset({"scaler_row", "gradient"}), _gblm,
                "Wanda + alpha * |W| * G, G the l1/l2 norm of per-sample full-model gradients", score=_gblm_score))
