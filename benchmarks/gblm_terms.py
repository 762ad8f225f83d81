"""Why does GBLM differ from Wanda on a model? The scale of the two score terms, per linear.

For every decoder linear: mean of |W| * sqrt(scaler_row) (Wanda's term) and of alpha * |W| * G (the
gradient term), their ratio, and how many keep decisions the gradient term flips at 50% per row.
scaler_row comes from the dense model's inputs (the prune sweep uses inputs through the already
pruned blocks; for a scale diagnostic the dense inputs are close enough, and that is stated).

    python benchmarks/gblm_terms.py MODEL_DIR GRAD_DIR [--alpha 100]

GRAD_DIR is a folder from `lowmem-gblm gradients`; its calibration_ids.safetensors gives the windows.
Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from lowmem_gblm.calib.data import load_ids
from lowmem_gblm.io.gradfiles import GradientFolder
from lowmem_gblm.io.model import StreamedModel, linear_names
from lowmem_gblm.mask import Pattern, select_keep
from lowmem_gblm.stream.context import BlockContext
from lowmem_gblm.stream.stats import collect_inputs
from lowmem_gblm.stream.store import ActivationStore
from lowmem_gblm.stream.sweep import embed, forward


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("grads")
    p.add_argument("--alpha", type=float, default=100.0)
    a = p.parse_args()
    model = StreamedModel.open(a.model)
    ids = load_ids(Path(a.grads) / "calibration_ids.safetensors")
    folder = GradientFolder.load_folder(Path(a.grads))
    dev, dt = torch.device("cpu"), torch.float32
    ctx = BlockContext.build(model, ids.shape[1], dev, dt)
    hidden = ActivationStore("cpu").new((*ids.shape, model.hidden_size), dt)  # [N, T, D], updated in place
    embed(model, ids, hidden, dt)
    pattern = Pattern.parse("unstructured", 0.5)
    rows = []
    print(f"{'linear':<40}{'wanda term':>12}{'grad term':>12}{'ratio':>8}{'flipped':>9}")
    for i in range(model.num_blocks):
        block = model.load_block(i, dev, dt)
        names = linear_names(block)
        with collect_inputs(block, names, frozenset({"scaler_row"})) as accs:
            forward(block, ctx, hidden, hidden, dev, dt)
        grads = folder.read(i)
        mods = dict(block.named_modules())
        for name in names:
            full = f"{model.family.block_prefix(i)}{name}.weight"
            w = mods[name].weight.abs()
            wanda = w * torch.sqrt(accs[name]["scaler_row"].result(ids.shape[0])).reshape(1, -1)
            grad = a.alpha * w * grads[full]
            keep_w = select_keep(wanda, pattern)
            keep_g = select_keep(wanda + grad, pattern)
            flipped = float((keep_w != keep_g).float().mean())
            row = {"linear": full, "wanda_mean": float(wanda.mean()), "grad_mean": float(grad.mean()),
                   "ratio": float(grad.mean() / wanda.mean()), "flipped": flipped}
            rows.append(row)
            print(f"{full[-40:]:<40}{row['wanda_mean']:>12.4g}{row['grad_mean']:>12.4g}{row['ratio']:>8.3f}"
                  f"{flipped:>9.3f}")
    by_kind = {}
    for r in rows:
        by_kind.setdefault(r["linear"].split(".")[-2], []).append(r["ratio"])
    summary = {k: statistics.median(v) for k, v in by_kind.items()}
    print("median ratio (grad term / wanda term) per linear kind:", {k: round(v, 3) for k, v in summary.items()})
    print(json.dumps({"benchmark": "gblm_terms", "alpha": a.alpha, "windows": list(ids.shape),
                      "median_ratio_by_kind": summary,
                      "mean_flipped": statistics.mean(r["flipped"] for r in rows), "rows": rows}))


if __name__ == "__main__":
    main()
