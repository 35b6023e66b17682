"""Dynamic batching: gather concurrent requests for one model into batches and run them off the event loop.

One DynamicBatcher per model. Callers ``await submit(inputs)`` on the event loop; a single dispatcher task takes
queued requests in arrival order until the batch holds ``max_batch_size`` rows or ``max_queue_delay_us`` has passed
since the oldest of them was queued, then runs ``run_batch`` on one executor thread (backends are not re-entrant)
and hands each caller a view of its own rows. Batch-sized tensor work (one ``torch.cat``) happens in that thread,
never per request and never on the event loop.

Requests carry either of the backends' two layouts (service/backends/base.py): uint8 NHWC raw images [n, S, S, 3]
(Classify, UINT8 ModelInfer) or float32 NCHW [n, 3, S, S] (FP32/FP16 ModelInfer). The batcher knows neither; it
batches only requests of one item shape and dtype, so the layouts never meet in one batch.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)


class QueueFullError(Exception):
    """The bounded queue is full; the request was not queued (RESOURCE_EXHAUSTED)."""


class DeadlineExceededError(TimeoutError):
    """The request's deadline passed while it was queued; it was never computed (DEADLINE_EXCEEDED)."""


class BatchTooLargeError(ValueError):
    """A single request carries more rows than max_batch_size, or no rows at all (INVALID_ARGUMENT)."""


class BatcherStoppedError(RuntimeError):
    """The batcher is draining or stopped and takes no new work (UNAVAILABLE)."""


@dataclass
class BatchResult:
    logits: torch.Tensor  # [n, classes], this caller's rows only
    queue_us: int  # from submit() to the start of its batch
    compute_us: int  # run_batch wall time for the whole batch
    batch_size: int  # rows in the batch this request ran in


@dataclass(eq=False)
class _Request:
    inputs: torch.Tensor  # [n, ...]: uint8 [n, S, S, 3] or float32 [n, 3, S, S]
    deadline: float | None  # time.monotonic() seconds
    future: asyncio.Future[BatchResult]
    queued_ns: int = field(default_factory=time.monotonic_ns)
    expiry: asyncio.TimerHandle | None = None

    @property
    def rows(self) -> int:
        return self.inputs.shape[0]

    def batches_with(self, other: _Request) -> bool:
        """Only requests of one item shape and dtype share a batch, so a malformed one can't fail the others."""
        return self.inputs.shape[1:] == other.inputs.shape[1:] and self.inputs.dtype == other.inputs.dtype


class DynamicBatcher:
    """Per-model request queue plus the dispatcher task that forms and runs batches.

    ``run_batch``: [N, ...] in one layout -> logits [N, classes], N <= max_batch_size; called from one executor thread
    at a time. ``max_queue_size`` counts queued requests (not rows). ``on_batch(batch_size, queue_us, compute_us)``
    is called on the event loop after each batch, with the longest queue wait in that batch.

    ``preferred_batch_sizes``: the backend's (service/backends/base.py), ascending, each at most max_batch_size.
    The batcher holds them for a batching policy to aim at; today's policy ignores them and forms batches as
    described above (with max_batch_size 32 and the fused backend's buckets, a batch of 17 computes 32 rows).
    """

    def __init__(
        self,
        run_batch: Callable[[torch.Tensor], torch.Tensor],
        *,
        max_batch_size: int,
        max_queue_delay_us: int,
        max_queue_size: int,
        executor: concurrent.futures.Executor | None = None,
        name: str = "",
        on_batch: Callable[[int, int, int], None] | None = None,
        preferred_batch_sizes: Sequence[int] = (),
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or max_queue_delay_us < 0:
            raise ValueError(
                f"need max_batch_size >= 1, max_queue_size >= 1, max_queue_delay_us >= 0; got "
                f"{max_batch_size}, {max_queue_size}, {max_queue_delay_us}"
            )
        preferred = tuple(preferred_batch_sizes)
        if list(preferred) != sorted(set(preferred)) or not all(1 <= size <= max_batch_size for size in preferred):
            raise ValueError(f"preferred_batch_sizes must ascend within 1..{max_batch_size}, got {preferred}")
        self._run_batch = run_batch
        self.preferred_batch_sizes = preferred
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_us / 1e6
        self.max_queue_size = max_queue_size
        self.name = name
        self._on_batch = on_batch
        self._owns_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"batcher-{name}" if name else "batcher"
        )
        self._queue: collections.deque[_Request] = collections.deque()
        self._arrived = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch (not counting the batch being computed)."""
        return len(self._queue)

    async def start(self) -> None:
        if self._dispatcher is not None:
            raise RuntimeError(f"batcher {self.name!r} already started")
        self._dispatcher = asyncio.create_task(self._dispatch_forever(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Refuse new work, finish everything already queued, then end the dispatcher."""
        self._stopping = True
        self._arrived.set()
        if self._dispatcher is not None:
            await self._dispatcher
        if self._owns_executor:
            self._executor.shutdown(wait=True)

    async def submit(self, inputs: torch.Tensor, deadline: float | None = None) -> BatchResult:
        """Queue ``inputs`` [n, ...] (1 <= n <= max_batch_size) and wait for its logits [n, classes].

        ``deadline`` is in time.monotonic() seconds. Raises QueueFullError, DeadlineExceededError,
        BatchTooLargeError, BatcherStoppedError, or whatever run_batch raised for this request's batch.
        """
        if self._stopping or self._dispatcher is None:
            raise BatcherStoppedError(f"model {self.name!r} is not accepting requests (batcher not running)")
        rows = inputs.shape[0] if inputs.ndim >= 1 else 0
        if not 1 <= rows <= self.max_batch_size:
            raise BatchTooLargeError(f"a request must carry 1 to {self.max_batch_size} rows, got {rows}")
        if len(self._queue) >= self.max_queue_size:
            raise QueueFullError(f"queue of model {self.name!r} is full ({self.max_queue_size} requests)")
        loop = asyncio.get_running_loop()
        request = _Request(inputs, deadline, loop.create_future())
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceededError("deadline passed before the request was queued")
            request.expiry = loop.call_later(remaining, self._expire, request)
        self._queue.append(request)
        self._arrived.set()
        try:
            return await request.future
        except asyncio.CancelledError:
            # The caller went away. If it is still queued, free its slot; if its batch is running, the batch goes
            # on for the others and its rows are simply dropped.
            self._withdraw(request)
            raise

    def _expire(self, request: _Request) -> None:
        """Deadline timer: fail the request now if it has not been dispatched, so it is never computed."""
        if request.future.done() or not self._withdraw(request):
            return
        request.future.set_exception(DeadlineExceededError("deadline passed while the request was queued"))

    def _withdraw(self, request: _Request) -> bool:
        """Take a request out of the queue; False when it is no longer queued (already in a batch)."""
        if request.expiry is not None:
            request.expiry.cancel()
        try:
            self._queue.remove(request)
        except ValueError:
            return False
        return True

    async def _dispatch_forever(self) -> None:
        while True:
            batch = await self._gather_batch()
            if batch is None:
                return
            await self._run(batch)

    async def _gather_batch(self) -> list[_Request] | None:
        """Wait for the first request, then take compatible ones until full or its delay window closes.

        Returns None once stopping with an empty queue. Requests whose deadline passed are failed here, not run.
        """
        while not self._queue:
            if self._stopping:
                return None
            self._arrived.clear()
            await self._arrived.wait()
        first = self._queue[0]
        window_closes = first.queued_ns / 1e9 + self.max_queue_delay_s
        batch: list[_Request] = []
        rows = 0
        while True:
            while self._queue and self._fits(self._queue[0], first, rows):
                request = self._queue.popleft()
                if request.expiry is not None:
                    request.expiry.cancel()  # from here on _drop_expired checks its deadline at dispatch
                batch.append(request)
                rows += request.rows
            if rows == self.max_batch_size or self._queue:
                break  # full, or the next request does not fit this batch: it opens the next one
            remaining = window_closes - time.monotonic()
            if remaining <= 0 or self._stopping or not await self._wait_for_arrival(remaining):
                break
        return self._drop_expired(batch)

    def _fits(self, request: _Request, first: _Request, rows: int) -> bool:
        return request.batches_with(first) and rows + request.rows <= self.max_batch_size

    async def _wait_for_arrival(self, timeout: float) -> bool:
        self._arrived.clear()
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout)
        except TimeoutError:
            return False
        return True

    @staticmethod
    def _drop_expired(batch: list[_Request]) -> list[_Request]:
        now = time.monotonic()
        live = []
        for request in batch:
            if request.future.done():  # cancelled by its caller
                continue
            if request.deadline is not None and request.deadline <= now:
                request.future.set_exception(DeadlineExceededError("deadline passed while the request was queued"))
                continue
            live.append(request)
        return live

    async def _run(self, batch: list[_Request]) -> None:
        if not batch:
            return
        started_ns = time.monotonic_ns()
        loop = asyncio.get_running_loop()
        try:
            logits, compute_ns = await loop.run_in_executor(
                self._executor, self._compute, [request.inputs for request in batch]
            )
        except Exception as error:
            logger.exception("batch of %d request(s) failed in model %r", len(batch), self.name)
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(error)
            return
        batch_rows = logits.shape[0]
        compute_us = compute_ns // 1000
        rows_per_request = logits.split([request.rows for request in batch])
        for request, rows in zip(batch, rows_per_request, strict=True):
            if not request.future.done():
                queue_us = (started_ns - request.queued_ns) // 1000
                request.future.set_result(BatchResult(rows, queue_us, compute_us, batch_rows))
        if self._on_batch is not None:
            try:
                self._on_batch(batch_rows, (started_ns - batch[0].queued_ns) // 1000, compute_us)
            except Exception:  # a metrics observer must never stop the dispatcher
                logger.exception("on_batch observer failed for model %r", self.name)

    def _compute(self, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Executor thread: one concatenation for the whole batch, then the backend."""
        batch = inputs[0] if len(inputs) == 1 else torch.cat(inputs)
        started_ns = time.monotonic_ns()
        logits = self._run_batch(batch)
        return logits, time.monotonic_ns() - started_ns
