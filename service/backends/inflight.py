"""Several batches in flight on one device: staging slots, and the order of copies and compute between two streams.

Device-agnostic: the fused backend (service/backends/fused.py) passes CUDA streams and events and does the copies;
tests pass fakes that record the order. Per batch, in its own slot (pinned host buffers, a device input buffer):

    copy stream:    upload(slot)  ──record──▶ uploaded[slot]
    compute stream:        wait(uploaded[slot]) ──▶ compute(slot) ──record──▶ done[slot]
    host:                                               done[slot].synchronize() ──▶ read(slot) ──▶ slot free

so batch k+1's upload (on the copy stream) runs while batch k computes. A slot is handed out again only once the
results of its last batch were read: its buffers are then neither being filled, nor read by a pending copy, nor
holding unread logits.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")


class Event(Protocol):
    def record(self, stream: Any) -> None: ...

    def synchronize(self) -> None: ...


class Stream(Protocol):
    def wait_event(self, event: Any) -> None: ...

    def synchronize(self) -> None: ...


class StagingSlots:
    """`count` slots handed out one batch at a time: ``acquire`` blocks until one is free, ``release`` frees it."""

    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError(f"need at least one slot, got {count}")
        self.count = count
        self._free = collections.deque(range(count))
        self._changed = threading.Condition()

    def acquire(self, timeout_s: float | None = None) -> int:
        with self._changed:
            if not self._changed.wait_for(lambda: bool(self._free), timeout_s):
                raise TimeoutError(f"no staging slot freed within {timeout_s} s (all {self.count} in flight)")
            return self._free.popleft()

    def release(self, slot: int) -> None:
        with self._changed:
            if not 0 <= slot < self.count or slot in self._free:
                raise ValueError(f"slot {slot} is not in flight")
            self._free.append(slot)
            self._changed.notify()

    @property
    def in_flight(self) -> int:
        with self._changed:
            return self.count - len(self._free)


class CopyComputePipeline:
    """Launches batches as upload (copy stream) then compute (compute stream), each in a slot of its own.

    ``launch`` returns at once, once the work is queued on the streams (it blocks only while every slot is in flight);
    the function it returns waits for that batch's compute, reads its results and frees the slot. ``on_stream(s)`` is
    the context in which work goes to stream s (``torch.cuda.stream`` on a GPU).
    """

    def __init__(
        self,
        slots: int,
        *,
        copy_stream: Stream,
        compute_stream: Stream,
        new_event: Callable[[], Event],
        on_stream: Callable[[Any], AbstractContextManager[object]],
    ) -> None:
        self.slots = StagingSlots(slots)
        self._copy_stream = copy_stream
        self._compute_stream = compute_stream
        self._on_stream = on_stream
        self._uploaded = [new_event() for _ in range(slots)]
        self._done = [new_event() for _ in range(slots)]

    def launch(
        self, upload: Callable[[int], None], compute: Callable[[int], None], read: Callable[[int], T]
    ) -> Callable[[], T]:
        """Queue one batch: upload(slot) on the copy stream, compute(slot) on the compute stream after it; the returned
        function waits for the compute and returns read(slot) (which must copy what it keeps out of the slot)."""
        slot = self.slots.acquire()
        try:
            with self._on_stream(self._copy_stream):
                upload(slot)
                self._uploaded[slot].record(self._copy_stream)
            with self._on_stream(self._compute_stream):
                self._compute_stream.wait_event(self._uploaded[slot])
                compute(slot)
                self._done[slot].record(self._compute_stream)
        except BaseException:
            self._settle(slot)
            raise
        return _Once(lambda: self._collect(slot, read))

    def _collect(self, slot: int, read: Callable[[int], T]) -> T:
        try:
            self._done[slot].synchronize()
            return read(slot)
        finally:
            self.slots.release(slot)

    def _settle(self, slot: int) -> None:
        """A launch failed part-way: wait for whatever it queued before the slot's buffers are used again."""
        with contextlib.suppress(Exception):
            self._copy_stream.synchronize()
            self._compute_stream.synchronize()
        self.slots.release(slot)


class _Once(Generic[T]):
    """Results are read once: a second call would free a slot another batch may hold by then."""

    def __init__(self, collect: Callable[[], T]) -> None:
        self._collect: Callable[[], T] | None = collect

    def __call__(self) -> T:
        if self._collect is None:
            raise RuntimeError("this batch's results were already read")
        collect, self._collect = self._collect, None
        return collect()
