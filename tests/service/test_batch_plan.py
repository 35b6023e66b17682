"""Where a batch closes among graph buckets (service/batch_plan.py): pure functions, no clock, no event loop."""

import pytest

from service.batch_plan import BucketPolicy, ComputeCosts, bucket_for, fill_count, pad_beats_waiting, requests_to_take

BUCKETS = (1, 2, 4, 8, 16, 32)  # the fused backend's for max_batch_size 32


def costs_of(seconds: dict[int, float]) -> ComputeCosts:
    costs = ComputeCosts(BUCKETS)
    for rows, value in seconds.items():
        costs.observe(rows, 10 * value)  # a first batch of its size, slow, and replaced by the next
        costs.observe(rows, value)
    return costs


# A GPU's small CUDA graphs: a fixed cost per batch dominates, rows are nearly free.
OVERHEAD_BOUND = costs_of({1: 1.0e-3, 2: 1.0e-3, 4: 1.05e-3, 8: 1.1e-3, 16: 1.2e-3, 32: 1.4e-3})
# A CPU: time follows rows.
ROW_BOUND = costs_of({1: 1e-3, 2: 2e-3, 4: 4e-3, 8: 8e-3, 16: 16e-3, 32: 32e-3})


@pytest.mark.parametrize(("rows", "bucket"), [(1, 1), (3, 4), (17, 32), (32, 32), (40, 40)])
def test_bucket_for_is_the_smallest_bucket_that_holds_the_rows(rows, bucket):
    assert bucket_for(rows, BUCKETS) == bucket
    assert bucket_for(rows, ()) == rows  # no buckets: every size runs as it is


@pytest.mark.parametrize(
    ("sizes", "take"),
    [
        ([1] * 17, 16),  # 17 rows: 16 fill a bucket, the 17th waits
        ([1] * 16, 16),  # exact already
        ([3, 2, 2], 1),  # 7 rows: the largest bucket below is 4, and 3 + 2 overflows it, so only the 3 goes
        ([2, 3, 1], 1),  # 6 -> 4: 2 fits, 2 + 3 does not; order is kept, nothing jumps the queue
        ([3], 1),  # a lone 3-row request: no bucket it can fill, it goes padded to 4
        ([5, 1], 1),  # 6 -> 4: the first request alone is larger than 4; it must still go
        ([1, 1, 1], 2),
    ],
)
def test_fill_closes_at_the_largest_bucket_the_requests_fill(sizes, take):
    assert fill_count(sizes, BUCKETS) == take


def test_without_buckets_every_policy_takes_everything():
    for policy in BucketPolicy:
        assert requests_to_take(policy, [1] * 17, (), ROW_BOUND, lambda index: 0.0) == 17


def test_pad_policy_takes_everything_the_window_gathered():
    assert requests_to_take(BucketPolicy.PAD, [1] * 17, BUCKETS, ROW_BOUND, lambda index: 0.0) == 17


def test_cost_pads_where_batches_cost_a_fixed_overhead_and_fills_where_rows_cost():
    for rows in (17, 24):
        sizes = [1] * rows
        # Overhead: pad C(32) = 1.4 ms; fill C(16) + C(1 or 8) = 2.2 or 2.3 ms.
        assert requests_to_take(BucketPolicy.COST, sizes, BUCKETS, OVERHEAD_BOUND, lambda index: 0.0) == rows
        # Rows: pad 32 ms; fill 16 + 1 = 17 or 16 + 8 = 24 ms.
        assert requests_to_take(BucketPolicy.COST, sizes, BUCKETS, ROW_BOUND, lambda index: 0.0) == 16
        assert requests_to_take(BucketPolicy.FILL, sizes, BUCKETS, OVERHEAD_BOUND, lambda index: 0.0) == 16


def test_cost_weighs_the_remainders_own_window():
    """Rows cost: 31 rows -> 16 now and 15 later, unless the 15 would also wait out a long window of their own."""
    sizes = [1] * 31
    # pad: C(32) = 32 ms. fill: C(16) + C(16) = 32 ms: a tie fills.
    assert not pad_beats_waiting(sizes, 16, ROW_BOUND, remainder_wait_s=0.0)
    # The remainder's window closes in 20 ms: fill takes 20 + 16 = 36 ms.
    assert pad_beats_waiting(sizes, 16, ROW_BOUND, remainder_wait_s=0.020)
    waits = {16: 0.020}
    assert requests_to_take(BucketPolicy.COST, sizes, BUCKETS, ROW_BOUND, waits.__getitem__) == 31


def test_cost_tries_a_padded_bucket_it_has_not_timed():
    costs = ComputeCosts(BUCKETS)
    assert costs.estimate(8) is None
    assert requests_to_take(BucketPolicy.COST, [1] * 17, BUCKETS, costs, lambda index: 0.0) == 17
    for rows, seconds in ((1, 1e-3), (1, 1e-3), (16, 16e-3), (16, 16e-3), (32, 0.1)):
        costs.observe(rows, seconds)
    assert requests_to_take(BucketPolicy.COST, [1] * 17, BUCKETS, costs, lambda index: 0.0) == 17  # 32 timed once
    costs.observe(32, 32e-3)
    assert requests_to_take(BucketPolicy.COST, [1] * 17, BUCKETS, costs, lambda index: 0.0) == 16


def test_compute_costs_smooth_what_they_see_and_estimate_the_rest_from_a_line():
    costs = ComputeCosts(BUCKETS, smoothing=0.5)
    costs.observe(3, 40.0)  # a batch of 3 computes bucket 4; its first batch, slow
    assert costs.estimate(4) == 40.0  # stands in until a second time replaces it
    costs.observe(4, 4.0)
    assert costs.estimate(4) == 4.0
    assert costs.estimate(8) == 8.0  # one bucket seen: proportional to rows
    costs.observe(4, 2.0)
    assert costs.estimate(3) == 3.0  # the average moves halfway to the new time
    costs.observe(16, 7.0)  # two buckets seen: 3.0 at 4 and 7.0 at 16, the line 5/3 + rows/3
    assert costs.estimate(8) == pytest.approx(5 / 3 + 8 / 3)
    assert costs.estimate(1) == pytest.approx(5 / 3 + 1 / 3)


def test_a_falling_line_is_clipped_to_a_flat_one():
    costs = costs_of({4: 3.0, 16: 1.0})  # noise: the larger bucket measured faster
    assert costs.estimate(8) == pytest.approx(2.0)  # slope 0, the mean


def test_a_padded_bucket_timed_long_ago_is_tried_again():
    costs = ComputeCosts(BUCKETS, refresh_after=4)
    for rows, seconds in ((16, 1.2e-3), (16, 1.2e-3), (1, 1e-3), (1, 1e-3), (32, 10e-3), (32, 10e-3)):
        costs.observe(rows, seconds)  # 32 timed in a busy moment: 10 ms > 1.2 + 1.0 ms, so fill
    assert requests_to_take(BucketPolicy.COST, [1] * 17, BUCKETS, costs, lambda index: 0.0) == 16
    for _ in range(3):  # filling runs 16 and 1 only; 4 batches after 32 last ran, its time is stale
        costs.observe(16, 1.2e-3)
    assert requests_to_take(BucketPolicy.COST, [1] * 17, BUCKETS, costs, lambda index: 0.0) == 16
    costs.observe(1, 1e-3)
    assert not costs.timed(32)
    assert requests_to_take(BucketPolicy.COST, [1] * 17, BUCKETS, costs, lambda index: 0.0) == 17  # tried again
    costs.observe(32, 1.4e-3)  # the new time replaces the stale one: cheap after all, so padding from now on
    assert costs.timed(32) and costs.estimate(32) == 1.4e-3
    assert requests_to_take(BucketPolicy.COST, [1] * 17, BUCKETS, costs, lambda index: 0.0) == 17
