#!/usr/bin/env bash
# Set up and run the test suite (what CI runs). pytest's exit 5 (nothing collected) counts as failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check lowmem_gblm cli tests benchmarks
# Two workers, one thread each (CI has 2 cores; the tests are small and mostly single-threaded): about half
# the serial wall time. PYTEST_WORKERS=0 runs them in one process.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
set +e
.venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist worksteal "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
