"""The planner held to measured peaks: every method x update x activation store x family kind, one fresh
``lowmem-gblm prune`` process each (CPU, one thread), its predicted host peak per phase against the peak RSS the
phase measured; prints a table and ends with one JSON line.

    OMP_NUM_THREADS=1 python benchmarks/planner_conformance.py [--only SUBSTRING ...] [--work DIR]

Two predictions per phase, both from the run's own settings: the engine's (``prune_report.json`` "predicted",
planned in the run's process on its RSS at the time) and a re-plan after the fact from the report
(``PlanSettings.of_report``, the settings the engine chose, on the measured ``baseline_rss``), as ``plan`` would
give before the run. Both must be within ``HOST_PEAK_BOUND`` of the measured peak, and the re-plan must choose the
settings the engine chose (nothing in the report's settings is lost on the way).

tests/test_planner.py runs ``CI_CASES`` in CI and the whole ``MATRIX`` with ``-m matrix``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__:  # imported by the tests (benchmarks.planner_conformance)
    from benchmarks._common import REPO, make_tiny_family, make_tiny_llama
else:  # run as a script: its folder is on sys.path
    from _common import REPO, make_tiny_family, make_tiny_llama

from lowmem_gblm.calib.data import save_ids
from lowmem_gblm.memory.plan import HOST_PEAK_BOUND, Budgets, PlanSettings, plan
from lowmem_gblm.memory.probe import baseline_rss
from lowmem_gblm.memory.shape import load_shape

MiB = 2**20
N, T, VOCAB = 16, 128, 320  # calibration windows x tokens (each case a few seconds of sweep at one thread)
# LLaMA-like: 2 blocks of hidden 512 (GQA 8 / 4 heads), so the block terms (weights, statistics, solver buffers,
# accumulators) are a visible share of a peak that python + torch + transformers (~400 MiB) otherwise hold
LLAMA = dict(layers=2, hidden=512, heads=8, kv_heads=4, inter=1376)
MOE = dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=4)  # mixtral, 4 experts
KINDS = ("llama", "mixtral")
METHODS = ("magnitude", "wanda", "sparsegpt", "gblm")
UPDATES = ("none", "obs", "lsq", "gradual")  # score methods only (SparseGPT updates as it prunes)
STORES = ("cpu", "disk")  # --offload
SOLVED = ("lsq", "gradual")  # the updates that run the iterative solver, and for them, time only (its buffers do not
FAST = ("--gradual-steps", "2", "--solver-max-iter", "20")  # depend on the steps or the iteration cap)


@dataclass(frozen=True)
class Case:
    method: str
    update: str = "none"
    store: str = "cpu"
    kind: str = "llama"

    @property
    def id(self) -> str:
        return "-".join([self.method + ("" if self.update == "none" else f"+{self.update}"), self.store, self.kind])

    def flags(self) -> list[str]:
        update = ["--update", self.update] if self.update != "none" else []
        return ["--method", self.method, *update, "--offload", self.store, *(FAST if self.update in SOLVED else ())]


MATRIX = [Case(m, u, s, k) for k in KINDS for s in STORES for m in METHODS
          for u in (("none",) if m == "sparsegpt" else UPDATES)]
# in CI, three cases (~15-30 s each at one thread, most of it the CLI's imports) that run what the earlier test's
# three (wanda, gblm, wanda+lsq on the RAM store) did not: SparseGPT on the disk store, magnitude + OBS, and GBLM's
# gradient sweep with --update gradual (the iterative solver's buffers, as lsq's); the rest with -m matrix
CI_CASES = [Case("sparsegpt", store="disk"), Case("magnitude", "obs"), Case("gblm", "gradual")]

# known findings, not yet fixed: case -> why (tests/test_planner.py marks them xfail)
MOE_GRADIENT_STEP = (
    "gblm gradient sweep on the MoE (gblm-cpu-mixtral measured 623.3 MiB, engine 520.4 / re-plan 516.7, -16.5% / "
    "-17.1%): the probe's MoE block step (memory.probe._experts_bound) counts 46.3 MiB, under the block's own fp32 "
    "expert weights + accumulators (~70 MiB), so predict._gradient_phase takes the accumulator write (70.5 MiB) as "
    "the reverse-walk stage and drops the step and its chunk-sum totals (35.3 MiB)")
KNOWN = {c.id: MOE_GRADIENT_STEP for c in MATRIX if c.method == "gblm" and c.kind == "mixtral"}


def make_model(kind: str, root: Path) -> tuple[Path, Path]:
    """The checkpoint of ``kind`` and a file of N x T calibration ids, built once under ``root``."""
    model, ids = root / f"model-{kind}", root / "ids.safetensors"
    if not (model / "config.json").is_file():
        if kind == "llama":
            make_tiny_llama(model, **LLAMA, vocab=VOCAB, max_pos=T, shard_size="4MB", tokenizer=False)
        else:
            make_tiny_family(model, kind, layers=2, vocab=VOCAB, shard_size="4MB", sizes=MOE)
    if not ids.is_file():
        save_ids(ids, torch.randint(VOCAB, (N, T), generator=torch.Generator().manual_seed(0)))
    return model, ids


def prune(case: Case, model: Path, ids: Path, out: Path) -> dict:
    """The case's prune run in a fresh one-thread process; its report."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "cli.main", "prune", str(model), str(out), *case.flags(), "--calib-ids", str(ids),
           "--nsamples", str(N), "--seqlen", str(T), "--device", "cpu", "-q"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"{case.id}: exit {res.returncode}\n{res.stderr[-4000:]}")
    return json.loads((out / "prune_report.json").read_text())


def conform(case: Case, model: Path, ids: Path, out: Path) -> dict:
    """Run ``case`` and compare: one row per measured phase (predicted and measured bytes, ratios, the re-plan's
    host terms), the settings where the re-plan and the run differ, and how many linears were counted analytically."""
    t0 = time.perf_counter()
    report = prune(case, model, ids, out)
    seconds = time.perf_counter() - t0
    base = baseline_rss()
    replan = plan(load_shape(model), PlanSettings.of_report(report), Budgets(), baseline=base)
    engine = {p["phase"]: p["host_peak_bytes"] for p in report["predicted"]["phases"]}
    phases = []
    for measured in report["phases"]:
        name, rss = measured["phase"], measured["peak_rss_bytes"]
        q = replan.phase(name)
        phases.append({"phase": name, "measured": rss, "engine": engine[name], "replan": q.host_peak_bytes,
                       "engine_ratio": engine[name] / rss, "replan_ratio": q.host_peak_bytes / rss,
                       # the share of the peak the run itself adds (what a forgotten term would be missing from)
                       "above_baseline_ratio": (q.host_peak_bytes - base) / max(rss - base, 1),
                       "terms": q.terms["host"], "seconds": measured["seconds"]})
    ran, again = report["predicted"]["settings"], replan.settings.as_dict()
    # disk_dir: where the plan was told a disk store goes (the run: OUT_DIR), a budget rather than a setting
    differ = {k: (again.get(k), ran.get(k)) for k in sorted((set(again) | set(ran)) - {"disk_dir"})
              if again.get(k) != ran.get(k)}
    return {"case": case.id, "seconds": seconds, "baseline": base, "phases": phases, "settings_differ": differ,
            # linears the probe could not run on fake tensors (data-dependent steps: SparseGPT's, OBS's) and counted
            # analytically: reported, not a failure (the bound holds the analytic count too)
            "analytic": sum(" prune of " in n for n in replan.notes)}


def problems(row: dict, bound: float = HOST_PEAK_BOUND) -> list[str]:
    """What breaks the plan's promise in ``row`` (empty: conforms)."""
    out = [f"re-plan settings (re-plan, run) differ: {row['settings_differ']}"] if row["settings_differ"] else []
    for p in row["phases"]:
        for who in ("engine", "replan"):
            if abs(p[f"{who}_ratio"] - 1) > bound:
                out.append(f"{p['phase']}: {who} predicted {p[who] / MiB:.1f} MiB, measured {p['measured'] / MiB:.1f} "
                           f"MiB ({p[f'{who}_ratio'] - 1:+.1%}, bound {bound:.0%}); terms (MiB): "
                           + ", ".join(f"{k} {v / MiB:.1f}" for k, v in p["terms"].items()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=[], help="cases whose id contains one of these (default: all)")
    ap.add_argument("--work", type=Path, default=None, help="folder for models and outputs (default: a temp dir)")
    args = ap.parse_args()
    cases = [c for c in MATRIX if not args.only or any(s in c.id for s in args.only)]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        print(f"{'case':<28}{'phase':<16}{'measured':>10}{'engine':>10}{'ratio':>8}{'replan':>10}{'ratio':>8}"
              f"{'run-only':>10}{'s':>7}{'analytic':>9}  (MiB; bound {HOST_PEAK_BOUND:.0%})", flush=True)
        for case in cases:
            model, ids = make_model(case.kind, work)
            row = conform(case, model, ids, work / f"out-{case.id}")
            row["problems"] = problems(row)
            rows.append(row)
            for p in row["phases"]:
                print(f"{case.id:<28}{p['phase']:<16}{p['measured'] / MiB:>10.1f}{p['engine'] / MiB:>10.1f}"
                      f"{p['engine_ratio']:>8.3f}{p['replan'] / MiB:>10.1f}{p['replan_ratio']:>8.3f}"
                      f"{p['above_baseline_ratio']:>10.3f}{row['seconds']:>7.1f}{row['analytic']:>9}", flush=True)
            for line in row["problems"]:
                print(f"  OUT OF BOUND {case.id}: {line}", flush=True)
    worst = max((abs(p[f"{w}_ratio"] - 1) for r in rows for p in r["phases"] for w in ("engine", "replan")),
                default=0.0)
    print(json.dumps({"benchmark": "planner_conformance", "bound": HOST_PEAK_BOUND, "windows": [N, T],
                      "threads": 1, "cases": len(rows), "failed": [r["case"] for r in rows if r["problems"]],
                      "worst_error": round(worst, 4),
                      "rows": [{"case": r["case"], "seconds": round(r["seconds"], 1),
                                "phases": {p["phase"]: {"measured_mib": round(p["measured"] / MiB, 1),
                                                        "engine_ratio": round(p["engine_ratio"], 4),
                                                        "replan_ratio": round(p["replan_ratio"], 4)}
                                           for p in r["phases"]}} for r in rows]}))


if __name__ == "__main__":
    main()
