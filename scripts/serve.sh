#!/usr/bin/env bash
# Sets everything up, then starts the server on the default model repository (gRPC :50051, KServe HTTP :8000,
# metrics :9100).
# Arguments go to `python -m service` (see `./scripts/serve.sh --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m service "$@"
