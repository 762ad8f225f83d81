"""Issue 32 cases 2, 6 and 7: what a model folder may hold and where its files may resolve.

2: a Hugging Face cache layout whose ``blobs`` folder is OUT_DIR (an earlier run's files are the input's data):
   ``--overwrite`` is refused before anything is deleted; 6: ``model.safetensors`` beside a sharded index is
   ambiguous (from_pretrained loads the single file); 7: side files copied into OUT_DIR (tokenizer, config) that
   are symlinks out of the model folder are refused like shards are (a cache snapshot's links into its blobs are
   still accepted: tests/test_strict_inputs.py)."""

import hashlib
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from cli.main import app
from tests.faults import cli_args

runner = CliRunner()


def _prune(model: Path, out: Path, calib: Path, *extra: str):
    result = runner.invoke(app, [*cli_args(model, out, calib, method="magnitude"), *extra])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stderr


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def test_overwrite_of_the_blobs_a_snapshot_links_to_is_refused(pruned, calib_text, tmp_path):
    """The snapshot's files are links into ``blobs``, and ``blobs`` is a finished run's OUT_DIR."""
    repo = tmp_path / "hub" / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abc"
    shutil.copytree(pruned, blobs)
    snap.mkdir(parents=True)
    for f in sorted(blobs.iterdir()):
        if f.is_file():
            os.symlink(os.path.join("..", "..", "blobs", f.name), snap / f.name)
    before = _hashes(blobs)
    code, err = _prune(snap, blobs, calib_text, "--overwrite")
    assert code == 2, err
    assert "holds MODEL_DIR's own data" in _one_error_line(err)
    assert _hashes(blobs) == before  # nothing deleted
    code, err = _prune(snap, blobs, calib_text)  # without --overwrite too: the run would write over its input
    assert code == 2 and "holds MODEL_DIR's own data" in _one_error_line(err)


def test_a_hard_link_of_a_model_file_in_out_dir_is_refused(tiny_model, calib_text, tmp_path):
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    out = tmp_path / "out"
    out.mkdir()
    os.link(model / "config.json", out / "config.json")
    code, err = _prune(model, out, calib_text, "--overwrite")
    assert code == 2 and "same file" in _one_error_line(err)
    assert (model / "config.json").is_file()


def test_single_file_beside_a_sharded_index_is_refused(tiny_model, calib_text, tmp_path):
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    save_file({"model.norm.weight": torch.ones(64)}, str(model / "model.safetensors"))
    code, err = _prune(model, tmp_path / "out", calib_text)
    assert code == 2, err
    line = _one_error_line(err)
    assert "model.safetensors" in line and "model.safetensors.index.json" in line and "ambiguous" in line
    assert not (tmp_path / "out").exists()


def test_side_file_linked_out_of_the_model_folder_is_refused(tiny_model, calib_text, tmp_path):
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    secret = tmp_path / "secret.txt"
    secret.write_text("not the model's")
    (model / "tokenizer_config.json").unlink()
    os.symlink(secret, model / "tokenizer_config.json")
    out = tmp_path / "out"
    code, err = _prune(model, out, calib_text)
    assert code == 2, err
    assert "tokenizer_config.json" in _one_error_line(err) and "outside the model folder" in err
    assert not (out / "tokenizer_config.json").exists()
