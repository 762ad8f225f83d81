"""Checkpoint files and configs that are malformed the way a broken download, a hand edit or an attacker
makes them: each is refused with exit 2 and a line naming the file (and the tensor or field), before any
weight is read; old buffers transformers ignores and Hugging Face cache snapshots are accepted."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.faults import cli_args, copy_model, shard_of

runner = CliRunner()
Q1 = "model.layers.1.self_attn.q_proj.weight"


def _prune(model: Path, out: Path, calib: Path):
    result = runner.invoke(app, cli_args(model, out, calib, method="magnitude"))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stderr


def _refused(model, out, calib, *needles):
    code, err = _prune(model, out, calib)
    assert code == 2, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (out / "model.safetensors.index.json").exists()
    return err


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(path: Path, header, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _two_tensors(header: dict) -> tuple[str, str]:
    """The first two tensors of a header in data order."""
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return names[0], names[1]


def _overlap(h, d):
    a, b = _two_tensors(h)
    h[b]["data_offsets"] = [x - 4 for x in h[b]["data_offsets"]]
    return h, d


def _negative(h, d):
    a, _ = _two_tensors(h)
    size = h[a]["data_offsets"][1]
    h[a]["data_offsets"] = [-16, size - 16]
    return h, d


def _gap(h, d):
    for k, v in h.items():  # every tensor moves 8 bytes on: the first 8 bytes of data belong to none
        if k != "__metadata__":
            v["data_offsets"] = [x + 8 for x in v["data_offsets"]]
    return h, b"\0" * 8 + d


def _trailing(h, d):
    return h, d + b"\0" * 8


def _set(field, value):
    def fn(h, d):
        a, _ = _two_tensors(h)
        h[a][field] = value
        return h, d
    return fn


HEADER_DAMAGE = {
    "overlapping offsets": (_overlap, "overlaps"),
    "negative offset": (_negative, "data_offsets"),
    "bytes before a tensor": (_gap, "unaccounted"),
    "bytes after the last tensor": (_trailing, "belong to no tensor"),
    "header is a list": (lambda h, d: ([h], d), "not an object"),
    "header is a string": (lambda h, d: ("weights", d), "not an object"),
    "offsets are strings": (_set("data_offsets", ["0", "16"]), "data_offsets"),
    "offsets are floats": (_set("data_offsets", [0.0, 16.0]), "data_offsets"),
    "negative shape": (_set("shape", [-4, -4]), "shape"),
    "float shape": (_set("shape", [4.0, 4]), "shape"),
    "unknown dtype": (_set("dtype", "F33"), "'F33'"),
    "metadata not strings": (lambda h, d: ({**h, "__metadata__": {"format": 1}}, d), "__metadata__"),
}


@pytest.mark.parametrize("damage", list(HEADER_DAMAGE))
def test_malformed_header(tiny_model, calib_text, tmp_path, damage):
    model = copy_model(tiny_model, tmp_path / "m")
    shard = shard_of(model, Q1)
    fn, needle = HEADER_DAMAGE[damage]
    _write(shard, *fn(*_header(shard)))
    err = _refused(model, tmp_path / "out", calib_text, shard.name, needle)
    if damage not in ("bytes before a tensor", "bytes after the last tensor", "header is a list",
                      "header is a string", "metadata not strings"):
        assert "tensor 'model.layers." in err  # names the tensor, not only the file


def test_library_rejects_what_we_reject(tiny_model, tmp_path):
    """The reference: the safetensors library itself refuses the offset damage we refuse."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for fn in (_overlap, _negative, _gap, _trailing):
        model = copy_model(tiny_model, tmp_path / fn.__name__)
        shard = shard_of(model, Q1)
        _write(shard, *fn(*_header(shard)))
        with pytest.raises((SafetensorError, Exception)):
            load_file(str(shard))


def _index_edit(fn):
    def edit(model: Path):
        path = model / "model.safetensors.index.json"
        data = json.loads(path.read_text())
        path.write_text(json.dumps(fn(data)))
    return edit


def _not_utf8(model: Path):
    path = model / "model.safetensors.index.json"
    path.write_bytes(b"\xff\xfe" + path.read_bytes())


def _wrong_shard(data):
    other = data["weight_map"]["model.norm.weight"]
    data["weight_map"][Q1] = other
    return data


INDEX_DAMAGE = {
    "not UTF-8": (_not_utf8, "not a valid safetensors index"),
    "a JSON list": (_index_edit(lambda d: [d]), "not a valid safetensors index"),
    "weight_map a list": (_index_edit(lambda d: {"weight_map": list(d["weight_map"].items())}), "weight_map"),
    "shard name not a string": (_index_edit(lambda d: {"weight_map": {**d["weight_map"], Q1: 7}}), "7"),
    "shard name empty": (_index_edit(lambda d: {"weight_map": {**d["weight_map"], Q1: ""}}), "''"),
    "absolute shard path": (_index_edit(lambda d: {"weight_map": {**d["weight_map"], Q1: "/etc/passwd"}}),
                            "outside the model folder"),
    "tensor in the wrong shard": (_index_edit(_wrong_shard), Q1),
}


@pytest.mark.parametrize("damage", list(INDEX_DAMAGE))
def test_malformed_index(tiny_model, calib_text, tmp_path, damage):
    model = copy_model(tiny_model, tmp_path / "m")
    fn, needle = INDEX_DAMAGE[damage]
    fn(model)
    _refused(model, tmp_path / "out", calib_text, "model.safetensors.index.json", needle)


@pytest.mark.parametrize("field,value,needle", [
    ("num_hidden_layers", 2, "does not explain: 'model.layers.2."),
    ("num_hidden_layers", 0, "num_hidden_layers is 0"),
    ("num_hidden_layers", -1, "num_hidden_layers is -1"),
    ("hidden_size", -64, "hidden_size is -64"),
    ("num_attention_heads", 0, "config.json"),  # transformers refuses it while reading
    ("rms_norm_eps", -1.0, "rms_norm_eps"),
])
def test_config_must_explain_every_tensor(tiny_model, calib_text, tmp_path, field, value, needle):
    model = copy_model(tiny_model, tmp_path / "m")
    path = model / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    _refused(model, tmp_path / "out", calib_text, needle)
    result = runner.invoke(app, ["plan", str(model), "--nsamples", "4", "--seqlen", "16"])
    if field != "num_hidden_layers" or value <= 0:  # plan reads the config (weights not needed)
        assert result.exit_code == 2 and needle in result.stderr, result.output


def test_rotary_inv_freq_buffers_are_skipped(tiny_model, calib_text, tmp_path):
    """Old checkpoints carry rotary_emb.inv_freq buffers transformers recomputes: accepted, not written."""
    import torch
    from safetensors.torch import save_file

    model = copy_model(tiny_model, tmp_path / "m")
    extra = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.arange(8.0) for i in range(3)}
    save_file(extra, str(model / "model-extra.safetensors"), metadata={"format": "pt"})
    index = model / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"].update({k: "model-extra.safetensors" for k in extra})
    index.write_text(json.dumps(data))
    out = tmp_path / "out"
    code, err = _prune(model, out, calib_text)
    assert code == 0, err
    written = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any("inv_freq" in k for k in written) and len(written) == len(data["weight_map"]) - 3
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0


def _hf_cache(src: Path, hub: Path) -> Path:
    """``src`` laid out as the Hugging Face cache does: snapshot files are symlinks into ../../blobs."""
    repo = hub / "models--org--tiny"
    snap = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        blob = repo / "blobs" / f"blob{i:04d}"
        blob.write_bytes(f.read_bytes())
        os.symlink(os.path.join("..", "..", "blobs", blob.name), snap / f.name)
    return snap


def test_hugging_face_cache_snapshot_is_accepted(tiny_model, calib_text, tmp_path):
    snap = _hf_cache(tiny_model, tmp_path / "hub")
    code, err = _prune(snap, tmp_path / "out", calib_text)
    assert code == 0, err
    plain_out = tmp_path / "plain"
    assert _prune(tiny_model, plain_out, calib_text)[0] == 0
    for shard in sorted(p.name for p in plain_out.glob("*.safetensors")):
        assert (tmp_path / "out" / shard).read_bytes() == (plain_out / shard).read_bytes()


def test_symlink_out_of_the_cache_repository_is_refused(tiny_model, calib_text, tmp_path):
    snap = _hf_cache(tiny_model, tmp_path / "hub")
    shard = shard_of(snap, Q1)
    elsewhere = tmp_path / "elsewhere.safetensors"
    elsewhere.write_bytes(shard.read_bytes())
    shard.unlink()
    os.symlink(elsewhere, shard)
    _refused(snap, tmp_path / "out", calib_text, "outside the model folder", shard.name)


@pytest.mark.parametrize("suffix,body", [
    (".txt", b"plain words \xff\xfe more words " * 50),
    (".jsonl", b'{"text": "caf\xe9 au lait"}\n' * 50),
    ("dir", b"latin-1 caf\xe9 " * 50),
])
def test_calibration_text_that_is_not_utf8(tiny_model, tmp_path, suffix, body):
    if suffix == "dir":
        calib = tmp_path / "texts"
        calib.mkdir()
        (calib / "a.txt").write_text("fine text " * 50)
        bad = calib / "b.txt"
    else:
        calib = bad = tmp_path / f"calib{suffix}"
    bad.write_bytes(body)
    err = _refused(tiny_model, tmp_path / "out", calib, "is not UTF-8", bad.name)
    assert not (tmp_path / "out").exists()
    assert "offset" in err


def test_non_finite_statistics_are_refused_naming_the_linear(tiny_model, calib_text, tmp_path):
    """Huge (finite) q/k weights overflow the attention logits: the o_proj inputs hold NaN, so every Wanda score
    of that linear would be NaN and the mask arbitrary. Refused, naming the linear; magnitude needs no statistic."""
    from tests.faults import edit_tensor

    model = copy_model(tiny_model, tmp_path / "m")
    for name in (Q1, Q1.replace("q_proj", "k_proj")):
        edit_tensor(model, name, lambda t: t * 1e20)
    result = runner.invoke(app, cli_args(model, tmp_path / "out", calib_text, method="wanda"))
    assert result.exit_code == 2, result.output
    assert "model.layers.1.self_attn.o_proj.weight: its scaler_row statistic holds NaN/Inf" in result.stderr
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
