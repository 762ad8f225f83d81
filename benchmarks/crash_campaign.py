"""Crash campaign: SIGKILL `lowmem-gblm prune` on a tiny checkpoint again and again, resume, and
compare the final output byte for byte with an uninterrupted run (every file but prune_report.json).

Kills are deterministic (LOWMEM_TEST_CRASH_AT points: mid shard write, between a shard's rename and
its manifest entry, mid manifest write, between report and index) and random (SIGKILL after a
random sleep). With --method gblm the kills cover both sweeps (gradient and prune).

    python benchmarks/crash_campaign.py --method wanda --offload cpu --kills 8

Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

from _common import cli_args, diff_trees, make_tiny_llama, sample_text, spawn

from lowmem_gblm.testing_hooks import CRASH_ENV

POINTS = ["shard_write:2", "shard_write:3", "shard_write:4", "manifest:1", "manifest:2", "manifest:3",
          "manifest_write:3", "finalize:1", "write:2"]
# GBLM runs the gradient sweep first (its block files are shard writes too, blocks last to first), then
# the prune sweep: with 4 blocks, shard_write 1-4 fall in the gradient sweep and 5-9 in the prune sweep.
GBLM_POINTS = ["gradient_block:1", "gradient_block:2", "gradient_block:3", "shard_write:1", "shard_write:3",
               "shard_write:5", "shard_write:7", "shard_write:9", "manifest:1", "manifest:3", "manifest_write:2",
               "finalize:1", "write:3"]


def blocks_done(out: Path) -> str:
    path = out / ".lowmem" / "manifest.json"
    if not path.is_file():
        return "-"
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return "torn!"  # must never happen: the manifest is replaced atomically
    n = sum(k.startswith("block.") for k in data["done"])
    return f"{n}{'+done' if data.get('complete') else ''}"


def attempt(args: list[str], point: str | None, sleep_s: float | None) -> tuple[int, float]:
    t0 = time.perf_counter()
    proc = spawn(args, {CRASH_ENV: point} if point else None)
    if sleep_s is not None:
        try:
            proc.wait(timeout=sleep_s)
        except Exception:
            proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=600)
    return proc.returncode, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="wanda", choices=["magnitude", "wanda", "sparsegpt", "gblm"])
    ap.add_argument("--offload", default="cpu", choices=["cpu", "disk"])
    ap.add_argument("--kills", type=int, default=8,
                    help="kill attempts in all; each OUT_DIR is killed until a run completes, then compared")
    ap.add_argument("--random-share", type=float, default=0.5, help="fraction of kills that are random sleeps")
    ap.add_argument("--points", default=None, help="deterministic kill points to draw from (default: per method)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="keep files here (default: a temporary folder)")
    opts = ap.parse_args()
    rng = random.Random(opts.seed)
    default = GBLM_POINTS if opts.method == "gblm" else POINTS
    points = [p for p in (opts.points.split(",") if opts.points else default) if p]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(opts.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = make_tiny_llama(work / "model", layers=opts.layers)
        calib = work / "calib.txt"
        calib.write_text(sample_text(6000, seed=2))

        def args(out: Path) -> list[str]:
            return cli_args(model, out, calib, method=opts.method, offload=opts.offload)

        rc, t_ref = attempt(args(work / "ref"), None, None)
        assert rc == 0, "the uninterrupted reference run failed"
        print(f"reference run: {t_ref:.1f} s ({opts.method}, offload {opts.offload}, {opts.layers} blocks)")
        print(f"{'trial':>5} {'try':>3}  {'kill':<22} {'rc':>4}  {'outcome':<9} {'blocks':>7}  {'s':>5}")
        rows, identical, verify_ok, landed = [], [], [], 0
        from lowmem_gblm.verify import verify

        def close_trial(trial: int, out: Path) -> None:
            """Resume to completion (if needed), then compare with the reference and verify."""
            rc, secs = attempt(args(out), None, None)
            print(f"{trial:>5} {'-':>3}  {'resume':<22} {rc:>4}  {'finished' if rc == 0 else 'ERROR':<9} "
                  f"{blocks_done(out):>7}  {secs:>5.1f}")
            diffs = diff_trees(out, work / "ref") if rc == 0 else ["resume failed"]
            identical.append(not diffs)
            if diffs:
                print(f"      trial {trial}: outputs differ: {', '.join(diffs[:5])}")
            verify_ok.append(rc == 0 and all(c.ok for c in verify(out)))

        # --kills attempts in all; a trial (fresh OUT_DIR) ends when a run completes or at the last kill
        trial, k, out = 0, 0, work / "out0"
        for n in range(opts.kills):
            if rng.random() < opts.random_share:
                point, sleep_s = None, rng.uniform(0.5 * t_ref, 1.05 * t_ref)  # startup is ~half a run
                label = f"random {sleep_s:.1f}s"
            else:
                point, sleep_s = rng.choice(points), None
                label = point
            rc, secs = attempt(args(out), point, sleep_s)
            outcome = {-signal.SIGKILL: "killed", 0: "finished"}.get(rc, "ERROR")
            landed += rc == -signal.SIGKILL
            rows.append({"trial": trial, "kill": label, "rc": rc, "outcome": outcome})
            print(f"{trial:>5} {k:>3}  {label:<22} {rc:>4}  {outcome:<9} {blocks_done(out):>7}  {secs:>5.1f}")
            k += 1
            if blocks_done(out).endswith("+done") or n == opts.kills - 1:
                close_trial(trial, out)
                trial, k, out = trial + 1, 0, work / f"out{trial + 1}"
    result = {
        "kills_tried": len(rows),
        "kills_landed": landed,
        "errors": sum(r["outcome"] == "ERROR" for r in rows),
        "trials": trial,
        "outputs_identical": all(identical),
        "verify_ok": all(verify_ok),
        "method": opts.method,
        "offload": opts.offload,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(result))
    sys.exit(0 if result["outputs_identical"] and result["verify_ok"] and not result["errors"] else 1)


if __name__ == "__main__":
    main()
