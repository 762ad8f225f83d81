#!/usr/bin/env bash
# Set up and run the test suite (what CI runs). pytest's exit 5 (nothing collected) counts as failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check lowmem_gblm cli tests benchmarks
set +e
.venv/bin/python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
