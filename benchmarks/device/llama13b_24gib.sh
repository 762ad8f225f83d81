#!/usr/bin/env bash
# The GPU proof in one call: a random bf16 checkpoint with LLaMA-13B's exact shapes (40 blocks, d=5120,
# ffn=13824, vocab 32000; benchmarks/configs/llama-13b.json) pruned with GBLM l1 50% by the library
# itself, in one process capped at 24 GiB of device memory, windows of 2048 tokens, RAM store, bf16
# compute; then one 2:4-pruned 13B linear timed dense vs torch semi-structured sparse.
#
#   bash benchmarks/device/llama13b_24gib.sh                 # on the lent GPU machine (device tool; < 9 min)
#   bash benchmarks/device/llama13b_24gib.sh --shape tiny    # CPU self-check: the same steps, seconds
#
# Results under $OUT (the device tool's folder; default /tmp/llama13b_24gib_out): llama13b_24gib.json and
# llama13b_24gib.txt (the table), prune_report.json, env.json, sparse_2of4.json, checkpoint.json, run.log.
#
# Steps, each under its own timeout, all inside LLAMA13B_BUDGET_S (default 530 s):
#   env 60 s | lsq 100 s (lsq_solvers.json / .txt) | sparse 120 s | ckpt 240 s | prune: the time left minus 40 s |
#   report 60 s
# The prune step picks N (32, 16, 8 or 4 windows) from a timing probe of block 0 and the write rate
# measured on the run's folder, so that its estimate x1.5 fits the time left; a prune stopped by its
# timeout still leaves the per-block and per-phase numbers it recorded. The scratch folders (checkpoint
# ~26 GB, output ~26 GB, bf16 gradient files dropped block by block as the output lands) are deleted at
# the end, whatever happens.
#
# Python: PYTHON if set, else the project venv if present (this repo's CPU machine), else python3 (the
# GPU image's, which holds torch, transformers, safetensors, numpy, rich: nothing is installed or fetched).
# Scratch: LLAMA13B_WORK if set, else llama13b_24gib under the non-tmpfs folder with the most free space
# of /tmp, /var/tmp, /root and the repo's parent. The checkpoint (and if need be the run) goes to
# /dev/shm/llama13b_24gib instead when that disk cannot hold both, when it writes under 0.4 GB/s, or with
# LLAMA13B_MODEL_IN_RAM=1; checkpoint.json says where everything went.
# NSAMPLES forces N; BATCH_SIZE sets the windows per block call (default 1); CAP_GIB the cap (default 24).
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.." || exit 2

SHAPE=llama-13b
while [ $# -gt 0 ]; do
  case "$1" in
    --shape) SHAPE=$2; shift 2 ;;
    --shape=*) SHAPE=${1#*=}; shift ;;
    *) echo "usage: $0 [--shape llama-13b|tiny]" >&2; exit 2 ;;
  esac
done

START=$(date +%s)
BUDGET=${LLAMA13B_BUDGET_S:-530}
OUT=${OUT:-/tmp/llama13b_24gib_out}
mkdir -p "$OUT" || exit 2
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
export PYTHONPATH=$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}  # the package (not installed on the GPU image) and scale.py

pick_work() {  # the non-tmpfs candidate with the most free bytes
  local best=/tmp bestfree=-1 d free fs
  for d in /tmp /var/tmp /root "$(dirname "$PWD")"; do
    [ -d "$d" ] && [ -w "$d" ] || continue
    fs=$(stat -f -c %T "$d" 2>/dev/null)
    [ "$fs" = tmpfs ] || [ "$fs" = ramfs ] && continue
    free=$(df -B1 --output=avail "$d" 2>/dev/null | tail -1 | tr -d ' ')
    [ -n "$free" ] && [ "$free" -gt "$bestfree" ] && { best=$d; bestfree=$free; }
  done
  echo "$best"
}
WORK=${LLAMA13B_WORK:-$(pick_work)/llama13b_24gib}
RAM_DIR=/dev/shm/llama13b_24gib   # the driver's RAM_DIR (tmpfs fallback)
cleanup() { rm -rf "$WORK" "$RAM_DIR"; }
trap cleanup EXIT
left() { echo $(( START + BUDGET - $(date +%s) )); }

step() {  # step NAME TIMEOUT [ARGS...]
  local name=$1 t=$2 rc
  shift 2
  echo "== $name: timeout ${t} s, $(left) s of the budget left"
  timeout -k 10 "$t" "$PY" benchmarks/device/llama13b_24gib.py "$name" --shape "$SHAPE" --out "$OUT" \
    --work "$WORK" "$@"
  rc=$?
  echo "== $name: exit $rc at $(( $(date +%s) - START )) s"
  return $rc
}

{
  echo "== $(date '+%F %T') shape $SHAPE, budget $BUDGET s, python $PY, scratch $WORK, results $OUT"
  df -h /tmp /dev/shm "$(dirname "$WORK")" 2>/dev/null | sort -u
  free -g 2>/dev/null | head -2
  step env 60
  # the exact update's solvers at the block's linear shapes (benchmarks/lsq_solvers.py): SparseGPT, the iterative
  # lsq solver and the direct one (4 rows, scaled), per linear, on the device
  LSQ_DEV=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo cpu)
  [ "$SHAPE" = tiny ] && LSQ_SHAPES="--shapes 256x256 688x256 256x688 --tokens 2048" || LSQ_SHAPES=""
  echo "== lsq: timeout 100 s on $LSQ_DEV, $(left) s of the budget left"
  # shellcheck disable=SC2086
  timeout -k 10 100 "$PY" benchmarks/lsq_solvers.py --device "$LSQ_DEV" $LSQ_SHAPES --direct-rows 4 \
    --out "$OUT/lsq_solvers.json" > "$OUT/lsq_solvers.txt" 2>&1
  echo "== lsq: exit $? at $(( $(date +%s) - START )) s"
  step sparse 120
  if step ckpt 240 ${LLAMA13B_MODEL_IN_RAM:+--model-in-ram}; then
    T=$(( $(left) - 40 ))
    if [ "$T" -ge 60 ]; then
      step prune "$T" --deadline $(( $(date +%s) + T )) ${NSAMPLES:+--nsamples "$NSAMPLES"} \
        ${BATCH_SIZE:+--batch-size "$BATCH_SIZE"} ${CAP_GIB:+--cap-gib "$CAP_GIB"}
    else
      echo "== prune: skipped, only $T s left"
    fi
  fi
  cleanup
  step report 60
  echo "== done in $(( $(date +%s) - START )) s; scratch removed: $WORK"
} 2>&1 | tee "$OUT/run.log"
