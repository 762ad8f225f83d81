"""Every bad input: one clear line on stderr, exit code 2, and no output that looks complete."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from cli.main import app


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


def prune_args(model, out, calib, *extra):
    return ["prune", str(model), str(out), "--calib", str(calib), "--nsamples", "4", "--seqlen", "16", "-q", *extra]


def check(runner, args, needle, out=None):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert needle in result.stderr, result.stderr
    assert result.stderr.startswith("error: ")
    if out is not None:
        assert not (out / "model.safetensors.index.json").exists()


def test_missing_model_dir(runner, tmp_path, calib_text):
    check(runner, prune_args(tmp_path / "nope", tmp_path / "out", calib_text), "is not a folder")


def test_not_a_checkpoint(runner, tmp_path, calib_text):
    (tmp_path / "m").mkdir()
    check(runner, prune_args(tmp_path / "m", tmp_path / "out", calib_text), "no config.json")


def test_pickle_only_checkpoint(runner, tmp_path, tiny_model, calib_text):
    m = tmp_path / "m"
    m.mkdir()
    shutil.copy(tiny_model / "config.json", m)
    (m / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    check(runner, prune_args(m, tmp_path / "out", calib_text), "safetensors only")


def test_unsupported_architecture(runner, tmp_path, tiny_model, calib_text):
    m = tmp_path / "m"
    shutil.copytree(tiny_model, m)
    cfg = json.loads((m / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (m / "config.json").write_text(json.dumps(cfg))
    check(runner, prune_args(m, tmp_path / "out", calib_text), "supported: LlamaForCausalLM")


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--method", "obs"], "unknown method 'obs'"),
        (["--sparsity", "1.5"], "--sparsity must be in (0, 1)"),
        (["--sparsity", "0"], "--sparsity must be in (0, 1)"),
        (["--pattern", "2-4"], "N:M"),
        (["--pattern", "4:2"], "0 < N < M"),
        (["--pattern", "3:7"], "not a multiple of M=7"),
        (["--seqlen", "512"], "exceeds the model's context"),
        (["--nsamples", "5000"], "need at least nsamples*seqlen"),
        (["--device", "tpu"], "--device"),
        (["--calib-ids", "/nonexistent.safetensors"], "--calib-ids"),
    ],
)
def test_bad_options(runner, tmp_path, tiny_model, calib_text, extra, needle):
    out = tmp_path / "out"
    check(runner, prune_args(tiny_model, out, calib_text, *extra), needle, out)


def test_missing_calibration_file(runner, tmp_path, tiny_model):
    check(runner, prune_args(tiny_model, tmp_path / "out", tmp_path / "none.txt"), "no such file")


def test_hub_name_offline_explains_local_files(runner, tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    check(runner, prune_args(tiny_model, tmp_path / "out", "wikitext2"), "pass local text instead")


def test_out_dir_inside_model_dir(runner, tmp_path, tiny_model, calib_text):
    m = tmp_path / "m"
    shutil.copytree(tiny_model, m)
    check(runner, prune_args(m, m, calib_text), "inside it")
    check(runner, prune_args(m, m / "sub", calib_text), "inside it")
    assert not (m / "sub").exists()


def test_unwritable_out_dir(runner, tmp_path, tiny_model, calib_text):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    check(runner, prune_args(tiny_model, blocker / "out", calib_text), "not writable")


def test_non_empty_foreign_out_dir(runner, tmp_path, tiny_model, calib_text):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    check(runner, prune_args(tiny_model, out, calib_text), "holds no lowmem-gblm run")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]  # nothing written, not even a lock


def test_changed_options_on_resume(runner, tmp_path, tiny_model, calib_text):
    out = tmp_path / "out"
    assert runner.invoke(app, prune_args(tiny_model, out, calib_text, "--sparsity", "0.5")).exit_code == 0
    check(runner, prune_args(tiny_model, out, calib_text, "--sparsity", "0.4"), "sparsity: 0.5 -> 0.4")
    check(runner, prune_args(tiny_model, out, calib_text, "--sparsity", "0.5", "--seed", "3"), "--overwrite")
