"""bfloat16 gradient files vs fp32 ones for GBLM on a real model.

One gradient sweep per file dtype (same calibration windows), then a GBLM prune from each folder
(``--gradients``): the fraction of identical keep-mask entries over all decoder linears, perplexity of
both on the eval split, and the bytes of the gradient files.

    LOWMEM_WIKI_JSON=.../summaries_en-us.json python benchmarks/grad_dtype.py \\
        --model /work/main/assets/smollm2-135m --nsamples 16 --seqlen 256 --eval-windows 32

Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json

from store_int8 import agreement, keep_masks, prepare, real_model_args


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    real_model_args(ap)
    ap.add_argument("--grad-norms", nargs="+", default=["l1", "l2"])
    args = ap.parse_args()

    from lowmem_gblm.config import GradientConfig, PruneConfig
    from lowmem_gblm.engine import compute_gradients, prune

    work, calib, evaluate = prepare(args, "grad_dtype-")

    result = {"model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen, "sparsity": args.sparsity,
              "eval_windows": args.eval_windows, "dense_ppl": evaluate(args.model), "grad_norms": {}}
    for norm in args.grad_norms:
        entry = {}
        for gd in ("float32", "bfloat16"):
            grads, out = work / f"grads-{norm}-{gd}", work / f"gblm-{norm}-{gd}"
            compute_gradients(GradientConfig(model_dir=args.model, out_dir=str(grads), calib=calib, grad_norm=norm,
                                             device="cpu", grad_dtype=gd, progress=False))
            prune(PruneConfig(model_dir=args.model, out_dir=str(out), calib=calib, method="gblm", grad_norm=norm,
                              sparsity=args.sparsity, device="cpu", gradients=str(grads), grad_dtype=gd,
                              progress=False))
            entry[gd] = {"ppl": evaluate(str(out)),
                         "gradient_file_bytes": sum(p.stat().st_size for p in grads.glob("block_*.safetensors"))}
        entry["mask_agreement"] = agreement(keep_masks(work / f"gblm-{norm}-float32"),
                                            keep_masks(work / f"gblm-{norm}-bfloat16"))
        result["grad_norms"][norm] = entry
    print(f"dense ppl {result['dense_ppl']:.3f}  ({args.eval_windows} x {args.seqlen} wiki-offline:eval); "
          f"GBLM {args.sparsity:.0%}, {args.nsamples} x {args.seqlen} calibration")
    print(f"{'norm':5} {'keep agree':>10} {'ppl fp32':>9} {'ppl bf16':>9} {'files fp32':>12} {'files bf16':>12}")
    for norm, e in result["grad_norms"].items():
        print(f"{norm:5} {e['mask_agreement']:10.5f} {e['float32']['ppl']:9.3f} {e['bfloat16']['ppl']:9.3f} "
              f"{e['float32']['gradient_file_bytes']:>12} {e['bfloat16']['gradient_file_bytes']:>12}")
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
