"""One concurrency step driven by NVIDIA's perf_analyzer (C++, no GIL) instead of Locust, as the same StepResult.

perf_analyzer sends KServe v2 ModelInfer over gRPC with random data in the layout ModelMetadata advertises (FP32
[1, 3, S, S] for the servers loadtest starts); it takes each input's datatype and shape from the model's metadata and
config (`--input-data` with a [32, 32, 3] tensor: "The supplied shape of [32,32,3] for input "input" is incompatible
with the model's input shape of [3,32,32]"), so it sends UINT8 NHWC only to a model whose repository table says
`advertised_input = "uint8_nhwc"`. The
step's duration is split into three time windows, the fewest perf_analyzer judges stability on; with
`stability_percentage` above their spread the three count as stable and the step ends after them, so a step takes
the same time as a Locust step. Its figures cover the requests of those windows: throughput, the client-side
latency percentiles of its CSV and the request count and mean latency of its log.
"""

import csv
import logging
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from loadtest.server import Target, batch_size_totals
from loadtest.step import NO_FIGURES, Figures, StepResult, mean_batch_size

logger = logging.getLogger(__name__)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "perf_analyzer.sh"
GENERATOR = "perf_analyzer"
WORKLOAD = "ModelInfer FP32 [1, 3, S, S] (perf_analyzer's random data)"
_WINDOWS = 3  # perf_analyzer compares the last three windows for stability
# A stability percentage any three windows meet: on a shared 2-core CPU, 1000 still failed
# 1 s windows at 2 users, one of which stalled.
ANY_WINDOWS = 1e6
# Start-up (and, on first use, scripts/perf_analyzer.sh installing the binary) on top of the windows.
_STARTUP_ALLOWANCE_S = 120
# perf_analyzer's log, once per concurrency: "    Request count: 3331" and "    Avg latency: 7206 usec (...)".
_REQUEST_COUNT = re.compile(r"^\s*Request count: (\d+)", re.MULTILINE)
_AVG_LATENCY_US = re.compile(r"^\s*Avg latency: (\d+) usec", re.MULTILINE)


@dataclass(frozen=True)
class PerfAnalyzerSettings:
    model: str
    duration_s: int
    # Spread (%) of the three windows' latency and throughput that perf_analyzer accepts as stable; beyond it the step
    # fails ("Failed to obtain stable measurement"). Its own default, 10, is rarely met on a shared CPU.
    stability_percentage: float


def perf_analyzer_command(target: Target, users: int, settings: PerfAnalyzerSettings, csv_path: Path) -> list[str]:
    window_ms = max(1, settings.duration_s * 1000 // _WINDOWS)
    command = [str(SCRIPT), "-m", settings.model, "-i", "grpc", "-u", target.address]
    command += ["--concurrency-range", str(users), "--measurement-mode", "time_windows"]
    command += ["--measurement-interval", str(window_ms), "--max-trials", str(_WINDOWS)]
    command += ["--stability-percentage", str(settings.stability_percentage), "-f", str(csv_path)]
    return command


def _microseconds_to_ms(text: str) -> float:
    return float(text) / 1000


def _parse(csv_path: Path, log_text: str) -> Figures:
    """The one concurrency row of perf_analyzer's CSV (latencies in µs) and its log's request count and mean."""
    with csv_path.open(newline="") as file:
        (row,) = csv.DictReader(file)
    requests = _REQUEST_COUNT.findall(log_text)
    mean_us = _AVG_LATENCY_US.findall(log_text)
    if not requests or not mean_us:
        raise ValueError(f"perf_analyzer's log has no 'Request count' or 'Avg latency' line; its CSV: {csv_path}")
    return Figures(
        requests=int(requests[-1]),
        rps=float(row["Inferences/Second"]),
        p50_ms=_microseconds_to_ms(row["p50 latency"]),
        p90_ms=_microseconds_to_ms(row["p90 latency"]),
        p95_ms=_microseconds_to_ms(row["p95 latency"]),
        p99_ms=_microseconds_to_ms(row["p99 latency"]),
        mean_ms=_microseconds_to_ms(mean_us[-1]),
    )


def run_perf_analyzer_step(
    target: Target, backend: str, users: int, settings: PerfAnalyzerSettings, out_dir: Path
) -> StepResult:
    """perf_analyzer at concurrency `users`; its CSV and log land in `out_dir` as `<backend>_u<users>_perf_analyzer.*`.

    perf_analyzer stops at the first failed request and exits non-zero: such a step has no figures and fails the
    run (its log says what failed)."""
    name = f"{backend}_u{users}_{GENERATOR}"
    csv_path, log_path = out_dir / f"{name}.csv", out_dir / f"{name}.log"
    before = batch_size_totals(target, settings.model)
    with log_path.open("wb") as log:
        completed = subprocess.run(
            perf_analyzer_command(target, users, settings, csv_path),
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=settings.duration_s + _STARTUP_ALLOWANCE_S,
            check=False,
        )
    after = batch_size_totals(target, settings.model)
    if completed.returncode == 0:
        figures = _parse(csv_path, log_path.read_text(errors="replace"))
    else:
        logger.error("perf_analyzer exited with %d; its log: %s", completed.returncode, log_path)
        figures = NO_FIGURES
    return StepResult(
        backend=backend,
        users=users,
        failures=0,  # perf_analyzer counts none: it stops at the first, and its exit code fails the step
        mean_batch_size=mean_batch_size(before, after),
        exit_code=completed.returncode,
        csv_prefix=name,
        generator=GENERATOR,
        workload=WORKLOAD,
        **figures._asdict(),
    )
