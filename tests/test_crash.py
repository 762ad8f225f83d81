"""A reduced crash campaign: SIGKILL `lowmem-gblm prune` mid shard write, between a shard's rename and
its manifest entry, and between the report and the index; resume; the output must match an
uninterrupted run byte for byte (benchmarks/crash_campaign.py runs the long version)."""

from __future__ import annotations

import json
import signal

from lowmem_gblm import testing_hooks
from lowmem_gblm.verify import verify
from tests.faults import cli_args, diff_trees, run, spawn

# Counts are per process: a resumed run skips the finished writes, so each kill lands further on.
KILLS = [
    ("shard_write:3", "block.0 shard half-written"),  # ids=1, rest=2, block 0=3
    ("manifest:2", "block.1 shard renamed, not listed"),  # this run: block 0=1, block 1=2
    ("finalize:1", "report written, index not"),
]


def test_sigkill_then_resume_is_byte_identical(tiny_model, calib_text, pruned, tmp_path):
    out = tmp_path / "out"
    for point, _what in KILLS:
        proc = spawn(cli_args(tiny_model, out, calib_text), {testing_hooks.CRASH_ENV: point})
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL, (point, err[-2000:])
        if point.startswith("shard_write"):
            assert list(out.glob(".model-*.tmp-*")), "the kill should leave a half-written temporary file"
        assert not (out / "model.safetensors.index.json").exists()
    done = json.loads((out / ".lowmem" / "manifest.json").read_text())["done"]
    assert set(done) == {"rest", "block.0", "block.1", "block.2"}  # all blocks finished; only finalize was cut
    run(tiny_model, out, calib_text)  # resume to completion
    assert diff_trees(out, pruned) == []
    assert all(c.ok for c in verify(out))
