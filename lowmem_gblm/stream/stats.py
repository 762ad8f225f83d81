"""Per-linear input statistics collected from forward hooks, accumulated in fp32.

Each statistic is a small class with ``add(x)`` (x: [rows, in], any dtype) and ``result(nsamples)``.
Methods name the statistics they need; the pipeline never branches on a method's name.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

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


STATISTICS = {"scaler_row": ScalerRow, "hessian": Hessian}


@contextmanager
def collect_inputs(block: nn.Module, names: list[str], wanted: frozenset[str]):
    """Attach accumulators for ``wanted`` statistics to the named linears of ``block``.

    Yields {linear_name: {stat_name: accumulator}}; hooks are removed on exit.
    """
    modules = dict(block.named_modules())
    accs: dict[str, dict[str, object]] = {}
    handles = []
    for name in names:
        linear = modules[name]
        accs[name] = {s: STATISTICS[s](linear.in_features, linear.weight.device) for s in wanted}

        def hook(_mod, args, _accs=accs[name]):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1])  # [B*T, in]
            for acc in _accs.values():
                acc.add(x)

        if accs[name]:
            handles.append(linear.register_forward_pre_hook(hook))
    try:
        yield accs
    finally:
        for h in handles:
            h.remove()
