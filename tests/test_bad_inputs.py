"""Damaged or changed input: each is refused with exit 2 and a message naming the file and tensor,
before or when it is read; blocks finished before the damage is met stay on disk."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from lowmem_gblm import testing_hooks
from tests.faults import cli_args, copy_model, edit_tensor, run, shard_of, with_value

runner = CliRunner()
Q1 = "model.layers.1.self_attn.q_proj.weight"
REPO = Path(__file__).resolve().parents[1]


def prune_cli(model, out, calib):
    result = runner.invoke(app, cli_args(model, out, calib))
    return result.exit_code, result.stderr


def test_truncated_shard(tiny_model, calib_text, tmp_path):
    model = copy_model(tiny_model, tmp_path / "m")
    shard = shard_of(model, Q1)
    os.truncate(shard, shard.stat().st_size - 16)
    code, err = prune_cli(model, tmp_path / "out", calib_text)
    assert code == 2 and shard.name in err and "truncated" in err and "model.layers.1." in err
    assert not (tmp_path / "out").exists()  # found while opening, before anything was written


@pytest.mark.parametrize("damage", ["huge_length", "garbled_json"])
def test_broken_header(tiny_model, calib_text, tmp_path, damage):
    model = copy_model(tiny_model, tmp_path / "m")
    shard = shard_of(model, Q1)
    data = bytearray(shard.read_bytes())
    if damage == "huge_length":  # header length beyond the file: checked before anything is parsed
        data[:8] = struct.pack("<Q", len(data) * 4)
    else:
        data[9:14] = b"\xff\xfe{{{"
    shard.write_bytes(bytes(data))
    code, err = prune_cli(model, tmp_path / "out", calib_text)
    assert code == 2 and shard.name in err and "broken safetensors header" in err


def test_missing_shard(tiny_model, calib_text, tmp_path):
    model = copy_model(tiny_model, tmp_path / "m")
    shard = shard_of(model, Q1)
    shard.unlink()
    code, err = prune_cli(model, tmp_path / "out", calib_text)
    assert code == 2 and shard.name in err and "missing" in err and "holding 'model.layers." in err


@pytest.mark.parametrize("name", [Q1, "model.embed_tokens.weight", "lm_head.weight"])
def test_wrong_shape(tiny_model, calib_text, tmp_path, name):
    model = copy_model(tiny_model, tmp_path / "m")
    shard = edit_tensor(model, name, lambda t: t[:-1].contiguous())
    code, err = prune_cli(model, tmp_path / "out", calib_text)
    assert code == 2 and shard.name in err and repr(name) in err and "shape" in err


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_stops_at_its_block(tiny_model, calib_text, tmp_path, value):
    model = copy_model(tiny_model, tmp_path / "m")
    shard = edit_tensor(model, Q1, with_value(value))
    out = tmp_path / "out"
    code, err = prune_cli(model, out, calib_text)
    assert code == 2 and shard.name in err and repr(Q1) in err and "NaN/Inf" in err
    done = json.loads((out / ".lowmem" / "manifest.json").read_text())["done"]
    assert sorted(done) == ["block.0", "rest"]  # block 0 finished before block 1 was read, and is kept
    assert all((out / e["file"]).stat().st_size == e["size"] for e in done.values())


def test_non_finite_non_block_tensor(tiny_model, calib_text, tmp_path):
    model = copy_model(tiny_model, tmp_path / "m")
    shard = edit_tensor(model, "model.norm.weight", with_value(float("nan")))
    code, err = prune_cli(model, tmp_path / "out", calib_text)
    assert code == 2 and shard.name in err and "'model.norm.weight'" in err


def test_model_changed_between_run_and_resume(tiny_model, calib_text, tmp_path, monkeypatch):
    model = copy_model(tiny_model, tmp_path / "m")
    out = tmp_path / "out"
    testing_hooks.reset()
    monkeypatch.setenv(testing_hooks.ENOSPC_ENV, "shard_write:4")  # ids, rest, block 0 written; block 1 fails
    with pytest.raises(Exception, match="no space left"):
        run(model, out, calib_text)
    monkeypatch.delenv(testing_hooks.ENOSPC_ENV)
    shard = edit_tensor(model, "model.layers.2.mlp.up_proj.weight", with_value(0.25))
    code, err = prune_cli(model, out, calib_text)
    assert code == 2 and "input model changed" in err and shard.name in err
    assert json.loads((out / ".lowmem" / "manifest.json").read_text())["done"].keys() == {"block.0", "rest"}


def test_index_path_outside_model_folder(tiny_model, calib_text, tmp_path):
    model = copy_model(tiny_model, tmp_path / "m")
    index = model / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][Q1] = "../elsewhere.safetensors"
    index.write_text(json.dumps(data))
    code, err = prune_cli(model, tmp_path / "out", calib_text)
    assert code == 2 and "outside the model folder" in err and "../elsewhere.safetensors" in err


def test_no_pickle_and_no_remote_code():
    """Only safetensors are ever read; remote code is never trusted."""
    sources = [p for d in ("lowmem_gblm", "cli", "benchmarks") for p in (REPO / d).rglob("*.py")]
    assert sources
    for path in sources:
        text = path.read_text()
        assert not re.search(r"torch\.load\(|^\s*import pickle|^\s*from pickle|pickle\.loads?\(", text, re.M), path
        assert not re.search(r"trust_remote_code\s*=\s*True", text), path
        assert "trust-remote-code" not in text, path
