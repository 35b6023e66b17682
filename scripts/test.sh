#!/usr/bin/env bash
# Sets everything up, then runs ruff and the whole test suite (kernels under the Triton interpreter on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" --durations=15 "$@"
