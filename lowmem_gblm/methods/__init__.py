"""Method registry. A method declares the statistics it needs and prunes one linear in place.

The engine asks the registry; it never branches on a method's name. A method receives a
``LinearJob`` with typed ``MethodOptions``, never the run's whole configuration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lowmem_gblm.errors import UsageError
from lowmem_gblm.mask import Pattern


@dataclass(frozen=True)
class MethodOptions:
    """The options a method reads (config.PruneConfig.method_options builds them from the run's options)."""

    magnitude_scope: str = "row"  # magnitude: keep per output row, or over the whole matrix
    alpha: float = 100.0  # GBLM: weight of the gradient term
    percdamp: float = 0.01  # SparseGPT: Hessian dampening, a fraction of mean(diag H)
    blocksize: int = 128  # SparseGPT: columns per lazy-update block
    solver: str = "auto"  # --update lsq: "direct" (float64 per row), "iterative" (methods.solve) or "auto"
    solver_tol: float = 3e-2  # iterative: each row stops at this relative residual (methods.solve.DEFAULT_TOL)
    solver_max_iter: int = 100  # iterative: at most this many iterations per row
    gradual_steps: int = 4  # --update gradual, unstructured: steps to the target sparsity (methods.update)
    gradual_coarse_tol: float = 1e-1  # --update gradual: each step but the last stops at max(this, solver_tol)
    ridge: float = 0.0  # lsq / gradual: a ridge toward the dense weights, a fraction of mean(diag H) (update_damping)
    ridge_scaling: str = "none"  # "none" or "inputs-per-token": the ridge times in_features / calib_tokens
    calib_tokens: int = 0  # calibration tokens behind each Hessian (the engine fills it; inputs-per-token uses it)


class SharedFactors:
    """The factorization of the last Hessian a method asked for, kept for the next linears that read the same input
    (q/k/v, gate/up: they share one Hessian and come one after another in a block). One slot: another Hessian (or
    another kind of factorization) replaces it, so at most one is held."""

    def __init__(self):
        self._key: tuple | None = None
        self._hessian: torch.Tensor | None = None  # held: its id cannot be reused while the slot is filled
        self._value = None

    def get(self, hessian: torch.Tensor, kind: tuple, build: Callable[[], object]):
        """``build()`` once per (Hessian tensor, kind); the held value while the same ones are asked for."""
        if self._hessian is not hessian or self._key != kind:
            self._key = self._hessian = self._value = None  # free the old one before building the new
            value = build()
            self._key, self._hessian, self._value = kind, hessian, value
        return self._value


@dataclass
class LinearJob:
    """One linear to prune. ``weight`` is modified in place: [out, in], compute dtype, on device."""

    name: str  # full checkpoint name of the weight, e.g. model.layers.3.mlp.down_proj.weight
    weight: torch.Tensor
    stats: dict[str, torch.Tensor]  # statistic name -> finished value (e.g. scaler_row [in]), "gradient" -> G
    pattern: Pattern
    options: MethodOptions
    # what the method reports about its choice, numbers or 0-dim tensors (GBLM: gradient_share, flipped_vs_wanda;
    # lsq: the solver's iterations and residual), or strings; the caller turns them into prune_report.json values
    diagnostics: dict[str, torch.Tensor | float | str] = field(default_factory=dict)
    factors: SharedFactors | None = None  # the block's factorization cache (None: every linear factors its own)


@dataclass(frozen=True)
class Method:
    name: str
    needs: frozenset[str]  # statistic names (stream.stats.STATISTICS) and/or "gradient"
    prune: Callable[[LinearJob], torch.Tensor]  # returns keep [out, in] bool; updates job.weight
    summary: str  # one line for --help
    updates_weights: bool = False  # True: surviving weights change (SparseGPT); else only masked
    solve: str | None = None  # the weight solve it runs per linear ("obs", "lsq"): counted by memory.work
    scratch_bytes: Callable[[int, int], int] | None = None  # its peak on one [out, in] linear, when the planner's
    # fake tensors cannot run it (data-dependent shapes); None: a generic estimate
    # score methods: the score of given weights [out, in] with the job's statistics (higher = keep), what the mask is
    # chosen from; ``--update gradual`` scores the refit weights with it at every step
    score: Callable[[LinearJob, torch.Tensor], torch.Tensor] | None = None

    @property
    def needs_gradients(self) -> bool:
        return "gradient" in self.needs


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    """A registered method by name; ``base+update`` (e.g. ``wanda+lsq``): the score method ``base`` with the
    kept weights then updated (methods.update, ``--update``)."""
    base, plus, update = str(name).partition("+")
    if base not in _REGISTRY:
        raise UsageError(f"unknown method {base!r}; choose one of: {', '.join(sorted(_REGISTRY))}")
    return update_module.with_update(_REGISTRY[base], update) if plus else _REGISTRY[base]


def registered() -> dict[str, Method]:
    """name -> Method, every method registered so far (the built-in ones are registered on import)."""
    return dict(_REGISTRY)


# the built-in methods register themselves (after the registry above exists)
from lowmem_gblm.methods import scored, sparsegpt  # noqa: E402,F401
from lowmem_gblm.methods import update as update_module  # noqa: E402
