"""Pruning a real vision transformer: DINOv2-S/14 + a linear head on scikit-learn's digits.

Model and images come from ``bash scripts/fetch_vit.sh`` (assets/dinov2-s-digits, assets/digits/{calib,test}).
Every method prunes the encoder layers' linears through the CLI (``lowmem-gblm prune --calib-images``); each
result is evaluated with ``lowmem-gblm eval``: top-1 on the test split, and the mean cosine of the final
features to the dense model's on scikit-image's sample photos (images the head never saw).

    python benchmarks/vit_digits.py [--nsamples 128] [--out runs/vit_digits]

Prints a table and ends with one JSON line; writes benchmarks/results/vit_digits.{txt,json}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "assets" / "dinov2-s-digits"
CALIB = ROOT / "assets" / "digits" / "calib"
TEST = ROOT / "assets" / "digits" / "test"
PHOTOS = ("astronaut", "camera", "chelsea", "clock", "coffee", "coins", "hubble_deep_field", "immunohistochemistry",
          "moon", "page", "rocket", "text")  # bundled with scikit-image (no download)
RUNS = {"magnitude": [], "wanda": [], "sparsegpt": [], "gblm-l1": ["--grad-norm", "l1"],
        "gblm-l2": ["--grad-norm", "l2"],
        # the weight updates (--update: the published masks, then the kept weights refit to the dense outputs)
        "wanda+lsq": ["--update", "lsq"], "gblm-l1+lsq": ["--grad-norm", "l1", "--update", "lsq"]}
DEFAULT_RUNS = ("magnitude", "wanda", "sparsegpt", "gblm-l1", "gblm-l2")
def pattern_flags(pattern: str) -> list[str]:
    """"50%" -> --sparsity 0.5; "2:4" -> --pattern 2:4."""
    if pattern.endswith("%"):
        return ["--sparsity", str(float(pattern[:-1]) / 100)]
    return ["--pattern", pattern]


def cli(*args: str) -> str:
    cmd = [sys.executable, "-m", "lowmem_gblm", *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def write_photos(folder: Path) -> Path:
    """scikit-image's bundled sample photos as PNGs (a flat folder: features only, no labels)."""
    import numpy as np
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        path = folder / f"{name}.png"
        if not path.is_file():
            img = np.asarray(getattr(skimage.data, name)())
            if img.dtype != np.uint8:
                img = img.astype(np.float64)
                img = (255 * (img - img.min()) / max(float(img.max() - img.min()), 1e-12)).astype(np.uint8)
            Image.fromarray(img[..., :3] if img.ndim == 3 else img).save(path)
    return folder


def evaluate(model: Path, photos: Path) -> dict:
    top1 = json.loads(cli("eval", str(model), "--images", str(TEST), "--batch-size", "16", "--json"))
    cos = json.loads(cli("eval", str(model), "--images", str(photos), "--reference", str(MODEL), "--batch-size", "4",
                         "--json"))
    return {"top1": top1["top1"], "feature_cosine": cos["feature_cosine"], "sparsity": top1["sparsity"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=128, help="calibration images (of the 256 in the calib split)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "vit_digits")
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_RUNS), choices=sorted(RUNS))
    ap.add_argument("--patterns", nargs="+", default=["50%", "2:4"], help="e.g. 50%% 30%% 2:4 4:8")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense row (already measured)")
    ap.add_argument("--tag", default="", help="results file suffix: vit_digits<tag>.{txt,json}")
    args = ap.parse_args()
    if not MODEL.is_dir():
        raise SystemExit(f"{MODEL} is missing: run bash scripts/fetch_vit.sh first")
    args.out.mkdir(parents=True, exist_ok=True)
    photos = write_photos(args.out / "photos")
    calib = ["--calib-images", str(CALIB), "--nsamples", str(args.nsamples), "--batch-size", "8", "-q"]
    rows = [] if args.no_dense else [{"method": "dense", "pattern": "-", "seconds": 0.0} | evaluate(MODEL, photos)]
    if rows:
        print(f"dense: {rows[0]}", flush=True)
    for method in args.methods:
        extra = RUNS[method]
        grads = None
        if method.startswith("gblm"):  # one gradient folder per norm, reused by both patterns (and updates)
            grads = args.out / f"grads-{method.split('+')[0]}"
            t0 = time.perf_counter()
            cli("gradients", str(MODEL), str(grads), *calib, *extra[:2])
            grad_seconds = time.perf_counter() - t0
        for pattern in args.patterns:
            flags = pattern_flags(pattern)
            out = args.out / f"{method}-{pattern.replace(':', 'of').replace('%', 'pct')}"
            t0 = time.perf_counter()
            opts = ["--gradients", str(grads)] if grads else []
            cli("prune", str(MODEL), str(out), "--method", method.split("-")[0].split("+")[0], *flags, *calib, *extra,
                *opts,
                "--overwrite")
            seconds = time.perf_counter() - t0 + (grad_seconds if grads else 0.0)
            row = {"method": method, "pattern": pattern, "seconds": round(seconds, 1)} | evaluate(out, photos)
            rows.append(row)
            print(f"{method} {pattern}: {row}", flush=True)
    lines = [f"DINOv2-S/14 + linear head on digits ({MODEL.name}); calibration: {args.nsamples} images of "
             f"{CALIB.relative_to(ROOT)} with labels; top-1 on {TEST.relative_to(ROOT)}; feature cosine to the dense "
             f"model on {len(PHOTOS)} scikit-image photos",
             f"{'method':<10} {'pattern':<7} {'top-1':>7} {'cosine':>8} {'sparsity':>8} {'seconds':>8}"]
    for r in rows:
        lines.append(f"{r['method']:<10} {r['pattern']:<7} {r['top1']:>7.4f} {r['feature_cosine']:>8.5f} "
                     f"{r['sparsity']:>8.4f} {r['seconds']:>8.1f}")
    table = "\n".join(lines)
    print(table)
    command = " ".join(["python benchmarks/vit_digits.py", *sys.argv[1:]])
    result = {"benchmark": "vit_digits", "nsamples": args.nsamples, "rows": rows, "command": command}
    results = ROOT / "benchmarks" / "results"
    (results / f"vit_digits{args.tag}.txt").write_text(f"$ {command}\n{table}\n")
    (results / f"vit_digits{args.tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
