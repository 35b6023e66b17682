#!/usr/bin/env bash
# Creates .venv and installs the project with pinned dependencies. Idempotent; used by serve.sh and test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip==25.3
# torch first and alone: on this kind of machine pip finds the pinned CPU build on disk; on a CUDA host,
# install the CUDA build of the same version before running this (README, "On a GPU").
.venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${EXTRAS:+[$EXTRAS]}"
