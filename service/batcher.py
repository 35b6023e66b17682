"""Dynamic batching: gather concurrent requests for one model into batches and run them off the event loop.

One DynamicBatcher per model. Callers ``await submit(inputs)`` on the event loop; a single dispatcher task gathers
queued requests in arrival order until they hold ``max_batch_size`` rows or ``max_queue_delay_us`` has passed since
the oldest of them was queued. Where the backend computes some sizes padded to a larger one (its preferred batch
sizes, the graph buckets), the batch then closes where its ``bucket_policy`` says (service/batch_plan.py), and the
requests it leaves stay queued, deadlines armed, for the next one. It runs ``run_batch`` on one executor thread
(backends are not re-entrant) and hands each caller a view of its own rows. Batch-sized tensor work (one
``torch.cat``) happens in that thread, never per request and never on the event loop.

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

from service.batch_plan import BucketPolicy, ComputeCosts, bucket_for, requests_to_take

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

    ``preferred_batch_sizes``: the backend's (service/backends/base.py), ascending, each at most max_batch_size; a
    batch of n rows is taken to compute ``bucket_for(n)`` rows. ``bucket_policy`` decides where a batch closes among
    them. ``on_padded_rows(rows)`` is called on the event loop after each batch with the rows computed for nothing.

    ``launch_batch`` (a backend's ``launch``, service/backends/base.py), when given, is called instead of
    ``run_batch`` with the requests' inputs, unconcatenated: it queues the batch and returns at once with the
    function that waits for its logits, which runs on a thread of its own; the dispatcher meanwhile gathers and
    launches the next batch. The backend bounds how many are in flight by blocking in ``launch``.
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
        bucket_policy: BucketPolicy = BucketPolicy.COST,
        on_padded_rows: Callable[[int], None] | None = None,
        launch_batch: Callable[[Sequence[torch.Tensor]], Callable[[], torch.Tensor]] | None = None,
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
        self.bucket_policy = bucket_policy
        self._costs = ComputeCosts(preferred)
        self._on_padded_rows = on_padded_rows
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_us / 1e6
        self.max_queue_size = max_queue_size
        self.name = name
        self._on_batch = on_batch
        self._owns_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"batcher-{name}" if name else "batcher"
        )
        self._launch_batch = launch_batch
        # Reads launched batches' results, so that the executor thread is free to launch the next batch meanwhile.
        self._completions = (
            None
            if launch_batch is None
            else concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"results-{name}")
        )
        self._in_flight: set[asyncio.Task[None]] = set()
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
        if self._completions is not None:
            self._completions.shutdown(wait=True)

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
                break
            await self._run(batch)
        await asyncio.gather(*self._in_flight)  # launched batches still computing

    async def _gather_batch(self) -> list[_Request] | None:
        """Wait for the first request, then for compatible ones until full or its delay window closes; then close.

        Returns None once stopping with an empty queue. Requests stay queued (their deadline timers armed) until the
        batch closes; those whose deadline passed are failed here, not run.
        """
        while True:
            while not self._queue:
                if self._stopping:
                    return None
                self._arrived.clear()
                await self._arrived.wait()
            if await self._window_closed(self._queue[0]):
                return self._close()
            # The first request left the queue (deadline, cancellation) while its window was open: the next one opens
            # a window of its own.

    async def _window_closed(self, first: _Request) -> bool:
        """Waits until `first`'s batch can grow no more (full, blocked, or its window closed): True; False as soon as
        `first` is no longer at the head of the queue."""
        window_closes = first.queued_ns / 1e9 + self.max_queue_delay_s
        while self._queue and self._queue[0] is first:
            gathered = self._gatherable()
            count, rows = len(gathered), sum(request.rows for request in gathered)
            if rows == self.max_batch_size or count < len(self._queue):
                return True  # full, or the next request does not fit this batch: it opens the next one
            remaining = window_closes - time.monotonic()
            if remaining <= 0 or self._stopping or not await self._wait_for_arrival(remaining):
                return True
        return False

    def _gatherable(self) -> list[_Request]:
        """The queue's head and the requests after it that can join its batch, in arrival order."""
        first, rows, taken = self._queue[0], 0, []
        for request in self._queue:
            if not self._fits(request, first, rows):
                break
            taken.append(request)
            rows += request.rows
        return taken

    def _close(self) -> list[_Request]:
        """Takes the requests the bucket policy puts in this batch off the queue; the others stay for the next."""
        if not self._queue:
            return []  # the head expired just as its window closed
        gathered = self._gatherable()
        delay_ns = self.max_queue_delay_s * 1e9
        now_ns = time.monotonic_ns()
        count = requests_to_take(
            self.bucket_policy,
            [request.rows for request in gathered],
            self.preferred_batch_sizes,
            self._costs,
            lambda index: max(0.0, (gathered[index].queued_ns + delay_ns - now_ns) / 1e9),
        )
        batch = [self._queue.popleft() for _ in range(count)]
        for request in batch:
            if request.expiry is not None:
                request.expiry.cancel()  # from here on _drop_expired checks its deadline at dispatch
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
        """Computes the batch; with ``launch_batch``, only queues it and leaves its results to a task of their own, so
        that the next batch is gathered and launched while this one computes."""
        if not batch:
            return
        started_ns = time.monotonic_ns()
        loop = asyncio.get_running_loop()
        inputs = [request.inputs for request in batch]
        try:
            if self._launch_batch is None:
                logits, compute_ns = await loop.run_in_executor(self._executor, self._compute, inputs)
            else:
                wait = await loop.run_in_executor(self._executor, self._launch, inputs)
                completion = asyncio.create_task(self._complete(batch, started_ns, wait))
                self._in_flight.add(completion)
                completion.add_done_callback(self._in_flight.discard)
                return
        except Exception as error:
            self._fail(batch, error)
            return
        self._deliver(batch, started_ns, logits, compute_ns)

    async def _complete(self, batch: list[_Request], started_ns: int, wait: Callable[[], torch.Tensor]) -> None:
        assert self._completions is not None
        try:
            logits = await asyncio.get_running_loop().run_in_executor(self._completions, wait)
        except Exception as error:
            self._fail(batch, error)
            return
        # From launch to logits: with batches in flight this includes waiting behind the one before.
        self._deliver(batch, started_ns, logits, time.monotonic_ns() - started_ns)

    def _fail(self, batch: list[_Request], error: Exception) -> None:
        logger.error("batch of %d request(s) failed in model %r", len(batch), self.name, exc_info=error)
        for request in batch:
            if not request.future.done():
                request.future.set_exception(error)

    def _deliver(self, batch: list[_Request], started_ns: int, logits: torch.Tensor, compute_ns: int) -> None:
        batch_rows = logits.shape[0]
        compute_us = compute_ns // 1000
        self._costs.observe(batch_rows, compute_ns / 1e9)
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
        if self._on_padded_rows is not None:
            try:
                self._on_padded_rows(bucket_for(batch_rows, self.preferred_batch_sizes) - batch_rows)
            except Exception:
                logger.exception("on_padded_rows observer failed for model %r", self.name)

    def _compute(self, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Executor thread: one concatenation for the whole batch, then the backend."""
        batch = inputs[0] if len(inputs) == 1 else torch.cat(inputs)
        started_ns = time.monotonic_ns()
        logits = self._run_batch(batch)
        return logits, time.monotonic_ns() - started_ns

    def _launch(self, inputs: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
        """Executor thread: the backend stages the inputs and queues the batch (blocking while its slots are full)."""
        assert self._launch_batch is not None
        return self._launch_batch(inputs)
