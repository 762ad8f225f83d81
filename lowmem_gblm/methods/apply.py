"""Prune one block's linears: the step the engine's prune sweep runs and the planner's probe measures.

The statistics are already collected (forward hooks over the dense block); each linear gets its
statistics (and GBLM's gradient norm), the method prunes it in place, and the bytes to write are made
in the checkpoint's stored dtype: masked stored bytes (exact) for mask-only methods, the updated
weight cast back for weight-updating ones. The block's weight is then set to exactly what is written,
so the next block sees the pruned model as saved.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from lowmem_gblm.errors import UsageError
from lowmem_gblm.io.model import linear_names
from lowmem_gblm.mask import Pattern
from lowmem_gblm.methods import LinearJob, Method, MethodOptions, SharedFactors, get_method
from lowmem_gblm.stream.stats import ROUTED

MAGNITUDE = get_method("magnitude")  # for an expert no calibration token reached


def statistics_needed(method: Method, available: Mapping) -> frozenset[str]:
    """The input statistics ``method`` needs, of those ``available`` (stream.stats.STATISTICS)."""
    return frozenset(s for s in method.needs if s in available)


def prune_linear(job: LinearJob, method: Method, stored: torch.Tensor, device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
    """Prune ``job.weight`` in place; return the tensor to write (``stored``'s dtype, CPU).

    stored: the weight as the checkpoint stores it [out, in]. Afterwards ``job.weight`` holds the
    written values in the compute dtype.
    """
    keep = method.prune(job)  # [out, in] bool
    # weight-updating methods write their new weights; mask-only ones the stored bytes, masked (exact)
    written = job.weight.to(stored.dtype).cpu() if method.updates_weights else stored.masked_fill(~keep.cpu(), 0)
    job.weight.copy_(written.to(device, dtype))  # next block sees what is written
    return written


@dataclass(frozen=True)
class BlockPruner:
    """How every linear of a block is pruned: the method with its pattern and options, on ``device`` in
    ``dtype`` (the block's compute dtype)."""

    method: Method
    pattern: Pattern
    options: MethodOptions
    device: torch.device
    dtype: torch.dtype

    def prune(self, block: nn.Module, prefix: str, stats: dict[str, dict], nsamples: int,
              gradients: Mapping | None, stored: dict[str, torch.Tensor], names: list[str] | None = None,
              weights: Mapping[str, torch.Tensor] | None = None,
              diagnostics: dict[str, dict[str, float]] | None = None) -> list[str]:
        """Prune the units ``names`` of ``block`` (default: every linear; weights named ``prefix`` + name +
        ``.weight``); ``stored[name]`` is replaced by the bytes to write. weights: unit -> its [out, in] weight
        in the block (default: the linear's; an expert's is a view into the fused parameter). stats: unit ->
        {statistic: accumulator} (cleared here; units reading the same input may share one dict: its statistics are
        finished once, see finished_statistics); gradients: full weight name -> G [out, in] (GBLM).

        An expert unit no calibration token reached (its ROUTED count is 0) has no statistics: it is pruned by
        magnitude with the same pattern. Returns those units' full names. ``diagnostics`` (filled when given): full
        weight name -> what its method reported about its choice, as numbers (GBLM: gradient_share,
        flipped_vs_wanda)."""
        modules = dict(block.named_modules())
        fallback = []
        factors = SharedFactors()  # linears reading the same input share their Hessian's factorization
        for name, finished, first in finished_statistics(stats, linear_names(block) if names is None else names,
                                                         nsamples):
            full = f"{prefix}{name}.weight"
            weight = modules[name].weight.data if weights is None else weights[name]
            method = self.method
            routed = finished.pop(ROUTED, None)
            if routed is not None and float(routed) == 0.0:
                method, finished = MAGNITUDE, {}
                fallback.append(full)
            elif method.needs_gradients:
                finished["gradient"] = gradients[full].to(self.device)
            for statistic, value in finished.items():
                if first or statistic == "gradient":  # a shared statistic is checked once, naming its first unit
                    _require_finite(value, f"{full}: its {statistic} statistic", self.dtype)
            job = LinearJob(full, weight, finished, self.pattern, self.options, factors=factors)
            stored[full] = prune_linear(job, method, stored[full], self.device, self.dtype)
            if method.updates_weights:
                _require_finite(stored[full], f"{full}: the updated weight", self.dtype)
            if diagnostics is not None and job.diagnostics:
                diagnostics[full] = {k: v if isinstance(v, str) else float(v)
                                     for k, v in sorted(job.diagnostics.items())}
            del finished, job
        return fallback


def finished_statistics(stats: Mapping[str, dict], names: list[str],
                        nsamples: int) -> Iterator[tuple[str, dict[str, torch.Tensor], bool]]:
    """(unit, its finished statistics, whether its set is met for the first time) for each of ``names`` in order.

    stats: unit -> {statistic: accumulator} (stream.stats.collect_inputs); units that read the same input share one
    dict. Each distinct set is finished once (so the units sharing it get the very same tensors, and a factorization
    cache keyed by the tensor hits) and its accumulators cleared then; every unit gets its own copy of the mapping
    (add or pop keys freely); the finished tensors are dropped after the last unit in ``names`` that uses them."""
    last: dict[int, str] = {}
    for name in names:
        if name in stats:
            last[id(stats[name])] = name
    finished: dict[int, dict[str, torch.Tensor]] = {}
    for name in names:
        accs = stats.get(name)
        if accs is None:
            yield name, {}, True
            continue
        key = id(accs)  # the dict stays in ``stats`` (cleared, not dropped): its id is not reused meanwhile
        first = key not in finished
        if first:
            finished[key] = {s: acc.result(nsamples) for s, acc in accs.items()}
            accs.clear()
        values = dict(finished[key])
        if last[key] == name:
            del finished[key]
        yield name, values, first
        del values


def _require_finite(t: torch.Tensor, what: str, dtype: torch.dtype) -> None:
    """Scores built from a NaN/Inf statistic would pick an arbitrary mask: refuse, naming the linear."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        fix = ("rerun with --dtype float32" if dtype != torch.float32
               else "the model's activations overflow float32 on this text; check the checkpoint")
        raise UsageError(f"{what} holds NaN/Inf, so its scores are not finite (computing in {dtype}); {fix}")


def linear_report(written: torch.Tensor) -> dict:
    """{"shape", "zeros", "sparsity"} of one written weight (for prune_report.json and the manifest)."""
    zeros = int((written == 0).sum())
    return {"shape": list(written.shape), "zeros": zeros, "sparsity": zeros / written.numel()}
