"""Prometheus metrics of the server, in a registry of its own (several servers can live in one test process).

Label values are bounded: the method is one of our RPC names and the model one of the repository's (requests for
unknown models are counted under "_unknown"), so a client cannot grow the series without limit.
"""

import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

logger = logging.getLogger(__name__)

UNKNOWN_MODEL = "_unknown"
# From a digit image on one core (~1 ms) to a large batch of resnet50 on a busy CPU (seconds).
_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceMetrics:
    """Requests by model/method/code, latency histograms (total, queue, compute), batch sizes, queue depth."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "resnet_requests",
            "RPCs answered, by model, method and status code",
            ["model", "method", "code"],
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "resnet_request_latency_seconds",
            "Time from the RPC's arrival to its answer",
            ["model", "method"],
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.queue_latency = Histogram(
            "resnet_queue_latency_seconds",
            "Time a request waited in its model's batch queue",
            ["model"],
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.compute_latency = Histogram(
            "resnet_compute_latency_seconds",
            "Backend time of one batch",
            ["model"],
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "resnet_batch_size",
            "Images per batch run by the backend",
            ["model"],
            buckets=_BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.padded_rows = Counter(
            "resnet_padded_rows",
            "Rows computed for nothing: a batch padded up to the backend's next graph bucket",
            ["model"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "resnet_queue_depth", "Requests waiting in the model's batch queue", ["model"], registry=self.registry
        )
        self.model_ready = Gauge("resnet_model_ready", "1 when the model serves", ["model"], registry=self.registry)

    def record_request(self, model: str, method: str, code: str, seconds: float) -> None:
        self.requests.labels(model, method, code).inc()
        self.request_latency.labels(model, method).observe(seconds)

    def record_queue_wait(self, model: str, queue_us: int) -> None:
        self.queue_latency.labels(model).observe(queue_us / 1e6)

    def batch_observer(self, model: str) -> Callable[[int, int, int], None]:
        """The DynamicBatcher's on_batch(batch_size, queue_us, compute_us) callback for `model`."""
        batch_size = self.batch_size.labels(model)
        compute_latency = self.compute_latency.labels(model)

        def on_batch(size: int, queue_us: int, compute_us: int) -> None:
            batch_size.observe(size)
            compute_latency.observe(compute_us / 1e6)

        return on_batch

    def track_queue_depth(self, model: str, depth: Callable[[], int]) -> None:
        self.queue_depth.labels(model).set_function(depth)

    def serve_http(self, host: str, port: int) -> Callable[[], None]:
        """Starts the /metrics HTTP endpoint in a daemon thread; returns the function that stops it."""
        http_server, thread = start_http_server(port, addr=host, registry=self.registry)
        logger.info("metrics on http://%s:%d/metrics", host, http_server.server_port)

        def close() -> None:
            http_server.shutdown()
            http_server.server_close()
            thread.join()

        return close
