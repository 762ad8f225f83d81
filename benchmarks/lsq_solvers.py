"""The exact update's cost at LLaMA-13B linear shapes: SparseGPT, the iterative lsq solver and the direct one.

    python benchmarks/lsq_solvers.py                      # 13B shapes, 8 windows x 2048 tokens, this CPU
    python benchmarks/lsq_solvers.py --shapes 1024x1024 --tokens 4096 --direct-rows 64   # a quick look

Per distinct input width n a Hessian H = (2/T) sum X^T X is accumulated window by window from synthetic
correlated inputs (a mixing matrix with a decaying spectrum, log-normal feature scales and a few outlier
features 30x larger, as LLM activations have). Per linear [out, n] (random weights, 50% unstructured keep-mask
from the Wanda score |W| sqrt(diag H)) it times, on one device, one after another:

* SparseGPT (``methods.sparsegpt``): the factorization of H (damping, Cholesky of H, its inverse, the Cholesky
  of that) and the column sweep (the OBS updates, the mask chosen inside it);
* the iterative solver (``methods.solve``): the factorization (damping, scaling, Cholesky, inverse, its probe)
  and the solve (conjugate gradients until every row's residual is below --tol, the package's default);
* the direct float64 solve (``methods.update.lsq_update``) on the first --direct-rows rows, scaled to all rows.

A block of LLaMA-13B has q, k, v, o (5120 -> 5120), gate, up (5120 -> 13824) and down (13824 -> 5120); q/k/v and
gate/up read the same input, so a block factors four Hessians (three of width 5120, one of 13824) when linears
share them, seven when they do not. The block rows add the per-linear times that way. FLOPs are counted as
``memory/work.py`` counts them (2mnk per product; LAPACK's potrf / potri counts), the iterative solver's from
the iterations each row actually ran. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from lowmem_gblm.mask import Pattern, select_keep
from lowmem_gblm.methods.solve import DEFAULT_TOL, factor_hessian, solve_kept
from lowmem_gblm.methods.sparsegpt import _prepare_hessian, inverse_hessian_cholesky, sparsegpt_prune
from lowmem_gblm.methods.update import lsq_update

LLAMA_13B_BLOCK = (("q", 5120, 5120), ("k", 5120, 5120), ("v", 5120, 5120), ("o", 5120, 5120),
                   ("gate", 13824, 5120), ("up", 13824, 5120), ("down", 5120, 13824))  # (name, out, in)
SHARED_INPUT = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "o_in", "gate": "mlp_in", "up": "mlp_in",
                "down": "down_in"}


def correlated_hessian(n: int, tokens: int, window: int, device, seed: int = 0) -> torch.Tensor:
    """H = (2/T) sum_t x_t x_t^T [n, n] fp32 over ``tokens`` synthetic correlated inputs, one window at a time."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    spectrum = torch.arange(1, n + 1, dtype=torch.float32).pow(-0.6)  # decaying singular values of the mixing
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    mix = (q * spectrum).to(device)  # [n, n]
    scale = torch.exp(0.8 * torch.randn(n, generator=g))
    scale[torch.randperm(n, generator=g)[: max(1, n // 500)]] *= 30.0  # outlier features
    scale = scale.to(device)
    h = torch.zeros(n, n, device=device)
    for start in range(0, tokens, window):
        t = min(window, tokens - start)
        z = torch.randn(t, n, generator=g).to(device)
        x = (z @ mix.T) * scale  # [t, n]
        h.addmm_(x.T, x)
    return h * (2.0 / tokens)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def potrf(n: int) -> int:
    return n * (n + 1) * (2 * n + 1) // 6


def potri(n: int) -> int:
    return (4 * n**3 + 3 * n**2 + 5 * n) // 6


def run_shape(name: str, out: int, n: int, h: torch.Tensor, args, device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(hash(name) % 2**31)
    w = (torch.randn(out, n, generator=g) * 0.02).to(device)
    keep = select_keep(w.abs() * h.diagonal().sqrt(), Pattern.parse("unstructured", 0.5))
    row = {"linear": name, "out": out, "in": n}
    # SparseGPT: the factorization alone, then the whole prune (sweep = whole - factorization)
    _, t_sg_factor = timed(lambda: inverse_hessian_cholesky(_prepare_hessian(w, h, 0.01)[1], 0.01), device)
    _, t_sg_total = timed(lambda: sparsegpt_prune(w, h, Pattern.parse("unstructured", 0.5), 128, 0.01), device)
    row |= {"sparsegpt_factor_s": t_sg_factor, "sparsegpt_sweep_s": max(t_sg_total - t_sg_factor, 0.0),
            "sparsegpt_factor_flops": 2 * potrf(n) + potri(n), "sparsegpt_sweep_flops": out * n * (n + 1)}
    # the iterative solver: factorization, then the solve
    factor, t_it_factor = timed(lambda: factor_hessian(h, 0.01, name), device)
    result, t_it_solve = timed(lambda f=factor: solve_kept(w, f, keep, args.tol, args.max_iter), device)
    d = result.diagnostics
    row |= {"iterative_factor_s": t_it_factor, "iterative_solve_s": t_it_solve,
            "iterative_factor_flops": potrf(n) + potri(n) + 4 * n * n * 4,  # + the probe: two products with 4 columns
            "iterative_solve_flops": int(round(2 * n * n * out * d["iterations_mean"])),
            "iterations_max": d["iterations"], "iterations_mean": d["iterations_mean"], "residual": d["residual"],
            "inverse_dtype": factor.inverse_dtype}
    del factor
    # the direct float64 solve on the first rows, scaled to all
    r = min(args.direct_rows, out)
    if r > 0:
        ref, t_direct = timed(lambda: lsq_update(w[:r], h, keep[:r], 0.01), device)
        k = int(keep[:r].sum(1).float().mean())
        row |= {"direct_rows": r, "direct_s_measured": t_direct, "direct_s": t_direct * out / r,
                "direct_flops": out * (potrf(k) + 2 * k * k) + 2 * out * n * n,
                "iterative_vs_direct_rel_weight_diff": float((result.weight[:r] - ref).norm() / ref.norm())}
    del result
    return row


def block_rows(rows: dict[str, dict]) -> dict:
    """A LLaMA-13B block from the per-shape rows: seconds and FLOPs, with shared and unshared factorizations."""
    out = {}
    for method, factor_key, solve_key in (("sparsegpt", "sparsegpt_factor", "sparsegpt_sweep"),
                                          ("iterative", "iterative_factor", "iterative_solve")):
        solve_s = sum(rows[name][f"{solve_key}_s"] for name, _, _ in LLAMA_13B_BLOCK)
        solve_f = sum(rows[name][f"{solve_key}_flops"] for name, _, _ in LLAMA_13B_BLOCK)
        firsts = {}
        for name, _, _ in LLAMA_13B_BLOCK:
            firsts.setdefault(SHARED_INPUT[name], name)
        shared_s = sum(rows[name][f"{factor_key}_s"] for name in firsts.values())
        shared_f = sum(rows[name][f"{factor_key}_flops"] for name in firsts.values())
        all_s = sum(rows[name][f"{factor_key}_s"] for name, _, _ in LLAMA_13B_BLOCK)
        out[method] = {"seconds_shared": solve_s + shared_s, "seconds_unshared": solve_s + all_s,
                       "flops_shared": solve_f + shared_f}
    if all("direct_s" in rows[name] for name, _, _ in LLAMA_13B_BLOCK):
        out["direct"] = {"seconds": sum(rows[n]["direct_s"] for n, _, _ in LLAMA_13B_BLOCK),
                         "flops": sum(rows[n]["direct_flops"] for n, _, _ in LLAMA_13B_BLOCK)}
    out["iterative_vs_sparsegpt"] = out["iterative"]["seconds_shared"] / out["sparsegpt"]["seconds_shared"]
    out["iterative_vs_sparsegpt_unshared"] = (out["iterative"]["seconds_shared"]
                                              / out["sparsegpt"]["seconds_unshared"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=None,
                   help="OUTxIN linears (default: the seven of a LLaMA-13B block, three distinct shapes)")
    p.add_argument("--tokens", type=int, default=8 * 2048, help="calibration tokens behind each Hessian")
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--direct-rows", type=int, default=8, help="rows the direct solve runs (0: skip it)")
    p.add_argument("--tol", type=float, default=DEFAULT_TOL, help="--solver-tol (default: the package's)")
    p.add_argument("--max-iter", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write the JSON here too")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.shapes:
        linears = [(s, *map(int, s.split("x"))) for s in args.shapes]
    else:
        linears = [(n, o, i) for n, o, i in LLAMA_13B_BLOCK if n in ("q", "gate", "down")]
    hessians: dict[int, torch.Tensor] = {}
    rows: dict[str, dict] = {}
    warm = correlated_hessian(256, 512, 512, device, seed=1)  # first calls load kernels and thread pools: not timed
    run_shape("warm-up", 64, 256, warm, argparse.Namespace(**vars(args) | {"direct_rows": 4}), device)
    t0 = time.perf_counter()
    for name, out, n in linears:
        if n not in hessians:
            hessians = {n: correlated_hessian(n, args.tokens, args.window, device)}  # one at a time
        rows[name] = run_shape(name, out, n, hessians[n], args, device)
        r = rows[name]
        print(f"{name:>10} {out:>6}x{n:<6} sparsegpt {r['sparsegpt_factor_s']:7.2f} + {r['sparsegpt_sweep_s']:7.2f} s"
              f" | iterative {r['iterative_factor_s']:7.2f} + {r['iterative_solve_s']:7.2f} s "
              f"({r['iterations_mean']:.1f} mean / {r['iterations_max']:.0f} max it)"
              + (f" | direct {r['direct_s']:9.1f} s ({r['direct_rows']} rows measured)" if "direct_s" in r else ""),
              flush=True)
    if not args.shapes:  # the block: q stands for k, v, o; gate for up
        for alias, src in (("k", "q"), ("v", "q"), ("o", "q"), ("up", "gate")):
            rows[alias] = rows[src]
    print("\n| linear | out x in | SparseGPT factor + sweep (s) | iterative factor + solve (s) | iterations mean / max "
          "| direct (s, scaled) | GFLOP SparseGPT / iterative / direct |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        if args.shapes is None and name in ("k", "v", "o", "up"):
            continue
        direct = f"{r['direct_s']:.4g}" if "direct_s" in r else "–"
        dflops = f"{r['direct_flops'] / 1e9:.0f}" if "direct_flops" in r else "–"
        print(f"| {name} | {r['out']} x {r['in']} | {r['sparsegpt_factor_s']:.4g} + {r['sparsegpt_sweep_s']:.4g} | "
              f"{r['iterative_factor_s']:.4g} + {r['iterative_solve_s']:.4g} | {r['iterations_mean']:.1f} / "
              f"{r['iterations_max']:.0f} | {direct} | "
              f"{(r['sparsegpt_factor_flops'] + r['sparsegpt_sweep_flops']) / 1e9:.0f} / "
              f"{(r['iterative_factor_flops'] + r['iterative_solve_flops']) / 1e9:.0f} / {dflops} |")
    result = {"benchmark": "lsq_solvers", "device": str(device), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "tokens": args.tokens, "tol": args.tol, "rows": rows,
              "seconds_total": time.perf_counter() - t0}
    if not args.shapes:
        result["block"] = block_rows(rows)
        b = result["block"]
        print(f"\nLLaMA-13B block (q/k/v and gate/up share a factorization): SparseGPT "
              f"{b['sparsegpt']['seconds_shared']:.1f} s ({b['sparsegpt']['flops_shared'] / 1e12:.2f} TFLOP), "
              f"iterative {b['iterative']['seconds_shared']:.1f} s ({b['iterative']['flops_shared'] / 1e12:.2f} TFLOP)"
              f": {b['iterative_vs_sparsegpt']:.2f}x; against SparseGPT factoring per linear (before sharing) "
              f"{b['sparsegpt']['seconds_unshared']:.1f} s: {b['iterative_vs_sparsegpt_unshared']:.2f}x"
              + (f"; direct {b['direct']['seconds'] / 3600:.1f} h ({b['direct']['flops'] / 1e12:.0f} TFLOP)"
                 if "direct" in b else ""))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}
                     | {"per_linear_s": {n: {"sparsegpt": round(r["sparsegpt_factor_s"] + r["sparsegpt_sweep_s"], 6),
                                             "iterative": round(r["iterative_factor_s"] + r["iterative_solve_s"], 6),
                                             "direct": round(r["direct_s"], 6) if "direct_s" in r else None}
                                         for n, r in rows.items()}}))
    assert math.isfinite(result["seconds_total"])


if __name__ == "__main__":
    main()
