"""Check a streamed gradient folder against full-model per-sample autograd (whole model in RAM).

    python benchmarks/gradients_vs_autograd.py MODEL_DIR GRAD_DIR [GRAD_DIR ...]

Every GRAD_DIR must come from ``lowmem-gblm gradients`` on MODEL_DIR (any grad norm; the windows
are read from its calibration_ids.safetensors). Prints one line per folder and ends with a JSON line.
Error metric: max |G_streamed - G_ref| / max |G_ref| per tensor (and the max elementwise relative error).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn


def reference(model_dir: str, ids: torch.Tensor) -> tuple[dict, dict, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    lin = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    l1 = {k: torch.zeros_like(m.weight) for k, m in lin.items()}
    sq = {k: torch.zeros_like(m.weight) for k, m in lin.items()}
    t0 = time.perf_counter()
    for n in range(ids.shape[0]):
        model.zero_grad(set_to_none=True)
        model(ids[n:n + 1], labels=ids[n:n + 1]).loss.backward()
        for k, m in lin.items():
            g = m.weight.grad.float()
            l1[k] += g.abs()
            sq[k] += g * g
    return l1, {k: v.sqrt() for k, v in sq.items()}, time.perf_counter() - t0


def main(model_dir: str, folders: list[str]) -> dict:
    results, cache = [], {}
    for folder in map(Path, folders):
        meta = json.loads((folder / "gradients.json").read_text())
        ids = load_file(str(folder / "calibration_ids.safetensors"))["input_ids"].long()
        key = ids.numpy().tobytes()
        if key not in cache:
            cache[key] = reference(model_dir, ids)
        l1, l2, seconds = cache[key]
        ref = l1 if meta["identity"]["grad_norm"] == "l1" else l2
        got = {}
        for entry in meta["done"].values():
            got.update(load_file(str(folder / entry["file"])))
        assert sorted(got) == sorted(ref), "tensor names differ"
        per = {k: float((got[k] - ref[k]).abs().max() / ref[k].abs().max()) for k in ref}
        worst = max(per, key=per.get)
        elem = max(float(((got[k] - ref[k]).abs() / ref[k].abs().clamp_min(1e-30)).max()) for k in ref)
        row = {"folder": str(folder), "grad_norm": meta["identity"]["grad_norm"], "windows": list(ids.shape),
               "tensors": len(ref), "max_rel_to_tensor_max": per[worst], "worst": worst, "max_elementwise_rel": elem,
               "reference_seconds": round(seconds, 1)}
        print(f"{folder}: {row['grad_norm']} {row['windows']}: {row['tensors']} tensors, max |G-R|/max|R| "
              f"{per[worst]:.3e} ({worst}), max elementwise rel {elem:.3e}")
        results.append(row)
    return {"model": model_dir, "results": results}


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    print(json.dumps(main(sys.argv[1], sys.argv[2:])))
