"""Disk full mid-write and two runs on one OUT_DIR."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from cli.main import app
from lowmem_gblm import testing_hooks
from lowmem_gblm.errors import InputError
from tests.faults import REPO, cli_args, diff_trees, run

runner = CliRunner()


# ids=1, rest=2, block0=3 shard writes; manifest writes: new=1, rest=2, block0=3, block1=4;
# plain writes: 4 side files then prune_report.json (5) and the index (6)
@pytest.mark.parametrize("point", ["shard_write:3", "manifest_write:4", "write:6"])
def test_disk_full_stops_cleanly_and_resumes(tiny_model, calib_text, pruned, tmp_path, monkeypatch, point):
    out = tmp_path / "out"
    testing_hooks.reset()
    monkeypatch.setenv(testing_hooks.ENOSPC_ENV, point)  # half the bytes written, then ENOSPC
    result = runner.invoke(app, cli_args(tiny_model, out, calib_text))
    assert result.exit_code == 2 and "no space left on the device while writing" in result.stderr
    assert "run the same command again" in result.stderr
    leftovers = [p.name for p in out.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []  # no half-written file anywhere
    manifest = json.loads((out / ".lowmem" / "manifest.json").read_text())
    for entry in manifest["done"].values():  # everything listed is whole
        assert (out / entry["file"]).stat().st_size == entry["size"]
    assert not (out / "model.safetensors.index.json").exists()
    monkeypatch.delenv(testing_hooks.ENOSPC_ENV)
    result = runner.invoke(app, cli_args(tiny_model, out, calib_text))  # space freed: same command resumes
    assert result.exit_code == 0, result.stderr
    assert diff_trees(out, pruned) == []


HOLD = """
import sys, time
from pathlib import Path
from lowmem_gblm.io.runstate import OutputLock
with OutputLock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_second_run_refuses_and_killed_run_leaves_no_lock(tiny_model, calib_text, pruned, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.perf_counter()
        with pytest.raises(InputError, match=rf"another lowmem-gblm run \(pid {holder.pid}\)"):
            run(tiny_model, out, calib_text)
        assert time.perf_counter() - t0 < 10  # refuses at once, does not wait for the lock
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    run(tiny_model, out, calib_text)  # the kernel dropped the dead holder's flock
    assert diff_trees(out, pruned) == []


def _disk_bytes(out) -> int:
    return json.loads((out / "prune_report.json").read_text())["predicted"]["phases"][0]["disk_bytes"]


def test_rerun_after_disk_full_counts_only_what_is_left_to_write(tiny_model, calib_text, pruned, tmp_path,
                                                                 monkeypatch):
    """The disk check of a resumed run credits the shards already written: a disk that holds the whole output
    but not twice what was written before the failure lets the same command finish."""
    need = _disk_bytes(pruned)
    out = tmp_path / "out"
    testing_hooks.reset()
    monkeypatch.setenv(testing_hooks.ENOSPC_ENV, "shard_write:4")  # ids, rest, block 0 written; block 1 fails
    assert runner.invoke(app, cli_args(tiny_model, out, calib_text)).exit_code == 2
    monkeypatch.delenv(testing_hooks.ENOSPC_ENV)
    manifest = json.loads((out / ".lowmem" / "manifest.json").read_text())
    written = sum((out / e["file"]).stat().st_size for e in manifest["done"].values())
    assert written > need // 4
    free = need - written + 1024  # what the disk has left: enough for the rest, not for the whole output
    short = runner.invoke(app, [*cli_args(tiny_model, out, calib_text), "--disk-space", str(free - 4096)])
    assert short.exit_code == 2 and "disk" in short.stderr  # the check still refuses a disk that is too small
    result = runner.invoke(app, [*cli_args(tiny_model, out, calib_text), "--disk-space", str(free)])
    assert result.exit_code == 0, result.stderr
    assert diff_trees(out, pruned) == []


@pytest.mark.parametrize("method", ["wanda", "gblm"])
def test_disk_full_removes_the_activation_store(tiny_model, calib_text, tmp_path, monkeypatch, method):
    """The disk store is scratch a resume rebuilds: after a failed write it does not keep the full disk full."""
    out = tmp_path / "out"
    testing_hooks.reset()
    monkeypatch.setenv(testing_hooks.ENOSPC_ENV, "shard_write:4")
    result = runner.invoke(app, cli_args(tiny_model, out, calib_text, method=method, offload="disk"))
    assert result.exit_code == 2 and "no space left" in result.stderr, result.output
    assert (out / ".lowmem" / "manifest.json").is_file()
    stores = [p for p in out.rglob("*") if p.suffix == ".npy"]
    assert stores == []


def test_disk_full_while_writing_the_lock(tiny_model, calib_text, tmp_path, monkeypatch):
    out = tmp_path / "out"
    testing_hooks.reset()
    monkeypatch.setenv(testing_hooks.ENOSPC_ENV, "lock_write:1")
    result = runner.invoke(app, cli_args(tiny_model, out, calib_text))
    assert result.exit_code == 2 and "no space left on the device for the lock file" in result.stderr, result.output
    monkeypatch.delenv(testing_hooks.ENOSPC_ENV)
    assert runner.invoke(app, cli_args(tiny_model, out, calib_text)).exit_code == 0  # the lock was released
