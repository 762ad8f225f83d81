"""Per-linear input statistics collected from forward hooks, accumulated in fp32.

Each statistic is a small class with ``add(x)`` (x: [rows, in], any dtype) and ``result(nsamples)``.
Methods name the statistics they need; the pipeline never branches on a method's name.
"""

from __future__ import annotations

import contextlib
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

ACC_DTYPE = torch.float32  # accumulators are fp32 whatever the compute dtype


class ScalerRow:
    """scaler_row_j = (1/N) sum_n sum_t x_{n,t,j}^2 (Wanda, GBLM)."""

    def __init__(self, in_features: int, device: torch.device):
        self.total = torch.zeros(in_features, dtype=ACC_DTYPE, device=device)

    def add(self, x: torch.Tensor) -> None:
        x = x.to(ACC_DTYPE)
        self.total += (x * x).sum(dim=0)

    def result(self, nsamples: int) -> torch.Tensor:
        return self.total / nsamples


class Hessian:
    """H = (2/N) sum_n X_n^T X_n over the tokens of each sample (SparseGPT), [in, in] fp32."""

    def __init__(self, in_features: int, device: torch.device):
        self.total = torch.zeros(in_features, in_features, dtype=ACC_DTYPE, device=device)

    def add(self, x: torch.Tensor) -> None:
        x = x.to(ACC_DTYPE)
        self.total.addmm_(x.t(), x)

    def result(self, nsamples: int) -> torch.Tensor:
        return self.total * (2.0 / nsamples)


class Tokens:
    """How many tokens reached an expert (mixtures of experts: an expert the router never picks has no
    statistics, and is pruned by magnitude instead)."""

    def __init__(self, _in_features: int, device: torch.device):
        self.total = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        self.total += x.shape[0]

    def result(self, _nsamples: int) -> torch.Tensor:
        return self.total


STATISTICS = {"scaler_row": ScalerRow, "hessian": Hessian}
ROUTED = "tokens"  # the statistic every expert unit gets besides the method's


class ExpertTap(TorchFunctionMode):
    """Sees the per-expert matmuls of fused experts (transformers' eager expert loop calls
    ``F.linear(x, param[e])`` once per expert and fused parameter): ``on_linear(param name, e, x, out)`` for
    each, with x the tokens routed to expert e [tokens, in]. Other calls pass through untouched."""

    def __init__(self, block: nn.Module, params: set[str], on_linear):
        super().__init__()
        self.params = {id(block.get_parameter(p)): p for p in params}
        self.on_linear = on_linear

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear and len(args) > 1:
            weight = args[1]
            base = weight._base
            if base is not None and id(base) in self.params:
                expert = (weight.storage_offset() - base.storage_offset()) // base.stride(0)
                self.on_linear(self.params[id(base)], int(expert), args[0], out)
        return out


def by_expert(experts: dict[str, tuple[str, int, slice]], names: list[str]) -> dict[tuple[str, int], list[str]]:
    """(fused parameter, expert) -> the named units in it (ExpertLayout.units: gate and up share one)."""
    out: dict[tuple[str, int], list[str]] = {}
    for name in names:
        if name in experts:
            param, e, _rows = experts[name]
            out.setdefault((param, e), []).append(name)
    return out


@contextmanager
def collect_inputs(block: nn.Module, names: list[str], wanted: frozenset[str],
                   experts: dict[str, tuple[str, int, slice]] | None = None):
    """Attach accumulators for ``wanted`` statistics to the named units of ``block``: linears (forward
    pre-hooks) and stored expert matrices (``experts``: StreamedModel.expert_units; an ExpertTap over the
    block's calls, with a ROUTED token count each).

    Yields {unit name: {stat_name: accumulator}}; hooks are removed on exit.
    """
    experts = experts or {}
    accs: dict[str, dict[str, object]] = {}
    handles = []
    for name in names:
        if name in experts:
            param, _e, rows = experts[name]
            in_features = block.get_parameter(param).shape[-1]
            accs[name] = {s: STATISTICS[s](in_features, block.get_parameter(param).device) for s in wanted}
            if wanted:
                accs[name][ROUTED] = Tokens(in_features, block.get_parameter(param).device)
            continue
        linear = block.get_submodule(name)
        accs[name] = {s: STATISTICS[s](linear.in_features, linear.weight.device) for s in wanted}

        def hook(_mod, args, _accs=accs[name]):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1])  # [B*T, in]
            for acc in _accs.values():
                acc.add(x)

        if accs[name]:
            handles.append(linear.register_forward_pre_hook(hook))
    groups = by_expert(experts, names) if wanted else {}

    def on_expert(param: str, e: int, x: torch.Tensor, _out: torch.Tensor) -> None:
        for name in groups.get((param, e), ()):
            for acc in accs[name].values():
                acc.add(x.detach())

    with contextlib.ExitStack() as stack:
        if groups:
            stack.enter_context(ExpertTap(block, {p for p, _ in groups}, on_expert))
        try:
            yield accs
        finally:
            for h in handles:
                h.remove()
