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

import torch

ROOT = Path(__file__).resolve().parents[1]

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


def old_head_peak(model: Path, t: int) -> int:
    """Device bytes of the gradient sweep's head as the code was before head_sample (the loop kept the
    previous window's fp32 logits alive while the next ran), on fake tensors, two windows."""
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lowmem_gblm.memory.probe import LiveBytes
    from lowmem_gblm.memory.shape import load_shape

    shape = load_shape(model)
    d, v = shape.hidden, shape.vocab
    with FakeTensorMode(), LiveBytes() as mem:
        norm_cls = shape.family.cls("norm_class")
        with torch.device("meta"):
            norm = norm_cls(d)
        norm.load_state_dict({"weight": torch.empty(d)}, assign=True)
        norm.requires_grad_(False)
        head = torch.empty(v, d)
        labels = torch.zeros(t - 1, dtype=torch.long)
        base = mem.now
        for _ in range(2):  # the old loop body, verbatim
            h = torch.empty(1, t, d).requires_grad_(True)
            with torch.enable_grad():
                logits = F.linear(norm(h), head).to(torch.float32)
                loss = F.cross_entropy(logits[0, :-1], labels)
                loss.backward()
        return mem.peak - base + head.nbytes + norm.weight.nbytes - h.nbytes


def h200_case(model: Path) -> dict:
    from lowmem_gblm.memory.plan import Budgets, PlanSettings, plan
    from lowmem_gblm.memory.probe import cublas_workspace_bytes
    from lowmem_gblm.memory.shape import load_shape

    p = plan(load_shape(model), PlanSettings("gblm", 128, 512, device="cuda", offload="cpu", head_chunk="auto"),
             Budgets.from_options("139GiB", "120GiB")).phase("gradient_sweep")
    old = old_head_peak(model, 512) + 2 * cublas_workspace_bytes()
    return {"device_new_code_mib": round(p.device_peak_bytes / MiB, 1), "device_old_code_mib": round(old / MiB, 1),
            "host_gib": round(p.host_peak_bytes / 2**30, 2), "host_stages": p.terms["host_stages"],
            "device_terms": p.terms["device"], "host_terms": p.terms["host"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm2", type=Path, default=None)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--methods", nargs="+", default=["gblm", "wanda"])
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--h200-case", action="store_true", help="only the 128x512 CUDA prediction (no runs)")
    a = ap.parse_args()
    if a.h200_case:
        print(json.dumps(h200_case(a.smollm2), indent=1))
        return
    from lowmem_gblm.calib.data import save_ids

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not a.skip_tiny:
            from _common import make_tiny_llama

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
