#!/usr/bin/env bash
# Runs NVIDIA Triton's perf_analyzer (C++, no GIL: the load generator that can drive a GPU server), installing it
# first where it is missing. Arguments go to perf_analyzer, e.g.
#   ./scripts/perf_analyzer.sh -m digits_resnet -i grpc -u 127.0.0.1:50051 --concurrency-range 1:16
#
# The binary comes from the tritonclient 2.40.0 wheel (later wheels no longer ship it), which cannot share a venv with
# the tritonclient the tests import (2.73.0): only its binary is unpacked, into .venv/perf_analyzer/. It links
# libcudart.so.12 (unpacked from the nvidia-cuda-runtime-cu12 wheel; no GPU is needed to drive a server over the
# network) and libb64 (Debian's libb64-0d). PERF_ANALYZER_INSTALL_ONLY=1: install, print the binary's path, exit.
set -euo pipefail
# No cd: perf_analyzer's own relative paths (-f results.csv, --input-data) stay relative to the caller's directory.
root="$(cd "$(dirname "$0")/.." && pwd)"
TRITONCLIENT_VERSION=2.40.0
CUDA_RUNTIME_VERSION=12.9.79
home="$root/.venv/perf_analyzer"
binary=$home/bin/perf_analyzer

if [ ! -x "$binary" ] || [ ! -e "$home/lib/libcudart.so.12" ]; then
    [ -x "$root/.venv/bin/python" ] || bash "$root/scripts/setup.sh"
    wheels=$(mktemp -d)
    trap 'rm -rf "$wheels"' EXIT
    "$root/.venv/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps --dest "$wheels" \
        "tritonclient==$TRITONCLIENT_VERSION" "nvidia-cuda-runtime-cu12==$CUDA_RUNTIME_VERSION" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    mkdir -p "$home/bin" "$home/lib"
    "$root/.venv/bin/python" - "$wheels" "$home" "$TRITONCLIENT_VERSION" <<'PY'
import pathlib, shutil, sys, zipfile

wheels, home, version = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
members = {
    f"tritonclient-{version}.data/data/bin/perf_analyzer": home / "bin" / "perf_analyzer",
    "nvidia/cuda_runtime/lib/libcudart.so.12": home / "lib" / "libcudart.so.12",
}
for wheel in wheels.glob("*.whl"):
    with zipfile.ZipFile(wheel) as archive:
        for name in set(archive.namelist()) & members.keys():
            with archive.open(name) as source, open(members[name], "wb") as target:
                shutil.copyfileobj(source, target)
            members[name].chmod(0o755)
PY
fi
if ! ldconfig -p | grep -q libb64.so.0d; then
    apt-get update -qq && apt-get install -y -qq libb64-0d >/dev/null
fi
if [ "${PERF_ANALYZER_INSTALL_ONLY:-0}" = 1 ]; then
    echo "$binary"
    exit 0
fi
LD_LIBRARY_PATH="$home/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$binary" "$@"
