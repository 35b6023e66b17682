"""python -m loadtest end to end: a real server on 127.0.0.1, Locust in a subprocess, the JSON and PNG report."""

import json
import time

import loadtest.__main__ as loadtest_main
from loadtest import server
from loadtest.__main__ import main
from loadtest.report import plot
from loadtest.step import StepResult


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


def test_a_model_that_fails_to_load_fails_the_run_at_once_with_the_reason(tmp_path, caplog):
    repository = tmp_path / "models.toml"
    missing = tmp_path / "missing.pt"
    repository.write_text(f'[models.broken]\narch = "digits_resnet"\ninput_size = 32\nweights = "{missing}"\n')
    out = tmp_path / "report"
    argv = ["--backends", "eager", "--model", "broken", "--model-repository", str(repository), "--users", "1"]

    started = time.monotonic()
    assert main([*argv, "--out", str(out)]) == 1

    # The server reports the load failure within seconds; waiting for readiness would take server.READY_TIMEOUT_S.
    assert time.monotonic() - started < server.READY_TIMEOUT_S / 2
    assert "failed to load" in caplog.text and str(missing) in caplog.text
    assert json.loads((out / "summary.json").read_text())["steps"] == []


def test_locust_processes_share_each_steps_users(tmp_path):
    out = tmp_path / "report"
    argv = ["--backends", "eager", "--model", "digits_resnet", "--users", "4", "--duration", "3"]

    assert main([*argv, "--locust-processes", "2", "--out", str(out)]) == 0, (out / "eager_u4_locust.log").read_text()

    (step,) = json.loads((out / "summary.json").read_text())["steps"]
    assert step["requests"] > 0 and step["failures"] == 0
    assert "2 workers connected" in (out / "eager_u4_locust.log").read_text()


def _step(users: int, requests: int) -> StepResult:
    latency = 5.0 if requests else None  # Locust reports no percentiles for a step without requests
    return StepResult("eager", users, requests, 0, requests / 3, latency, latency, latency, latency,
                      latency or 0.0, None, 0, f"eager_u{users}", "locust", "ModelInferUser")  # fmt: skip


def test_a_step_without_requests_fails_the_run_and_still_gets_a_report(tmp_path, monkeypatch, caplog):
    steps = iter([_step(1, 30), _step(4, 0)])
    monkeypatch.setattr(server, "wait_ready", lambda target, model: "eager")
    monkeypatch.setattr(loadtest_main, "run_step", lambda *args: next(steps))
    out = tmp_path / "report"
    argv = ["--host", "127.0.0.1:1", "--users", "1,4", "--user-classes", "ModelInferUser", "--out", str(out)]

    assert main(argv) == 1

    assert "eager, 4 users, locust: no request completed" in caplog.text
    assert [step["requests"] for step in json.loads((out / "summary.json").read_text())["steps"]] == [30, 0]
    assert (out / "summary.png").read_bytes().startswith(b"\x89PNG")
    # Also when no step has a latency to draw on the log scale.
    assert plot(tmp_path / "none.png", [_step(1, 0)], "nothing").read_bytes().startswith(b"\x89PNG")
