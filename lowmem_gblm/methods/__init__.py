"""Method registry. A method declares the statistics it needs and prunes one linear in place.

The pipeline asks the registry; it never branches on a method's name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lowmem_gblm.errors import UsageError
from lowmem_gblm.mask import Pattern


@dataclass
class LinearJob:
    """One linear to prune. ``weight`` is modified in place: [out, in], compute dtype, on device."""

    name: str  # full checkpoint name of the weight, e.g. model.layers.3.mlp.down_proj.weight
    weight: torch.Tensor
    stats: dict[str, torch.Tensor]  # statistic name -> finished value (e.g. scaler_row [in])
    pattern: Pattern
    options: object  # the PruneConfig


@dataclass(frozen=True)
class Method:
    name: str
    needs: frozenset[str]  # statistic names (stream.stats.STATISTICS) and/or "gradient"
    prune: Callable[[LinearJob], torch.Tensor]  # returns keep [out, in] bool; updates job.weight
    summary: str
    updates_weights: bool = False  # True: surviving weights change (SparseGPT); else only masked


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    _load_builtin()
    if name not in _REGISTRY:
        raise UsageError(f"unknown method {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def method_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    from lowmem_gblm.methods import scored  # noqa: F401  (registers magnitude, wanda, gblm)

    with contextlib.suppress(ImportError):  # registers sparsegpt
        from lowmem_gblm.methods import sparsegpt  # noqa: F401
