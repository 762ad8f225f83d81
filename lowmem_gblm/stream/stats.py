"""Per-linear input statistics collected from forward hooks, accumulated in fp32.

Each statistic is a small class with ``add(x)`` (x: [rows, in], any dtype) and ``result(nsamples)``.
Methods name the statistics they need; the pipeline never branches on a method's name.
"""

from __future__ import annotations

import contextlib
import weakref
from contextlib import contextmanager
from functools import partial

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


class InputStatistics(dict):
    """unit name -> {statistic name: accumulator}, as ``collect_inputs`` yields it. Units that read the same input
    map to the *same* dict object (with ``share``): one set of statistics per distinct input. The first unit of each
    set (in the order the forward reached them) is its leader, whose name keys the set in ``accumulators``."""

    def distinct(self) -> dict[str, dict[str, object]]:
        """leader -> its accumulators: each distinct set once, in the order the sets were made."""
        out: dict[str, dict[str, object]] = {}
        seen: set[int] = set()
        for name, accs in self.items():
            if id(accs) not in seen:
                seen.add(id(accs))
                out[name] = accs
        return out

    def groups(self) -> tuple[tuple[str, ...], ...]:
        """The units of each distinct set, leader first."""
        by_set: dict[int, list[str]] = {}
        for name, accs in self.items():
            by_set.setdefault(id(accs), []).append(name)
        return tuple(tuple(names) for names in by_set.values())

    def accumulators(self) -> dict[str, object]:
        """"leader/statistic" -> accumulator of every distinct set: what a ChunkFold folds (one per distinct input,
        so a shared accumulator is never folded twice). Build it at every fold step: a set is made at its first
        call."""
        return {f"{leader}/{s}": acc for leader, accs in self.distinct().items() for s, acc in accs.items()}


class _Sharing:
    """collect_inputs' run-time sharing for linears: which input each linear read (weak references only)."""

    def __init__(self, accs: InputStatistics, wanted: frozenset[str]):
        self.accs, self.wanted = accs, wanted
        self.readers: dict[int, tuple[weakref.ref, str]] = {}  # id(input) -> (the input, the leader that read it)
        self.leader: dict[str, str] = {}  # a linear sharing another's set -> that leader
        self.latest: dict[str, weakref.ref] = {}  # leader -> the input of its latest call

    def hook(self, mod: nn.Module, args: tuple, *, name: str) -> None:
        x = args[0]
        if name in self.leader:  # a follower: its leader's statistics already hold this input
            leader = self.leader[name]
            if self.latest[leader]() is not x:
                raise RuntimeError(f"internal error: {name} shares the input statistics of {leader} (it read the same "
                                   "tensor at its first call), but now reads another input")
            return
        if name not in self.accs:  # first call: join the set of the linear that read this very tensor, or make one
            seen = self.readers.get(id(x))
            if seen is not None and seen[0]() is x:
                self.leader[name] = seen[1]
                self.accs[name] = self.accs[seen[1]]
                return
            self.accs[name] = {s: STATISTICS[s](mod.in_features, mod.weight.device) for s in self.wanted}
        ref = weakref.ref(x)
        self.readers[id(x)] = (ref, name)
        self.latest[name] = ref
        flat = x.detach().reshape(-1, x.shape[-1])  # [B*T, in]
        for acc in self.accs[name].values():
            acc.add(flat)


@contextmanager
def collect_inputs(block: nn.Module, names: list[str], wanted: frozenset[str],
                   experts: dict[str, tuple[str, int, slice]] | None = None, *, share: bool = False):
    """Attach accumulators for ``wanted`` statistics to the named units of ``block``: linears (forward
    pre-hooks) and stored expert matrices (``experts``: StreamedModel.expert_units; an ExpertTap over the
    block's calls, with a ROUTED token count each).

    Yields an InputStatistics {unit name: {stat_name: accumulator}}; hooks are removed on exit.

    ``share``: units that read the same input share one set of accumulators (the same dict; its statistics are
    added once per call): q/k/v, gate/up, an expert's gate and up. For linears it is found at run time: at a
    linear's first call, if its input is the very tensor object a linear already read in this forward (a weakref,
    so nothing is kept alive and a reused id cannot match), it joins that linear's set; every later call checks it
    still reads its leader's input (RuntimeError otherwise: an internal bug, never wrong statistics). A linear's
    set is made at its first call, so memory is one set per distinct input; a linear the forward never reached
    gets a zero set of its own on exit. The expert units of one (fused parameter, expert) read the same tokens:
    they share one set from the start (``by_expert``). Without ``share`` every unit has its own set (made up front).
    """
    experts = experts or {}
    accs = InputStatistics()
    handles = []
    groups = by_expert(experts, names) if wanted else {}
    sharing = _Sharing(accs, wanted) if share else None
    for name in names:
        if name in experts:
            param = experts[name][0]
            first = groups.get(experts[name][:2], [name])[0] if share else name
            if first != name:  # shared: the group's first unit made the set
                accs[name] = accs[first]
                continue
            tensor = block.get_parameter(param)
            accs[name] = {s: STATISTICS[s](tensor.shape[-1], tensor.device) for s in wanted}
            if wanted:
                accs[name][ROUTED] = Tokens(tensor.shape[-1], tensor.device)
            continue
        linear = block.get_submodule(name)
        if not wanted:
            accs[name] = {}
        elif sharing is not None:  # the set is made (or joined) at the first call
            handles.append(linear.register_forward_pre_hook(partial(sharing.hook, name=name)))
        else:
            accs[name] = {s: STATISTICS[s](linear.in_features, linear.weight.device) for s in wanted}

            def hook(_mod, args, _accs=accs[name]):
                x = args[0].detach()
                x = x.reshape(-1, x.shape[-1])  # [B*T, in]
                for acc in _accs.values():
                    acc.add(x)

            handles.append(linear.register_forward_pre_hook(hook))

    def on_expert(param: str, e: int, x: torch.Tensor, _out: torch.Tensor) -> None:
        done: list[dict] = []
        for name in groups.get((param, e), ()):
            if any(accs[name] is d for d in done):  # a shared set: added once
                continue
            done.append(accs[name])
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
            if sharing is not None:  # a linear the forward never reached: zero statistics of its own, as unshared
                for name in names:
                    if name not in accs:
                        linear = block.get_submodule(name)
                        accs[name] = {s: STATISTICS[s](linear.in_features, linear.weight.device) for s in wanted}
