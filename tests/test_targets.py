"""--targets / --ignore: which decoder linears are pruned (regexes on the full module name)."""

import re

import pytest
import torch
from safetensors import safe_open

from lowmem_gblm.config import CalibConfig, PruneConfig
from lowmem_gblm.engine import prune
from lowmem_gblm.errors import UsageError
from tests.reference import inmemory_prune, load_ids
from tests.test_prune_stream import read_all


def _run(model_dir, out, calib_text, **kw):
    calib = CalibConfig(source=str(calib_text), nsamples=4, seqlen=24)
    return prune(PruneConfig(model_dir=str(model_dir), out_dir=str(out), calib=calib, progress=False, **kw))


def test_ignored_linears_keep_their_bytes_and_the_rest_equals_the_reference(tiny_model, calib_text, tmp_path):
    out = tmp_path / "out"
    ignore = r"mlp\.down_proj|layers\.1\.self_attn"
    report = _run(tiny_model, out, calib_text, method="wanda", sparsity=0.5, ignore=ignore)
    got = read_all(out)
    dense = read_all(tiny_model)
    skipped = sorted(n for n in got if ".layers." in n and got[n].dim() == 2 and re.search(ignore, n))
    assert sorted(report["skipped"]) == skipped and len(skipped) == 3 + 4
    for name in skipped:
        assert torch.equal(got[name], dense[name]), name  # untouched bytes
    ref = inmemory_prune(tiny_model, load_ids(out), "wanda", "unstructured", 0.5,
                         prunes=lambda n: not re.search(ignore, n)).state_dict()
    pruned = [n for n in got if ".layers." in n and got[n].dim() == 2 and n not in skipped]
    assert len(pruned) == 21 - 7
    for name in pruned:
        assert torch.equal(got[name], ref[name]), name
    assert report["sparsity"]["overall"] == pytest.approx(0.5)  # over the pruned linears
    assert sorted(report["sparsity"]["per_linear"]) == sorted(pruned)


def test_targets_prunes_only_the_matching_linears(tiny_model, calib_text, tmp_path):
    report = _run(tiny_model, tmp_path / "out", calib_text, method="magnitude", sparsity=0.5,
                  targets=r"self_attn\.(q|k)_proj")
    assert sorted(report["sparsity"]["per_linear"]) == sorted(
        f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(3) for p in "qk")
    assert len(report["skipped"]) == 21 - 6
    with safe_open(str(tmp_path / "out" / "model-00001-of-00004.safetensors"), framework="pt") as f:
        assert float((f.get_tensor("model.layers.0.self_attn.q_proj.weight") == 0).float().mean()) == 0.5


def test_a_selection_of_nothing_and_a_bad_regex_are_refused(tiny_model, calib_text, tmp_path):
    with pytest.raises(UsageError, match="select no linear"):
        _run(tiny_model, tmp_path / "a", calib_text, targets="no_such_linear")
    assert not (tmp_path / "a").exists()
    with pytest.raises(UsageError, match="not a regular expression"):
        _run(tiny_model, tmp_path / "b", calib_text, ignore="(")
    with pytest.raises(UsageError, match="no linear to prune"):
        _run(tiny_model, tmp_path / "c", calib_text, layer_sparsity="owl", ignore=r"layers\.2\.")
