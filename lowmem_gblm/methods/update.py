"""How the surviving weights change once a score method has chosen the mask (``--update``).

Which weights go and how the survivors change are separate steps: a score method (magnitude, Wanda,
GBLM) picks ``keep``; an update then rewrites the kept weights of every output row to reconstruct the
dense layer's output on the calibration inputs of the still-dense block, whose Gram matrix
H = (2/N) sum_n X_n^T X_n is SparseGPT's Hessian (same accumulation, same damping rule):

* ``none``: the kept weights stay as they are (the published Wanda / GBLM).
* ``obs``:  SparseGPT's OBS sweep (Frantar & Alistarh 2023) for the fixed mask: columns left to right in
  blocks, each pruned weight's error spread over the later columns of its row, lazy block updates.
* ``lsq``:  the exact least-squares solution per row. Row r keeps the columns S; minimising
  (w - v)^T H (w - v) over v with v = 0 off S gives H[S, S] v[S] = (H w)[S]. Two solvers (``--solver``):

  - ``direct``: float64, a Cholesky factor per row, rows with the same number of kept columns batched (a few
    hundred MiB of systems per call). Cost per row ~k^3/3 for k kept columns: exact, the reference the tests
    compare against, and hours per block at LLaMA-13B shapes.
  - ``iterative`` (``methods.solve``): every row at once in fp32, conjugate gradients on the pruned weights'
    multipliers with G = H^-1 shared by the linears that read the same input; about ten [out, in] x [in, in]
    products per linear, each row stopping at ``--solver-tol``.
  - ``auto`` (the default): iterative, but direct on linears narrower than AUTO_MIN_COLUMNS, where the
    per-row systems are small enough that the direct solve is as fast (benchmarks/lsq_solvers.py).

Both see H damped as SparseGPT damps it: dead inputs (H_ii = 0) get H_ii = 1 and a zero weight, then
``percdamp * mean(diag H)`` on the diagonal; a damped H that is still not positive definite is retried with ten
times the damping (logged, and reported per linear as ``percdamp_used``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from lowmem_gblm.errors import UsageError
from lowmem_gblm.mask import Pattern, flip_fraction, select_keep
from lowmem_gblm.methods import LinearJob, Method, solve
from lowmem_gblm.methods.solve import DAMP_GROWTH, DAMP_MAX, factor_hessian, solve_kept
from lowmem_gblm.methods.sparsegpt import (
    WEIGHT_DTYPE,
    HessianFactor,
    _prepare_hessian,
    hessian_factor,
    sparsegpt_prune,
)
from lowmem_gblm.runtime import concrete

log = logging.getLogger(__name__)

LSQ_DTYPE = torch.float64  # the normal equations of a row: float64 (the Gram matrix of long inputs is ill-conditioned)
LSQ_CALL_BYTES = 256 * 2**20  # rows per batched solve: at most this many bytes of [rows, k, k] systems

UPDATES = ("none", "obs", "lsq", "gradual")
GRADUAL_STEPS = 4  # --update gradual (unstructured): the sparsity reaches its target in this many steps
SOLVERS = ("auto", "direct", "iterative")
AUTO_MIN_COLUMNS = 128  # --solver auto: the direct solve below this many input columns (benchmarks/lsq_solvers.py:
# on this 2-core CPU the direct solve takes 0.45 ms at 64 x 32 and 1.05 ms at 64 x 64 against 0.77 and 1.45 ms, the
# iterative one 1.8 ms at 128 x 128 against 9.1 ms, 27x faster at 576 x 576 and 65-145x at LLaMA-13B shapes)


def resolve_solver(solver: str, in_features: int) -> str:
    """``--solver`` for a linear with ``in_features`` columns: auto -> iterative, or direct on narrow linears."""
    if solver not in SOLVERS:
        raise UsageError(f"--solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    if solver != "auto":
        return solver
    return "direct" if in_features < AUTO_MIN_COLUMNS else "iterative"


def obs_update(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, blocksize: int,
               percdamp: float, factor: HessianFactor | None = None) -> torch.Tensor:
    """SparseGPT's OBS sweep for a fixed ``keep`` [out, in]: the updated weight [out, in] fp32 (0 off keep).
    ``factor``: SparseGPT's factor of ``hessian`` computed beforehand (shared by the linears reading one input)."""
    return sparsegpt_prune(weight, hessian, _any_pattern(), blocksize, percdamp, keep=keep, factor=factor)[0]


def _obs(job: LinearJob, dense: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``obs_update`` with SparseGPT's factor shared through the block's ``job.factors`` (as SparseGPT shares it)."""
    hessian, o = job.stats["hessian"], job.options

    def build() -> HessianFactor:
        return hessian_factor(hessian, dense.device, o.percdamp)

    factor = build() if job.factors is None else job.factors.get(
        hessian, ("sparsegpt", o.percdamp, str(dense.device)), build)
    return obs_update(dense, hessian, keep, o.blocksize, o.percdamp, factor)


def lsq_update(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Per row, the kept weights minimising (w - v)^T H (w - v) with v = 0 off ``keep``. weight [out, in] (any
    float dtype), hessian [in, in], keep [out, in] bool -> [out, in] fp32."""
    w, h = _prepare_hessian(weight, hessian, percdamp)  # fp32 W (dead inputs zeroed), damped H
    h = h.to(LSQ_DTYPE)
    target = w.to(LSQ_DTYPE) @ h  # [out, in]: row r is (H w_r)^T (H symmetric)
    out = torch.zeros_like(target)
    counts = keep.sum(dim=1)  # [out]
    for k in counts.unique().tolist():
        if k == 0:
            continue
        rows = (counts == k).nonzero().flatten()
        step = max(1, LSQ_CALL_BYTES // (k * k * torch.finfo(LSQ_DTYPE).bits // 8))
        for s in range(0, rows.numel(), step):
            r = rows[s:s + step]  # [R]
            cols = keep[r].nonzero()[:, 1].view(r.numel(), k)  # [R, k] kept columns per row, ascending
            a = h[cols.unsqueeze(2), cols.unsqueeze(1)]  # [R, k, k] = H[S_r, S_r]
            b = target[r.unsqueeze(1), cols].unsqueeze(2)  # [R, k, 1] = (H w_r)[S_r]
            low, info = torch.linalg.cholesky_ex(a)
            if bool((info != 0).any()):
                raise NotPositiveDefinite(f"lsq: the damped Hessian restricted to a row's kept columns is not "
                                          f"positive definite; increase --percdamp (now {percdamp:g})")
            out[r.unsqueeze(1), cols] = torch.cholesky_solve(b, low).squeeze(2)
    return out.to(torch.float32)


class NotPositiveDefinite(UsageError):
    """The direct solve met a row system that is not positive definite (lsq_direct retries with more damping)."""


def update_damping(options, in_features: int) -> float:
    """The damping the exact update solves with, as a fraction of mean(diag H): ``--percdamp`` plus ``--ridge``.

    A ridge toward the dense weights, minimising (w - v)^T H (w - v) + mu ||w - v||^2 over the kept weights, is the
    same problem with H + mu I (the pruned weights' part of ||w - v||^2 does not depend on v): ``--ridge R`` adds
    mu = R mean(diag H), or R (in / tokens) mean(diag H) with ``--ridge-scaling inputs-per-token`` (the refit has
    ``in`` unknowns per row against ``tokens`` calibration rows: the fewer tokens per input, the more it can fit the
    calibration text's noise). R = 0 is the exact solve; R -> infinity keeps the masked dense weights."""
    ridge = options.ridge
    if ridge and options.ridge_scaling == "inputs-per-token":
        ridge *= in_features / max(options.calib_tokens, 1)
    return options.percdamp + ridge


def lsq_direct(job: LinearJob, dense: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``lsq_update`` with more damping while a row system is not positive definite; reports the solver, the damping
    used and the reconstruction error in ``job.diagnostics``."""
    percdamp = update_damping(job.options, dense.shape[1])
    while True:
        try:
            new = lsq_update(dense, job.stats["hessian"], keep, percdamp)
            break
        except NotPositiveDefinite:
            if percdamp * DAMP_GROWTH > DAMP_MAX:
                raise UsageError(f"{job.name}: the Hessian is not positive definite even with --percdamp "
                                 f"{percdamp:g}") from None
            percdamp = max(percdamp * DAMP_GROWTH, 1e-6)
            log.warning("%s: a row system of the damped Hessian is not positive definite; retrying with percdamp %g",
                        job.name, percdamp)
    w, h = _prepare_hessian(dense, job.stats["hessian"], percdamp)
    job.diagnostics.update({"solver": "direct", "percdamp_used": percdamp,
                            "reconstruction_error": reconstruction_error(w, new, h)})
    return new


def lsq_iterative(job: LinearJob, dense: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``methods.solve.solve_kept`` with the factorization shared by the linears reading the same input (the block's
    ``job.factors``); the solver's numbers go to ``job.diagnostics``."""
    o = job.options
    factor = _factor(job)
    result = solve_kept(dense, factor, keep, o.solver_tol, o.solver_max_iter)
    if result.diagnostics.get("unconverged_rows"):
        log.warning("%s: %d row(s) did not reach --solver-tol %g in %d iterations (largest residual %.3g)", job.name,
                    int(result.diagnostics["unconverged_rows"]), o.solver_tol, o.solver_max_iter,
                    result.diagnostics["residual"])
    job.diagnostics.update({"solver": "iterative", "percdamp_used": factor.percdamp,
                            "inverse_dtype": factor.inverse_dtype} | result.diagnostics)
    return result.weight


def lsq(job: LinearJob, dense: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The ``lsq`` update of one linear with the solver ``--solver`` resolves to for its width."""
    if resolve_solver(job.options.solver, dense.shape[1]) == "direct":
        return lsq_direct(job, dense, keep)
    return lsq_iterative(job, dense, keep)


def gradual_schedule(pattern: Pattern, steps: int) -> list[Pattern]:
    """The patterns ``--update gradual`` prunes to, one per step, the last = ``pattern``. Unstructured: the sparsity
    follows the cubic schedule s * (1 - (1 - t / steps)^3), t = 1..steps (Zhu & Gupta 2017's, as Boza 2024's
    gradual ADMM); N:M: one more weight pruned in every group per step ((M-1):M, (M-2):M, ..., N:M), ``steps``
    ignored."""
    if pattern.kind == "nm":
        return [Pattern.parse(f"{pattern.m - j}:{pattern.m}", None) for j in range(1, pattern.m - pattern.n + 1)]
    out = []
    for t in range(1, steps + 1):
        sparsity = pattern.sparsity * (1.0 - (1.0 - t / steps) ** 3)
        out.append(Pattern.parse("unstructured", sparsity) if t < steps else pattern)
    return out


def gradual(job: LinearJob, dense: torch.Tensor, base: Method) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks chosen with the update: the sparsity grows step by step (``gradual_schedule``); at each step the base
    method's own score (magnitude, Wanda, GBLM with its gradient term) of the weights as refit so far picks the
    next weights to prune among those still kept, and the kept weights are refit exactly (the iterative solver, warm
    started from the previous step's multipliers). Every step keeps exactly the pattern's count per row (N:M: per
    group), the weights pruned once stay pruned. Returns (weight [out, in] fp32, keep)."""
    o, hessian = job.options, job.stats["hessian"]
    factor = _factor(job)
    w = solve.scaled(dense, factor)  # [out, in] in unit-diagonal coordinates
    keep = torch.ones_like(dense, dtype=torch.bool)
    state, total, total_mean = None, 0, 0.0
    schedule = gradual_schedule(job.pattern, o.gradual_steps)
    for t, pattern in enumerate(schedule):
        current = w if state is None else (state.full * keep)  # the refit weights (scaled), 0 where pruned
        score = base.score(job, current / factor.scale)  # [out, in] fp32, higher = keep
        keep = select_keep(score.masked_fill_(~keep, -torch.inf), pattern)  # per row (config refuses matrix scope)
        del score, current
        last = t == len(schedule) - 1
        tol = o.solver_tol if last else max(o.solver_tol, o.gradual_coarse_tol)
        state = solve.multipliers_cg(w, factor.inverse, keep & ~factor.dead, tol, o.solver_max_iter, start=state)
        if concrete(w):
            total += int(state.iters.max())
            total_mean += float(state.iters.float().mean())
    result = solve.finish(w, factor, keep & ~factor.dead, state, o.solver_tol)
    job.diagnostics.update({"solver": "iterative", "percdamp_used": factor.percdamp,
                            "inverse_dtype": factor.inverse_dtype, "gradual_steps": float(len(schedule)),
                            "iterations_all_steps": float(total), "iterations_mean_all_steps": total_mean}
                           | result.diagnostics)
    del hessian
    return result.weight, keep


def _factor(job: LinearJob) -> solve.Factor:
    """The job's Hessian factored (damped, scaled, inverted), shared by the linears reading the same input."""
    hessian = job.stats["hessian"]
    percdamp = update_damping(job.options, hessian.shape[0])

    def build():
        return factor_hessian(hessian, percdamp, job.name)

    return build() if job.factors is None else job.factors.get(hessian, ("lsq", percdamp), build)


def reconstruction_error(weight: torch.Tensor, new: torch.Tensor, hessian: torch.Tensor) -> float:
    """sum_r (w_r - v_r)^T H (w_r - v_r) in float64: ||(W - V) X||^2 up to H's scale."""
    d = (weight.to(LSQ_DTYPE) - new.to(LSQ_DTYPE))
    return float((d @ hessian.to(LSQ_DTYPE) * d).sum())


def apply_update(update: str, job: LinearJob, dense: torch.Tensor, keep: torch.Tensor, base: Method) -> torch.Tensor:
    """Rewrite ``job.weight`` (already masked by its method) with the ``update`` of its kept weights; ``dense`` is
    the weight before masking (fp32), ``keep`` the base method's mask. Returns the mask written (``gradual``
    chooses its own)."""
    if update == "gradual":
        new, chosen = gradual(job, dense, base)
        job.diagnostics["flipped_vs_base"] = flip_fraction(chosen, keep)
        keep = chosen
    else:
        new = _UPDATE_FNS[update](job, dense, keep)
    job.weight.copy_(new.to(job.weight.dtype))
    return keep


def _any_pattern() -> Pattern:
    return Pattern.parse("unstructured", 0.5)  # a fixed mask ignores the pattern; any parses


def with_update(base: Method, update: str) -> Method:
    """``base`` (a score method) followed by ``update`` of the kept weights: one registry entry named
    ``base+update``, needing the Hessian too, writing its updated weights."""
    if update == "none":
        return base
    if update not in _UPDATE_FNS:
        raise UsageError(f"unknown --update {update!r}; choose one of: {', '.join(UPDATES)}")
    if base.updates_weights or (update == "gradual" and base.score is None):
        raise UsageError(f"--update {update}: {base.name} updates its surviving weights itself; --update applies to "
                         "the score methods (magnitude, wanda, gblm)")

    def prune(job: LinearJob) -> torch.Tensor:
        dense = job.weight.to(WEIGHT_DTYPE, copy=True)  # before the method masks it
        keep = base.prune(job)
        return apply_update(update, job, dense, keep, base)

    return Method(f"{base.name}+{update}", base.needs | {"hessian"}, prune,
                  f"{base.summary}; kept weights then updated by {update}", updates_weights=True, solve=update,
                  scratch_bytes=lsq_scratch_bytes if update == "lsq" else None)


def lsq_scratch_bytes(out_features: int, in_features: int) -> int:
    """lsq_update's peak on one linear: the fp32 copies of W and H, H, the target and the result in float64, and
    one batched call's systems and their factors (at most 2 x LSQ_CALL_BYTES)."""
    o, i, f64 = out_features, in_features, torch.finfo(LSQ_DTYPE).bits // 8
    return o * i * 4 + i * i * 4 + i * i * f64 + 2 * o * i * f64 + 2 * LSQ_CALL_BYTES + o * i * 4


_UPDATE_FNS: dict[str, Callable[[LinearJob, torch.Tensor, torch.Tensor], torch.Tensor] | None] = {
    "obs": _obs,
    "lsq": lsq,
    "gradual": None,  # chooses its own mask: apply_update calls gradual()
}
