"""Batches in flight (service/backends/inflight.py) on fake streams and events that record what was queued where."""

from __future__ import annotations

import contextlib
import threading

import pytest

from service.backends.inflight import CopyComputePipeline, StagingSlots


class FakeStream:
    def __init__(self, name: str, log: list[tuple]) -> None:
        self.name = name
        self._log = log

    def wait_event(self, event: FakeEvent) -> None:
        self._log.append((self.name, "wait", event.name))

    def synchronize(self) -> None:
        self._log.append((self.name, "synchronize"))


class FakeEvent:
    def __init__(self, name: str, log: list[tuple]) -> None:
        self.name = name
        self._log = log

    def record(self, stream: FakeStream) -> None:
        self._log.append((stream.name, "record", self.name))

    def synchronize(self) -> None:
        self._log.append(("host", "synchronize", self.name))


class Device:
    """Two fake streams, events named uploaded/done by creation order, and a log of everything queued, in order."""

    def __init__(self, slots: int = 2) -> None:
        self.log: list[tuple] = []
        self.current = "default"
        names = iter([f"{kind}[{slot}]" for kind in ("uploaded", "done") for slot in range(slots)])
        self.pipeline = CopyComputePipeline(
            slots,
            copy_stream=FakeStream("copy", self.log),
            compute_stream=FakeStream("compute", self.log),
            new_event=lambda: FakeEvent(next(names), self.log),
            on_stream=self.on_stream,
        )

    @contextlib.contextmanager
    def on_stream(self, stream: FakeStream):
        previous, self.current = self.current, stream.name
        try:
            yield
        finally:
            self.current = previous

    def launch(self, batch: str):
        """A batch whose upload, compute and read log the stream they ran on and their slot."""
        return self.pipeline.launch(
            lambda slot: self.log.append((self.current, "upload", batch, slot)),
            lambda slot: self.log.append((self.current, "compute", batch, slot)),
            lambda slot: (self.log.append(("host", "read", batch, slot)), f"logits of {batch}")[1],
        )


def test_upload_on_the_copy_stream_then_compute_after_its_event_on_the_compute_stream():
    device = Device()
    read = device.launch("k")
    assert device.log == [
        ("copy", "upload", "k", 0),
        ("copy", "record", "uploaded[0]"),
        ("compute", "wait", "uploaded[0]"),
        ("compute", "compute", "k", 0),
        ("compute", "record", "done[0]"),
    ]
    device.log.clear()
    assert read() == "logits of k"
    assert device.log == [("host", "synchronize", "done[0]"), ("host", "read", "k", 0)]  # read only after done


def test_two_batches_in_flight_the_next_upload_queued_before_the_first_result_is_read():
    device = Device(slots=2)
    read_k = device.launch("k")
    read_next = device.launch("k+1")
    # Batch k+1's upload is on the copy stream while batch k's compute is queued on the compute stream: they overlap.
    assert ("copy", "upload", "k+1", 1) in device.log
    assert not any(entry[1] == "read" for entry in device.log)
    assert device.pipeline.slots.in_flight == 2
    assert (read_k(), read_next()) == ("logits of k", "logits of k+1")
    assert device.pipeline.slots.in_flight == 0


def test_no_slot_is_reused_before_its_results_are_read():
    device = Device(slots=2)
    read_first = device.launch("a")
    device.launch("b")
    third_started = threading.Event()
    third: list = []

    def launch_third() -> None:
        third_started.set()
        third.append(device.launch("c"))

    worker = threading.Thread(target=launch_third)
    worker.start()
    assert third_started.wait(5)
    worker.join(0.2)
    assert worker.is_alive() and not third  # both slots in flight: the third batch waits, its upload not queued
    assert not any(entry[2] == "c" for entry in device.log if len(entry) > 2)
    read_first()
    worker.join(5)
    assert not worker.is_alive() and third
    uploads = [entry for entry in device.log if entry[1] == "upload"]
    assert uploads[-1] == ("copy", "upload", "c", 0)  # slot 0 again, only after a's results were read
    assert device.log.index(("host", "read", "a", 0)) < device.log.index(("copy", "upload", "c", 0))


def test_results_are_read_once():
    device = Device()
    read = device.launch("k")
    read()
    with pytest.raises(RuntimeError, match="already read"):
        read()
    assert device.pipeline.slots.in_flight == 0


def test_a_failing_compute_frees_its_slot_after_waiting_for_what_it_queued():
    device = Device(slots=1)

    def broken(slot: int) -> None:
        raise RuntimeError("graph replay failed")

    with pytest.raises(RuntimeError, match="graph replay failed"):
        device.pipeline.launch(lambda slot: None, broken, lambda slot: None)
    assert device.log[-2:] == [("copy", "synchronize"), ("compute", "synchronize")]
    assert device.pipeline.slots.in_flight == 0
    assert device.launch("next")() == "logits of next"


def test_staging_slots_refuse_a_release_of_a_free_slot_and_time_out():
    slots = StagingSlots(1)
    with pytest.raises(ValueError, match="not in flight"):
        slots.release(0)
    held = slots.acquire()
    with pytest.raises(TimeoutError, match="all 1 in flight"):
        slots.acquire(timeout_s=0.05)
    slots.release(held)
    with pytest.raises(ValueError, match="at least one slot"):
        StagingSlots(0)
