"""Does the converted DINOv2 checkpoint compute what the ONNX file computes? On real photos.

    python benchmarks/onnx_dinov2_check.py assets/vit_s_focus.onnx assets/dinov2-s

Preprocesses scikit-image's bundled photos (astronaut, coffee, chelsea, rocket, and the grayscale
camera, converted to RGB) with the checkpoint's own preprocessor_config.json, runs the ONNX file
with onnxruntime (its backbone output, the final layernorm, exposed as an extra graph output) and the
converted ``Dinov2Model`` with transformers, and prints per photo the largest absolute difference of
last_hidden_state and the relative error ||a - b|| / ||b||. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from lowmem_gblm.convert.onnx_dinov2 import backbone_output_name
from lowmem_gblm.convert.onnx_graph import load_onnx, onnx_tensors

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")


def photos():
    from PIL import Image
    from skimage import data

    return {name: Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("onnx_file")
    p.add_argument("model_dir")
    a = p.parse_args()
    from transformers import AutoImageProcessor, Dinov2Model

    images = photos()
    processor = AutoImageProcessor.from_pretrained(a.model_dir)
    pixels = processor(images=list(images.values()), return_tensors="pt")["pixel_values"]  # [N, 3, 224, 224]
    proto = load_onnx(a.onnx_file)
    name = backbone_output_name(proto)
    t0 = time.perf_counter()
    (ref,) = onnx_tensors(proto, pixels.numpy(), [name])  # [N, 1 + (224/14)², 384]
    t_ort = time.perf_counter() - t0
    model = Dinov2Model.from_pretrained(a.model_dir).eval()
    t0 = time.perf_counter()
    with torch.inference_mode():
        ours = model(pixel_values=pixels).last_hidden_state.numpy()
    t_torch = time.perf_counter() - t0
    rows = []
    print(f"backbone output {name}: {tuple(ref.shape)}; onnxruntime {t_ort:.2f}s, transformers {t_torch:.2f}s")
    print(f"{'photo':<10} {'size':>10} {'max |diff|':>11} {'max |ref|':>10} {'rel l2':>10} {'cls cos':>10}")
    for i, (photo, img) in enumerate(images.items()):
        d = ours[i] - ref[i]
        rel = float(np.linalg.norm(d) / np.linalg.norm(ref[i]))
        cos = float(ours[i, 0] @ ref[i, 0] / (np.linalg.norm(ours[i, 0]) * np.linalg.norm(ref[i, 0])))
        rows.append({"photo": photo, "size": list(img.size), "max_abs_diff": float(np.abs(d).max()),
                     "max_abs_ref": float(np.abs(ref[i]).max()), "rel_l2": rel, "cls_cos": cos})
        print(f"{photo:<10} {f'{img.size[0]}x{img.size[1]}':>10} {np.abs(d).max():11.3e} {np.abs(ref[i]).max():10.3f} "
              f"{rel:10.3e} {cos:10.7f}")
    worst = max(r["rel_l2"] for r in rows)
    print(json.dumps({"onnx": a.onnx_file, "model": a.model_dir, "tensor": name, "shape": list(ref.shape),
                      "worst_rel_l2": worst, "worst_max_abs_diff": max(r["max_abs_diff"] for r in rows),
                      "photos": rows}))


if __name__ == "__main__":
    main()
