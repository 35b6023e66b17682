#!/usr/bin/env bash
# Everything a GPU host should check, within 8 minutes: versions, the gpu-marked tests, the block and end-to-end
# benchmarks at batch 1 and 128 (ResNet-50 and pre-act ResNet-50 blocks in bfloat16, ResNet-50's in float16, fused
# against unfused and BN-folded; ResNet-50 then ResNet-18 end to end in bfloat16, torch.compile with and without
# CUDA graphs among the backends; torch.compile's blocks as far as their budget goes) and a short load test of the
# fused and eager servers (ResNet-50, bfloat16, loadtest/gpu_repository.toml).
# Results (JSON, markdown, PNG where matplotlib is there, Locust CSVs) and one log per step land in OUT_DIR.
#
#   PYTHONPATH=. bash bench/gpu_check.sh OUT_DIR        (from the repository root; no pip install needed)
#
# Each step has its own time box (sized from a run on an H200: bench/results/gpu_h200_20261127/). A benchmark
# rewrites its JSON and markdown after every row, so a step cut by its box keeps what it measured ("complete":
# false); a step that fails or is cut is logged and the next one runs. Exit status: 0 when every step finished,
# 1 otherwise. The load test needs Locust (the loadtest extra); without it that step is skipped and logged.
set -uo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
out_dir=$1
mkdir -p "$out_dir"
python=${PYTHON:-python}
export PYTHONPATH=${PYTHONPATH:-.}
failed=0

# step NAME SECONDS COMMAND...: runs COMMAND with a time box, its output in OUT_DIR/NAME.log and on the terminal.
step() {
    local name=$1 seconds=$2
    shift 2
    echo "=== $name (at most ${seconds}s): $*"
    local started=$SECONDS
    timeout --signal=INT --kill-after=20 "$seconds" "$@" 2>&1 | tee "$out_dir/$name.log"
    local status=${PIPESTATUS[0]}
    echo "=== $name: exit $status after $((SECONDS - started))s"
    if [[ $status -ne 0 ]]; then
        failed=1
    fi
}

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    "$python" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda,
"cudnn", torch.backends.cudnn.version(), "triton", triton.__version__, "card", torch.cuda.get_device_name())'
} 2>&1 | tee "$out_dir/versions.txt"

bench=(--out-dir "$out_dir" --batch 1 128)
# In order of importance. The tests run in parallel processes: they are mostly Triton compilation (one binary per
# layer shape, tile and dtype), which then sits in Triton's cache for the benchmarks; each benchmark autotunes again
# in its own quiet process. (pytest-benchmark, where installed, only warns under xdist: it is switched off.)
step pytest_gpu 130 "$python" -m pytest -m gpu -q -p no:cacheprovider -p no:benchmark \
    -n "${GPU_CHECK_TEST_WORKERS:-16}" tests
step blocks_bf16 65 "$python" -m bench.blocks "${bench[@]}" --dtype bfloat16 --arch resnet50 preact_resnet50 \
    --variants unfused folded fused
step blocks_fp16 30 "$python" -m bench.blocks "${bench[@]}" --dtype float16 --arch resnet50 \
    --variants unfused folded fused
step model_bf16 110 "$python" -m bench.model "${bench[@]}" --dtype bfloat16 --arch resnet50 resnet18 \
    --backends eager-channels-last compile compile-graphs fused fused-graphs --compile-budget-s 60
step blocks_compile_bf16 25 "$python" -m bench.blocks "${bench[@]}" --dtype bfloat16 --arch resnet50 \
    --variants unfused compile compile-max-autotune --compile-budget-s 20
if "$python" -c 'import locust' 2>/dev/null; then
    step loadtest 95 "$python" -m loadtest --model resnet50 --model-repository loadtest/gpu_repository.toml \
        --backends fused,eager --users 1,64 --duration 5 --out "$out_dir/loadtest"
else
    echo "=== loadtest: skipped, Locust is not installed (pip install '.[loadtest]')" | tee "$out_dir/loadtest.log"
fi

echo "total ${SECONDS}s; results in $out_dir"
ls -l "$out_dir"
exit "$failed"
