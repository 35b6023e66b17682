#!/usr/bin/env bash
# Load through the cluster, unchanged: for each replica count, ./scripts/cluster.sh (one replica per GPU where GPUs
# exist) and `python -m loadtest --host` against its Envoy. Each count's report (loadtest's summary.json and .png,
# Locust's CSVs), the cluster's logs and its CPU time per request (bench/cluster_cpu.py) land in OUT_DIR/replicas-N/.
#
#   bash bench/cluster_scaling.sh OUT_DIR
#   REPLICAS="1 2 4 8" CLUSTER_ARGS="--model-repository loadtest/gpu_repository.toml" \
#       LOADTEST_ARGS="--model resnet50 --users 1,16,64,256" bash bench/cluster_scaling.sh OUT_DIR   # a GPU host
#
# Default: digits_resnet (offline everywhere: bench/cluster_repository.toml), on each replica's default backend (onnxruntime on a CPU), 1 and 3
# replicas, loadtest's default users (1, 4, 16, 64), 15 s a step. Exit 1 when a cluster or a load test fails.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
out_dir=$(realpath -m "$1")
mkdir -p "$out_dir"
port=${PORT:-8080}
read -r -a loadtest_args <<< "${LOADTEST_ARGS:---duration 15}"
read -r -a cluster_args <<< "${CLUSTER_ARGS:---model-repository bench/cluster_repository.toml}"

for replicas in ${REPLICAS:-1 3}; do
    run_dir="$out_dir/replicas-$replicas"
    mkdir -p "$run_dir"
    ./scripts/cluster.sh --replicas "$replicas" --port "$port" --log-dir "$run_dir/cluster-logs" "${cluster_args[@]}" \
        > "$run_dir/cluster.out" 2> "$run_dir/cluster.err" &
    cluster=$!
    for _ in $(seq 1 900); do
        grep -q '^ready:' "$run_dir/cluster.out" && break
        kill -0 "$cluster" 2> /dev/null || { cat "$run_dir/cluster.err" >&2; exit 1; }
        sleep 1
    done
    grep -q '^ready:' "$run_dir/cluster.out" || { kill -TERM "$cluster"; wait "$cluster" || true; exit 1; }
    cat "$run_dir/cluster.out"
    admin_port=$(sed -n 's|.*admin http://127.0.0.1:\([0-9]*\).*|\1|p' "$run_dir/cluster.out")
    cpu=(.venv/bin/python -m bench.cluster_cpu --pid "$cluster" --admin-port "$admin_port")
    status=0
    "${cpu[@]}" --out "$run_dir/cpu_at_ready.json" || status=$?
    .venv/bin/python -m loadtest --host "127.0.0.1:$port" --out "$run_dir" "${loadtest_args[@]}" || status=$?
    "${cpu[@]}" --out "$run_dir/cpu.json" --since "$run_dir/cpu_at_ready.json" || status=$?
    rm -rf "$run_dir/digits_images"  # loadtest's copy of the images it sent
    kill -TERM "$cluster"
    wait "$cluster" || status=$?
    [[ $status -eq 0 ]] || exit 1
done
