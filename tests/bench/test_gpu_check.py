"""bench/gpu_check.sh --dry-run: every step's exact command runs in its checking mode on this GPU-less machine (the
benchmarks and the load test parse their arguments and list their rows, pytest collects the gpu tests), every log
names the card, versions and date, and the time boxes fit the 8-minute budget."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import triton

from tests.support.server import REPO_ROOT

STEPS = ("pytest_gpu", "model_resnet50_bf16_device", "blocks_bf16", "layers_bf16", "model_bf16", "model_fp16",
         "blocks_fp16", "blocks_compile_bf16", "loadtest")  # fmt: skip


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, object]:
    out_dir = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO_ROOT)}
    command = ["bash", str(REPO_ROOT / "bench" / "gpu_check.sh"), "--dry-run", str(out_dir)]
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    return completed, out_dir


def test_every_step_passes_its_dry_run(dry_run):
    completed, out_dir = dry_run
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    assert re.findall(r"^=== (\w+): exit 0;", completed.stdout, re.MULTILINE) == list(STEPS)
    assert not list(out_dir.glob("*.json")), "a dry run measured and wrote results"


def test_every_log_names_the_card_versions_and_date(dry_run):
    _, out_dir = dry_run
    for step in STEPS:
        first = (out_dir / f"{step}.log").read_text().splitlines()[0]
        assert re.match(rf"# {step}: \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ card \S+ driver \S+ torch \S+ ", first), first
        assert f"triton {triton.__version__}" in first


def test_the_model_steps_list_device_pinned_and_pageable_rows(dry_run):
    _, out_dir = dry_run
    first = (out_dir / "model_resnet50_bf16_device.log").read_text()
    # The priority rows: ResNet-50 bfloat16 from the device at batch 1 and 256, compile-max-autotune among them.
    for batch in (1, 256):
        for kind in ("fused-graphs", "eager-channels-last", "compile-max-autotune"):
            assert f"resnet50 {kind}, batch {batch}, input device: timing cuda-events" in first
    assert "input pinned" not in first
    rows = (out_dir / "model_bf16.log").read_text()
    for arch in ("resnet50", "resnet18"):
        for batch in (1, 8, 32, 128, 256):
            assert f"{arch} fused-graphs, batch {batch}, input pinned: timing wall" in rows
            assert f"{arch} compile-max-autotune, batch {batch}, input pageable: timing wall" in rows
    assert "cuda-graph" in (out_dir / "blocks_bf16.log").read_text()
    assert "layer4.2.conv3, timing profiler-cuda" in (out_dir / "layers_bf16.log").read_text()


def test_the_time_boxes_fit_eight_minutes(dry_run):
    completed, _ = dry_run
    boxes, budget = map(int, re.search(r"time boxes add up to (\d+)s of the (\d+)s budget", completed.stdout).groups())
    assert budget == 480 and boxes <= budget
