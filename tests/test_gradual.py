"""--update gradual: the mask chosen together with the exact update (methods.update.gradual)."""

from __future__ import annotations

import json

import pytest
import torch

from lowmem_gblm.config import CalibConfig, PruneConfig
from lowmem_gblm.errors import UsageError
from lowmem_gblm.mask import Pattern
from lowmem_gblm.methods import LinearJob, MethodOptions, get_method
from lowmem_gblm.methods import update as update_module
from lowmem_gblm.methods.solve import factor_hessian, solve_kept
from lowmem_gblm.methods.sparsegpt import _prepare_hessian
from lowmem_gblm.methods.update import gradual_schedule, reconstruction_error
from tests.reference import inmemory_prune, load_ids
from tests.test_prune_stream import read_all, run


def _layer(out=32, inp=64, tokens=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, inp, generator=g) @ (torch.randn(inp, inp, generator=g) * 0.4 + torch.eye(inp)))
    x = x * torch.logspace(-1, 1, inp)
    x[:, 9] = 0.0  # a dead input
    w = torch.randn(out, inp, generator=g)
    h = x.t() @ x * (2.0 / tokens)
    return w, {"scaler_row": x.pow(2).sum(0) / 4, "hessian": h, "gradient": torch.rand(out, inp, generator=g)}


def _job(w, stats, pattern, **options):
    return LinearJob("l", w.clone(), stats, pattern, MethodOptions(**options))


def test_schedule_hand_computed():
    got = [p.sparsity for p in gradual_schedule(Pattern.parse("unstructured", 0.5), 4)]
    assert got == [0.5 * (1 - 0.75 ** 3), 0.5 * (1 - 0.5 ** 3), 0.5 * (1 - 0.25 ** 3), 0.5]
    assert [str(p) for p in gradual_schedule(Pattern.parse("2:4", None), 9)] == ["3:4", "2:4"]
    assert [str(p) for p in gradual_schedule(Pattern.parse("4:8", None), 1)] == ["7:8", "6:8", "5:8", "4:8"]
    assert [p.sparsity for p in gradual_schedule(Pattern.parse("unstructured", 0.7), 1)] == [0.7]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "gblm"])
@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", None),
                                              ("4:8", None)])
def test_exact_counts_and_nm_groups(method, pattern, sparsity):
    w, stats = _layer()
    p = Pattern.parse(pattern, sparsity)
    job = _job(w, stats, p, alpha=100.0)
    keep = get_method(f"{method}+gradual").prune(job)
    if p.kind == "nm":
        assert bool((keep.view(w.shape[0], -1, p.m).sum(-1) == p.n).all())
    else:
        assert bool((keep.sum(1) == w.shape[1] - int(w.shape[1] * p.sparsity)).all())
    assert bool((job.weight[~keep] == 0).all()) and bool((job.weight[:, 9] == 0).all())  # pruned and dead: 0
    assert job.diagnostics["gradual_steps"] == len(gradual_schedule(p, 4))
    assert 0.0 <= float(job.diagnostics["flipped_vs_base"]) <= 1.0


def test_pruned_weights_stay_pruned(monkeypatch):
    w, stats = _layer()
    masks = []
    real = update_module.select_keep

    def recording(score, pattern, *a):
        keep = real(score, pattern, *a)
        masks.append(keep.clone())
        return keep

    monkeypatch.setattr(update_module, "select_keep", recording)
    get_method("wanda+gradual").prune(_job(w, stats, Pattern.parse("unstructured", 0.6), gradual_steps=5))
    assert len(masks) == 5
    for before, after in zip(masks, masks[1:], strict=False):
        assert not bool((after & ~before).any())  # nothing comes back
        assert int(after.sum()) <= int(before.sum())
    assert int(masks[0].sum()) > int(masks[-1].sum()) == 32 * (64 - int(64 * 0.6))


def test_one_step_is_lsq_with_the_base_mask():
    w, stats = _layer(seed=1)
    p = Pattern.parse("unstructured", 0.5)
    job = _job(w, stats, p, gradual_steps=1, solver="iterative")
    keep = get_method("wanda+gradual").prune(job)
    lsq_job = _job(w, stats, p, solver="iterative")
    lsq_keep = get_method("wanda+lsq").prune(lsq_job)
    assert torch.equal(keep, lsq_keep) and float(job.diagnostics["flipped_vs_base"]) == 0.0
    assert torch.equal(job.weight, lsq_job.weight)


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", None)])
def test_reconstructs_better_than_lsq_on_the_base_mask(pattern, sparsity):
    """On correlated inputs the refit-aware mask reconstructs the layer's outputs better than the exact update of the
    one-shot mask (the point of choosing the mask with the update)."""
    w, stats = _layer(seed=2)
    p = Pattern.parse(pattern, sparsity)
    job_g, job_l = _job(w, stats, p, solver_tol=1e-4), _job(w, stats, p, solver="iterative", solver_tol=1e-4)
    get_method("wanda+gradual").prune(job_g)
    get_method("wanda+lsq").prune(job_l)
    wd, hd = _prepare_hessian(w, stats["hessian"], 0.01)
    assert reconstruction_error(wd, job_g.weight, hd) < 0.97 * reconstruction_error(wd, job_l.weight, hd)


def test_the_gradient_term_steers_the_mask():
    w, stats = _layer(seed=3)
    p = Pattern.parse("unstructured", 0.5)
    keeps = {}
    for method, alpha in (("wanda", 0.0), ("gblm", 0.0), ("gblm", 1e4)):
        keeps[(method, alpha)] = get_method(f"{method}+gradual").prune(_job(w, stats, p, alpha=alpha))
    assert torch.equal(keeps[("wanda", 0.0)], keeps[("gblm", 0.0)])  # alpha 0: GBLM's score is Wanda's
    assert not torch.equal(keeps[("wanda", 0.0)], keeps[("gblm", 1e4)])


def test_final_weights_are_the_exact_refit_of_the_final_mask():
    w, stats = _layer(seed=4)
    job = _job(w, stats, Pattern.parse("unstructured", 0.5), solver_tol=1e-6)
    keep = get_method("wanda+gradual").prune(job)
    ref = solve_kept(w, factor_hessian(stats["hessian"], 0.01), keep, tol=1e-6).weight
    assert float((job.weight - ref).norm() / ref.norm()) <= 1e-4


def test_refusals(tiny_model, calib_text, tmp_path):
    calib = CalibConfig(source=str(calib_text), nsamples=4, seqlen=32)

    def cfg(**kw):
        return PruneConfig(model_dir=str(tiny_model), out_dir=str(tmp_path / "o"), calib=calib, **kw)

    with pytest.raises(UsageError, match="--solver direct applies to --update lsq"):
        cfg(update="gradual", solver="direct")
    with pytest.raises(UsageError, match="--magnitude-scope row"):
        cfg(method="magnitude", update="gradual", magnitude_scope="matrix")
    with pytest.raises(UsageError, match="applies to the score methods"):
        cfg(method="sparsegpt", update="gradual")
    with pytest.raises(UsageError, match="--gradual-steps"):
        cfg(update="gradual", gradual_steps=0)
    assert cfg(update="gradual").fingerprint_dict()["update"] == "gradual"
    assert "gradual_steps" not in cfg(update="gradual").fingerprint_dict()
    assert cfg(update="gradual", gradual_steps=8).fingerprint_dict()["gradual_steps"] == 8


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("2:4", None)])
def test_streamed_gradual_equals_inmemory(tiny_model, calib_text, tmp_path, pattern, sparsity):
    out = tmp_path / "out"
    run(tiny_model, out, calib_text, method="wanda", update="gradual", sparsity=sparsity, pattern=pattern)
    ref = inmemory_prune(tiny_model, load_ids(out), "wanda", pattern, sparsity, update="gradual").state_dict()
    for name, w in read_all(out).items():
        if ".layers." in name and w.dim() == 2:
            assert torch.equal(w == 0, ref[name] == 0), name
            assert float((w - ref[name]).abs().max() / ref[name].abs().max()) <= 1e-5, name
    rows = json.loads((out / "prune_report.json").read_text())["sparsity"]["per_linear"]
    assert all(r["solver"] == "iterative" and "flipped_vs_base" in r for r in rows.values())


def test_a_killed_gradual_run_resumes_byte_identical(tiny_model, calib_text, tmp_path):
    from lowmem_gblm import testing_hooks
    from lowmem_gblm.engine import prune
    from tests.faults import config, diff_trees

    ref = tmp_path / "ref"
    prune(config(tiny_model, ref, calib_text, update="gradual", pattern="2:4", sparsity=None))
    out = tmp_path / "out"
    testing_hooks.reset()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(testing_hooks.ENOSPC_ENV, "shard_write:3")  # block 2's shard fails: blocks 0, 1 are done
        with pytest.raises((UsageError, OSError)):
            prune(config(tiny_model, out, calib_text, update="gradual", pattern="2:4", sparsity=None))
    testing_hooks.reset()
    prune(config(tiny_model, out, calib_text, update="gradual", pattern="2:4", sparsity=None))
    assert not diff_trees(ref, out)
