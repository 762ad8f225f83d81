"""lowmem-gblm verify: passes on a finished run, fails (exit 1) on each kind of damage, exit 2 on no run."""

from __future__ import annotations

import json
import shutil

import torch
from typer.testing import CliRunner

from cli.main import app
from lowmem_gblm.verify import verify
from tests.faults import edit_tensor, run

runner = CliRunner()
Q = "model.layers.1.self_attn.q_proj.weight"


def failed(out) -> set[str]:
    return {c.name for c in verify(out) if not c.ok}


def test_verify_passes_on_a_finished_run(pruned):
    result = runner.invoke(app, ["verify", str(pruned), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1]) == {
        "ok": True, "checks": {"index": True, "checksums": True, "sparsity": True, "keys": True}}


def test_verify_finds_damage(pruned, tmp_path):
    flipped = shutil.copytree(pruned, tmp_path / "flipped")  # one weight changed in place: sha256 and zeros
    edit_tensor(flipped, Q, lambda t: t.masked_fill(t == 0, 0.5))
    assert failed(flipped) == {"checksums", "sparsity"}
    result = runner.invoke(app, ["verify", str(flipped)])
    assert result.exit_code == 1 and "FAIL  checksums" in result.output

    report = shutil.copytree(pruned, tmp_path / "report")  # the report lies about one linear
    data = json.loads((report / "prune_report.json").read_text())
    data["sparsity"]["per_linear"][Q]["zeros"] += 1
    (report / "prune_report.json").write_text(json.dumps(data))
    assert failed(report) == {"sparsity"}

    index = shutil.copytree(pruned, tmp_path / "index")  # a key dropped from the index
    data = json.loads((index / "model.safetensors.index.json").read_text())
    del data["weight_map"]["model.norm.weight"]
    (index / "model.safetensors.index.json").write_text(json.dumps(data))
    assert failed(index) == {"index", "keys"}


def test_verify_checks_nm_groups(tiny_model, calib_text, tmp_path):
    out = tmp_path / "nm"
    run(tiny_model, out, calib_text, method="magnitude", pattern="2:4", sparsity=None)
    checks = {c.name: c for c in verify(out)}
    assert all(c.ok for c in checks.values()) and "pattern" in checks
    edit_tensor(out, Q, lambda t: t.masked_fill(t == 0, 1.0))  # every group now dense
    assert {c.name for c in verify(out) if not c.ok} == {"checksums", "sparsity", "pattern"}


def test_verify_minds_tied_head(tiny_tied, calib_text, tmp_path):
    out = tmp_path / "tied"
    run(tiny_tied, out, calib_text, method="magnitude")
    checks = {c.name: c for c in verify(out)}
    assert all(c.ok for c in checks.values()), [c.line() for c in checks.values()]
    assert "lm_head.weight tied" in checks["keys"].detail


def test_verify_unusable_input_exits_2(tmp_path):
    assert runner.invoke(app, ["verify", str(tmp_path / "missing")]).exit_code == 2
    (tmp_path / "half").mkdir()
    result = runner.invoke(app, ["verify", str(tmp_path / "half")])
    assert result.exit_code == 2 and "not a finished run" in result.stderr


def test_nm_violation_counter():
    from lowmem_gblm.verify import _nm_violations

    w = torch.tensor([[1.0, 2.0, 0.0, 0.0, 0.0, 6.0, 7.0, 8.0]])
    assert _nm_violations(w, 2, 4) == 1
