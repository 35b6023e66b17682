"""Batches in flight on a real GPU: the copy stream's upload of batch k+1 overlaps batch k's compute, and the fused
backend's overlapped path answers exactly as one batch at a time. CPU-side ordering: tests/service/test_inflight.py."""

from __future__ import annotations

import pytest
import torch

import models
from service.backends import create_backend
from service.backends.inflight import CopyComputePipeline

pytestmark = pytest.mark.gpu

SPIN_CYCLES = 50_000_000  # torch.cuda._sleep: ~25-40 ms of a busy compute stream at 1.2-2 GHz
UPLOAD_BYTES = 64 << 20  # ~3-5 ms from pinned memory over PCIe 4/5


def test_upload_of_the_next_batch_overlaps_the_compute_of_the_last():
    cuda = torch.device("cuda")
    events: list[torch.cuda.Event] = []

    def timing_event() -> torch.cuda.Event:
        events.append(torch.cuda.Event(enable_timing=True))
        return events[-1]

    copy_stream, compute_stream = torch.cuda.Stream(cuda), torch.cuda.Stream(cuda)
    pipeline = CopyComputePipeline(  # creates its events in order: uploaded[0], uploaded[1], done[0], done[1]
        2, copy_stream=copy_stream, compute_stream=compute_stream, new_event=timing_event, on_stream=torch.cuda.stream
    )
    hosts = [torch.randint(0, 255, (UPLOAD_BYTES,), dtype=torch.uint8).pin_memory() for _ in range(2)]
    device_inputs = [torch.empty(UPLOAD_BYTES, dtype=torch.uint8, device=cuda) for _ in range(2)]
    outputs = [torch.empty(16, dtype=torch.int64, device=cuda) for _ in range(2)]
    pinned_outputs = [torch.empty(16, dtype=torch.int64).pin_memory() for _ in range(2)]

    def upload(slot: int) -> None:  # batch i takes slot i: both are free
        device_inputs[slot].copy_(hosts[slot], non_blocking=True)

    def compute(slot: int) -> None:
        torch.cuda._sleep(SPIN_CYCLES)
        outputs[slot].copy_(device_inputs[slot][:16].long() * 2)
        pinned_outputs[slot].copy_(outputs[slot], non_blocking=True)

    start = torch.cuda.Event(enable_timing=True)
    start.record(copy_stream)
    torch.cuda.synchronize()
    reads = [pipeline.launch(upload, compute, lambda slot: pinned_outputs[slot].clone()) for _ in range(2)]
    results = [read() for read in reads]
    for host, result in zip(hosts, results, strict=True):
        assert torch.equal(result, host[:16].long() * 2)
    ms = {name: start.elapsed_time(event) for name, event in zip(("up0", "up1", "done0", "done1"), events, strict=True)}
    assert ms["up0"] < ms["done0"] < ms["done1"]
    assert ms["up1"] < ms["done0"], f"batch 1 uploaded only after batch 0 computed: {ms}"


def test_fused_batches_in_flight_answer_as_one_at_a_time():
    cuda = torch.device("cuda")
    fused = create_backend("fused", models.build("resnet18"), input_size=64, max_batch_size=8, device=cuda)
    x = torch.randn(8, 3, 64, 64)
    sizes = (3, 8, 1, 6)
    one_at_a_time = [fused.run(x[:n]) for n in sizes]
    # Two slots: the first two batches are in flight together, read after both were launched.
    # A batch launched as its requests' parts, staged with no concatenation: here each batch as two requests.
    first_two = [fused.launch([x[:1], x[1:n]]) for n in sizes[:2]]
    in_flight = [wait() for wait in first_two] + [fused.launch([x[:n]])() for n in sizes[2:]]
    for n, alone, overlapped in zip(sizes, one_at_a_time, in_flight, strict=True):
        assert overlapped.shape == (n, 1000) and overlapped.device.type == "cpu"
        # The same graphs on the same rows: bit for bit (the kernels are deterministic, split-K included).
        assert torch.equal(overlapped, alone)
