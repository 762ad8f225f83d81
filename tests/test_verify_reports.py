"""Issue 32 cases 8-10: ``verify`` recomputes the report's own sums (an edited overall sparsity fails), and passes
correct runs made with --targets/--ignore (skipped linears are listed under "skipped") and correct mixture-of-experts
runs (the router is never pruned; the checkpoint keeps one matrix per expert where transformers 5 fuses them),
while damaged ones still fail."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from lowmem_gblm.config import CalibConfig, PruneConfig
from lowmem_gblm.engine import prune
from lowmem_gblm.verify import verify
from tests.faults import run
from tests.tiny import MOE_KINDS, make_tiny_family


def failed(out) -> dict[str, str]:
    return {c.name: c.detail for c in verify(out) if not c.ok}


def _edit_report(out, fn) -> None:
    path = out / "prune_report.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("edit", [
    lambda r: r["sparsity"].__setitem__("overall", 0.25),
    lambda r: r["sparsity"].__setitem__("zeros", r["sparsity"]["zeros"] // 2),
    lambda r: r["sparsity"].__setitem__("numel", r["sparsity"]["numel"] * 2),
    lambda r: r["sparsity"]["per_block"].__setitem__(0, 0.1),
], ids=["overall", "zeros", "numel", "per_block"])
def test_an_edited_overall_sparsity_fails(pruned, tmp_path, edit):
    out = shutil.copytree(pruned, tmp_path / "out")
    assert failed(out) == {}
    _edit_report(out, edit)
    assert set(failed(out)) == {"sparsity"}


@pytest.fixture(scope="module")
def targeted(tiny_model, calib_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("targets") / "out"
    run(tiny_model, out, calib_text, targets=r"mlp\.", ignore=r"layers\.1\.")
    return out


def test_a_targets_run_passes(targeted):
    assert failed(targeted) == {}
    report = json.loads((targeted / "prune_report.json").read_text())
    assert report["skipped"] and all("mlp" in k for k in report["sparsity"]["per_linear"])


def test_a_targets_run_still_fails_when_a_skipped_linear_is_unlisted(targeted, tmp_path):
    out = shutil.copytree(targeted, tmp_path / "out")
    _edit_report(out, lambda r: r.__setitem__("skipped", r["skipped"][1:]))
    assert "missing from the report" in failed(out)["sparsity"]


def test_a_targets_run_fails_when_the_report_skips_what_the_index_lacks(targeted, tmp_path):
    out = shutil.copytree(targeted, tmp_path / "out")
    _edit_report(out, lambda r: r["skipped"].append("model.layers.7.self_attn.q_proj.weight"))
    assert "as skipped" in failed(out)["sparsity"]


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_a_mixture_of_experts_run_passes(kind, tmp_path):
    model = make_tiny_family(tmp_path / "model", kind, layers=2)
    ids = tmp_path / "ids.safetensors"
    save_file({"input_ids": torch.randint(2, 320, (4, 16), generator=torch.Generator().manual_seed(5))}, str(ids))
    out = tmp_path / "out"
    prune(PruneConfig(model_dir=str(model), out_dir=str(out), method="wanda", sparsity=0.5, device="cpu",
                      progress=False, calib=CalibConfig(ids_file=str(ids), nsamples=4, seqlen=16)))
    assert failed(out) == {}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    router = next(k for k in index["weight_map"] if k.endswith("gate.weight") and "experts" not in k)
    expert = next(k for k in index["weight_map"] if ".experts.1." in k)
    dropped = shutil.copytree(out, tmp_path / "dropped")  # an expert matrix gone from the index: keys still fail
    data = json.loads((dropped / "model.safetensors.index.json").read_text())
    del data["weight_map"][expert]
    (dropped / "model.safetensors.index.json").write_text(json.dumps(data))
    assert "keys" in failed(dropped) and expert in failed(dropped)["keys"]
    _edit_report(out, lambda r: r["sparsity"]["per_linear"].pop(expert))  # a pruned expert unreported
    assert "missing from the report" in failed(out)["sparsity"]
    assert router not in failed(out)["sparsity"]
