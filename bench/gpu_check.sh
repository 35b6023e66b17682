#!/usr/bin/env bash
# Everything a GPU host should check, within 8 minutes, in order of importance: the card, driver and versions; the
# gpu-marked tests; ResNet-50 bfloat16 end to end from a batch already on the device at batch 1 and 256 (fused + CUDA
# graphs against eager channels_last, torch.compile with CUDA graphs and max-autotune); the ResNet-50 blocks in
# bfloat16, each variant timed inside a CUDA graph; the per-layer breakdown of the fused ResNet-50 at batch 1 and 128
# (kernel time per convolution and the config autotuning chose); ResNet-50 and ResNet-18 end to end in bfloat16 and
# float16 at batch 1 to 256 from device, pinned and pageable memory; the float16 and torch.compile blocks; and a short
# load test of the fused and eager servers (ResNet-50, bfloat16, loadtest/gpu_repository.toml).
#
#   PYTHONPATH=. bash bench/gpu_check.sh [--dry-run] OUT_DIR      (from the repository root; no pip install needed)
#
# Results (JSON, markdown, PNG where matplotlib is there, Locust CSVs) and one log per step land in OUT_DIR; result
# files are named by card, dtype, torch and Triton versions and date, and every log starts with a line naming the
# card, driver, versions and date. The benchmarks and the load test's servers keep compiled kernels and autotune
# results in OUT_DIR/kernel-cache (per platform: --kernel-cache-dir), so each step reads the configs the earlier ones
# tuned, and the layer breakdown says which were read ("cached") and which tuned; it holds binaries: don't commit it.
#
# Each step has its own time box (sizes from the H200 runs in bench/results/gpu_h200_20261127/), and the whole run
# stops at GPU_CHECK_BUDGET_S (480): a step gets at most what is left. A benchmark rewrites its JSON and markdown
# after every row, so a step cut by its box keeps what it measured ("complete": false); a step that fails or is cut
# is logged and the next one runs. Exit status: 0 when every step finished, 1 otherwise. The load test needs Locust
# (the loadtest extra); without it that step is skipped and logged.
#
# --dry-run needs no GPU: every step's exact command runs in its checking mode instead (the benchmarks and the load
# test with --dry-run: arguments parsed, rows listed, nothing measured; pytest with --collect-only), and the run fails
# if any of them fails or the time boxes add up to more than the budget.
set -uo pipefail

dry_run=0
if [[ ${1:-} == --dry-run ]]; then
    dry_run=1
    shift
fi
if [[ $# -ne 1 ]]; then
    echo "usage: $0 [--dry-run] OUT_DIR" >&2
    exit 2
fi
out_dir=$1
mkdir -p "$out_dir"
python=${PYTHON:-python}
export PYTHONPATH=${PYTHONPATH:-.}
budget_s=${GPU_CHECK_BUDGET_S:-480}
grace_s=10  # after a box's SIGINT, the seconds before SIGKILL
kernel_cache=$out_dir/kernel-cache
failed=0
boxes_s=0

# step NAME SECONDS COMMAND...: runs COMMAND with a time box, its output in OUT_DIR/NAME.log and on the terminal.
step() {
    local name=$1 seconds=$2
    shift 2
    boxes_s=$((boxes_s + seconds))
    local log=$out_dir/$name.log
    echo "# $name: $stamp" >"$log"
    if ((dry_run)); then
        if [[ " $* " == *" -m pytest "* ]]; then
            set -- "$@" --collect-only -n 0
        else
            set -- "$@" --dry-run
        fi
        echo "=== $name (dry run of a ${seconds}s step): $*"
        "$@" >>"$log" 2>&1
        local status=$?
        echo "=== $name: exit $status; $(grep -c . "$log") lines in $log"
        if [[ $status -ne 0 ]]; then
            tail -20 "$log"
            failed=1
        fi
        return
    fi
    local left=$((budget_s - SECONDS - grace_s))
    if ((left < 10)); then
        echo "=== $name: not run, the ${budget_s}s budget is spent" | tee -a "$log"
        failed=1
        return
    fi
    ((seconds > left)) && seconds=$left
    echo "=== $name (at most ${seconds}s): $*"
    local started=$SECONDS
    timeout --signal=INT --kill-after="$grace_s" "$seconds" "$@" 2>&1 | tee -a "$log"
    local status=${PIPESTATUS[0]}
    echo "=== $name: exit $status after $((SECONDS - started))s"
    if [[ $status -ne 0 ]]; then
        failed=1
    fi
}

# The card, driver, versions and date, in versions.txt and (as $stamp) at the top of every log.
versions=$("$python" -c '
import datetime, torch, triton
from kernels.autotune import current_platform
cuda = torch.cuda.is_available()
platform = current_platform()
print(datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "card", platform.card, "driver",
      platform.driver, "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version() if cuda else None, "triton", triton.__version__)
' 2>&1) || failed=1
stamp=${versions//$'\n'/ }
{
    echo "$versions"
    if ((dry_run)); then
        echo "dry run: nvidia-smi not asked"
    else
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    fi
} 2>&1 | tee "$out_dir/versions.txt"

bench=(--device cuda --out-dir "$out_dir" --kernel-cache-dir "$kernel_cache")
all_batches=(--batch 1 8 32 128 256)
model_backends=(--backends fused-graphs eager-channels-last compile compile-max-autotune)
# The tests run in parallel processes: they are mostly Triton compilation (one binary per layer shape, tile and
# dtype). Each benchmark then autotunes in its own quiet process, or reads what an earlier benchmark step tuned.
# (pytest-benchmark, where installed, only warns under xdist: it is switched off.) The first model step holds the
# rows the targets are judged by; max-autotune compiles before reduce-overhead there, so the compile budget goes to
# it first; Inductor's on-disk caches (FX graphs, autotuning) can make the later steps' ResNet-50 compilations cheaper.
step pytest_gpu 120 "$python" -m pytest -m gpu -q -p no:cacheprovider -p no:benchmark \
    -n "${GPU_CHECK_TEST_WORKERS:-16}" tests
step model_resnet50_bf16_device 70 "$python" -m bench.model "${bench[@]}" --dtype bfloat16 --arch resnet50 \
    --batch 1 256 --inputs device \
    --backends fused-graphs eager-channels-last compile-max-autotune compile-graphs --compile-budget-s 50
step blocks_bf16 40 "$python" -m bench.blocks "${bench[@]}" --dtype bfloat16 --arch resnet50 --batch 1 128 \
    --variants unfused folded fused
step layers_bf16 25 "$python" -m bench.layers "${bench[@]}" --dtype bfloat16 --arch resnet50 --batch 1 128
step model_bf16 55 "$python" -m bench.model "${bench[@]}" --dtype bfloat16 --arch resnet50 resnet18 \
    "${all_batches[@]}" --inputs device pinned pageable "${model_backends[@]}" --compile-budget-s 30
step model_fp16 40 "$python" -m bench.model "${bench[@]}" --dtype float16 --arch resnet50 resnet18 \
    "${all_batches[@]}" --inputs device pinned pageable "${model_backends[@]}" --compile-budget-s 20
step blocks_fp16 20 "$python" -m bench.blocks "${bench[@]}" --dtype float16 --arch resnet50 --batch 1 128 \
    --variants unfused folded fused
step blocks_compile_bf16 15 "$python" -m bench.blocks "${bench[@]}" --dtype bfloat16 --arch resnet50 --batch 1 128 \
    --variants unfused compile compile-max-autotune --compile-budget-s 10
if "$python" -c 'import locust' 2>/dev/null; then
    # The servers it starts inherit the environment: the fused one reads the configs the benchmarks tuned.
    step loadtest 60 env RESNET_SERVE_KERNEL_CACHE_DIR="$kernel_cache" "$python" -m loadtest --model resnet50 \
        --model-repository loadtest/gpu_repository.toml --backends fused,eager --users 1,64 --duration 5 \
        --out "$out_dir/loadtest"
else
    echo "=== loadtest: skipped, Locust is not installed (pip install '.[loadtest]')" | tee "$out_dir/loadtest.log"
fi

if ((dry_run)); then
    echo "dry run: time boxes add up to ${boxes_s}s of the ${budget_s}s budget"
    if ((boxes_s > budget_s)); then
        echo "dry run FAILED: the time boxes exceed the budget" >&2
        failed=1
    fi
else
    tuned=$(find "$kernel_cache" -name '*.autotune.json' 2>/dev/null | wc -l)
    echo "kernel cache: $tuned autotune results in $kernel_cache"
    echo "total ${SECONDS}s; results in $out_dir"
    ls -l "$out_dir"
fi
exit "$failed"
