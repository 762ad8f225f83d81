"""The exact least-squares update of the kept weights, solved iteratively in fp32 (``--solver iterative``).

The problem (``--update lsq``): for each output row r with kept columns S_r, minimise (w - v)^T H (w - v) over v
with v = 0 off S_r, H the damped Gram matrix of the layer's inputs. The direct solve (``methods.update.lsq_update``)
factors H[S_r, S_r] per row in float64: out * k^3 / 3 FLOPs for k kept columns, hours per block at 13B.

Here every row is solved at once with matrix products. With G = H^-1 and P_r the pruned columns of row r, the
solution is v = w - lambda G with lambda supported on P_r and (lambda G)[P_r] = w[P_r] (OBS with every pruned
weight removed together: Hassibi & Stork's multipliers). The multipliers solve G[P_r, P_r] lambda = w[P_r], a
symmetric positive definite system per row; conjugate gradients with the Jacobi preconditioner diag(G) solve all
rows together, one [out, in] x [in, in] product per iteration (the rows are independent: each has its own step
sizes and stops on its own). From lambda = 0 the first step is the diagonal OBS estimate w_j / G_jj (SparseGPT's
saliency). Measured on SmolLM2's Hessians (benchmarks/solver_convergence.py) this converges in about the
iterations of conjugate gradients on the kept side preconditioned by G[S, S] (ALPS's back-solve, made stronger),
at half the products per iteration, and several times faster than ADMM (Boza 2024) with one factorisation.

Numerics: H is scaled to unit diagonal first (the inputs' scales differ by orders of magnitude), fp32 throughout.
G comes from an fp32 Cholesky factor; its accuracy is probed (||H G z - z|| for a few random z) and when fp32 is not
enough (long calibration windows make H ill-conditioned) G is formed once in float64 and rounded to fp32. A damped H
that is not positive definite is retried with ten times the damping, logged and reported, never a crash.

The report's numbers need no further product: the iterations, the residual each row reached, and the
reconstruction error sum_r (w_r - v_r)^T H (w_r - v_r) from the multipliers (``reconstruction_error``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from lowmem_gblm.errors import UsageError
from lowmem_gblm.runtime import concrete

log = logging.getLogger(__name__)

SOLVE_DTYPE = torch.float32  # the hot path: products, iterations, the inverse used by them
FACTOR_FALLBACK_DTYPE = torch.float64  # the inverse formed once in float64 when fp32's is not accurate enough
INVERSE_TOL = 1e-3  # ||H G z - z|| / ||z|| above this: G is formed in float64 instead
INVERSE_PROBES = 4  # random vectors for that probe
DAMP_GROWTH = 10.0  # a damped H that is not positive definite is retried with this factor more damping
DAMP_MAX = 10.0  # ... up to this fraction of mean(diag H) (the largest --percdamp accepted)
DEFAULT_TOL = 3e-2  # per row: ||r||_{D^-1} / ||w_P||_{D^-1} (relative residual of the multipliers' system); on
# SmolLM2 the perplexity is within 0.15% of the direct solve's at 50% and 2:4 (benchmarks/results/quality-cpu-solver-*)
DEFAULT_MAX_ITER = 100


@dataclass
class Factor:
    """What every linear reading the same inputs shares: H damped and scaled to unit diagonal, its inverse.

    hessian [in, in] fp32 (unit diagonal), inverse [in, in] fp32, scale [in] (sqrt of the damped diagonal: the
    weights are solved as w * scale), dead [in] bool (inputs that were always 0: their weights become 0)."""

    hessian: torch.Tensor
    inverse: torch.Tensor | None
    scale: torch.Tensor
    dead: torch.Tensor
    percdamp: float  # the damping used (more than asked when H needed it)
    retries: int = 0  # how many times the damping was raised
    inverse_dtype: str = "float32"
    inverse_error: float = 0.0  # the probe's ||H G z - z|| / ||z||
    notes: list[str] = field(default_factory=list)


def damped(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's damping rule on an fp32 copy: dead inputs (H_ii = 0) get H_ii = 1, then percdamp * mean(diag H)
    on the diagonal. hessian [in, in] -> (H [in, in] fp32, dead [in] bool)."""
    h = hessian.to(dtype=SOLVE_DTYPE, copy=True)
    diag = h.diagonal()  # a view: writes go into h
    dead = diag == 0
    diag[dead] = 1.0
    diag += percdamp * torch.mean(diag)
    return h, dead


def factor_hessian(hessian: torch.Tensor, percdamp: float, name: str = "", with_inverse: bool = True) -> Factor:
    """Damp, scale to unit diagonal and (``with_inverse``) invert ``hessian`` [in, in]; more damping while it is not
    positive definite (logged, recorded in the Factor)."""
    asked, retries = percdamp, 0
    while True:
        h, dead = damped(hessian, percdamp)
        scale = h.diagonal().sqrt()  # [in] > 0 after damping (dead inputs have 1)
        h.div_(scale.unsqueeze(1)).div_(scale.unsqueeze(0))  # unit diagonal
        if not with_inverse:
            return Factor(h, None, scale, dead, percdamp, retries)
        if not concrete(h):  # the planner's fake tensors: the same allocations, no value checks
            return Factor(h, torch.cholesky_inverse(torch.linalg.cholesky(h)), scale, dead, percdamp)
        inverse, dtype, error = _inverse(h)
        if inverse is not None:
            break
        if percdamp * DAMP_GROWTH > DAMP_MAX or not bool(torch.isfinite(hessian).all()):
            raise UsageError(f"{name}: the Hessian is not positive definite even with --percdamp {percdamp:g} "
                             "(its statistics may hold NaN/Inf; check the model in float32)")
        percdamp = max(percdamp * DAMP_GROWTH, 1e-6)
        retries += 1
        log.warning("%s: the damped Hessian is not positive definite; retrying with percdamp %g (asked %g)", name,
                    percdamp, asked)
    notes = [] if dtype == SOLVE_DTYPE else [f"inverse formed in float64 (fp32 probe error above {INVERSE_TOL:g})"]
    return Factor(h, inverse, scale, dead, percdamp, retries, str(dtype).removeprefix("torch."), error, notes)


def _inverse(h: torch.Tensor) -> tuple[torch.Tensor | None, torch.dtype, float]:
    """G = h^-1 in fp32 when fp32 is accurate enough, else formed in float64 (and rounded to fp32); (None, .., inf)
    when h is not positive definite in float64 either."""
    low, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0:
        inverse = torch.cholesky_inverse(low)
        del low
        error = _probe_error(h, inverse)
        if error <= INVERSE_TOL:
            return inverse, SOLVE_DTYPE, error
        del inverse
    low, info = torch.linalg.cholesky_ex(h.to(FACTOR_FALLBACK_DTYPE))
    if int(info) != 0:
        return None, FACTOR_FALLBACK_DTYPE, math.inf
    inverse = torch.cholesky_inverse(low).to(SOLVE_DTYPE)
    del low
    return inverse, FACTOR_FALLBACK_DTYPE, _probe_error(h, inverse)


def _probe_error(h: torch.Tensor, inverse: torch.Tensor) -> float:
    """||h (G z) - z||_F / ||z||_F over a few fixed random columns z: how far G is from h's inverse."""
    gen = torch.Generator(device=h.device).manual_seed(0)
    z = torch.randn(h.shape[0], INVERSE_PROBES, generator=gen, device=h.device, dtype=h.dtype)
    error = float(torch.linalg.matrix_norm(h @ (inverse @ z) - z) / torch.linalg.matrix_norm(z))
    return error if math.isfinite(error) else math.inf


@dataclass(frozen=True)
class SolveResult:
    weight: torch.Tensor  # [out, in] fp32, 0 off keep
    diagnostics: dict[str, float]


@dataclass
class Multipliers:
    """The state of ``multipliers_cg`` for every row: ``full`` = w - lambda G [out, in] (the solution on the kept
    columns, the residual r on the pruned ones), ``lam`` = lambda [out, in] (0 off the pruned columns), and per row
    the iterations run [out] and the relative residual reached [out]."""

    full: torch.Tensor
    lam: torch.Tensor
    iters: torch.Tensor
    rel: torch.Tensor


def solve_kept(weight: torch.Tensor, factor: Factor, keep: torch.Tensor, tol: float = DEFAULT_TOL,
               max_iter: int = DEFAULT_MAX_ITER) -> SolveResult:
    """The kept weights minimising (w - v)^T H (w - v) per row, all rows at once (module docstring).

    weight [out, in] (any float dtype), keep [out, in] bool -> SolveResult (weight [out, in] fp32, 0 off keep and on
    dead inputs). Each row iterates until its relative residual is <= tol, at most max_iter times."""
    w = scaled(weight, factor)
    keep = keep & ~factor.dead
    return finish(w, factor, keep, multipliers_cg(w, factor.inverse, keep, tol, max_iter), tol)


def scaled(weight: torch.Tensor, factor: Factor) -> torch.Tensor:
    """The weight [out, in] as the solver sees it: an fp32 copy, 0 on dead inputs, times ``factor.scale`` (the
    problem in the unit-diagonal coordinates of ``factor.hessian``)."""
    w = weight.to(dtype=SOLVE_DTYPE, copy=True)
    w[:, factor.dead] = 0.0
    return w.mul_(factor.scale)


def finish(w: torch.Tensor, factor: Factor, keep: torch.Tensor, m: Multipliers, tol: float) -> SolveResult:
    """``multipliers_cg``'s result -> the kept weights in the caller's coordinates and the numbers of the solve
    (``w``: the scaled weight it solved for; ``m.full`` becomes the result)."""
    diagnostics = {}
    if concrete(w):  # (the planner's fake tensors have no numbers)
        it, rel = m.iters, m.rel
        diagnostics = {"iterations": float(it.max()) if it.numel() else 0.0,
                       "iterations_mean": float(it.float().mean()) if it.numel() else 0.0,
                       "residual": float(rel.max()) if rel.numel() else 0.0,
                       "unconverged_rows": float((rel > tol).sum()),
                       "reconstruction_error": reconstruction_error(w, keep, m)}
    v = m.full.masked_fill_(~keep, 0.0)  # [out, in]
    m.full = m.lam = None
    return SolveResult(v.div_(factor.scale), diagnostics)


def reconstruction_error(w: torch.Tensor, keep: torch.Tensor, m: Multipliers) -> float:
    """sum_r (w_r - v_r)^T H (w_r - v_r) for v = ``m.full`` on the kept columns, from the multipliers, without a
    product with H. With r the residual (``m.full`` on the pruned columns), w - v = lambda G + r, so (G H = I)
    the error is lambda G lambda^T + 2 lambda . r + r H r^T, and lambda G = w - r on the pruned columns gives
    sum lambda (w + r) + r H r^T. The last term is r's own energy, O(residual^2): its diagonal part sum r^2 (H has
    a unit diagonal here) is added, the rest left out. On SmolLM2's Hessians at --solver-tol 3e-2 this is within
    7e-4 of the exact value (mostly within 1e-4; tests/test_solve.py checks 1e-3)."""
    r = m.full.masked_fill(keep, 0.0)  # [out, in]: the residual on the pruned columns
    total = torch.sum(m.lam * (w + r), dtype=torch.float64) + torch.sum(r * r, dtype=torch.float64)
    return float(total)


def multipliers_cg(w: torch.Tensor, inverse: torch.Tensor, keep: torch.Tensor, tol: float, max_iter: int,
                   start: Multipliers | None = None) -> Multipliers:
    """Conjugate gradients on G[P, P] lambda = w[P] for every row (P: the row's pruned columns), Jacobi-preconditioned.

    w [out, in] (scaled), inverse G [in, in], keep [out, in] bool. ``start``: a previous solve's state whose
    multipliers are 0 off this P (fewer pruned columns; consumed), else lambda = 0. Rows stop on their own at a
    relative residual (to w[P], in the preconditioner's norm) <= tol: once converged they leave the products (the
    active rows are gathered)."""
    pruned = (~keep).to(w.dtype)  # [out, in] 1 where pruned
    g = inverse.diagonal().clamp_min(torch.finfo(w.dtype).tiny)  # [in] Jacobi preconditioner diag(G)
    full = w.clone() if start is None else start.full  # w - lambda G
    lam = torch.zeros_like(w) if start is None else start.lam
    z = full * pruned / g  # preconditioned residual
    p = z.clone()
    rz = (full * pruned * z).sum(dim=1)  # [out]
    rz0 = (w * pruned * (w * pruned / g)).sum(dim=1) if start is not None else rz.clone()
    iters = torch.zeros(w.shape[0], dtype=torch.int64, device=w.device)
    target = (tol * tol) * rz0
    fake = not concrete(w)  # the planner's fake tensors: one iteration over every row (the peak), no stopping test
    active = torch.arange(w.shape[0], device=w.device) if fake else (rz > target).nonzero().flatten()
    del z
    tiny = torch.finfo(w.dtype).tiny
    for _ in range(1 if fake else max_iter):
        if active.numel() == 0:
            break
        every = active.numel() == w.shape[0]
        pa, ma = (p, pruned) if every else (p[active], pruned[active])  # [a, in]
        fa, la = (full, lam) if every else (full[active], lam[active])
        q = pa @ inverse  # [a, in]: the one product of the iteration
        alpha = (rz[active] / (pa * q * ma).sum(dim=1).clamp_min(tiny)).unsqueeze(1)  # [a, 1]
        la.add_(alpha * pa)  # lambda += alpha p
        fa.sub_(alpha * q)  # w - lambda G
        del q
        za = fa * ma / g  # the residual (full on the pruned columns), preconditioned
        rz_new = (fa * ma * za).sum(dim=1)
        pa.mul_((rz_new / rz[active].clamp_min(tiny)).unsqueeze(1)).add_(za)  # p = z + beta p
        if not every:
            full[active], lam[active], p[active] = fa, la, pa
        del fa, la, pa, za, ma
        rz[active] = rz_new
        iters[active] += 1
        if not fake:
            active = active[rz_new > target[active]]
    rel = (rz / rz0.clamp_min(tiny)).sqrt()
    return Multipliers(full, lam, iters, rel)
