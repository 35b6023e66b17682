"""The sweep's report: a summary JSON and a PNG of latency percentiles and throughput against concurrency."""

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

# Figure without pyplot: no GUI backend or global state, so it draws the same on a server without a display.
from matplotlib.figure import Figure

from loadtest.step import StepResult

_PERCENTILES = (("p50_ms", "p50", "-"), ("p95_ms", "p95", "--"), ("p99_ms", "p99", ":"))


def write_summary(path: Path, steps: Sequence[StepResult], run_info: Mapping[str, object]) -> Path:
    """{**run_info, "steps": [one object per (backend, users) step]} as indented JSON."""
    path.write_text(json.dumps({**run_info, "steps": [asdict(step) for step in steps]}, indent=2) + "\n")
    return path


def plot(path: Path, steps: Sequence[StepResult], title: str) -> Path:
    """Left: p50/p95/p99 latency (ms) against users; right: requests/s against users; one colour per backend and
    generator (a Locust and a perf_analyzer sweep of one server are two series)."""
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    latency_axis, throughput_axis = figure.subplots(1, 2)
    for index, series in enumerate(dict.fromkeys((step.backend, step.generator) for step in steps)):
        runs = sorted((step for step in steps if (step.backend, step.generator) == series), key=lambda step: step.users)
        colour = f"C{index}"
        name = " ".join(series)
        timed = [step for step in runs if step.requests]  # a step without requests has no percentiles
        for field, percentile, style in _PERCENTILES:
            latency_axis.plot([step.users for step in timed], [getattr(step, field) for step in timed], style,
                              marker="o", color=colour, label=f"{name} {percentile}")  # fmt: skip
        throughput_axis.plot([step.users for step in runs], [step.rps for step in runs], marker="o", color=colour,
                             label=name)  # fmt: skip
    all_users = sorted({step.users for step in steps})
    for axis, ylabel in ((latency_axis, "latency (ms)"), (throughput_axis, "requests/s")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(all_users, [str(users) for users in all_users])
        axis.minorticks_off()
        axis.set_xlabel("concurrent users")
        axis.set_ylabel(ylabel)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize="small")
    if any(step.requests for step in steps):
        latency_axis.set_yscale("log")
    figure.suptitle(title)
    figure.savefig(path, dpi=110)
    return path
