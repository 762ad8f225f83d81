"""--update obs / lsq: the kept weights rewritten for a mask chosen by a score method."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from lowmem_gblm import testing_hooks
from lowmem_gblm.config import CalibConfig, GradientConfig
from lowmem_gblm.engine import compute_gradients, prune
from lowmem_gblm.errors import UsageError
from lowmem_gblm.io.gradfiles import GradientFolder
from lowmem_gblm.mask import Pattern, select_keep
from lowmem_gblm.methods import get_method
from lowmem_gblm.methods.sparsegpt import _prepare_hessian, sparsegpt_prune
from lowmem_gblm.methods.update import lsq_update, obs_update, reconstruction_error
from lowmem_gblm.verify import verify
from tests.faults import config, diff_trees
from tests.reference import inmemory_prune, load_ids
from tests.test_prune_stream import NSAMPLES, SEQLEN, read_all, run


def _layer(out: int = 12, inp: int = 32, tokens: int = 200, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, inp, generator=g) * torch.linspace(0.2, 3.0, inp)  # uneven input scales
    x[:, 5] = 0.0  # a dead input
    w = torch.randn(out, inp, generator=g)
    return x, w, x.t() @ x * (2.0 / tokens)  # H = (2/N) X^T X as the statistics accumulate it


def _masks(w: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
    wanda = w.abs() * x.pow(2).mean(0).sqrt()
    return {"magnitude-50%": select_keep(w.abs(), Pattern.parse("unstructured", 0.5)),
            "wanda-70%": select_keep(wanda, Pattern.parse("unstructured", 0.7)),
            "wanda-2:4": select_keep(wanda, Pattern.parse("2:4", None)),
            "magnitude-matrix-40%": select_keep(w.abs(), Pattern.parse("unstructured", 0.4), "matrix")}


def test_lsq_equals_a_float64_least_squares_solve_per_row():
    x, w, h = _layer()
    for name, keep in _masks(w, x).items():
        got = lsq_update(w, h, keep, percdamp=0.0)
        assert torch.equal(got == 0, ~keep | (keep & (torch.arange(w.shape[1]) == 5))), name  # dead input: 0
        x64, w64 = x.double(), w.double()
        w64[:, 5] = 0.0  # a dead input's weight is zero (as SparseGPT's damping rule does)
        for r in range(w.shape[0]):
            cols = keep[r].nonzero().flatten()
            cols = cols[cols != 5]
            ref = torch.linalg.lstsq(x64[:, cols], (x64 @ w64[r]).unsqueeze(1)).solution.squeeze(1)
            assert torch.allclose(got[r, cols].double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max())), (name, r)


def test_lsq_reconstructs_no_worse_than_obs_or_none_on_the_same_mask():
    """Without damping on ||(W - V) X||^2 itself; with damping on the damped objective both updates minimise
    (a dead input's weight is zeroed there: it contributes nothing to X W either way)."""
    x, w, h = _layer(seed=1)
    for percdamp in (0.0, 0.01):
        ref_w, damped = _prepare_hessian(w, h, percdamp)
        objective = h if percdamp == 0 else damped
        for name, keep in _masks(w, x).items():
            errors = {"none": reconstruction_error(ref_w, ref_w * keep, objective),
                      "obs": reconstruction_error(ref_w, obs_update(w, h, keep, 8, percdamp), objective),
                      "lsq": reconstruction_error(ref_w, lsq_update(w, h, keep, percdamp), objective)}
            assert errors["lsq"] <= errors["obs"] * (1 + 1e-9), (name, percdamp, errors)
            assert errors["lsq"] <= errors["none"] * (1 + 1e-9), (name, percdamp, errors)
            assert errors["lsq"] < errors["none"], (name, percdamp, errors)


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("2:4", None), ("unstructured", 0.7)])
def test_obs_with_sparsegpts_own_mask_gives_sparsegpts_weights(pattern, sparsity):
    x, w, h = _layer(out=16, inp=64, seed=2)
    p = Pattern.parse(pattern, sparsity)
    ref, keep = sparsegpt_prune(w, h, p, blocksize=16)
    assert torch.equal(obs_update(w, h, keep, 16, 0.01), ref)


def test_update_is_refused_for_sparsegpt_and_names_the_methods(tiny_model, calib_text, tmp_path):
    with pytest.raises(UsageError, match="applies to the score methods"):
        get_method("sparsegpt+obs")
    with pytest.raises(UsageError, match="unknown --update 'ridge'"):
        get_method("wanda+ridge")
    result = CliRunner().invoke(app, ["prune", str(tiny_model), str(tmp_path / "o"), "--method", "sparsegpt",
                                      "--update", "lsq", "--calib", str(calib_text), "--device", "cpu"])
    assert result.exit_code == 2
    assert "applies to the score methods" in result.output
    assert not (tmp_path / "o").exists()
    assert get_method("gblm+lsq").needs == {"scaler_row", "gradient", "hessian"}


@pytest.mark.parametrize("method,update,pattern,sparsity", [
    ("wanda", "lsq", "unstructured", 0.5), ("wanda", "obs", "2:4", None), ("magnitude", "lsq", "2:4", None),
])
def test_streamed_update_equals_inmemory(tiny_model, calib_text, tmp_path, method, update, pattern, sparsity):
    out = tmp_path / "out"
    run(tiny_model, out, calib_text, method=method, update=update, sparsity=sparsity, pattern=pattern,
        blocksize=32)
    ref = inmemory_prune(tiny_model, load_ids(out), method, pattern, sparsity, blocksize=32,
                         update=update).state_dict()
    got = read_all(out)
    for name, w in got.items():
        if ".layers." not in name or w.dim() != 2:
            continue
        rel = (w - ref[name]).abs().max() / ref[name].abs().max()
        assert rel <= 1e-5, (name, float(rel))
        assert torch.equal(w == 0, ref[name] == 0), name
    assert all(c.ok for c in verify(out)), [c.line() for c in verify(out) if not c.ok]


def test_gblm_with_lsq_streams_like_the_reference(tiny_model, calib_text, tmp_path):
    """GBLM's mask from its own streamed gradients, then lsq: the same as the reference given those gradients."""
    grads_dir = tmp_path / "grads"
    calib = CalibConfig(source=str(calib_text), nsamples=NSAMPLES, seqlen=SEQLEN)
    compute_gradients(GradientConfig(model_dir=str(tiny_model), out_dir=str(grads_dir), calib=calib, device="cpu",
                                     progress=False))
    out = tmp_path / "out"
    run(tiny_model, out, calib_text, method="gblm", update="lsq", gradients=str(grads_dir), alpha=100.0)
    folder = GradientFolder.load_folder(grads_dir)
    grads = {k: v for i in range(3) for k, v in folder.read(i).items()}
    ref = inmemory_prune(tiny_model, load_ids(out), "gblm", grads=grads, alpha=100.0, update="lsq").state_dict()
    for name, w in read_all(out).items():
        if ".layers." in name and w.dim() == 2:
            assert torch.equal(w == 0, ref[name] == 0), name
            assert float((w - ref[name]).abs().max() / ref[name].abs().max()) <= 1e-5, name


def test_update_none_is_todays_run_and_a_resumed_update_run_is_byte_identical(tiny_model, calib_text, tmp_path):
    run(tiny_model, tmp_path / "plain", calib_text, method="wanda")
    run(tiny_model, tmp_path / "none", calib_text, method="wanda", update="none")
    assert not diff_trees(tmp_path / "plain", tmp_path / "none")
    ref = tmp_path / "ref"
    prune(config(tiny_model, ref, calib_text, update="obs"))
    out = tmp_path / "out"
    testing_hooks.reset()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(testing_hooks.ENOSPC_ENV, "shard_write:3")  # block 2's shard fails: blocks 0, 1 are done
        with pytest.raises((UsageError, OSError)):
            prune(config(tiny_model, out, calib_text, update="obs"))
    testing_hooks.reset()
    prune(config(tiny_model, out, calib_text, update="obs"))
    assert not diff_trees(ref, out)


def test_obs_shares_sparsegpts_factor_across_one_hessian(monkeypatch):
    """q/k/v read one input: --update obs factors its Hessian once (the block's SharedFactors), same bytes."""
    from lowmem_gblm.methods import LinearJob, MethodOptions, SharedFactors
    from lowmem_gblm.methods import update as update_module

    calls = []
    real = update_module.hessian_factor
    monkeypatch.setattr(update_module, "hessian_factor", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, w, h = _layer(out=16, inp=32)
    stats, factors = {"scaler_row": x.pow(2).mean(0), "hessian": h}, SharedFactors()
    method, pattern = get_method("wanda+obs"), Pattern.parse("unstructured", 0.5)
    for _ in range(3):
        job = LinearJob("q", w.clone(), stats, pattern, MethodOptions(blocksize=8), factors=factors)
        keep = method.prune(job)
        assert torch.equal(job.weight, obs_update(w, h, keep, 8, 0.01))
    assert len(calls) == 1
