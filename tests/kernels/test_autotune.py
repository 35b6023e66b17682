"""kernels.autotune: what it keys on, where it keeps results, and what it records.

On a CPU the autotuner runs under the interpreter with a wall-clock timer (Triton's own do_bench needs CUDA) and
Triton never persists there, so reading results back from disk is checked by the `gpu` test at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch
import triton
import triton.language as tl
from triton import knobs

from kernels import autotune as autotune_module
from kernels import conv_configs
from kernels.autotune import CACHED, TUNED, Platform, RecordingAutotuner, autotune, describe_outcomes
from kernels.conv_bn_act import _autotuned_kernel
from tests.support.server import REPO_ROOT

H200 = Platform("NVIDIA H200", "580.159.04", "2.11.0+cu130", "3.6.0")


@triton.jit
def _scale_kernel(x_ptr, out_ptr, n, FACTOR: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) * FACTOR, mask=mask)


def _wall_clock(kernel_call, quantiles):
    started = time.perf_counter()
    kernel_call()
    elapsed_ms = (time.perf_counter() - started) * 1e3
    return [elapsed_ms] * len(quantiles)


@pytest.fixture
def kernel_cache_state():
    """Leaves Triton's cache directory and kernels.autotune's state as they were."""
    with knobs.cache.scope():
        yield
    autotune_module._State.cache_dir = None


def test_platform_tag_names_card_driver_torch_and_triton():
    assert H200.tag == "nvidia-h200_driver-580.159.04_torch-2.11.0+cu130_triton-3.6.0"
    h100 = Platform("NVIDIA H100 80GB HBM3", H200.driver, H200.torch, H200.triton)
    assert h100.tag.startswith("nvidia-h100-80gb-hbm3_")
    # Any one field changed makes another directory.
    for field in ("card", "driver", "torch", "triton"):
        other = Platform(**{**H200.__dict__, field: "x" + getattr(H200, field)})
        assert other.tag != H200.tag, field


@pytest.mark.parametrize(
    "text",
    [
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.04  Thu Oct  2 2025\nGCC version:  gcc 12\n",
        "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build  (dvs-builder@x)\n",
    ],
)
def test_driver_version_reads_the_nvidia_kernel_module(tmp_path, text):
    version_file = tmp_path / "version"
    version_file.write_text(text)
    assert autotune_module.driver_version(version_file) == "580.159.04"


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without the NVIDIA driver reports")
def test_driver_version_without_a_driver(tmp_path):
    assert autotune_module.driver_version(tmp_path / "absent") == "none"


def test_use_cache_dir_points_tritons_cache_at_the_platform_directory(tmp_path, kernel_cache_state):
    directory = autotune_module.use_cache_dir(tmp_path / "kernels", H200)
    assert directory == tmp_path / "kernels" / H200.tag and directory.is_dir()
    assert autotune_module.cache_dir() == directory
    assert knobs.cache.dir == os.environ["TRITON_CACHE_DIR"] == str(directory)
    # Triton's own cache manager (compiled kernels, <kernel>.autotune.json) now writes there.
    written = triton.runtime.cache.get_cache_manager("ab" * 32).put("{}", "probe.autotune.json", binary=False)
    assert os.path.commonpath([written, directory]) == str(directory)
    assert "the kernel cache " + str(directory) in describe_outcomes(Counter({CACHED: 3}))


def test_describe_outcomes_counts_cached_and_tuned(kernel_cache_state):
    line = describe_outcomes(Counter({CACHED: 40, TUNED: 2}))
    assert "40 configs read from the cache, 2 tuned" in line
    assert "not kept" in line
    assert "0 configs read from the cache, 0 tuned" in describe_outcomes(Counter())


def test_autotune_refuses_a_key_that_names_no_argument():
    configs = [triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})]
    with pytest.raises(ValueError, match=r"\['FACTR'\]"):
        autotune("scale, misspelled", configs, ["n", "FACTR"])(_scale_kernel)


def test_conv_key_holds_stride_padding_and_every_fusion_flag():
    key = set(conv_configs.AUTOTUNE_KEY)
    assert {"stride_h", "stride_w", "pad_h", "pad_w", "HAS_RESIDUAL", "APPLY_RELU", "HAS_PROLOGUE"} <= key
    assert {"PROLOGUE_RELU", "SPLIT_K"} <= key  # the prologue's kind and the split change the best tile too
    for form in ("pointwise", "taps", "flat"):
        tuner = _autotuned_kernel(torch.float16, False, form)  # builds it: every key name is a kernel argument
        assert set(tuner.keys) == key
        assert autotune_module.autotuners()[f"conv_bn_act fp16 {form}"] is tuner


def test_each_new_key_is_tuned_once_and_every_launch_is_recorded():
    configs = [triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 64})]
    tuner = RecordingAutotuner(
        "scale", _scale_kernel, _scale_kernel.arg_names, configs, ["n", "FACTOR"],
        reset_to_zero=None, restore_value=None, do_bench=_wall_clock,
    )  # fmt: skip
    x = torch.randn(100)
    out = torch.empty_like(x)

    def launch(factor: float) -> None:
        tuner[lambda meta: (triton.cdiv(100, meta["BLOCK"]),)](x, out, 100, FACTOR=factor)

    with autotune_module.recording_launches() as launches:
        for factor in (2.0, 3.0, 2.0):  # FACTOR is a constexpr passed by keyword, and a key
            launch(factor)
            torch.testing.assert_close(out, x * factor)
    assert len(tuner.cache) == 2
    assert tuner.outcomes == dict.fromkeys(tuner.cache, TUNED)
    # The key values in key order, then one dtype per tensor argument (x, out).
    dtypes = ("torch.float32", "torch.float32")
    assert [entry.key for entry in launches] == [(100, factor, *dtypes) for factor in (2.0, 3.0, 2.0)]
    for recorded in launches:
        assert recorded.autotuner == "scale"
        assert tuner.cache[recorded.key] is recorded.config
    launch(2.0)  # outside the block: not recorded
    assert len(launches) == 3


_TUNE_ONE_LAYER = """
import json, sys, torch
from kernels import autotune
from kernels.conv_bn_act import conv_bn_act, pack_conv_weight
autotune.use_cache_dir(sys.argv[1])
torch.manual_seed(0)
x = torch.randn(3, 28, 28, 64, device="cuda", dtype=torch.bfloat16)
weight = pack_conv_weight(torch.randn(128, 64, 3, 3), torch.bfloat16).cuda()
bias = torch.randn(128, device="cuda")
out = conv_bn_act(x, weight, bias, kernel_size=(3, 3), stride=2, padding=1, relu=True)
counts = autotune.outcome_counts()
print(json.dumps({"cached": counts["cached"], "tuned": counts["tuned"], "sum": float(out.float().sum())}))
"""


@pytest.mark.gpu
def test_a_restart_with_a_warm_cache_reads_its_configs_instead_of_tuning(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    runs = []
    for _ in range(2):
        completed = subprocess.run(
            [sys.executable, "-c", _TUNE_ONE_LAYER, str(tmp_path)],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert completed.returncode == 0, completed.stderr[-4000:]
        runs.append(json.loads(completed.stdout.splitlines()[-1]))
    first, second = runs
    assert (first["cached"], first["tuned"]) == (0, 1)
    assert (second["cached"], second["tuned"]) == (1, 0)
    assert second["sum"] == first["sum"]  # the same config: the same kernel, the same bits
    assert len(list(tmp_path.glob("*/*/*.autotune.json"))) == 1
