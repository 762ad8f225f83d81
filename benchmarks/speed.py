"""Speed side by side: the streamed GBLM run at several --batch-size values against the published in-memory
recipe, same model, windows, dtype and threads, in one run.

    LOWMEM_WIKI_JSON=.../summaries_en-us.json \\
    python benchmarks/speed.py --model assets/smollm2-135m --nsamples 32 --seqlen 512 --batches 1 4 8 16

Each case runs in its own subprocess (separate RSS): ``in-memory`` is benchmarks/peak_memory.py's baseline
(whole model, ``loss.backward()`` per window, then layer-by-layer Wanda/GBLM pruning with everything in
memory); ``streamed B`` is ``lowmem-gblm prune --method gblm --batch-size B --offload OFFLOAD``. Per streamed
case: the gradient and prune sweeps' seconds and, from prune_report.json's per-phase ``work``, their matmul
FLOPs and the fraction of this machine's measured matmul peak (lowmem_gblm.memory.matmul_peak.measured_peak,
refreshed once at the start so a busy cache entry is not used). Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from peak_memory import calibration_file, child_env, gib, mask_agreement, run_baseline, run_child

ROOT = Path(__file__).resolve().parents[1]


def run_streamed(model: Path, ids: Path, work: Path, a, batch: int) -> dict:
    out = work / f"streamed-b{batch}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "cli.main", "prune", str(model), str(out), "--method", "gblm",
           "--calib-ids", str(ids), "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen),
           "--device", a.device, "--dtype", "float32", "--alpha", str(a.alpha), "--sparsity", str(a.sparsity),
           "--offload", a.offload, "--batch-size", str(batch), "--quiet",
           "--chunk-windows", str(a.nsamples)]  # one chunk: calls of B windows (a call never crosses a chunk)
    wall, maxrss = run_child(cmd, child_env(a.threads), work / f"streamed-b{batch}.log")
    report = json.loads((out / "prune_report.json").read_text())
    phases = {p["phase"]: p for p in report["phases"]}
    detail = {}
    for name, p in phases.items():
        w = p.get("work") or {}
        detail[name] = {"seconds": p["seconds"], "peak_rss_bytes": p["peak_rss_bytes"],
                        "peak_rss_anon_bytes": p.get("peak_rss_anon_bytes"),
                        "peak_rss_file_bytes": p.get("peak_rss_file_bytes"),
                        "tflop": (w.get("flops") or 0) / 1e12, "fraction_of_peak": w.get("fraction_of_peak")}
    return {"approach": f"streamed B={batch}", "batch": batch, "wall_s": wall, "work_s": report["seconds_total"],
            "peak_rss_bytes": max(p["peak_rss_bytes"] for p in phases.values()), "ru_maxrss_bytes": maxrss,
            "detail": detail, "out": str(out)}


def _pct(x) -> str:
    return "-" if x is None else f"{x:.0%}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "assets/smollm2-135m"))
    p.add_argument("--work", default="/tmp/lowmem-speedbench")
    p.add_argument("--calib", default="wiki-offline:calib")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--offload", default="disk", help="the streamed runs' activation store: cpu | disk")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--alpha", type=float, default=100.0)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--no-baseline", action="store_true", help="skip the in-memory recipe")
    p.add_argument("--out-json", help="also write the result here")
    a = p.parse_args()
    model, work = Path(a.model), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ids = calibration_file(model, work, a)

    import torch

    from lowmem_gblm.memory.matmul_peak import measured_peak

    torch.set_num_threads(a.threads)
    peak = measured_peak(torch.device(a.device), torch.float32, refresh=True)
    t_start = time.perf_counter()
    rows = []
    if not a.no_baseline:
        base = run_baseline(model, ids, work, a)
        mask_file = base.pop("mask_file")
        rows.append(base)
        print(f"  in-memory: {base['wall_s']:.1f} s, peak {gib(base['peak_rss_bytes'])}", file=sys.stderr, flush=True)
    for batch in a.batches:
        r = run_streamed(model, ids, work, a, batch)
        if not a.no_baseline:
            r["mask_agreement"] = mask_agreement(mask_file, r["out"])["agree"]
        shutil.rmtree(r.pop("out"), ignore_errors=True)
        rows.append(r)
        print(f"  {r['approach']}: {r['wall_s']:.1f} s, peak {gib(r['peak_rss_bytes'])}", file=sys.stderr, flush=True)

    base = rows[0] if not a.no_baseline else None
    print(f"\nGBLM (l1, alpha {a.alpha}, {a.sparsity:.0%}), {a.nsamples} windows x {a.seqlen} tokens from {a.calib}, "
          f"fp32, {a.threads} threads, device {a.device}, streamed store {a.offload}; measured matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s; {platform.machine()} {os.cpu_count()} CPUs")
    print(f"{'approach':<15}{'wall s':>8}{'peak RSS':>11}{'grad s':>8}{'grad %pk':>9}{'prune s':>9}{'prune %pk':>10}"
          f"{'wall ratio':>11}{'RSS ratio':>10}{'masks agree':>12}")
    for r in rows:
        d = r.get("detail", {})
        g, pr = d.get("gradient_sweep", {}), d.get("prune_sweep", {})
        ratio = "" if base is None or r is base else (f"{r['wall_s'] / base['wall_s']:>10.2f}x"
                                                      f"{r['peak_rss_bytes'] / base['peak_rss_bytes']:>9.2f}x"
                                                      f"{r.get('mask_agreement', 0):>12.6f}")
        grad_s = g.get("seconds", d.get("gradients", {}).get("seconds"))
        prune_s = pr.get("seconds", d.get("prune", {}).get("seconds"))
        print(f"{r['approach']:<15}{r['wall_s']:>8.1f}{gib(r['peak_rss_bytes']):>11}"
              f"{grad_s if grad_s is None else round(grad_s, 1)!s:>8}{_pct(g.get('fraction_of_peak')):>9}"
              f"{prune_s if prune_s is None else round(prune_s, 1)!s:>9}{_pct(pr.get('fraction_of_peak')):>10}{ratio}")
    result = {"benchmark": "speed", "nsamples": a.nsamples, "seqlen": a.seqlen, "calib": a.calib, "threads": a.threads,
              "device": a.device, "offload": a.offload, "peak_flops_per_s": peak, "machine": platform.machine(),
              "cpu_count": os.cpu_count(), "seconds_total": time.perf_counter() - t_start, "rows": rows}
    if a.out_json:
        Path(a.out_json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
