"""One concurrency step: Locust headless in a subprocess for a bounded time, its CSVs, and the figures they hold.

StepResult is also what a perf_analyzer step gives (loadtest/perf_analyzer.py): each row names its generator."""

import csv
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from loadtest.server import Target, batch_size_totals

logger = logging.getLogger(__name__)

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
# Locust's start-up (imports, reading the images) and its --stop-timeout come on top of the step's duration.
_STARTUP_ALLOWANCE_S = 60
_STOP_TIMEOUT_S = 10


GENERATOR = "locust"


@dataclass(frozen=True)
class StepResult:
    backend: str
    users: int
    requests: int
    failures: int
    rps: float
    p50_ms: float | None  # None when the step had no request
    p90_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    mean_ms: float
    mean_batch_size: float | None  # from /metrics over the step; None without a /metrics URL or without batches
    exit_code: int  # the generator's
    csv_prefix: str  # the generator's files in --out start with it
    generator: str  # "locust" or "perf_analyzer"
    workload: str  # what its requests were: the Locust user classes, or perf_analyzer's ModelInfer


class Figures(NamedTuple):
    """What a generator measured over a step."""

    requests: int
    rps: float
    p50_ms: float | None
    p90_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    mean_ms: float


NO_FIGURES = Figures(0, 0.0, None, None, None, None, 0.0)


def mean_batch_size(before: tuple[float, float] | None, after: tuple[float, float] | None) -> float | None:
    """The mean batch size between two batch_size_totals readings; None without /metrics or without a batch."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


@dataclass(frozen=True)
class StepSettings:
    model: str
    duration_s: int
    user_classes: tuple[str, ...]
    image_dir: str = ""
    processes: int = 1  # Locust processes sharing the users: one gevent process tops out on a fast server


def locust_command(target: Target, users: int, settings: StepSettings, csv_prefix: Path) -> list[str]:
    """Every user spawns within the first second, and the statistics restart once they all run."""
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", target.address]
    command += ["--users", str(users), "--spawn-rate", str(users), "--run-time", f"{settings.duration_s}s"]
    command += ["--reset-stats", "--stop-timeout", str(_STOP_TIMEOUT_S), "--only-summary", "--csv", str(csv_prefix)]
    if settings.processes > 1:
        command += ["--processes", str(settings.processes)]
    command += ["--model", settings.model, "--image-dir", settings.image_dir, *settings.user_classes]
    return command


def aggregated_row(stats_csv: Path) -> dict[str, str]:
    """The "Aggregated" row of Locust's `<prefix>_stats.csv` (every request name together)."""
    with stats_csv.open(newline="") as file:
        for row in csv.DictReader(file):
            if row["Name"] == "Aggregated":
                return row
    raise ValueError(f"{stats_csv} has no Aggregated row")


def _milliseconds(text: str) -> float | None:
    return None if text == "N/A" else float(text)  # Locust writes N/A for the percentiles of no request


def run_step(target: Target, backend: str, users: int, settings: StepSettings, out_dir: Path) -> StepResult:
    """Runs Locust against `target` with `users` users; its CSVs and log land in `out_dir` as `<backend>_u<users>*`."""
    csv_prefix = out_dir / f"{backend}_u{users}"
    before = batch_size_totals(target, settings.model)
    log_path = csv_prefix.with_name(csv_prefix.name + "_locust.log")
    with log_path.open("wb") as log:
        completed = subprocess.run(
            locust_command(target, users, settings, csv_prefix),
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=settings.duration_s + _STARTUP_ALLOWANCE_S + _STOP_TIMEOUT_S,
            check=False,
        )
    after = batch_size_totals(target, settings.model)
    row = aggregated_row(csv_prefix.with_name(csv_prefix.name + "_stats.csv"))
    if completed.returncode != 0:
        logger.error("locust exited with %d; its log: %s", completed.returncode, log_path)
    return StepResult(
        backend=backend,
        users=users,
        requests=int(row["Request Count"]),
        failures=int(row["Failure Count"]),
        rps=float(row["Requests/s"]),
        p50_ms=_milliseconds(row["50%"]),
        p90_ms=_milliseconds(row["90%"]),
        p95_ms=_milliseconds(row["95%"]),
        p99_ms=_milliseconds(row["99%"]),
        mean_ms=float(row["Average Response Time"]),
        mean_batch_size=mean_batch_size(before, after),
        exit_code=completed.returncode,
        csv_prefix=csv_prefix.name,
        generator=GENERATOR,
        workload=", ".join(settings.user_classes),
    )
