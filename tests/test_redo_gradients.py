"""Issue 32 case 1: a GBLM run killed mid prune sweep, a finished shard then changed or deleted. The redo of that
block needs its gradients, which the run's own folder had already dropped: the resume recomputes them and finishes
byte-identical; ``--overwrite`` can always clear what a run wrote (a shard the manifest no longer lists included)."""

import json

import pytest
from typer.testing import CliRunner

from cli.main import app
from lowmem_gblm import testing_hooks
from tests.faults import cli_args, diff_trees
from tests.tiny import make_tiny_llama


@pytest.fixture(scope="module")
def model4(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("m4") / "model", layers=4, seed=5)


@pytest.fixture(scope="module")
def gblm_ref(model4, calib_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    result = CliRunner().invoke(app, cli_args(model4, out, calib_text, method="gblm"))
    assert result.exit_code == 0, result.output
    return out


def _interrupted(model, out, calib, monkeypatch, point="block_done:3"):
    """A GBLM run stopped at ``point`` (an injected failure there leaves what a kill there leaves); its manifest."""
    testing_hooks.reset()
    monkeypatch.setenv(testing_hooks.ENOSPC_ENV, point)
    assert CliRunner().invoke(app, cli_args(model, out, calib, method="gblm")).exit_code != 0
    monkeypatch.delenv(testing_hooks.ENOSPC_ENV)
    return json.loads((out / ".lowmem" / "manifest.json").read_text())


@pytest.mark.parametrize("damage", ["changed", "deleted"])
def test_a_redone_block_gets_its_gradients_again(model4, calib_text, gblm_ref, tmp_path, damage, monkeypatch):
    out = tmp_path / "out"
    manifest = _interrupted(model4, out, calib_text, monkeypatch)
    shard = out / manifest["done"]["block.0"]["file"]
    if damage == "changed":
        data = bytearray(shard.read_bytes())
        data[-5] ^= 0x40  # same size, header intact
        shard.write_bytes(bytes(data))
    else:
        shard.unlink()
    result = CliRunner().invoke(app, cli_args(model4, out, calib_text, method="gblm"))
    assert result.exit_code == 0, result.output
    assert diff_trees(out, gblm_ref) == []


def test_overwrite_clears_a_shard_the_manifest_dropped(model4, calib_text, gblm_ref, tmp_path, monkeypatch):
    out = tmp_path / "out"
    manifest = _interrupted(model4, out, calib_text, monkeypatch)
    # what an older resume left: the changed shard is no longer in the manifest, but it is still the run's file
    entry = manifest["done"].pop("block.0")
    (out / ".lowmem" / "manifest.json").write_text(json.dumps(manifest))
    assert (out / entry["file"]).is_file()
    result = CliRunner().invoke(app, [*cli_args(model4, out, calib_text, method="gblm"), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert diff_trees(out, gblm_ref) == []


def test_overwrite_clears_a_shard_written_before_its_manifest_entry(model4, calib_text, gblm_ref, tmp_path,
                                                                   monkeypatch):
    out = tmp_path / "out"
    _interrupted(model4, out, calib_text, monkeypatch, "manifest:2")
    (out / ".model-00003-of-00005.safetensors.tmp-99999").write_bytes(b"half")  # a write a kill interrupted
    result = CliRunner().invoke(app, [*cli_args(model4, out, calib_text, method="gblm"), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert diff_trees(out, gblm_ref) == []

