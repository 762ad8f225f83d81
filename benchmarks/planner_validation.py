"""Planner vs measurement: predicted host peak (CLI ``plan`` and the engine's own plan check) against the
peak RSS each phase measured, for real CPU runs; ends with one JSON line.

    LOWMEM_WIKI_JSON=.../summaries_en-us.json python benchmarks/planner_validation.py \
        --smollm2 /path/smollm2-135m --nsamples 8 --seqlen 256

Each run is a fresh ``lowmem-gblm prune`` process on CPU with --offload cpu and --calib-ids (a file of
windows, so no tokenizer is loaded in the measured process). The tiny model is built here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

MiB = 2**20


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, check=False)


def case(name: str, model: Path, ids: Path, method: str, n: int, t: int, work: Path) -> list[dict]:
    res = cli("plan", str(model), "--method", method, "--nsamples", str(n), "--seqlen", str(t), "--offload", "cpu",
              "--json")
    assert res.returncode == 0, res.stderr
    planned = {p["name"]: p["host_peak_bytes"] for p in json.loads(res.stdout)["phases"]}
    out = work / f"{name}-{method}"
    cmd = ["prune", str(model), str(out), "--method", method, "--calib-ids", str(ids), "--nsamples", str(n),
           "--seqlen", str(t), "--device", "cpu", "--offload", "cpu", "-q"]
    res = cli(*cmd)
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "prune_report.json").read_text())
    engine = {p["phase"]: p["host_peak_bytes"] for p in report["predicted"]["phases"]}
    rows = []
    for p in report["phases"]:
        m = p["peak_rss_bytes"]
        rows.append({"case": name, "method": method, "windows": f"{n}x{t}", "phase": p["phase"],
                     "plan_cli_mib": round(planned[p["phase"]] / MiB, 1),
                     "plan_engine_mib": round(engine[p["phase"]] / MiB, 1),
                     "measured_mib": round(m / MiB, 1), "err_cli": round(planned[p["phase"]] / m - 1, 3),
                     "err_engine": round(engine[p["phase"]] / m - 1, 3), "command": "lowmem-gblm " + " ".join(cmd)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm2", type=Path, default=None)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--methods", nargs="+", default=["gblm", "wanda"])
    ap.add_argument("--skip-tiny", action="store_true")
    a = ap.parse_args()
    from lowmem_gblm.calib.data import save_ids

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not a.skip_tiny:
            from tests.tiny import make_tiny_llama

            n, t = 64, 256
            model = make_tiny_llama(work / "tiny", layers=2, hidden=512, heads=8, kv_heads=4, inter=1376, vocab=320,
                                    max_pos=t, shard_size="4MB", tokenizer=False)
            ids = work / "tiny_ids.safetensors"
            save_ids(ids, torch.randint(320, (n, t), generator=torch.Generator().manual_seed(0)))
            for method in a.methods:
                rows += case("tiny(2x512,V320)", model, ids, method, n, t, work)
        if a.smollm2:
            from lowmem_gblm.calib.data import resolve_windows
            from lowmem_gblm.config import CalibConfig

            calib = CalibConfig(source="wiki-offline:calib", nsamples=a.nsamples, seqlen=a.seqlen)
            ids = work / "smol_ids.safetensors"
            save_ids(ids, resolve_windows(calib, a.smollm2, 49152, 8192))
            for method in a.methods:
                rows += case("SmolLM2-135M", a.smollm2, ids, method, a.nsamples, a.seqlen, work)
    print(f"{'case':<18}{'method':<7}{'windows':<9}{'phase':<16}{'plan CLI':>10}{'plan engine':>12}{'measured':>10}"
          f"{'err CLI':>9}{'err eng':>9}")
    for r in rows:
        print(f"{r['case']:<18}{r['method']:<7}{r['windows']:<9}{r['phase']:<16}{r['plan_cli_mib']:>10}"
              f"{r['plan_engine_mib']:>12}{r['measured_mib']:>10}{r['err_cli']:>9.1%}{r['err_engine']:>9.1%}")
    print(json.dumps({"benchmark": "planner_validation", "rows": rows}))


if __name__ == "__main__":
    main()
