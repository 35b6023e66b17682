"""DynamicBatcher: batches, delay window, per-caller rows, queue bound, deadlines, cancellation, drain, buckets."""

import asyncio
import threading
import time

import pytest
import torch

from service.batch_plan import BucketPolicy
from service.batcher import (
    BatcherStoppedError,
    BatchTooLargeError,
    DeadlineExceededError,
    DynamicBatcher,
    QueueFullError,
)

ITEM = (3, 2, 2)  # [3, H, W] per row: small, the batcher never looks inside


def row_logits(x: torch.Tensor) -> torch.Tensor:
    """A per-row function, so each caller can check it got exactly its own rows back. [n,3,2,2] -> [n,12]."""
    return x.flatten(1) * 2.0 + 1.0


class RecordingModel:
    """run_batch that records every batch it computes and can be held inside a batch until released."""

    def __init__(self, hold: bool = False) -> None:
        self.batches: list[torch.Tensor] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.batches.append(batch.clone())
        self.started.set()
        assert self.release.wait(timeout=10), "test never released the model"
        return row_logits(batch)

    @property
    def sizes(self) -> list[int]:
        return [b.shape[0] for b in self.batches]

    def computed(self, x: torch.Tensor) -> bool:
        return any(torch.equal(row, x[0]) for b in self.batches for row in b)

    async def wait_started(self) -> None:
        assert await asyncio.to_thread(self.started.wait, 10)


def make_batcher(model, **overrides) -> DynamicBatcher:
    options = {"max_batch_size": 4, "max_queue_delay_us": 50_000, "max_queue_size": 64, "name": "test"}
    options.update(overrides)
    return DynamicBatcher(model, **options)


async def started(batcher: DynamicBatcher) -> DynamicBatcher:
    await batcher.start()
    return batcher


def test_batches_fill_up_to_max_size_without_splitting_requests():
    async def main():
        model = RecordingModel()
        seen = []
        batcher = await started(make_batcher(model, on_batch=lambda size, q, c: seen.append(size)))
        requests = [torch.randn(n, *ITEM) for n in (3, 2, 2, 1, 1, 1, 1, 1, 1)]
        results = await asyncio.gather(*(batcher.submit(x) for x in requests))
        await batcher.stop()
        # 3 then 2 would be 5 > 4, so the 2-row request opens the next batch instead of being split.
        assert model.sizes == [3, 4, 4, 2]
        assert seen == model.sizes
        assert [r.batch_size for r in results] == [3, 4, 4, 4, 4, 4, 4, 2, 2]

    asyncio.run(main())


def test_batch_that_cannot_take_the_next_request_goes_without_waiting_out_the_window():
    async def main():
        model = RecordingModel()
        batcher = await started(make_batcher(model, max_batch_size=4, max_queue_delay_us=2_000_000))
        t0 = time.monotonic()
        await asyncio.gather(*(batcher.submit(torch.randn(n, *ITEM)) for n in (3, 2, 2)))
        elapsed = time.monotonic() - t0
        await batcher.stop()
        assert model.sizes == [3, 4]
        assert elapsed < 1.0  # neither batch can grow: both go at once instead of after the 2 s window

    asyncio.run(main())


def test_each_caller_gets_its_own_rows():
    async def main():
        model = RecordingModel()
        batcher = await started(make_batcher(model, max_batch_size=8, max_queue_delay_us=20_000))
        requests = [torch.randn(int(n), *ITEM) for n in torch.randint(1, 4, (40,))]

        async def call(i, x):
            await asyncio.sleep(0.001 * (i % 7))  # staggered arrivals, so batches mix requests from several waves
            return await batcher.submit(x)

        results = await asyncio.gather(*(call(i, x) for i, x in enumerate(requests)))
        await batcher.stop()
        for x, result in zip(requests, results, strict=True):
            torch.testing.assert_close(result.logits, row_logits(x), rtol=0, atol=0)
        assert max(model.sizes) > 1 and max(model.sizes) <= 8
        assert sum(model.sizes) == sum(x.shape[0] for x in requests)

    asyncio.run(main())


def test_lone_request_waits_for_the_delay_window_and_late_arrival_joins_it():
    async def main():
        model = RecordingModel()
        batcher = await started(make_batcher(model, max_batch_size=8, max_queue_delay_us=150_000))
        t0 = time.monotonic()
        first = asyncio.create_task(batcher.submit(torch.randn(1, *ITEM)))
        await asyncio.sleep(0.03)
        second = await batcher.submit(torch.randn(1, *ITEM))
        elapsed = time.monotonic() - t0
        await first
        await batcher.stop()
        assert model.sizes == [2]
        assert 0.15 <= elapsed < 1.0
        assert second.queue_us < first.result().queue_us  # the window counts from the first request's arrival
        assert first.result().queue_us >= 150_000

    asyncio.run(main())


def test_zero_delay_does_not_hold_a_lone_request():
    async def main():
        model = RecordingModel()
        batcher = await started(make_batcher(model, max_queue_delay_us=0))
        result = await batcher.submit(torch.randn(2, *ITEM))
        await batcher.stop()
        assert result.queue_us < 100_000 and model.sizes == [2]

    asyncio.run(main())


def test_full_queue_rejects_immediately():
    async def main():
        model = RecordingModel(hold=True)
        batcher = await started(make_batcher(model, max_batch_size=1, max_queue_size=2))
        running = asyncio.create_task(batcher.submit(torch.randn(1, *ITEM)))
        await model.wait_started()
        queued = [asyncio.create_task(batcher.submit(torch.randn(1, *ITEM))) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert batcher.queue_depth == 2
        t0 = time.monotonic()
        with pytest.raises(QueueFullError):
            await batcher.submit(torch.randn(1, *ITEM))
        assert time.monotonic() - t0 < 0.05
        model.release.set()
        await asyncio.gather(running, *queued)
        await batcher.stop()
        assert model.sizes == [1, 1, 1]

    asyncio.run(main())


def test_request_expiring_in_the_queue_fails_at_its_deadline_and_is_never_computed():
    async def main():
        model = RecordingModel(hold=True)
        batcher = await started(make_batcher(model, max_batch_size=1))
        running = asyncio.create_task(batcher.submit(torch.randn(1, *ITEM)))
        await model.wait_started()
        doomed = torch.randn(1, *ITEM)
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            await batcher.submit(doomed, deadline=time.monotonic() + 0.05)
        assert time.monotonic() - t0 < 0.5  # answered at its deadline, not when the model frees up
        assert batcher.queue_depth == 0
        model.release.set()
        after = torch.randn(1, *ITEM)
        result = await batcher.submit(after)
        await running
        await batcher.stop()
        torch.testing.assert_close(result.logits, row_logits(after), rtol=0, atol=0)
        assert not model.computed(doomed)

    asyncio.run(main())


def test_request_expiring_inside_the_delay_window_is_dropped_from_its_batch():
    async def main():
        model = RecordingModel()
        batcher = await started(make_batcher(model, max_batch_size=8, max_queue_delay_us=200_000))
        doomed, kept = torch.randn(1, *ITEM), torch.randn(2, *ITEM)
        outcomes = await asyncio.gather(
            batcher.submit(doomed, deadline=time.monotonic() + 0.05), batcher.submit(kept), return_exceptions=True
        )
        await batcher.stop()
        assert isinstance(outcomes[0], DeadlineExceededError)
        torch.testing.assert_close(outcomes[1].logits, row_logits(kept), rtol=0, atol=0)
        assert model.sizes == [2] and not model.computed(doomed)

    asyncio.run(main())


def test_deadline_already_past_is_rejected_without_queueing():
    async def main():
        model = RecordingModel()
        batcher = await started(make_batcher(model))
        with pytest.raises(DeadlineExceededError):
            await batcher.submit(torch.randn(1, *ITEM), deadline=time.monotonic() - 0.001)
        await batcher.stop()
        assert model.sizes == []

    asyncio.run(main())


def test_cancelled_callers_do_not_break_the_batch_for_others():
    async def main():
        model = RecordingModel(hold=True)
        batcher = await started(make_batcher(model, max_batch_size=4, max_queue_delay_us=0))
        running_x = torch.randn(1, *ITEM)
        running = asyncio.create_task(batcher.submit(running_x))
        await model.wait_started()
        waiting_x = [torch.randn(1, *ITEM) for _ in range(3)]
        waiting = [asyncio.create_task(batcher.submit(x)) for x in waiting_x]
        await asyncio.sleep(0.01)
        waiting[1].cancel()  # still queued: its slot is freed and it is never computed
        running.cancel()  # its batch is already computing: that batch finishes for nobody, harmlessly
        await asyncio.sleep(0.01)
        assert batcher.queue_depth == 2
        model.release.set()
        answered = await asyncio.gather(waiting[0], waiting[2])
        await batcher.stop()
        for x, result in zip((waiting_x[0], waiting_x[2]), answered, strict=True):
            torch.testing.assert_close(result.logits, row_logits(x), rtol=0, atol=0)
        assert running.cancelled() and waiting[1].cancelled()
        assert not model.computed(waiting_x[1])
        assert model.sizes == [1, 2]

    asyncio.run(main())


def test_stop_drains_queued_work_then_refuses_new_work():
    async def main():
        model = RecordingModel()
        batcher = await started(make_batcher(model, max_batch_size=2, max_queue_delay_us=5_000_000))
        pending = [asyncio.create_task(batcher.submit(torch.randn(1, *ITEM))) for _ in range(5)]
        await asyncio.sleep(0.01)
        t0 = time.monotonic()
        await batcher.stop()
        assert time.monotonic() - t0 < 2.0  # draining does not sit out the 5 s delay window
        assert all(task.done() and task.exception() is None for task in pending)
        assert sum(model.sizes) == 5
        with pytest.raises(BatcherStoppedError):
            await batcher.submit(torch.randn(1, *ITEM))

    asyncio.run(main())


def test_oversized_or_empty_request_is_a_value_error():
    async def main():
        batcher = await started(make_batcher(RecordingModel(), max_batch_size=4))
        for rows in (5, 0):
            with pytest.raises(BatchTooLargeError) as raised:
                await batcher.submit(torch.randn(rows, *ITEM))
            assert isinstance(raised.value, ValueError)
        await batcher.stop()

    asyncio.run(main())


def test_failing_batch_fails_only_its_callers_and_the_batcher_goes_on():
    async def main():
        calls = []

        def flaky(batch):
            calls.append(batch.shape[0])
            if len(calls) == 1:
                raise RuntimeError("backend exploded")
            return row_logits(batch)

        batcher = await started(make_batcher(flaky, max_queue_delay_us=0))
        with pytest.raises(RuntimeError, match="exploded"):
            await batcher.submit(torch.randn(1, *ITEM))
        x = torch.randn(3, *ITEM)
        result = await batcher.submit(x)
        await batcher.stop()
        torch.testing.assert_close(result.logits, row_logits(x), rtol=0, atol=0)

    asyncio.run(main())


def test_requests_of_different_item_shapes_never_share_a_batch():
    async def main():
        model = RecordingModel()
        batcher = await started(make_batcher(model, max_batch_size=8))
        small, large = torch.randn(1, *ITEM), torch.randn(1, 3, 4, 4)
        results = await asyncio.gather(batcher.submit(small), batcher.submit(small), batcher.submit(large))
        await batcher.stop()
        assert model.sizes == [2, 1]
        torch.testing.assert_close(results[2].logits, row_logits(large), rtol=0, atol=0)

    asyncio.run(main())


def test_preferred_batch_sizes_are_kept_for_the_policy_and_checked():
    assert make_batcher(RecordingModel(), preferred_batch_sizes=[1, 2, 4]).preferred_batch_sizes == (1, 2, 4)
    assert make_batcher(RecordingModel()).preferred_batch_sizes == ()
    for bad in ([2, 1], [1, 1], [0, 2], [1, 8]):  # max_batch_size is 4
        with pytest.raises(ValueError, match=r"preferred_batch_sizes must ascend within 1\.\.4"):
            make_batcher(RecordingModel(), preferred_batch_sizes=bad)


class GatedModel:
    """run_batch that waits for one permit per batch, so a test decides when each batch finishes."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.rows: list[torch.Tensor] = []
        self._permits = threading.Semaphore(0)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.sizes.append(batch.shape[0])
        self.rows.extend(batch.clone())
        assert self._permits.acquire(timeout=10), "test never let the batch finish"
        return row_logits(batch)

    def finish_one(self) -> None:
        self._permits.release()

    async def wait_for_batches(self, count: int) -> None:
        for _ in range(1000):
            if len(self.sizes) >= count:
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"only {len(self.sizes)} batches started, expected {count}")


@pytest.mark.parametrize(
    ("policy", "sizes", "padded"),
    [
        # Three single rows queued behind a running batch: fill takes the 2 that fill a bucket, the third waits.
        (BucketPolicy.FILL, [1, 2, 1], [0, 0, 0]),
        # pad takes all three, computed as 4: one padded row.
        (BucketPolicy.PAD, [1, 3], [0, 1]),
    ],
)
def test_batches_close_on_buckets_by_policy_and_report_padded_rows(policy, sizes, padded):
    async def main():
        model = GatedModel()
        seen = []
        batcher = await started(
            make_batcher(
                model, max_queue_delay_us=0, preferred_batch_sizes=(1, 2, 4), bucket_policy=policy,
                on_padded_rows=seen.append,
            )
        )  # fmt: skip
        blocker = asyncio.create_task(batcher.submit(torch.randn(1, *ITEM)))
        await model.wait_for_batches(1)
        requests = [torch.randn(1, *ITEM) for _ in range(3)]
        waiting = [asyncio.create_task(batcher.submit(x)) for x in requests]
        await asyncio.sleep(0.01)  # all three queued behind the running batch
        for _ in sizes:
            model.finish_one()
        results = await asyncio.gather(blocker, *waiting)
        await batcher.stop()
        assert model.sizes == sizes
        assert seen == padded
        for x, result in zip(requests, results[1:], strict=True):
            torch.testing.assert_close(result.logits, row_logits(x), rtol=0, atol=0)

    asyncio.run(main())


def test_request_left_for_the_next_bucket_keeps_its_deadline_and_is_never_computed():
    async def main():
        model = GatedModel()
        batcher = await started(
            make_batcher(model, max_queue_delay_us=0, preferred_batch_sizes=(1, 2, 4), bucket_policy=BucketPolicy.FILL)
        )
        blocker = asyncio.create_task(batcher.submit(torch.randn(1, *ITEM)))
        await model.wait_for_batches(1)
        filled = [asyncio.create_task(batcher.submit(torch.randn(1, *ITEM))) for _ in range(2)]
        late = torch.randn(1, *ITEM)
        left_over = asyncio.create_task(batcher.submit(late, deadline=time.monotonic() + 0.3))
        await asyncio.sleep(0.01)
        model.finish_one()  # the blocker; the next batch takes the two that fill bucket 2, `late` stays queued
        await model.wait_for_batches(2)
        assert model.sizes == [1, 2] and batcher.queue_depth == 1
        with pytest.raises(DeadlineExceededError):
            await asyncio.wait_for(left_over, 5)  # expires in the queue while the batch of 2 is held
        assert batcher.queue_depth == 0
        model.finish_one()
        await asyncio.gather(blocker, *filled)
        await batcher.stop()
        assert model.sizes == [1, 2]
        assert not any(torch.equal(row, late[0]) for row in model.rows)

    asyncio.run(main())


def test_bucket_policy_defaults_to_cost():
    assert make_batcher(RecordingModel()).bucket_policy is BucketPolicy.COST


class LaunchingModel:
    """launch_batch whose results wait for the test: records launches and reads, in order, per batch index."""

    def __init__(self, fail_batch: int | None = None) -> None:
        self.events: list[tuple[str, int]] = []
        self.finish = [threading.Event() for _ in range(16)]
        self._fail_batch = fail_batch

    def __call__(self, parts: list[torch.Tensor]):
        batch = torch.cat(parts)
        index = sum(1 for kind, _ in self.events if kind == "launch")
        self.events.append(("launch", index))

        def wait() -> torch.Tensor:
            assert self.finish[index].wait(10), "test never finished the batch"
            self.events.append(("read", index))
            if index == self._fail_batch:
                raise RuntimeError(f"batch {index} failed on the device")
            return row_logits(batch)

        return wait

    async def wait_for(self, event: tuple[str, int]) -> None:
        for _ in range(1000):
            if event in self.events:
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"never saw {event}; saw {self.events}")


def launching_batcher(model: LaunchingModel) -> DynamicBatcher:
    def unused(batch: torch.Tensor) -> torch.Tensor:
        raise AssertionError("with launch_batch the batcher never calls run_batch")

    return make_batcher(unused, max_batch_size=1, max_queue_delay_us=0, launch_batch=model)


def test_with_launch_batch_the_next_batch_launches_while_the_last_computes():
    async def main():
        model = LaunchingModel()
        batcher = await started(launching_batcher(model))
        requests = [torch.randn(1, *ITEM) for _ in range(3)]
        calls = [asyncio.create_task(batcher.submit(x)) for x in requests]
        await model.wait_for(("launch", 2))  # all three launched, none of their results read yet
        assert model.events == [("launch", 0), ("launch", 1), ("launch", 2)]
        for finish in model.finish[:3]:
            finish.set()
        results = await asyncio.gather(*calls)
        await batcher.stop()
        for x, result in zip(requests, results, strict=True):
            torch.testing.assert_close(result.logits, row_logits(x), rtol=0, atol=0)

    asyncio.run(main())


def test_a_launched_batch_that_fails_fails_only_its_callers():
    async def main():
        model = LaunchingModel(fail_batch=0)
        batcher = await started(launching_batcher(model))
        doomed = asyncio.create_task(batcher.submit(torch.randn(1, *ITEM)))
        await model.wait_for(("launch", 0))
        fine = torch.randn(1, *ITEM)
        other = asyncio.create_task(batcher.submit(fine))
        model.finish[0].set()
        model.finish[1].set()
        with pytest.raises(RuntimeError, match="batch 0 failed"):
            await doomed
        torch.testing.assert_close((await other).logits, row_logits(fine), rtol=0, atol=0)
        await batcher.stop()

    asyncio.run(main())


def test_stop_waits_for_launched_batches_to_deliver():
    async def main():
        model = LaunchingModel()
        batcher = await started(launching_batcher(model))
        call = asyncio.create_task(batcher.submit(torch.randn(1, *ITEM)))
        await model.wait_for(("launch", 0))
        stopping = asyncio.create_task(batcher.stop())
        await asyncio.sleep(0.05)
        assert not stopping.done()  # its batch is still computing
        model.finish[0].set()
        await stopping
        assert call.done() and (await call).batch_size == 1

    asyncio.run(main())
