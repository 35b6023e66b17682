"""python -m loadtest's second generator and UINT8 users, end to end: a real server on 127.0.0.1 swept at one step by
Locust with ModelInfer UINT8 users and by NVIDIA's perf_analyzer (FP32 ModelInfer), both rows in one report."""

import csv
import json

import pytest

from loadtest import perf_analyzer, server
from loadtest.__main__ import build_parser, main

PERF_ANALYZER_BINARY = perf_analyzer.SCRIPT.parents[1] / ".venv" / "perf_analyzer" / "bin" / "perf_analyzer"


def test_locust_uint8_users_and_perf_analyzer_fill_one_report(tmp_path):
    assert PERF_ANALYZER_BINARY.exists(), (
        "no perf_analyzer: PERF_ANALYZER_INSTALL_ONLY=1 scripts/perf_analyzer.sh installs it (scripts/test.sh does)"
    )
    out = tmp_path / "report"
    argv = ["--backends", "eager", "--model", "digits_resnet", "--users", "2", "--duration", "3", "--out", str(out)]
    argv += ["--generators", "locust,perf_analyzer", "--user-classes", "ModelInferUint8User"]

    code = main(argv)

    logs = "\n".join(path.read_text(errors="replace") for path in out.glob("eager_u2_*.log"))
    assert code == 0, logs
    locust_row, perf_row = json.loads((out / "summary.json").read_text())["steps"]
    assert (locust_row["generator"], locust_row["workload"]) == ("locust", "ModelInferUint8User")
    assert perf_row["generator"] == "perf_analyzer" and perf_row["workload"].startswith("ModelInfer FP32")
    for row in (locust_row, perf_row):
        assert (row["backend"], row["users"], row["exit_code"], row["failures"]) == ("eager", 2, 0, 0)
        assert row["requests"] > 0 and row["rps"] > 0
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert row["mean_ms"] > 0 and row["mean_batch_size"] >= 1
    # The UINT8 requests reached the model: Locust's only request name is ModelInfer, none failed.
    with (out / "eager_u2_stats.csv").open(newline="") as file:
        names = {row["Name"] for row in csv.DictReader(file)} - {"Aggregated"}
    assert names == {"/inference.GRPCInferenceService/ModelInfer"}
    # The perf_analyzer row is its CSV's, converted from µs: p99 exactly as perf_analyzer wrote it.
    with (out / "eager_u2_perf_analyzer.csv").open(newline="") as file:
        (pa_row,) = csv.DictReader(file)
    assert perf_row["p99_ms"] == float(pa_row["p99 latency"]) / 1000
    assert perf_row["rps"] == float(pa_row["Inferences/Second"])
    assert (out / "summary.png").read_bytes().startswith(b"\x89PNG")


def test_perf_analyzer_that_cannot_reach_the_server_gives_a_failed_step_without_figures(tmp_path):
    settings = perf_analyzer.PerfAnalyzerSettings("digits_resnet", duration_s=3, stability_percentage=1000)
    nobody = server.Target(f"127.0.0.1:{server.free_port()}")  # nothing listens there

    step = perf_analyzer.run_perf_analyzer_step(nobody, "none", 1, settings, tmp_path)

    assert step.exit_code != 0 and step.generator == "perf_analyzer"
    assert step.requests == 0 and step.p50_ms is None and step.p99_ms is None
    assert "Connection refused" in (tmp_path / "none_u1_perf_analyzer.log").read_text(errors="replace")


def test_an_unknown_generator_is_refused(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--generators", "locust,wrk"])
    assert "'wrk' is not one of locust, perf_analyzer" in capsys.readouterr().err
