"""python -m loadtest end to end: a real server on 127.0.0.1, Locust in a subprocess, the JSON and PNG report."""

import json

from loadtest.__main__ import main


def test_one_step_against_a_real_server_reports_requests_and_no_failure(tmp_path):
    out = tmp_path / "report"
    argv = ["--backends", "eager", "--model", "digits_resnet", "--users", "2", "--duration", "3", "--out", str(out)]
    argv += ["--user-classes", "ClassifyUser,ModelInferUser"]

    assert main(argv) == 0, (out / "eager_u2_locust.log").read_text()

    summary = json.loads((out / "summary.json").read_text())
    (step,) = summary["steps"]
    assert (step["backend"], step["users"]) == ("eager", 2)
    assert step["requests"] > 0 and step["failures"] == 0
    assert step["rps"] > 0 and 0 < step["p50_ms"] <= step["p99_ms"]
    assert step["mean_batch_size"] >= 1
    assert (out / "eager_u2_stats.csv").is_file()
    assert (out / "summary.png").read_bytes().startswith(b"\x89PNG")


def test_a_model_missing_from_the_repository_fails_the_run_before_any_step(tmp_path):
    out = tmp_path / "report"

    assert main(["--backends", "eager", "--model", "no_such_model", "--users", "1", "--out", str(out)]) == 1

    assert json.loads((out / "summary.json").read_text())["steps"] == []
