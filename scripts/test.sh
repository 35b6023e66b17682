#!/usr/bin/env bash
# Sets everything up, then runs ruff, mypy and the whole test suite (kernels under the Triton interpreter on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test bash scripts/setup.sh
# tests/deploy/test_compose.py validates docker-compose.yml with Debian's docker-compose (no Docker engine needed).
command -v docker-compose >/dev/null || { apt-get update -qq && apt-get install -y -qq docker-compose >/dev/null; }
# The perf_analyzer tests drive the server with NVIDIA's binary: installed here, so that no test downloads anything.
PERF_ANALYZER_INSTALL_ONLY=1 bash scripts/perf_analyzer.sh >/dev/null
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy  # kernels/, models/, service/: [tool.mypy] in pyproject.toml
.venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" --durations=15 "$@"
