"""--layer-sparsity owl: per-block sparsity from the dense model's outlier ratios (Yin et al. 2024)."""

from __future__ import annotations

import json

import pytest
import torch

from lowmem_gblm import testing_hooks
from lowmem_gblm.config import CalibConfig, PruneConfig
from lowmem_gblm.engine import prune
from lowmem_gblm.errors import UsageError
from lowmem_gblm.score.owl import outlier_ratio, owl_sparsities
from tests.faults import config, diff_trees
from tests.reference import inmemory_prune, load_full, load_ids
from tests.test_prune_stream import read_all, run


def test_owl_sparsities_golden_and_mean_is_the_target():
    # ratios 0.01, 0.03, 0.02 -> normalised 0, 0.16, 0.08 (2 * lambda = 0.16), mean 0.08
    # -> densities 0.5 - 0.08, 0.5 + 0.08, 0.5 -> sparsities 0.58, 0.42, 0.50
    got = owl_sparsities([0.01, 0.03, 0.02], 0.5, 0.08)
    assert got == pytest.approx([0.58, 0.42, 0.50], abs=1e-12)
    assert sum(got) / 3 == pytest.approx(0.5, abs=1e-15)
    assert owl_sparsities([0.02, 0.02], 0.7, 0.08) == pytest.approx([0.7, 0.7])  # no spread: uniform
    ratios = torch.rand(40, generator=torch.Generator().manual_seed(0)).tolist()
    s = owl_sparsities(ratios, 0.6, 0.1)
    assert sum(s) / len(s) == pytest.approx(0.6, abs=1e-12)
    assert max(s) - min(s) == pytest.approx(0.2)
    order = sorted(range(40), key=ratios.__getitem__)
    assert [s[i] for i in order] == sorted(s, reverse=True)  # more outliers, less pruning
    with pytest.raises(UsageError, match="lower --owl-lambda"):
        owl_sparsities([0.0, 1.0], 0.9, 0.1)


def test_outlier_ratio_golden():
    # scores |W| * sqrt(scaler): [[1, 2], [3, 4]] and [[8]] (scaler 4 -> x2 on [[4]]); mean over the block 18/5 = 3.6
    w = [torch.tensor([[1.0, -2.0], [3.0, 4.0]]), torch.tensor([[-4.0]])]
    s = [torch.tensor([1.0, 1.0]), torch.tensor([4.0])]
    assert outlier_ratio(w, s, 1.0) == 2 / 5  # 4 and 8 above 3.6
    assert outlier_ratio(w, s, 2.0) == 1 / 5  # 8 above 7.2


def test_owl_is_refused_with_an_nm_pattern(calib_text):
    calib = CalibConfig(source=str(calib_text), nsamples=2, seqlen=16)
    with pytest.raises(UsageError, match="--pattern unstructured with owl"):
        PruneConfig(model_dir="m", out_dir="o", calib=calib, pattern="2:4", sparsity=None, layer_sparsity="owl")
    with pytest.raises(UsageError, match="--owl-lambda"):
        PruneConfig(model_dir="m", out_dir="o", calib=calib, layer_sparsity="owl", owl_lambda=0.7)


def _reference_owl(model_dir, ids: torch.Tensor, target: float, lam: float, m: float) -> list[float]:
    """Outlier ratios of the dense in-memory model written out here (hooks on every linear, whole model)."""
    model = load_full(model_dir)
    sums = {}
    hooks = []

    def hook(_m, args, _n):
        sums[_n] += (args[0].reshape(-1, args[0].shape[-1]).float() ** 2).sum(0)  # returns None: inputs unchanged

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            sums[name] = torch.zeros(mod.in_features)
            hooks.append(mod.register_forward_pre_hook(lambda m, a, _n=name: hook(m, a, _n)))
    with torch.no_grad():
        for k in range(ids.shape[0]):
            model.model(ids[k:k + 1])
    for h in hooks:
        h.remove()
    modules = dict(model.named_modules())
    ratios = []
    for i in range(len(model.model.layers)):
        names = [n for n in sums if n.startswith(f"model.layers.{i}.")]
        scores = torch.cat([(modules[n].weight.abs() * (sums[n] / ids.shape[0]).sqrt()).flatten() for n in names])
        ratios.append(float((scores > m * scores.mean()).sum()) / scores.numel())
    lo, hi = min(ratios), max(ratios)
    norm = [(r - lo) / (hi - lo) * 2 * lam for r in ratios]
    mean = sum(norm) / len(norm)
    return [1 - ((1 - target) + v - mean) for v in norm]


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_streamed_owl_equals_inmemory(tiny_model, calib_text, tmp_path, method):
    out = tmp_path / "out"
    report = run(tiny_model, out, calib_text, method=method, sparsity=0.6, layer_sparsity="owl", owl_lambda=0.1,
                 owl_m=3.0)
    ids = load_ids(out)
    expected = _reference_owl(tiny_model, ids, 0.6, 0.1, 3.0)
    owl = report["layer_sparsity"]
    assert owl["kind"] == "owl"
    assert owl["sparsity"] == pytest.approx(expected, abs=1e-6)
    assert len(set(round(s, 6) for s in owl["sparsity"])) > 1  # the blocks really differ
    ref = inmemory_prune(tiny_model, ids, method, "unstructured", owl["sparsity"]).state_dict()
    got = read_all(out)
    for name, w in got.items():
        if ".layers." in name and w.dim() == 2:
            assert torch.equal(w == 0, ref[name] == 0), name
    for i, s in enumerate(owl["sparsity"]):  # each block pruned at its own sparsity (int(in * s) per row)
        assert report["sparsity"]["per_block"][i] == pytest.approx(s, abs=0.02), i


def test_owl_resumes_byte_identical_and_keeps_its_sparsities(tiny_model, calib_text, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    prune(config(tiny_model, ref, calib_text, layer_sparsity="owl"))
    testing_hooks.reset()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(testing_hooks.ENOSPC_ENV, "shard_write:3")
        with pytest.raises((UsageError, OSError)):
            prune(config(tiny_model, out, calib_text, layer_sparsity="owl"))
    testing_hooks.reset()
    saved = json.loads((out / ".lowmem" / "manifest.json").read_text())["owl"]
    prune(config(tiny_model, out, calib_text, layer_sparsity="owl"))
    assert not diff_trees(ref, out)
    assert json.loads((out / "prune_report.json").read_text())["layer_sparsity"]["sparsity"] == saved["sparsity"]


def test_gblm_owl_takes_its_statistics_from_the_gradient_sweep(tiny_model, calib_text, tmp_path):
    """GBLM's gradient sweep records every linear's dense Σx² in its folder; OWL then needs no forward sweep of its
    own, and gives exactly what the forward sweep gives (same windows, fold order and store), which equals the
    in-memory reference."""
    from lowmem_gblm.config import GradientConfig
    from lowmem_gblm.engine import compute_gradients
    from lowmem_gblm.io.gradfiles import INPUT_NORMS_FILE, INPUT_NORMS_KEY
    from tests.test_prune_stream import NSAMPLES, SEQLEN

    opts = dict(method="gblm", sparsity=0.6, layer_sparsity="owl", owl_lambda=0.1, owl_m=3.0, device="cpu")
    own = run(tiny_model, tmp_path / "own", calib_text, **opts)
    assert own["layer_sparsity"]["statistics"] == "gradient_sweep"
    assert "owl_weights" in [p["phase"] for p in own["phases"]]
    assert "owl_sweep" not in [p["phase"] for p in own["phases"]]
    ids = load_ids(tmp_path / "own")
    expected = _reference_owl(tiny_model, ids, 0.6, 0.1, 3.0)
    assert own["layer_sparsity"]["sparsity"] == pytest.approx(expected, abs=1e-6)
    assert len(set(round(s, 6) for s in expected)) > 1

    # a gradient folder without the statistics (as older ones are): OWL runs its forward sweep, same numbers
    grads = tmp_path / "grads"
    compute_gradients(GradientConfig(model_dir=str(tiny_model), out_dir=str(grads), device="cpu", progress=False,
                                     calib=CalibConfig(source=str(calib_text), nsamples=NSAMPLES, seqlen=SEQLEN)))
    state = json.loads((grads / "gradients.json").read_text())
    assert state[INPUT_NORMS_KEY]["file"] == INPUT_NORMS_FILE and (grads / INPUT_NORMS_FILE).is_file()
    with_file = run(tiny_model, tmp_path / "with", calib_text, gradients=str(grads), **opts)
    del state[INPUT_NORMS_KEY]
    (grads / "gradients.json").write_text(json.dumps(state))
    without = run(tiny_model, tmp_path / "without", calib_text, gradients=str(grads), **opts)
    assert with_file["layer_sparsity"]["statistics"] == "gradient_sweep"
    assert without["layer_sparsity"]["statistics"] == "forward_sweep"
    assert without["layer_sparsity"]["outlier_ratio"] == with_file["layer_sparsity"]["outlier_ratio"] \
        == own["layer_sparsity"]["outlier_ratio"]
    a, b = read_all(tmp_path / "with"), read_all(tmp_path / "without")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
