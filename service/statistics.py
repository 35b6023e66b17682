"""Per-model inference statistics in Triton's terms (InferStatistics, InferBatchStatistics), as plain counters.

The KServe ModelStatistics RPC (and an HTTP /v2/models/stats frontend) turn these into protobuf messages through
service/servicers/kserve_messages.py. Everything is updated on the event loop (the batcher's on_batch callback runs
there too), so no lock is needed. Durations are nanoseconds, as Triton reports them.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Duration:
    """How many times something happened and its total time (Triton's StatisticDuration)."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns


@dataclass
class BatchTimes:
    """The backend runs of one batch size; its input and output are made per request, so only compute_infer."""

    compute_infer: Duration = field(default_factory=Duration)


@dataclass
class RequestTimes:
    """What one successful request spent where (nanoseconds)."""

    queue_ns: int
    compute_input_ns: int
    compute_infer_ns: int
    compute_output_ns: int


@dataclass
class ModelStats:
    """One model's counters since the server started. `last_inference_ms`: milliseconds since the epoch, 0 = never."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0  # images (batch rows) inferred
    execution_count: int = 0  # backend runs (batches)
    last_inference_ms: int = 0
    batches: dict[int, BatchTimes] = field(default_factory=lambda: defaultdict(BatchTimes))

    def record_success(self, rows: int, total_ns: int, times: RequestTimes) -> None:
        self.success.add(total_ns)
        self.queue.add(times.queue_ns)
        self.compute_input.add(times.compute_input_ns)
        self.compute_infer.add(times.compute_infer_ns)
        self.compute_output.add(times.compute_output_ns)
        self.inference_count += rows
        self.last_inference_ms = time.time_ns() // 1_000_000

    def record_failure(self, total_ns: int) -> None:
        self.fail.add(total_ns)
        self.last_inference_ms = time.time_ns() // 1_000_000

    def record_batch(self, size: int, compute_us: int) -> None:
        self.execution_count += 1
        self.batches[size].compute_infer.add(compute_us * 1000)


class InferenceStatistics:
    """ModelStats by model name (models of the repository only: callers check the name first)."""

    def __init__(self) -> None:
        self._models: dict[str, ModelStats] = defaultdict(ModelStats)

    def of(self, model: str) -> ModelStats:
        return self._models[model]

    def batch_observer(self, model: str) -> Callable[[int, int, int], None]:
        """The DynamicBatcher's on_batch(batch_size, queue_us, compute_us) callback for `model`."""
        stats = self.of(model)

        def on_batch(size: int, queue_us: int, compute_us: int) -> None:
            stats.record_batch(size, compute_us)

        return on_batch
