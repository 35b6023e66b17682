"""bench.serve_throughput end to end on a tiny model (digits_resnet at 32, onnxruntime), every request kind against
one server, bounded to a few requests; and the /proc CPU reading it judges the server by."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from bench.process_cpu import tree_cpu_seconds
from bench.serve_throughput import REQUESTS
from tests.support.server import CPU_ONLY, REPO_ROOT

CALLERS = 2
REQUESTS_PER_CALLER = 3


def test_every_request_kind_is_served_and_measured_with_and_without_frontends(tmp_path: Path):
    command = [sys.executable, "-m", "bench.serve_throughput", "--request", *REQUESTS, "--arch", "digits_resnet"]
    command += ["--input-size", "32", "--backend", "onnxruntime", "--callers", str(CALLERS), "--frontends", "0", "1"]
    command += ["--requests", str(REQUESTS_PER_CALLER), "--rounds", "2", "--reps", "1", "--out-dir", str(tmp_path)]
    done = subprocess.run(
        command, cwd=REPO_ROOT, env={**os.environ, **CPU_ONLY}, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr
    (path,) = tmp_path.glob("serve_throughput_cpu_*.json")
    report = json.loads(path.read_text())
    assert report["backend_alone"]["arch"] == "digits_resnet" and report["backend_alone"]["batch"] == CALLERS
    assert report["backend_alone"]["cpu_ms_per_image"] >= 0
    assert list(report["served"]) == ["0", "1"]
    for frontends, by_request in report["served"].items():
        assert list(by_request) == list(REQUESTS), frontends
        check_served(report, by_request)
        # With frontends, the engine's CPU is reported on its own, a part of the server's.
        for served in by_request.values():
            for measured in served["rounds"]:
                engine = measured["engine_cpu_ms_per_request"]
                assert (engine is None) == (frontends == "0"), (frontends, measured)
                assert engine is None or 0 <= engine <= measured["server_cpu_ms_per_request"], measured


def check_served(report: dict, by_request: dict) -> None:
    payloads = [by_request[request]["payload"] for request in REQUESTS]
    assert payloads[0].startswith("JPEG") and "FP32 [1, 3, 32, 32]" in payloads[1]
    assert "UINT8 [1, 32, 32, 3]" in payloads[2]
    for request, served in by_request.items():
        assert len(served["rounds"]) == 2, request
        for measured in served["rounds"]:
            assert measured["images_per_s"] > 0 and 1 <= measured["mean_batch"] <= CALLERS, (request, measured)
            assert measured["server_cpu_s"] >= 0 and measured["client_cpu_ms_per_request"] >= 0, (request, measured)
            per_request = measured["server_cpu_s"] * 1e3 / (CALLERS * REQUESTS_PER_CALLER)
            assert abs(measured["server_cpu_ms_per_request"] - per_request) < 1e-9
        rate = served["images_per_s"]
        assert rate["p20"] <= rate["median"] <= rate["p80"]
        assert served["served_over_backend"] == rate["median"] / report["backend_alone"]["images_per_s_median"]
    # One round may take less than a clock tick of server CPU; all of them together (36 requests) do not.
    assert sum(measured["server_cpu_s"] for served in by_request.values() for measured in served["rounds"]) > 0


def test_tree_cpu_seconds_counts_a_grandchild():
    # The child starts a grandchild that burns 0.3 s of CPU, then both wait on stdin: only the grandchild works.
    burner = "import time\nwhile time.process_time() < 0.3: pass\nprint('burnt', flush=True)\ninput()"
    parent = textwrap.dedent(f"""
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", {burner!r}], stdin=sys.stdin)
        child.wait()
    """)
    process = subprocess.Popen([sys.executable, "-c", parent], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline() == "burnt\n"
        assert tree_cpu_seconds(process.pid) >= 0.3
    finally:
        process.communicate("\n", timeout=30)


def test_a_model_that_cannot_load_stops_the_bench_at_once_with_the_servers_reason(tmp_path: Path):
    command = [sys.executable, "-m", "bench.serve_throughput", "--request", "infer-uint8", "--arch", "digits_resnet"]
    command += ["--input-size", "8", "--backend", "onnxruntime", "--callers", "2", "--requests", "1", "--rounds", "1"]
    command += ["--reps", "1", "--out-dir", str(tmp_path)]
    done = subprocess.run(
        command, cwd=REPO_ROOT, env={**os.environ, **CPU_ONLY}, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "server did not become ready" in done.stderr and "takes 32x32 inputs, not 8" in done.stderr
    assert not list(tmp_path.iterdir())
