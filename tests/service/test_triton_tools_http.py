"""NVIDIA's own HTTP tools against a real server on 127.0.0.1, unchanged: tritonclient[http] (sync, async_infer, the
asyncio client; JSON and binary tensors) and perf_analyzer `-i http` (bounded: a few windows of few requests, at
concurrency 1 and 8), on the shipped digits model."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import models
from models import digits
from tests.support.numerics import CROSS_BACKEND_TOLERANCE, assert_relative_close
from tests.support.server import CPU_ONLY, REPO_ROOT, ServerProcess, serving, write_repository

SIZE = digits.INPUT_SIZE
MAX_BATCH = 8
REPOSITORY = {
    "digits_resnet": {"arch": "digits_resnet", "weights": "pretrained", "input_size": SIZE, "backend": "eager",
                      "max_batch_size": MAX_BATCH, "max_queue_delay_us": 1000},
}  # fmt: skip
PERF_ANALYZER = REPO_ROOT / ".venv" / "perf_analyzer" / "bin" / "perf_analyzer"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    directory = tmp_path_factory.mktemp("triton-tools")
    repository = write_repository(directory / "models.toml", REPOSITORY)
    with serving(directory, repository=repository, env=CPU_ONLY) as running:
        yield running


def check_extensions(extensions: dict, first_input: np.ndarray) -> None:
    """What the probe's get_model_repository_index, get_inference_statistics, unload/load and class_count=3 saw."""
    assert {(entry["name"], entry["state"]) for entry in extensions["index"]} == {("digits_resnet", "READY")}
    (stats,) = extensions["stats"]["model_stats"]
    # Every infer of the probe before it asked: 2 arrays x 6 ways (the module's other tests may have run first).
    assert stats["name"] == "digits_resnet" and stats["inference_stats"]["success"]["count"] >= 12
    assert (extensions["unloaded_ready"], extensions["reloaded_ready"]) == (False, True)
    eager = models.build("digits_resnet", "pretrained")
    with torch.inference_mode():
        reference = eager(torch.from_numpy(first_input))
    for row, logits in zip(extensions["classification"], reference, strict=True):
        scores, indices = zip(*((float(s), int(i)) for s, i, *_ in (entry.split(":") for entry in row)), strict=True)
        assert list(indices) == logits.topk(3).indices.tolist()
        assert_relative_close(torch.tensor(scores), logits.topk(3).values, CROSS_BACKEND_TOLERANCE, what="class_count")


def test_tritonclient_http_works_unchanged(server: ServerProcess, tmp_path: Path):
    rng = np.random.default_rng(5)
    inputs = {
        "digits_resnet:0": rng.standard_normal((2, 3, SIZE, SIZE), dtype=np.float32),
        "digits_resnet:1": rng.standard_normal((1, 3, SIZE, SIZE), dtype=np.float32).astype(np.float16),
    }
    np.savez(tmp_path / "inputs.npz", **inputs)
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "support" / "tritonclient_http_probe.py"),
         f"127.0.0.1:{server.http_port}", str(tmp_path / "inputs.npz"), str(tmp_path / "outputs.npz")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    assert report["live"] and report["ready"] and report["server"]["name"] == "fused-resnet"
    model = report["models"]["digits_resnet"]
    assert model["ready"]
    assert model["metadata"]["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, SIZE, SIZE]}]
    assert model["metadata"]["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert model["config"]["max_batch_size"] == MAX_BATCH
    check_extensions(report["extensions"], inputs["digits_resnet:0"])

    outputs = dict(np.load(tmp_path / "outputs.npz"))
    ways = {
        "in-json-out-json",
        "in-json-out-binary",
        "in-binary-out-json",
        "in-binary-out-binary",
        "async_infer",
        "aio",
    }
    assert set(outputs) == {f"{key}|{way}" for key in inputs for way in ways}
    eager = models.build("digits_resnet", "pretrained")
    for name, logits in outputs.items():
        array = inputs[name.split("|")[0]]
        with torch.inference_mode():
            reference = eager(torch.from_numpy(array.astype(np.float32)))
        assert_relative_close(logits, reference, CROSS_BACKEND_TOLERANCE, what=name)


def test_perf_analyzer_over_http_has_no_errors(server: ServerProcess, tmp_path: Path):
    assert PERF_ANALYZER.exists(), (
        "no perf_analyzer: PERF_ANALYZER_INSTALL_ONLY=1 scripts/perf_analyzer.sh installs it (scripts/test.sh does)"
    )
    failures_before = server.metric("nv_inference_request_failure", model="digits_resnet")
    successes_before = server.metric("nv_inference_request_success", model="digits_resnet")
    report = tmp_path / "perf.csv"
    completed = subprocess.run(
        [str(REPO_ROOT / "scripts" / "perf_analyzer.sh"), "-m", "digits_resnet", "-i", "http",
         "-u", f"127.0.0.1:{server.http_port}", "--concurrency-range", "1:8:7",
         # Bounded: windows of 10 requests, at most 4 per concurrency. A check of correctness, not a measurement: on a
         # shared CPU one window can be 50 times slower than the next, so any 3 windows count as stable (max/min 1001).
         "--measurement-mode", "count_windows", "--measurement-request-count", "10", "--max-trials", "4",
         "--stability-percentage", "100000", "-f", str(report)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout + completed.stderr
    rows = list(csv.DictReader(report.open()))
    # perf_analyzer orders its CSV by throughput, which a loaded machine can invert.
    assert sorted(int(row["Concurrency"]) for row in rows) == [1, 8]
    assert all(float(row["Inferences/Second"]) > 0 for row in rows)
    # perf_analyzer stops at a failed request; the server saw none either.
    assert server.metric("nv_inference_request_failure", model="digits_resnet") == failures_before
    assert server.metric("nv_inference_request_success", model="digits_resnet") - successes_before >= 20
