"""Build the vision model to prune: the dense DINOv2-S backbone + a linear head for scikit-learn's digits.

    python scripts/build_vit_digits.py assets/dinov2-s assets/dinov2-s-digits assets/digits \
        [--seed 0] [--train 1000] [--calib 256] [--upscale bilinear] [--results FILE.txt]

1. Images: ``sklearn.datasets.load_digits`` (1,797 8x8 images, values 0..16, classes 0..9, bundled
   with scikit-learn) scaled to 0..255 (``round(v * 255 / 16)``, ink bright on black), upscaled to
   224x224 with PIL's bilinear filter (``--upscale nearest`` gives 28x28 blocks instead), and written
   as RGB PNGs (three equal channels) in ImageFolder layout
   ``IMAGES/{train,calib,test}/<digit>/<index>.png`` (``index``: the image's position in
   ``load_digits``, 4 digits). The split is a seeded permutation: the first ``--train`` images train
   the head, the next ``--calib`` are the calibration set for pruning, the rest (541) the test set.
2. Preprocessing: the classifier's ``preprocessor_config.json`` is the backbone's DINOv2 processor with
   the resize set to shortest edge 224 (bicubic) and the center crop 224, so these 224x224 images
   reach the model unchanged (DINOv2's usual resize to 256 would crop a 16-pixel margin, over half an
   original digit pixel); other images get resize-224 + crop-224 + ImageNet mean/std. The script
   reads the PNGs back with ``lowmem_gblm.calib.images.load_image_folder`` through that file, exactly
   as calibration and evaluation will.
3. Head: transformers' ``Dinov2ForImageClassification`` classifies ``concat(CLS, mean of patch
   tokens)`` of the final layernorm output with ``Linear(2 * 384, 10)``. The features are computed
   with the dense backbone, standardized, and a multinomial logistic regression (scikit-learn, lbfgs,
   C = ``--C``) is fitted on the train split; the standardization is folded into the Linear, so the
   saved checkpoint's logits are the regression's decision function (checked after reloading).
4. Output: ``OUT`` holds ``config.json`` (``id2label`` / ``label2id`` "0".."9"), ``model.safetensors``,
   ``preprocessor_config.json``. Top-1 on train / calib / test is printed; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lowmem_gblm.calib.images import load_image_folder

log = logging.getLogger("build_vit_digits")
SPLITS = ("train", "calib", "test")
SIZE = 224


def digit_png(pixels_8x8: np.ndarray, upscale: str):
    """One 8x8 digit (0..16) as a SIZE x SIZE RGB PIL image."""
    from PIL import Image

    gray = np.rint(pixels_8x8 * (255.0 / 16.0)).astype(np.uint8)
    resample = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST}[upscale]
    return Image.fromarray(gray, mode="L").resize((SIZE, SIZE), resample).convert("RGB")


def split_indices(n: int, n_train: int, n_calib: int, seed: int) -> dict[str, list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    cut = {"train": order[:n_train], "calib": order[n_train:n_train + n_calib], "test": order[n_train + n_calib:]}
    return {k: sorted(v) for k, v in cut.items()}


def write_image_folder(images_dir: Path, seed: int, n_train: int, n_calib: int, upscale: str) -> dict[str, int]:
    """The three ImageFolder splits (written to a temporary folder, then renamed into place)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    parts = split_indices(len(digits.target), n_train, n_calib, seed)
    tmp = images_dir.with_name(images_dir.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, idx in parts.items():
        for i in idx:
            folder = tmp / split / str(int(digits.target[i]))
            folder.mkdir(parents=True, exist_ok=True)
            digit_png(digits.images[i], upscale).save(folder / f"{i:04d}.png")
    (tmp / "split.json").write_text(json.dumps({"source": "sklearn.datasets.load_digits", "seed": seed,
                                                "upscale": upscale, "size": SIZE, "indices": parts}) + "\n")
    tmp.rename(images_dir)
    return {k: len(v) for k, v in parts.items()}


def classifier_processor(backbone_dir: Path) -> dict:
    pre = json.loads((backbone_dir / "preprocessor_config.json").read_text())
    pre["size"] = {"shortest_edge": SIZE}
    pre["crop_size"] = {"height": SIZE, "width": SIZE}
    return pre


@torch.inference_mode()
def head_features(dinov2, pixel_values: torch.Tensor, batch_size: int) -> torch.Tensor:
    """[N, 2D]: concat(CLS, mean of patch tokens) of the last hidden state, as Dinov2ForImageClassification."""
    out = []
    for i in range(0, len(pixel_values), batch_size):
        h = dinov2(pixel_values=pixel_values[i:i + batch_size]).last_hidden_state  # [B, 1 + n, D]
        out.append(torch.cat([h[:, 0], h[:, 1:].mean(dim=1)], dim=1))
    return torch.cat(out)


def fit_head(x: np.ndarray, y: np.ndarray, c: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logistic regression on standardized features, folded back: (W [K, F], b [K]) on the raw features."""
    from sklearn.linear_model import LogisticRegression

    mu, sigma = x.mean(0), x.std(0) + 1e-6
    clf = LogisticRegression(C=c, max_iter=5000, random_state=seed).fit((x - mu) / sigma, y)
    w = clf.coef_ / sigma  # [K, F]
    b = clf.intercept_ - w @ mu
    return w.astype(np.float32), b.astype(np.float32)


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


def split_matches(images_dir: Path, seed: int, sizes: tuple[int, int], upscale: str) -> bool:
    """Whether ``images_dir`` already holds the splits these options write (then they are reused)."""
    try:
        meta = json.loads((images_dir / "split.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    got = meta.get("indices", {})
    return (meta.get("seed"), meta.get("upscale"), meta.get("size")) == (seed, upscale, SIZE) and \
        (len(got.get("train", [])), len(got.get("calib", []))) == sizes


def dense_features(model, images_dir: Path, processor_dir: str, backbone_sha: str, batch_size: int):
    """{split: (features [N, 2D], labels [N])}, cached in IMAGES/features-<backbone sha>.safetensors."""
    from safetensors.torch import load_file, save_file

    cache = images_dir / f"features-{backbone_sha[:12]}.safetensors"
    if cache.is_file():
        t = load_file(str(cache))
        log.info("features: reusing %s", cache)
        return {s: (t[f"x_{s}"], t[f"y_{s}"]) for s in SPLITS}, 0.0
    out, t0 = {}, time.perf_counter()
    for split in SPLITS:
        pixels, y, _ = load_image_folder(images_dir / split, processor_dir)
        t = time.perf_counter()
        out[split] = (head_features(model.dinov2, pixels, batch_size).clone(), y)
        log.info("%s: %d images, features %s in %.1fs (%.2f img/s)", split, len(y), list(out[split][0].shape),
                 time.perf_counter() - t, len(y) / (time.perf_counter() - t))
    save_file({f"{k}_{s}": v[i] for s, v in out.items() for i, k in enumerate("xy")}, str(cache))
    return out, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("backbone", type=Path, help="a Dinov2Model folder (lowmem-gblm import-onnx-dinov2)")
    p.add_argument("out", type=Path, help="the new Dinov2ForImageClassification folder")
    p.add_argument("images", type=Path, help="the ImageFolder splits (written, or reused when they match)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=1000)
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--upscale", choices=("bilinear", "nearest"), default="bilinear")
    p.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the logistic regression")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--overwrite", action="store_true", help="replace OUT, and IMAGES when its split differs")
    p.add_argument("--results", type=Path, help="also write the report to this file")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from transformers import Dinov2Config, Dinov2ForImageClassification, Dinov2Model

    from lowmem_gblm.io.writer import file_sha256

    t0 = time.perf_counter()
    if split_matches(a.images, a.seed, (a.train, a.calib), a.upscale):
        log.info("images: reusing %s (same seed, split and upscale)", a.images)
    else:
        for path in (a.out, a.images):
            if path.exists() and any(path.iterdir()) and not a.overwrite:
                raise SystemExit(f"error: {path} is not empty; pass --overwrite to replace it")
        shutil.rmtree(a.images, ignore_errors=True)
        write_image_folder(a.images, a.seed, a.train, a.calib, a.upscale)
        log.info("images: wrote %s in %.1fs", a.images, time.perf_counter() - t0)
    if a.out.exists() and any(a.out.iterdir()) and not a.overwrite:
        raise SystemExit(f"error: {a.out} is not empty; pass --overwrite to replace it")

    labels = [str(i) for i in range(10)]
    config = Dinov2Config.from_pretrained(a.backbone, num_labels=10, id2label=dict(enumerate(labels)),
                                          label2id={n: i for i, n in enumerate(labels)})
    config.architectures = ["Dinov2ForImageClassification"]
    model = Dinov2ForImageClassification(config).eval()
    model.dinov2.load_state_dict(Dinov2Model.from_pretrained(a.backbone).state_dict(), strict=True)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "preprocessor_config.json").write_text(json.dumps(classifier_processor(a.backbone), indent=2))
        (Path(tmp) / "config.json").write_text(config.to_json_string())
        data, t_feat = dense_features(model, a.images, tmp, file_sha256(a.backbone / "model.safetensors"),
                                      a.batch_size)
        w, b = fit_head(data["train"][0].numpy(), data["train"][1].numpy(), a.C, a.seed)
        with torch.no_grad():
            model.classifier.weight.copy_(torch.from_numpy(w))
            model.classifier.bias.copy_(torch.from_numpy(b))
            acc = {s: top1(model.classifier(x), y) for s, (x, y) in data.items()}
        shutil.rmtree(a.out, ignore_errors=True)
        model.save_pretrained(a.out, safe_serialization=True)
        shutil.copy(Path(tmp) / "preprocessor_config.json", a.out / "preprocessor_config.json")

    # the saved checkpoint, reloaded, gives the head's logits on test images read through its own processor
    reloaded = Dinov2ForImageClassification.from_pretrained(a.out).eval()
    pixels, _, checked = load_image_folder(a.images / "test", a.out, nsamples=16, seed=a.seed)
    with torch.inference_mode():
        logits = reloaded(pixel_values=pixels).logits
        direct = model.classifier(head_features(model.dinov2, pixels, a.batch_size))
    check = float((logits - direct).abs().max())
    assert check < 1e-3, f"reloaded checkpoint's logits differ from the head's by {check}"
    sizes = {s: len(y) for s, (_, y) in data.items()}
    report = {"backbone": str(a.backbone), "out": str(a.out), "images": str(a.images), "split": sizes,
              "seed": a.seed, "upscale": a.upscale, "C": a.C, "top1": acc, "feature_seconds": round(t_feat, 1),
              "reload_max_abs_logit_diff": check, "reload_checked_images": len(checked),
              "total_seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__}
    lines = [f"dense DINOv2-S + linear head on sklearn digits ({a.upscale} 8x8 -> {SIZE}), seed {a.seed}",
             f"split train/calib/test: {sizes['train']}/{sizes['calib']}/{sizes['test']}",
             *(f"top-1 {s:<5}: {acc[s] * 100:6.2f}%" for s in SPLITS),
             f"features {t_feat:.1f}s for {sum(sizes.values())} images (0 = cached); reloaded vs head logits "
             f"max |diff| {check:.1e} on {len(checked)} test images",
             json.dumps(report)]
    text = "\n".join(lines)
    print(text)
    if a.results:
        a.results.parent.mkdir(parents=True, exist_ok=True)
        a.results.write_text(f"# python scripts/build_vit_digits.py {' '.join(sys.argv[1:])}\n{text}\n")


if __name__ == "__main__":
    main()
