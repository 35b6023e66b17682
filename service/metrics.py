"""Prometheus metrics of the server, in a registry of its own (several servers can live in one test process), served
on /metrics (any other path: 404) by an aiohttp application on the server's event loop.

Beside our own families (resnet_*), the registry holds the process and Python collectors and the Triton families that
users' dashboards read (nv_inference_*, labelled model and version as Triton labels them; nv_gpu_* where there is a
GPU: service/gpu_metrics.py). Triton declares nv_inference_* counters, in microseconds, under names without `_total`;
prometheus_client would append `_total` to a Counter, which the dashboards' queries do not name, so they are gauges
that only ever increase. Their meaning is Triton's: an inference request is one Classify or ModelInfer call (over gRPC
or HTTP), nv_inference_count counts the images inferred, nv_inference_exec_count the batches run, and a request's
compute time is that of the batch it ran in.

With frontend processes beside an engine (service/multiprocess/), every process counts what it sees (the frontends
their requests, the engine its batches) into prometheus-client's multiprocess files, and the engine serves /metrics
from them all: counters and histograms are summed over every process that ever ran (a restarted frontend's counts
stay), resnet_model_ready is the engine's, and the process_* families are the engine process's own.

Label values are bounded: the method is one of our RPC names and the model one of the repository's (requests for
unknown models are counted under "_unknown", and not at all in Triton's families), so a client cannot grow the series
without limit.
"""

import asyncio
import logging
import os
from collections.abc import Callable, Iterator

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from service.gpu_metrics import gpu_collector
from service.http.errors import ENDPOINTS, json_errors
from service.http.site import start_site

logger = logging.getLogger(__name__)

UNKNOWN_MODEL = "_unknown"
# Every served model has the one version "1" (service/servicers/kserve.py answers for it), the label Triton gives it.
MODEL_VERSION = "1"
# The RPCs that are inference requests in Triton's sense (the others are health and metadata calls).
INFERENCE_METHODS = frozenset({"Classify", "ModelInfer"})
# Triton's nv_inference_request_failure reasons, by the status code the request ended with.
_FAILURE_REASON_OF_CODE = {
    "RESOURCE_EXHAUSTED": "REJECTED",
    "UNAVAILABLE": "REJECTED",
    "CANCELLED": "CANCELED",
    "DEADLINE_EXCEEDED": "CANCELED",
    "INTERNAL": "BACKEND",
}
# From a digit image on one core (~1 ms) to a large batch of resnet50 on a busy CPU (seconds).
_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# prometheus-client writes every process's values under this directory when it is set at import (multiprocess mode).
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROCESS_DIR_ENV) or None


class ServiceMetrics:
    """Requests by model/method/code, latency histograms (total, queue, compute), batch sizes, queue depth."""

    def __init__(self) -> None:
        # The families below live in `registry`; /metrics serves `served`, the same registry in one process, and in
        # multiprocess mode a registry that reads every process's files instead (registering both would count twice).
        self.registry = CollectorRegistry()
        shared_dir = _multiprocess_dir()
        if shared_dir is None:
            self.served = self.registry
        else:
            self.served = CollectorRegistry()
            MultiProcessCollector(self.served, path=shared_dir)
        # The default registry's collectors read the process and interpreter afresh on every scrape: sharing is safe.
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.served.register(collector)
        self._queue_depths = _QueueDepths()
        self.served.register(self._queue_depths)
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
        self.model_ready = Gauge(
            "resnet_model_ready",
            "1 when the model serves",
            ["model"],
            registry=self.registry,
            multiprocess_mode="livemax",  # only the engine sets it
        )
        self.triton = TritonMetrics(self.registry)

    def record_request(self, model: str, method: str, code: str, seconds: float) -> None:
        self.requests.labels(model, method, code).inc()
        self.request_latency.labels(model, method).observe(seconds)
        if method in INFERENCE_METHODS and model not in ("", UNKNOWN_MODEL):
            self.triton.record_request(model, code, seconds)

    def record_batched(self, model: str, queue_us: int, compute_us: int) -> None:
        """One request's time in its model's batcher: its wait in the queue, and the compute time of its batch."""
        self.queue_latency.labels(model).observe(queue_us / 1e6)
        self.triton.queue_us.labels(model, MODEL_VERSION).inc(queue_us)
        self.triton.compute_infer_us.labels(model, MODEL_VERSION).inc(compute_us)

    def batch_observer(self, model: str) -> Callable[[int, int, int], None]:
        """The DynamicBatcher's on_batch(batch_size, queue_us, compute_us) callback for `model`."""
        batch_size = self.batch_size.labels(model)
        compute_latency = self.compute_latency.labels(model)
        inferences = self.triton.inference_count.labels(model, MODEL_VERSION)
        executions = self.triton.exec_count.labels(model, MODEL_VERSION)

        def on_batch(size: int, queue_us: int, compute_us: int) -> None:
            batch_size.observe(size)
            compute_latency.observe(compute_us / 1e6)
            inferences.inc(size)
            executions.inc()

        return on_batch

    def track_queue_depth(self, model: str, depth: Callable[[], int]) -> None:
        """resnet_queue_depth{model} reads `depth()` at each scrape (in the process that runs the batchers)."""
        self._queue_depths.track(model, depth)

    async def serve_http(self, host: str, port: int) -> web.AppRunner:
        """Starts /metrics on host:port (OSError when it cannot bind); `cleanup()` the runner to stop it. Only the
        process serving /metrics reads the GPUs (nv_gpu_*)."""
        gpus = gpu_collector()
        if gpus is not None:
            self.served.register(gpus)
        runner = await start_site(metrics_app(self.served), host, port, grace_s=1.0)
        logger.info("metrics on http://%s:%d/metrics", host, port)
        return runner


class TritonMetrics:
    """Triton's per-model inference families (see the module's docstring for why they are gauges)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def family(name: str, help_text: str, *extra_labels: str) -> Gauge:
            # "sum": in multiprocess mode each process's share adds up, a process that ended included.
            labels = ["model", "version", *extra_labels]
            return Gauge(name, help_text, labels, registry=registry, multiprocess_mode="sum")

        self.success = family(
            "nv_inference_request_success", "Number of successful inference requests, all batch sizes"
        )
        self.failure = family(
            "nv_inference_request_failure", "Number of failed inference requests, all batch sizes", "reason"
        )
        self.inference_count = family("nv_inference_count", "Number of inferences performed (a batch of n counts n)")
        self.exec_count = family("nv_inference_exec_count", "Number of model executions performed (batches run)")
        self.request_us = family(
            "nv_inference_request_duration_us", "Cumulative inference request duration in microseconds (queue included)"
        )
        self.queue_us = family(
            "nv_inference_queue_duration_us", "Cumulative inference queuing duration in microseconds"
        )
        self.compute_infer_us = family(
            "nv_inference_compute_infer_duration_us", "Cumulative compute inference duration in microseconds"
        )

    def record_request(self, model: str, code: str, seconds: float) -> None:
        if code == "OK":
            self.success.labels(model, MODEL_VERSION).inc()
        else:
            self.failure.labels(model, MODEL_VERSION, _FAILURE_REASON_OF_CODE.get(code, "OTHER")).inc()
        self.request_us.labels(model, MODEL_VERSION).inc(seconds * 1e6)


class _QueueDepths(Collector):
    """resnet_queue_depth, read from the batchers at each scrape: a collector rather than a callback gauge, which
    prometheus-client's multiprocess mode cannot export."""

    def __init__(self) -> None:
        self._depths: dict[str, Callable[[], int]] = {}

    def track(self, model: str, depth: Callable[[], int]) -> None:
        self._depths[model] = depth

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "resnet_queue_depth", "Requests waiting in the model's batch queue", labels=["model"]
        )
        for model, depth in list(self._depths.items()):
            family.add_metric([model], depth())
        yield family


def metrics_app(registry: CollectorRegistry) -> web.Application:
    """/metrics in Prometheus' text format; every other path 404, so a probe aimed at the wrong path fails."""

    async def metrics(request: web.Request) -> web.Response:
        # Collecting reads /proc and NVML: off the event loop, which serves inference.
        text = await asyncio.get_running_loop().run_in_executor(None, generate_latest, registry)
        return web.Response(body=text, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application(middlewares=[json_errors])
    app[ENDPOINTS] = "this port serves /metrics only"
    app.router.add_get("/metrics", metrics)
    return app
