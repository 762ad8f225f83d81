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
