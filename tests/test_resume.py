"""Kill a real `lowmem-gblm prune` process with SIGKILL mid-run, resume it, demand identical bytes."""

import json
import logging
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from lowmem_gblm import testing_hooks
from tests.faults import cli_args, diff_trees
from tests.tiny import make_tiny_llama

CLI = [sys.executable, "-m", "cli.main", "prune"]
ROOT = Path(__file__).resolve().parents[1]


def tree_bytes(out: Path) -> dict:
    """Every file of OUT_DIR except the timing report and the lock's pid."""
    skip = {"prune_report.json", "lock"}
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name not in skip)
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


def cli(model, out, calib, extra=(), crash=None):
    env = dict(os.environ)
    env.pop("LOWMEM_TEST_CRASH_AT", None)
    if crash:
        env["LOWMEM_TEST_CRASH_AT"] = crash
    args = [*CLI, str(model), str(out), "--calib", str(calib), "--nsamples", "4", "--seqlen", "24", "-q", *extra]
    return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def model5(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("m5") / "model", layers=5, seed=3)


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_sigkill_then_resume_is_byte_identical(model5, calib_text, tmp_path, offload):
    extra = ["--method", "wanda", "--sparsity", "0.5", "--offload", offload]
    ref = tmp_path / "ref"
    assert cli(model5, ref, calib_text, extra).returncode == 0
    rng = random.Random(1234 + len(offload))
    out = tmp_path / "out"
    # K-th block written by that process: first kill somewhere in blocks 1-3, then once more right away
    points = ["manifest", "block_done"]
    kills = [f"{rng.choice(points)}:{rng.randint(1, 3)}", f"{rng.choice(points)}:1"]
    for point in kills:
        r = cli(model5, out, calib_text, extra, crash=point)
        assert r.returncode == -signal.SIGKILL, (point, r.stderr)
        assert not (out / "model.safetensors.index.json").exists()  # an interrupted run never looks complete
    r = cli(model5, out, calib_text, extra)
    assert r.returncode == 0, r.stderr
    assert tree_bytes(out) == tree_bytes(ref)


def test_kill_at_a_random_moment(model5, calib_text, tmp_path):
    """SIGKILL from outside after a random delay, repeatedly, until the run completes."""
    extra = ["--method", "wanda", "--sparsity", "0.5"]
    ref = tmp_path / "ref"
    assert cli(model5, ref, calib_text, extra).returncode == 0
    out = tmp_path / "out"
    rng = random.Random(7)
    env = {k: v for k, v in os.environ.items() if k != "LOWMEM_TEST_CRASH_AT"}
    args = [*CLI, str(model5), str(out), "--calib", str(calib_text), "--nsamples", "4", "--seqlen", "24", "-q", *extra]
    for _ in range(3):
        proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(2.0, 6.0))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert cli(model5, out, calib_text, extra).returncode == 0
    assert tree_bytes(out) == tree_bytes(ref)


def test_a_finished_shard_changed_before_the_resume_is_redone(tiny_model, calib_text, pruned, tmp_path, monkeypatch,
                                                             caplog):
    """Same size, other bytes: the resume hashes each replayed shard as it reads it, finds the change and redoes
    that block from the input model, so the damage never reaches later blocks; the output is the clean one."""
    runner = CliRunner()
    out = tmp_path / "out"
    testing_hooks.reset()
    monkeypatch.setenv(testing_hooks.ENOSPC_ENV, "shard_write:5")  # blocks 0 and 1 written; block 2 fails
    assert runner.invoke(app, cli_args(tiny_model, out, calib_text)).exit_code == 2
    monkeypatch.delenv(testing_hooks.ENOSPC_ENV)
    manifest = json.loads((out / ".lowmem" / "manifest.json").read_text())
    shard = out / manifest["done"]["block.0"]["file"]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x40  # a weight byte flipped: same size, header intact
    shard.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="lowmem_gblm"):
        result = runner.invoke(app, cli_args(tiny_model, out, calib_text))
    assert result.exit_code == 0, result.output
    assert f"{shard.name} changed since this run wrote it" in caplog.text and "redoing block 0" in caplog.text
    assert diff_trees(out, pruned) == []
