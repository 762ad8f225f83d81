"""I/O overlap: wall time of ``prune --method wanda`` with and without block prefetch, same model, one run.

Small calibration windows so that reading each block is a visible share of the time. Before every
run the page cache of the checkpoint shards is dropped with ``posix_fadvise(POSIX_FADV_DONTNEED)``
(works without root for clean pages; no global ``drop_caches``), so each run reads the shards from
the disk again. Runs alternate (on, off, off, on, ...) so drift in a shared machine hits both sides.
Outputs of the two modes are checked byte-identical.

    LOWMEM_WIKI_JSON=.../summaries_en-us.json python benchmarks/io_overlap.py \\
        --model /work/main/assets/smollm2-135m --nsamples 4 --seqlen 64 --repeats 2 \\
        --json-out benchmarks/results/io_overlap.json

Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def drop_cache(folder: Path) -> int:
    """posix_fadvise(DONTNEED) on every safetensors file in ``folder``; returns the bytes advised."""
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd) if os.access(path, os.W_OK) else None
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def shard_digest(out: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(out.glob("model-*.safetensors")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="/work/main/assets/smollm2-135m")
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="runs per mode")
    ap.add_argument("--work", default=None, help="folder for outputs (default: a temporary one)")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--calib-ids", default=None, help="windows file (for a model without a tokenizer)")
    ap.add_argument("--dtype", default="auto", help="compute dtype (auto: fp32 on the CPU)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch
    from transformers import AutoTokenizer

    from lowmem_gblm.calib.data import calibration_windows, save_ids
    from lowmem_gblm.config import CalibConfig, PruneConfig
    from lowmem_gblm.engine import prune

    model = Path(args.model)
    work = Path(args.work or tempfile.mkdtemp(prefix="io_overlap-"))
    work.mkdir(parents=True, exist_ok=True)
    ids_file = Path(args.calib_ids) if args.calib_ids else work / "calib_ids.safetensors"
    if not args.calib_ids:
        tok = AutoTokenizer.from_pretrained(str(model))
        save_ids(ids_file, calibration_windows(tok, "wiki-offline:calib", args.nsamples, args.seqlen, 0))
    calib = CalibConfig(ids_file=str(ids_file), nsamples=args.nsamples, seqlen=args.seqlen)

    order = []
    for r in range(args.repeats):
        order += [True, False] if r % 2 == 0 else [False, True]
    runs, digests = [], {}
    for k, prefetch in enumerate(order):
        out = work / f"out-{k}"
        shutil.rmtree(out, ignore_errors=True)
        advised = drop_cache(model)
        t0 = time.perf_counter()
        report = prune(PruneConfig(model_dir=str(model), out_dir=str(out), calib=calib, method="wanda",
                                   sparsity=0.5, device="cpu", dtype=args.dtype, prefetch=prefetch,
                                   progress=False))
        wall = time.perf_counter() - t0
        sweep = next(p for p in report["phases"] if p["phase"] == "prune_sweep") if report["phases"] else {}
        digests.setdefault(prefetch, set()).add(shard_digest(out))
        runs.append({"prefetch": prefetch, "wall_s": wall, "prune_sweep_s": sweep.get("seconds"),
                     "peak_rss_bytes": sweep.get("peak_rss_bytes"), "cache_dropped_bytes": advised})
        print(f"run {k}: prefetch={'on ' if prefetch else 'off'} wall {wall:7.2f} s, "
              f"prune sweep {sweep.get('seconds', float('nan')):7.2f} s", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    identical = len(digests[True] | digests[False]) == 1

    def summary(flag: bool) -> dict:
        walls = [r["wall_s"] for r in runs if r["prefetch"] is flag]
        sweeps = [r["prune_sweep_s"] for r in runs if r["prefetch"] is flag]
        return {"wall_s_median": statistics.median(walls), "wall_s": walls,
                "prune_sweep_s_median": statistics.median(sweeps),
                "peak_rss_bytes_max": max(r["peak_rss_bytes"] or 0 for r in runs if r["prefetch"] is flag)}

    on, off = summary(True), summary(False)
    print()
    print(f"{'prefetch':9} {'wall median s':>14} {'sweep median s':>15} {'peak RSS MiB':>13}")
    for name, s in (("on", on), ("off", off)):
        print(f"{name:9} {s['wall_s_median']:14.2f} {s['prune_sweep_s_median']:15.2f} "
              f"{s['peak_rss_bytes_max'] / 2**20:13.0f}")
    speedup = off["wall_s_median"] / on["wall_s_median"]
    print(f"speedup (off / on, wall): {speedup:.3f}x; outputs byte-identical: {identical}")
    result = {"benchmark": "io_overlap", "model": str(model), "method": "wanda", "sparsity": 0.5,
              "nsamples": args.nsamples, "seqlen": args.seqlen, "repeats": args.repeats, "device": "cpu",
              "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
              "cache_drop": "posix_fadvise(POSIX_FADV_DONTNEED) on the input shards before each run",
              "prefetch_on": on, "prefetch_off": off, "speedup_wall": speedup, "outputs_identical": identical,
              "runs": runs}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
