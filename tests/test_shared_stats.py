"""Linears that read the same input share one set of input statistics and one factorization (issue 31).

A tiny LLaMA block (hidden 64, 4 heads of 16, 2 KV heads, intermediate 128): q/k/v read the attention norm's
output, gate/up the MLP norm's, o and down their own inputs, so 7 linears read 4 distinct inputs. Shared
statistics must be bit-identical to separate ones, and so must everything pruned from them.
"""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowmem_gblm.io.model import linear_names
from lowmem_gblm.mask import Pattern
from lowmem_gblm.memory.predict import _statistics_bytes
from lowmem_gblm.memory.probe import input_groups, probe
from lowmem_gblm.memory.shape import load_shape
from lowmem_gblm.methods import LinearJob, MethodOptions, get_method
from lowmem_gblm.methods import sparsegpt as sparsegpt_module
from lowmem_gblm.methods import update as update_module
from lowmem_gblm.methods.apply import BlockPruner, finished_statistics
from lowmem_gblm.methods.sparsegpt import sparsegpt_prune
from lowmem_gblm.stream import stats as stats_module
from lowmem_gblm.stream.context import BlockContext, run_block
from lowmem_gblm.stream.stats import ROUTED, collect_inputs
from tests.tiny import make_tiny_llama

CPU = torch.device("cpu")
T = 16
GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
BOTH = frozenset({"scaler_row", "hessian"})


@pytest.fixture(scope="module")
def shape(tmp_path_factory):
    return load_shape(make_tiny_llama(tmp_path_factory.mktemp("shared") / "m", layers=1, tokenizer=False))


def _block(shape):
    torch.manual_seed(0)
    return shape.family.cls("layer_class")(shape.config, layer_idx=0).requires_grad_(False).eval()


def _inputs(shape, calls: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, T, shape.hidden, generator=g) for _ in range(calls)]


@torch.no_grad()
def _collect(shape, block, wanted, share: bool):
    ctx = BlockContext.build(shape, T, CPU, torch.float32)
    with collect_inputs(block, linear_names(block), wanted, share=share) as stats:
        for x in _inputs(shape):
            run_block(block, ctx, x)
    return stats


def test_shared_statistics_are_bit_identical_and_one_set_per_input(shape, monkeypatch):
    made = []

    class Counted(stats_module.Hessian):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setitem(stats_module.STATISTICS, "hessian", Counted)
    block = _block(shape)
    separate = _collect(shape, block, BOTH, share=False)
    assert len(made) == 7 and len(separate.distinct()) == 7
    made.clear()
    shared = _collect(shape, block, BOTH, share=True)
    assert len(made) == 4  # 4 Hessians allocated for the block's 7 linears, not 7
    assert shared.groups() == GROUPS
    assert list(shared.distinct()) == [g[0] for g in GROUPS]
    assert shared["self_attn.q_proj"] is shared["self_attn.v_proj"] and shared["mlp.gate_proj"] is shared["mlp.up_proj"]
    assert shared["self_attn.q_proj"] is not shared["self_attn.o_proj"]
    assert sorted(shared.accumulators()) == sorted(f"{g[0]}/{s}" for g in GROUPS for s in BOTH)
    for name in linear_names(block):
        for s in BOTH:
            assert torch.equal(shared[name][s].result(6), separate[name][s].result(6)), (name, s)


class _Toy(nn.Module):
    """a and b read x; c reads x too, or (``swap``) another tensor; d is never called."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c, self.d = (nn.Linear(8, 8) for _ in range(4))
        self.swap = False

    def forward(self, x):
        y = self.a(x) + self.b(x)
        return y + self.c(x * 2 if self.swap else x)


@torch.no_grad()
def test_a_follower_that_reads_another_input_is_an_internal_error():
    toy = _Toy()
    with collect_inputs(toy, ["a", "b", "c", "d"], frozenset({"hessian"}), share=True) as stats:
        x = torch.randn(3, 8)
        toy(x)
        seen = weakref.ref(x)
        del x
        assert seen() is None  # the hooks keep no input alive
        assert stats.groups() == (("a", "b", "c"),)
        toy(torch.randn(3, 8))  # a new input, still shared: fine
        toy.swap = True
        with pytest.raises(RuntimeError, match="internal error: c shares the input statistics of a"):
            toy(torch.randn(3, 8))
    # d was never reached: zero statistics of its own on exit (what an unshared run gives it)
    assert stats["d"] is not stats["a"] and torch.equal(stats["d"]["hessian"].total, torch.zeros(8, 8))


def test_expert_units_of_one_expert_share_statically():
    """A fused [E, 2I, D] gate_up parameter called per expert as transformers' eager loop does: the gate and up rows
    of expert e share one set (with one ROUTED count); down has its own; an expert no token reached counts 0."""

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.gate_up_proj = nn.Parameter(torch.randn(2, 6, 4), requires_grad=False)
            self.down_proj = nn.Parameter(torch.randn(2, 4, 3), requires_grad=False)

        def forward(self, x):  # every token to expert 0; expert 1 unused
            gate, up = F.linear(x, self.gate_up_proj[0]).chunk(2, dim=-1)
            return F.linear(F.silu(gate) * up, self.down_proj[0])

    block = Experts()
    units = (("gate", "gate_up_proj", slice(0, 3)), ("up", "gate_up_proj", slice(3, 6)),
             ("down", "down_proj", slice(None)))
    experts = {f"e{e}.{m}": (p, e, rows) for e in range(2) for m, p, rows in units}
    names = list(experts)
    x = torch.randn(5, 4)
    results = {}
    for share in (False, True):
        with torch.no_grad(), collect_inputs(block, names, BOTH, experts, share=share) as stats:
            block(x)
        results[share] = {n: {s: a.result(5) for s, a in stats[n].items()} for n in names}
        assert (stats["e0.gate"] is stats["e0.up"]) == share and stats["e0.gate"] is not stats["e0.down"]
        assert len(stats.distinct()) == (4 if share else 6)
    for n in names:
        assert results[True][n].keys() == results[False][n].keys() == BOTH | {ROUTED}
        for s in results[True][n]:
            assert torch.equal(results[True][n][s], results[False][n][s]), (n, s)
    assert float(results[True]["e0.up"][ROUTED]) == 5 and float(results[True]["e1.gate"][ROUTED]) == 0


def test_finished_statistics_are_one_set_of_tensors_per_input(shape):
    block = _block(shape)
    stats = _collect(shape, block, BOTH, share=True)
    seen = {}
    for name, finished, first in finished_statistics(stats, linear_names(block), 6):
        group = next(g for g in GROUPS if name in g)
        assert first == (name == group[0])
        if first:
            assert all(not a for n, a in stats.items() if n in group)  # the accumulators are cleared once finished
            seen[group] = finished["hessian"]
        assert finished["hessian"] is seen[group]  # the same tensor: a factorization cache keyed by it hits
        finished["gradient"] = torch.zeros(1)  # each unit's own copy of the mapping
    assert len(seen) == 4


def _prune_block(shape, method: str, options: MethodOptions, share: bool):
    """The engine's BlockPruner on the tiny block with shared or separate statistics: the written weights."""
    block = _block(shape)
    stats = _collect(shape, block, BOTH - {"scaler_row"} | get_method(method).needs - {"gradient"}, share)
    names = linear_names(block)
    stored = {f"model.layers.0.{n}.weight": block.get_submodule(n).weight.detach().clone() for n in names}
    pruner = BlockPruner(get_method(method), Pattern.parse("unstructured", 0.5), options, CPU, torch.float32)
    pruner.prune(block, "model.layers.0.", stats, 6, None, stored, names)
    return stored


def test_sparsegpt_factors_once_per_shared_hessian(shape, monkeypatch):
    calls = []
    real = sparsegpt_module.inverse_hessian_cholesky
    monkeypatch.setattr(sparsegpt_module, "inverse_hessian_cholesky", lambda h, p: calls.append(h.shape) or real(h, p))
    shared = _prune_block(shape, "sparsegpt", MethodOptions(blocksize=16), share=True)
    assert len(calls) == 4  # one per distinct input, not one per linear
    calls.clear()
    separate = _prune_block(shape, "sparsegpt", MethodOptions(blocksize=16), share=False)
    assert len(calls) == 7
    for name, written in shared.items():
        assert torch.equal(written, separate[name]), name


def test_sparsegpt_with_a_given_factor_is_the_same_arithmetic():
    torch.manual_seed(0)
    x = torch.randn(40, 24)
    x[:, 3] = 0  # a dead input
    hessian, weight = 2 * x.T @ x / 40, torch.randn(10, 24)
    for pattern in (Pattern.parse("unstructured", 0.5), Pattern.parse("2:4", None)):
        alone = sparsegpt_prune(weight, hessian, pattern, blocksize=8, percdamp=0.01)
        factor = sparsegpt_module.hessian_factor(hessian, CPU, 0.01)
        given = sparsegpt_prune(weight, None, pattern, blocksize=8, percdamp=0.01, factor=factor)
        assert torch.equal(alone[0], given[0]) and torch.equal(alone[1], given[1])
        assert bool((given[0][:, 3] == 0).all())


def test_lsq_factors_once_per_shared_hessian(shape, monkeypatch):
    calls = []
    real = update_module.factor_hessian
    monkeypatch.setattr(update_module, "factor_hessian", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    options = MethodOptions(solver="iterative", solver_max_iter=5)  # enough to compare; fast
    shared = _prune_block(shape, "wanda+lsq", options, share=True)
    assert len(calls) == 4
    calls.clear()
    separate = _prune_block(shape, "wanda+lsq", options, share=False)
    assert len(calls) == 7
    for name, written in shared.items():
        assert torch.equal(written, separate[name]), name


def test_probe_and_planner_see_the_shared_sets(shape):
    assert input_groups(shape) == GROUPS
    pr = probe(shape, "wanda+lsq", T, torch.float32, 2, None, solver="iterative")
    assert pr.groups == GROUPS
    assert pr.notes == ()  # the iterative solver runs on fake tensors: measured, no analytic fallback
    # one Hessian per distinct input: 3 inputs of width 64 and one of 128, fp32
    assert _statistics_bytes(shape, {"hessian"}, input_groups(shape)) == (3 * 64 * 64 + 128 * 128) * 4
    assert _statistics_bytes(shape, {"scaler_row", "hessian", "gradient"}, input_groups(shape)) == \
        (3 * 64 * 64 + 128 * 128 + 3 * 64 + 128) * 4


def test_a_job_without_the_block_cache_factors_its_own(shape):
    """LinearJob.factors None (a caller outside the block loop): SparseGPT still runs, factoring per call."""
    torch.manual_seed(0)
    x = torch.randn(32, 64)
    weight, hessian = torch.randn(8, 64), 2 * x.T @ x / 32
    job = LinearJob("w", weight.clone(), {"hessian": hessian}, Pattern.parse("unstructured", 0.5),
                    MethodOptions(blocksize=16))
    keep = get_method("sparsegpt").prune(job)
    ref, ref_keep = sparsegpt_prune(weight, hessian, Pattern.parse("unstructured", 0.5), blocksize=16)
    assert torch.equal(job.weight, ref) and torch.equal(keep, ref_keep)
