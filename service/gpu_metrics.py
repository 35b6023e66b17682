"""Triton's GPU metric families (nv_gpu_utilization, nv_gpu_memory_total_bytes, nv_gpu_memory_used_bytes), from NVML.

NVML reads the driver's counters without creating a CUDA context, so a CPU-backend server on a GPU host costs the card
nothing. Where NVML cannot start (no driver: a CPU machine) the families are absent rather than zero, as in Triton.
"""

import logging
from collections.abc import Iterator

import pynvml
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)


class GpuCollector(Collector):
    """One sample per visible card, labelled with its UUID as Triton labels them."""

    def __init__(self, handles: list) -> None:
        self._handles = handles

    def collect(self) -> Iterator[Metric]:
        utilization = GaugeMetricFamily("nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)", labels=["gpu_uuid"])
        total = GaugeMetricFamily("nv_gpu_memory_total_bytes", "GPU total memory, in bytes", labels=["gpu_uuid"])
        used = GaugeMetricFamily("nv_gpu_memory_used_bytes", "GPU used memory, in bytes", labels=["gpu_uuid"])
        for handle in self._handles:
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            utilization.add_metric([uuid], pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100)
            total.add_metric([uuid], memory.total)
            used.add_metric([uuid], memory.used)
        yield from (utilization, total, used)


def gpu_collector() -> GpuCollector | None:
    """The collector of this host's cards, or None where there is no NVIDIA driver or no card."""
    try:
        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(index) for index in range(pynvml.nvmlDeviceGetCount())]
    except pynvml.NVMLError as error:
        logger.info("no GPU metrics: %s", error)
        return None
    return GpuCollector(handles) if handles else None
