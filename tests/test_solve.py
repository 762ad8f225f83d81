"""--solver iterative (methods.solve): the same least-squares update as the direct float64 solve, all rows at once."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lowmem_gblm.mask import Pattern, select_keep
from lowmem_gblm.methods import LinearJob, MethodOptions, SharedFactors, get_method
from lowmem_gblm.methods import solve as solve_module
from lowmem_gblm.methods.solve import factor_hessian, multipliers_cg, solve_kept
from lowmem_gblm.methods.sparsegpt import _prepare_hessian
from lowmem_gblm.methods.update import lsq_update, reconstruction_error, resolve_solver
from tests.faults import diff_trees
from tests.reference import inmemory_prune, load_ids
from tests.test_prune_stream import read_all, run


def _layer(out: int = 24, inp: int = 48, tokens: int = 400, seed: int = 0, dead: bool = True, rank: int | None = None):
    """x [tokens, in] correlated with uneven scales (a dead input when ``dead``; rank-deficient when ``rank``)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens, rank or inp, generator=g)
    mix = torch.randn(rank or inp, inp, generator=g) * 0.5 + torch.eye(rank or inp, inp)
    x = (base @ mix) * torch.logspace(-1, 1, inp)  # inputs 100x apart in scale
    if dead:
        x[:, 7] = 0.0
    w = torch.randn(out, inp, generator=g)
    return x, w, x.t() @ x * (2.0 / tokens)


def _masks(w: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
    wanda = w.abs() * x.pow(2).mean(0).sqrt()
    return {"50%": select_keep(wanda, Pattern.parse("unstructured", 0.5)),
            "70%": select_keep(wanda, Pattern.parse("unstructured", 0.7)),
            "2:4": select_keep(wanda, Pattern.parse("2:4", None)),
            "4:8": select_keep(wanda, Pattern.parse("4:8", None))}


def _compare(w, h, keep, percdamp, tol):
    ref = lsq_update(w, h, keep, percdamp)
    got = solve_kept(w, factor_hessian(h, percdamp), keep, tol=tol, max_iter=500)
    wd, hd = _prepare_hessian(w, h, percdamp)
    e_ref, e_got = reconstruction_error(wd, ref, hd), reconstruction_error(wd, got.weight, hd)
    return ref, got, e_ref, e_got


@pytest.mark.parametrize("dead", [True, False])
@pytest.mark.parametrize("percdamp", [0.01, 0.0])
def test_iterative_equals_the_direct_float64_solve(dead, percdamp):
    x, w, h = _layer(dead=dead)
    for name, keep in _masks(w, x).items():
        ref, got, e_ref, e_got = _compare(w, h, keep, percdamp, tol=1e-5)
        assert torch.equal(got.weight == 0, ref == 0), name  # zero exactly off keep (and on the dead input)
        assert abs(e_got - e_ref) <= 1e-4 * e_ref, (name, e_got, e_ref)
        assert float((got.weight - ref).norm() / ref.norm()) <= 1e-3, name
        assert got.diagnostics["unconverged_rows"] == 0 and got.diagnostics["residual"] <= 1e-5, name
        assert got.diagnostics["reconstruction_error"] == pytest.approx(e_got, rel=1e-3), name
        # never worse than the masked dense weights (the update's starting point)
        wd, hd = _prepare_hessian(w, h, percdamp)
        assert e_got < reconstruction_error(wd, wd * keep, hd), name


def test_the_default_tolerance_is_close_to_exact_and_a_looser_one_is_cheaper():
    x, w, h = _layer(out=64, inp=64, seed=3)
    for name, keep in _masks(w, x).items():
        ref, default, e_ref, e_default = _compare(w, h, keep, 0.01, tol=solve_module.DEFAULT_TOL)
        assert abs(e_default - e_ref) <= 2e-3 * e_ref, name
        # the reported error (from the multipliers, no product with H) is the achieved one within 1e-3
        assert default.diagnostics["reconstruction_error"] == pytest.approx(e_default, rel=1e-3), name
        loose = solve_kept(w, factor_hessian(h, 0.01), keep, tol=0.3)
        assert loose.diagnostics["iterations"] < default.diagnostics["iterations"], name
        assert loose.diagnostics["reconstruction_error"] > default.diagnostics["reconstruction_error"], name


def test_near_singular_hessian_gets_a_float64_inverse_and_stays_exact():
    """Fewer tokens than inputs and almost no damping: the Gram matrix has rank 20 of 48, its smallest eigenvalues
    are the damping's (1e-7 of the mean): fp32's inverse fails the probe, the float64 one is used."""
    x, w, h = _layer(tokens=20, dead=False)
    factor = factor_hessian(h, 1e-7)
    assert factor.inverse_dtype == "float64" and factor.notes
    keep = _masks(w, x)["50%"]
    got = solve_kept(w, factor, keep, tol=1e-6, max_iter=2000)
    ref = lsq_update(w, h, keep, 1e-7)
    wd, hd = _prepare_hessian(w, h, 1e-7)
    e_ref, e_got = reconstruction_error(wd, ref, hd), reconstruction_error(wd, got.weight, hd)
    assert e_got <= e_ref * (1 + 1e-3) + 1e-6 * reconstruction_error(wd, wd * keep, hd)


def test_a_hessian_that_is_not_positive_definite_is_retried_with_more_damping(caplog):
    x, w, h = _layer(dead=False)
    h = h.clone()
    h[3, 3] = -float(h.diagonal().mean()) * 5  # not PD even after percdamp 0.01 (a corrupted statistic)
    with caplog.at_level(logging.WARNING):
        factor = factor_hessian(h, 0.01, "layer.x")
    assert factor.retries >= 1 and factor.percdamp > 0.01
    assert "not positive definite" in caplog.text and "layer.x" in caplog.text
    got = solve_kept(w, factor, _masks(w, x)["50%"])
    assert bool(torch.isfinite(got.weight).all())


def test_hand_computed_two_columns():
    """H = [[2, 1], [1, 2]], w = [1, 1], keep column 0: v0 = (H w)_0 / H_00 = 3 / 2 (percdamp 0)."""
    h = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    w = torch.tensor([[1.0, 1.0]])
    got = solve_kept(w, factor_hessian(h, 0.0), torch.tensor([[True, False]]), tol=1e-7)
    assert torch.allclose(got.weight, torch.tensor([[1.5, 0.0]]), atol=1e-6)
    # reconstruction error: (w - v) = [-0.5, 1]; (w - v)^T H (w - v) = 0.5 - 1 + 2 = 1.5
    assert got.diagnostics["reconstruction_error"] == pytest.approx(1.5, rel=1e-6)


def test_rows_stop_on_their_own():
    """A row with nothing pruned needs no iteration; a row with everything pruned is all zeros; the others iterate
    until their own residual is below the tolerance."""
    x, w, h = _layer(out=6, dead=False)
    keep = _masks(w, x)["50%"]
    keep[0] = True
    keep[1] = False
    factor = factor_hessian(h, 0.01)
    wn = w * factor.scale
    m = multipliers_cg(wn, factor.inverse, keep, 1e-6, 500)
    assert m.iters[0] == 0 and torch.equal(m.full[0], wn[0]) and not bool(m.lam[0].any())
    assert int(m.iters[2:].min()) > 0 and bool((m.rel <= 1e-6).all())
    assert not bool((m.lam * keep).any())  # the multipliers live on the pruned columns
    got = solve_kept(w, factor, keep, tol=1e-6)
    assert torch.equal(got.weight[1], torch.zeros_like(got.weight[1]))


def test_auto_picks_direct_only_on_narrow_linears():
    assert resolve_solver("auto", 32) == "direct"
    assert resolve_solver("auto", 4096) == "iterative"
    assert resolve_solver("direct", 4096) == "direct"


def test_linears_with_one_hessian_share_one_factorization(monkeypatch):
    calls = []
    real = factor_hessian

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr("lowmem_gblm.methods.update.factor_hessian", counting)
    x, _, h = _layer(dead=False)
    method, factors = get_method("wanda+lsq"), SharedFactors()
    options = MethodOptions(solver="iterative")
    stats = {"scaler_row": x.pow(2).sum(0) / 4, "hessian": h}
    for i in range(3):  # q, k, v: the same Hessian tensor
        job = LinearJob(f"q{i}", torch.randn(16, 48), stats, Pattern.parse("unstructured", 0.5), options,
                        factors=factors)
        method.prune(job)
        assert job.diagnostics["solver"] == "iterative" and job.diagnostics["iterations"] >= 1
    assert len(calls) == 1
    job = LinearJob("o", torch.randn(16, 48), dict(stats, hessian=h.clone()), Pattern.parse("unstructured", 0.5),
                    options, factors=factors)
    method.prune(job)
    assert len(calls) == 2  # another Hessian: a new factorization (the old one is dropped)


def test_fake_tensors_run_the_solver_without_values():
    """The planner's probe runs the solver on fake tensors: the same allocations, no data-dependent steps."""
    with FakeTensorMode():
        w, h = torch.empty(32, 64), torch.empty(64, 64)
        keep = torch.empty(32, 64, dtype=torch.bool)
        out = solve_kept(w, factor_hessian(h, 0.01), keep)
        assert out.weight.shape == (32, 64) and out.diagnostics == {}


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("2:4", None)])
def test_streamed_iterative_update_equals_inmemory_and_reports_the_solver(tiny_model, calib_text, tmp_path, pattern,
                                                                          sparsity):
    from lowmem_gblm.config import DEFAULT_RIDGE

    ridge, scaling = DEFAULT_RIDGE["unstructured" if pattern == "unstructured" else "nm"]
    out = tmp_path / "out"
    run(tiny_model, out, calib_text, method="wanda", update="lsq", solver="iterative", sparsity=sparsity,
        pattern=pattern)
    ref = inmemory_prune(tiny_model, load_ids(out), "wanda", pattern, sparsity, update="lsq",
                         solver="iterative").state_dict()
    for name, w in read_all(out).items():
        if ".layers." in name and w.dim() == 2:
            assert torch.equal(w == 0, ref[name] == 0), name
            assert float((w - ref[name]).abs().max() / ref[name].abs().max()) <= 1e-5, name
    report = json.loads((out / "prune_report.json").read_text())
    rows = report["sparsity"]["per_linear"]
    tokens = report["calibration"]["windows"][0] * report["calibration"]["windows"][1]
    for name, row in rows.items():
        assert row["solver"] == "iterative" and row["iterations"] >= 1, name
        assert row["residual"] <= solve_module.DEFAULT_TOL and row["reconstruction_error"] > 0, name
        assert row["inverse_dtype"] in ("float32", "float64"), name
        per = row["shape"][1] / tokens if scaling == "inputs-per-token" else 1.0
        assert row["percdamp_used"] == pytest.approx(0.01 + ridge * per), name  # --percdamp + the default ridge


def test_iterative_run_resumes_byte_identical(tiny_model, calib_text, tmp_path):
    from lowmem_gblm import testing_hooks
    from lowmem_gblm.engine import prune
    from lowmem_gblm.errors import UsageError
    from tests.faults import config

    ref = tmp_path / "ref"
    prune(config(tiny_model, ref, calib_text, update="lsq", solver="iterative"))
    out = tmp_path / "out"
    testing_hooks.reset()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(testing_hooks.ENOSPC_ENV, "shard_write:3")
        with pytest.raises((UsageError, OSError)):
            prune(config(tiny_model, out, calib_text, update="lsq", solver="iterative"))
    testing_hooks.reset()
    prune(config(tiny_model, out, calib_text, update="lsq", solver="iterative"))
    assert not diff_trees(ref, out)


def test_solver_options_are_fingerprinted_only_where_they_change_bytes(tiny_model, calib_text, tmp_path):
    from tests.faults import config

    def fp(**kw):
        return config(tiny_model, tmp_path / "o", calib_text, **kw).fingerprint_dict()

    assert "solver" not in fp() and "solver" not in fp(solver="iterative")  # no update: no solver
    assert "solver" not in fp(update="lsq", solver="direct")  # as runs made before --solver (they resume)
    assert fp(update="lsq")["solver"] == "auto"
    assert fp(update="lsq", solver_tol=1e-3) != fp(update="lsq")


def test_ridge_zero_is_the_exact_solve_and_a_huge_ridge_the_masked_dense_weights():
    """--ridge: minimise (w - v)^T H (w - v) + mu ||w - v||^2 over the kept weights = the same problem with H + mu I."""
    from lowmem_gblm.methods.update import update_damping

    x, w, h = _layer(out=16, inp=32, dead=False)
    keep = _masks(w, x)["50%"]
    stats = {"scaler_row": x.pow(2).mean(0), "hessian": h}

    def run(solver, **options):
        job = LinearJob("l", w.clone(), stats, Pattern.parse("unstructured", 0.5),
                        MethodOptions(solver=solver, solver_tol=1e-7, solver_max_iter=500, **options))
        get_method("wanda+lsq").prune(job)
        return job.weight

    for solver in ("direct", "iterative"):
        exact = run(solver)
        assert torch.equal(run(solver, ridge=0.0), exact)
        assert float((run(solver, ridge=1e6) - w * keep).norm() / (w * keep).norm()) <= 1e-4, solver
        # in between: the closed form (H + mu I)[S,S] v = ((H + mu I) w)[S], mu = ridge * mean(diag H) on top of
        # the damping, per row in float64
        mid = run(solver, ridge=0.5)
        hd = h.double() + (0.01 + 0.5) * float(h.diagonal().mean()) * torch.eye(32, dtype=torch.float64)
        for r in range(w.shape[0]):
            cols = keep[r].nonzero().flatten()
            ref = torch.linalg.solve(hd[cols][:, cols], (hd @ w[r].double())[cols])
            assert torch.allclose(mid[r, cols].double(), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max())), r
    # inputs-per-token scaling: the ridge times in / tokens
    o = MethodOptions(ridge=2.0, ridge_scaling="inputs-per-token", calib_tokens=128)
    assert update_damping(o, 32) == pytest.approx(0.01 + 2.0 * 32 / 128)
    assert update_damping(MethodOptions(ridge=2.0), 32) == pytest.approx(2.01)


def test_ridge_options_are_checked_fingerprinted_and_scaled_by_the_runs_tokens(tiny_model, calib_text, tmp_path):
    from lowmem_gblm.errors import UsageError
    from tests.faults import config

    with pytest.raises(UsageError, match="--ridge regularises"):
        config(tiny_model, tmp_path / "o", calib_text, ridge=0.1)
    with pytest.raises(UsageError, match="--ridge must be"):
        config(tiny_model, tmp_path / "o", calib_text, update="lsq", ridge=-1.0)
    # not given: DEFAULT_RIDGE's for the mask kind with a solved update (fingerprinted: it decides bytes), 0 and no
    # scaling for the others (not fingerprinted: runs from before the option resume)
    from lowmem_gblm.config import DEFAULT_RIDGE

    assert set(DEFAULT_RIDGE) == {"unstructured", "nm"} and all(r > 0 for r, _ in DEFAULT_RIDGE.values())
    for update in ("lsq", "gradual"):
        for kind, pattern in (("unstructured", {}), ("nm", {"pattern": "2:4", "sparsity": None})):
            ridge, scaling = DEFAULT_RIDGE[kind]
            default = config(tiny_model, tmp_path / "o", calib_text, update=update, **pattern)
            assert (default.ridge, str(default.ridge_scaling)) == (ridge, scaling)
            assert default.fingerprint_dict()["ridge"] == ridge
            assert (default.method_options().ridge, default.method_options().ridge_scaling) == (ridge, scaling)
            exact = config(tiny_model, tmp_path / "o", calib_text, update=update, ridge=0.0, **pattern)
            assert exact.ridge == 0.0 and str(exact.ridge_scaling) == "none"
            assert not {"ridge", "ridge_scaling"} & set(exact.fingerprint_dict())
            given = config(tiny_model, tmp_path / "o", calib_text, update=update, ridge=0.2, **pattern)
            assert (given.ridge, str(given.ridge_scaling)) == (0.2, "none")  # a given ridge is not scaled unless asked
    for update in ("none", "obs"):
        plain = config(tiny_model, tmp_path / "o", calib_text, update=update)
        assert plain.ridge == 0.0 and not {"ridge", "ridge_scaling"} & set(plain.fingerprint_dict())
    with pytest.raises(UsageError, match="--ridge must be"):
        config(tiny_model, tmp_path / "o", calib_text, update="lsq", ridge="0.1")
    out = tmp_path / "out"
    run(tiny_model, out, calib_text, method="wanda", update="lsq", ridge=0.5, ridge_scaling="inputs-per-token")
    report = json.loads((out / "prune_report.json").read_text())
    tokens = report["calibration"]["windows"][0] * report["calibration"]["windows"][1]
    for name, row in report["sparsity"]["per_linear"].items():
        width = row["shape"][1]
        assert row["percdamp_used"] == pytest.approx(0.01 + 0.5 * width / tokens), name
