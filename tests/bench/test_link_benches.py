"""bench.engine_overhead and bench.transport end to end, bounded to a few requests: every round is measured and
written, and every request gets its own answer (the benches match answers to requests by id and fail otherwise)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support.server import CPU_ONLY, REPO_ROOT

ROUNDS = 2


def run_bench(module: str, tmp_path: Path, *arguments: str) -> dict:
    command = [sys.executable, "-m", module, *arguments, "--rounds", str(ROUNDS), "--out-dir", str(tmp_path)]
    done = subprocess.run(
        command, cwd=REPO_ROOT, env={**os.environ, **CPU_ONLY}, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-4000:]
    (path,) = tmp_path.glob("*.json")
    return json.loads(path.read_text())


def check_measured(result: dict, rate: str, cpu: set[str]) -> None:
    keys = {rate, *cpu}
    assert len(result["rounds"]) == ROUNDS
    for measured in result["rounds"]:
        assert set(measured) == keys and measured[rate] > 0, measured
        assert all(measured[key] >= 0 for key in cpu), measured
    for key in keys:
        assert result[key]["p20"] <= result[key]["median"] <= result[key]["p80"]


def test_engine_overhead_measures_the_engine_and_the_links_per_request(tmp_path: Path):
    result = run_bench("bench.engine_overhead", tmp_path, "--frontends", "2", "--callers", "3", "--requests", "5")
    assert result["settings"] == {"frontends": 2, "callers": 3, "requests": 5, "rounds": ROUNDS}
    check_measured(result, "requests_per_s", {"engine_cpu_us_per_request", "link_cpu_us_per_request", "mean_batch"})
    # Every request was computed: at most its frontends' callers were queued together.
    assert all(1 <= measured["mean_batch"] <= 2 * 3 for measured in result["rounds"]), result["rounds"]


def test_transport_measures_both_transports_per_round_trip(tmp_path: Path):
    result = run_bench("bench.transport", tmp_path, "--callers", "4", "--requests", "20")
    assert list(result["transports"]) == ["unix", "zmq"]
    for measured in result["transports"].values():
        check_measured(measured, "round_trips_per_s", {"caller_cpu_us_per_round_trip", "peer_cpu_us_per_round_trip"})
