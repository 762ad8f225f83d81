"""``--overwrite`` deletes only what a lowmem-gblm run wrote; everything else is refused with exit 2 and
left as it was (issue: the input model inside OUT_DIR, folders of unrelated files, OUT_DIR "", ., .., ~, /)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

FAST = ["--method", "magnitude", "--nsamples", "4", "--seqlen", "16", "--device", "cpu", "-q"]


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (relative name -> sha256 of its bytes)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _prune(model, out, calib, *extra):
    return CliRunner().invoke(app, ["prune", str(model), str(out), "--calib", str(calib), *FAST, *extra])


def _refused(result, needle: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert needle in result.stderr, result.stderr


def test_model_inside_out_dir_is_never_deleted(tiny_model, calib_text, tmp_path):
    parent = tmp_path / "p"
    shutil.copytree(tiny_model, parent / "m")
    (parent / "notes.txt").write_text("x")
    before = _snapshot(parent)
    _refused(_prune(parent / "m", parent, calib_text, "--overwrite"), "MODEL_DIR")
    assert _snapshot(parent) == before  # not even a lock folder was left


def test_empty_out_dir_argument_is_refused(tiny_model, calib_text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("x")
    result = _prune(tiny_model, "", calib_text, "--overwrite")
    assert result.exit_code == 2 and "empty path" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_unrelated_files_are_refused_with_and_without_overwrite(tiny_model, calib_text, tmp_path):
    u = tmp_path / "u"
    u.mkdir()
    (u / "thesis.tex").write_text("years of work")
    _refused(_prune(tiny_model, u, calib_text, "--overwrite"), "holds no lowmem-gblm run")
    result = _prune(tiny_model, u, calib_text)
    _refused(result, "holds no lowmem-gblm run")
    assert "--overwrite" not in result.stderr  # the refusal does not suggest deleting them
    assert _snapshot(u) == {"thesis.tex": hashlib.sha256(b"years of work").hexdigest()}


@pytest.mark.parametrize("where", [".", "..", "home", "/"])
def test_well_known_folders_are_refused(tiny_model, calib_text, tmp_path, monkeypatch, where):
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    (work / "a.txt").write_text("a")
    (work.parent / "b.txt").write_text("b")
    monkeypatch.setenv("HOME", str(work))
    monkeypatch.chdir(work)
    out = str(Path.home()) if where == "home" else where
    before = _snapshot(tmp_path / "work")
    result = _prune(tiny_model, out, calib_text, "--overwrite")
    assert result.exit_code == 2, result.output
    assert _snapshot(tmp_path / "work") == before


def test_gradients_or_calibration_ids_inside_out_dir_are_refused(tiny_model, calib_text, tmp_path):
    out = tmp_path / "out"
    assert _prune(tiny_model, out, calib_text).exit_code == 0
    ids = out / "calibration_ids.safetensors"
    before = _snapshot(out)
    _refused(_prune(tiny_model, out, calib_text, "--calib-ids", str(ids), "--overwrite"), "--calib-ids")
    grads = out / "grads"
    grads.mkdir()
    (grads / "gradients.json").write_text("{}")
    before = _snapshot(out)
    result = CliRunner().invoke(app, ["prune", str(tiny_model), str(out), "--calib", str(calib_text), *FAST[2:],
                                      "--method", "gblm", "--gradients", str(grads), "--overwrite"])
    _refused(result, "--gradients")
    assert _snapshot(out) == before


def test_overwrite_replaces_a_run_but_not_what_the_user_added(tiny_model, calib_text, tmp_path):
    out = tmp_path / "out"
    assert _prune(tiny_model, out, calib_text, "--sparsity", "0.5").exit_code == 0
    (out / "my_notes.md").write_text("mine")
    before = _snapshot(out)
    _refused(_prune(tiny_model, out, calib_text, "--sparsity", "0.3", "--overwrite"), "my_notes.md")
    assert _snapshot(out) == before
    (out / "my_notes.md").unlink()
    assert _prune(tiny_model, out, calib_text, "--sparsity", "0.3", "--overwrite").exit_code == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["sparsity"]["overall"] == pytest.approx(0.3, abs=0.02)


def test_a_crafted_manifest_cannot_point_outside_out_dir(tiny_model, calib_text, tmp_path):
    out = tmp_path / "out"
    assert _prune(tiny_model, out, calib_text).exit_code == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    manifest_path = out / ".lowmem" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["done"]["evil"] = {"file": "../victim.txt", "sha256": "0", "size": 7}
    manifest_path.write_text(json.dumps(manifest))
    before = _snapshot(out)
    _refused(_prune(tiny_model, out, calib_text, "--sparsity", "0.4", "--overwrite"), "manifest.json is damaged")
    assert victim.read_text() == "keep me" and _snapshot(out) == before  # which files are ours is unknown


@pytest.mark.parametrize("damage", ["done a list", "entry lacks file", "not JSON"])
def test_a_damaged_manifest_is_neither_resumed_nor_overwritten(tiny_model, calib_text, tmp_path, damage):
    out = tmp_path / "out"
    assert _prune(tiny_model, out, calib_text).exit_code == 0
    manifest_path = out / ".lowmem" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if damage == "done a list":
        manifest["done"] = list(manifest["done"].values())
    elif damage == "entry lacks file":
        del manifest["done"]["block.1"]["file"]
    manifest_path.write_text("{" if damage == "not JSON" else json.dumps(manifest))
    before = _snapshot(out)
    for extra in ((), ("--overwrite",)):
        _refused(_prune(tiny_model, out, calib_text, *extra), "manifest.json is damaged")
        assert _snapshot(out) == before


def test_sparsity_nan_with_a_pattern_is_refused_and_a_sparsity_that_prunes_nothing_says_so(
        tiny_model, calib_text, tmp_path, caplog):
    _refused(_prune(tiny_model, tmp_path / "a", calib_text, "--pattern", "2:4", "--sparsity", "nan"), "--sparsity")
    assert not (tmp_path / "a").exists()
    with caplog.at_level(logging.WARNING, logger="lowmem_gblm"):
        assert _prune(tiny_model, tmp_path / "b", calib_text, "--sparsity", "1e-9").exit_code == 0
        assert "asked for sparsity 1e-09" in caplog.text
        caplog.clear()
        assert _prune(tiny_model, tmp_path / "c", calib_text, "--sparsity", "0.5").exit_code == 0
        assert "asked for sparsity" not in caplog.text


def test_rerunning_a_finished_run_redoes_a_missing_shard(tiny_model, calib_text, tmp_path, caplog):
    out = tmp_path / "out"
    assert _prune(tiny_model, out, calib_text).exit_code == 0
    before = _snapshot(out)
    shard = out / "model-00002-of-00004.safetensors"
    shard.unlink()
    with caplog.at_level(logging.WARNING, logger="lowmem_gblm"):
        assert _prune(tiny_model, out, calib_text).exit_code == 0
    assert shard.name in caplog.text
    after = _snapshot(out)
    assert {k: v for k, v in after.items() if k.endswith(".safetensors") or k.endswith("index.json")} == \
        {k: v for k, v in before.items() if k.endswith(".safetensors") or k.endswith("index.json")}
