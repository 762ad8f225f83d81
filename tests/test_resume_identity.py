"""What a resume compares: the bytes' causes, not how they were spelled.

Issue 37 case 2: a path option's spelling (relative from another folder, absolute, through a symlink) does not
refuse a resume: the calibration windows' sha256 (and the gradient folder's hashes) are the identity; another file
is still refused. Issue 32 case 3: the CPU thread count per process splits float sums, so it is part of a CPU run's
identity: a job of 2 one-thread ranks killed, then resumed as one process with 2 threads, is refused with one line
naming OMP_NUM_THREADS (resumed with one thread it finishes byte-identical: tests/test_data_parallel.py)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from lowmem_gblm import testing_hooks
from lowmem_gblm.calib.data import save_ids
from lowmem_gblm.config import CalibConfig, PruneConfig
from tests.faults import diff_trees

runner = CliRunner()
MANIFEST = os.path.join(".lowmem", "manifest.json")


def _args(model, out, ids) -> list[str]:
    return ["prune", str(model), str(out), "--method", "wanda", "--calib-ids", str(ids), "--nsamples", "4",
            "--seqlen", "32", "--device", "cpu", "--offload", "cpu", "--quiet"]


def _ids(path, seed: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_ids(path, torch.randint(2, 320, (4, 32), generator=torch.Generator().manual_seed(seed)))
    return path


def test_a_path_option_spelled_otherwise_still_resumes(tiny_model, tmp_path, monkeypatch):
    base, other = tmp_path / "base", tmp_path / "other"
    ids = _ids(base / "calib-0.safetensors", 11)
    other.mkdir()
    (tmp_path / "link.safetensors").symlink_to(ids)
    ref = tmp_path / "ref"
    assert runner.invoke(app, _args(tiny_model, ref, ids)).exit_code == 0
    out = tmp_path / "out"
    # (cwd, spelling, the shard write that fails) of each attempt: the first writes the ids, the rest shard and
    # block 0; the second block 1; the third nothing (it still resumes); the last finishes
    attempts = [(base, "calib-0.safetensors", "shard_write:4"), (other, "../base/calib-0.safetensors", "shard_write:2"),
                (other, str(tmp_path / "link.safetensors"), "shard_write:1"), (tmp_path, str(ids), None)]
    for cwd, spelling, fail in attempts:
        monkeypatch.chdir(cwd)
        testing_hooks.reset()
        last = fail is None
        if not last:
            monkeypatch.setenv(testing_hooks.ENOSPC_ENV, fail)
        result = runner.invoke(app, _args(tiny_model, out, spelling))
        monkeypatch.delenv(testing_hooks.ENOSPC_ENV, raising=False)
        assert result.exit_code == (0 if last else 2), (spelling, result.output)
        assert "other settings" not in result.output
    assert diff_trees(out, ref) == []
    different = _ids(tmp_path / "calib-1.safetensors", 12)  # other windows: still refused
    shutil_out = tmp_path / "out2"
    testing_hooks.reset()
    monkeypatch.setenv(testing_hooks.ENOSPC_ENV, "shard_write:3")
    assert runner.invoke(app, _args(tiny_model, shutil_out, ids)).exit_code == 2
    monkeypatch.delenv(testing_hooks.ENOSPC_ENV)
    result = runner.invoke(app, _args(tiny_model, shutil_out, different))
    assert result.exit_code == 2 and "calibration_sha256" in result.output


def test_an_older_manifest_that_recorded_the_path_still_resumes(tiny_model, tmp_path, monkeypatch):
    """Manifests written before this change hold the path as typed and no thread count: they resume as before."""
    ids = _ids(tmp_path / "calib.safetensors", 11)
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert runner.invoke(app, _args(tiny_model, ref, ids)).exit_code == 0
    testing_hooks.reset()
    monkeypatch.setenv(testing_hooks.ENOSPC_ENV, "shard_write:3")
    assert runner.invoke(app, _args(tiny_model, out, ids)).exit_code == 2
    monkeypatch.delenv(testing_hooks.ENOSPC_ENV)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["identity"]["config"]["calib"] |= {"ids_file": "somewhere/else.safetensors", "source": None}
    manifest["identity"]["config"]["gradients"] = None
    del manifest["identity"]["cpu_threads"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    assert runner.invoke(app, _args(tiny_model, out, ids)).exit_code == 0
    assert diff_trees(out, ref) == [".lowmem/manifest.json"]  # the recorded identity is kept as it was


@pytest.mark.parametrize("field", ["ids_file", "source", "images", "labels_file", "pixels_file", "gradients"])
def test_no_path_option_is_fingerprinted(field, tmp_path):
    def config(path: str) -> dict:
        calib = {"source": "x.txt"} if field in ("ids_file", "source", "gradients") else {}
        calib |= {"images": "imgs"} if field == "labels_file" else {}
        calib |= {field: path} if field != "gradients" else {}
        kw = {"gradients": path, "method": "gblm"} if field == "gradients" else {}
        return PruneConfig(model_dir="m", out_dir="o", calib=CalibConfig(**calib), **kw).fingerprint_dict()

    fingerprint = config("a/b.file")
    assert fingerprint == config(str(tmp_path / "a" / "b.file")) == config("../elsewhere/b.file")
    assert "a/b.file" not in json.dumps(fingerprint)


def test_a_job_resumed_with_another_thread_count_is_refused(tiny_model, calib_text, tmp_path):
    from tests.test_data_parallel import _launch

    def cli(out):
        return ["-m", "lowmem_gblm", "prune", str(tiny_model), str(out), "--method", "sparsegpt", "--calib",
                str(calib_text), "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--offload", "cpu",
                "--chunk-windows", "1", "--quiet"]

    out = tmp_path / "out"
    killed = _launch(2, cli(out), LOWMEM_TEST_CRASH_AT="block_done:2", LOWMEM_TEST_RANK="0")
    assert killed.returncode != 0 and not (out / "model.safetensors.index.json").exists()
    refused = _launch(1, cli(out), OMP_NUM_THREADS="2")
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    assert "cpu_threads: 1 -> 2" in lines[0] and "OMP_NUM_THREADS" in lines[0]
    # resumed with one thread per process it finishes byte-identical: test_data_parallel's killed-job tests
