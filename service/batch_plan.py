"""Where a batch closes when the backend computes some batch sizes padded to a larger one (its graph buckets).

The dynamic batcher (service/batcher.py) gathers requests until its delay window ends; this module decides, as pure
functions of the gathered row counts and a cost estimate, how many of them the batch takes. Those it leaves stay
queued, with their deadlines armed, and open the next batch. A model's repository entry picks the policy
(`bucket_policy`, service/repository.py):

- ``pad``: take everything gathered; the backend pads it up to the next bucket (the batcher before it knew buckets).
- ``fill``: close at the largest bucket the gathered requests can fill, so no row is computed for nothing; the rest
  wait for the next batch. A lone request larger than every bucket it can fill still goes, padded.
- ``cost`` (default): as ``fill``, but pad up to the next bucket when waiting for the next batch would cost more
  time than computing the padding does (``pad_beats_waiting``).
"""

from __future__ import annotations

import bisect
import collections
import enum
from collections.abc import Callable, Sequence


class BucketPolicy(enum.StrEnum):
    PAD = "pad"
    FILL = "fill"
    COST = "cost"


def bucket_for(rows: int, buckets: Sequence[int]) -> int:
    """The rows the backend computes for a batch of `rows`: the smallest bucket >= rows, or rows itself."""
    index = bisect.bisect_left(buckets, rows)
    return buckets[index] if index < len(buckets) else rows


def fill_count(sizes: Sequence[int], buckets: Sequence[int]) -> int:
    """How many of the requests (row counts, arrival order) fill the largest bucket their rows can fill.

    The longest prefix whose rows fit in the largest bucket <= all their rows; at least one request, since the first
    must go even when no bucket fits it exactly (it is padded then).
    """
    total = sum(sizes)
    index = bisect.bisect_right(buckets, total) - 1
    if not buckets or index < 0 or buckets[index] == total:
        return len(sizes)  # nothing to fill below, or already exact
    target, rows, count = buckets[index], 0, 0
    for size in sizes:
        if rows + size > target:
            break
        rows, count = rows + size, count + 1
    return max(count, 1)


class ComputeCosts:
    """Seconds a batch takes, per bucket, learned from the batches the backend ran.

    A bucket seen before is estimated by an exponential moving average of its times (``smoothing`` is the weight of a
    new time), from its second time on: a backend's first batch of a size may pay for allocation or kernel selection
    (oneDNN creates its primitives per shape), so the first time only stands in until a second one replaces it. One
    not seen yet is read off a line ``fixed + per_row * rows`` through the buckets seen (least squares; the slope and
    intercept clipped at zero), or scaled in proportion to rows from the one bucket seen. ``estimate`` is None until
    a batch has been seen.

    A bucket's time goes stale once ``refresh_after`` batches of other sizes ran since it was last timed: ``timed``
    is then False, so the cost rule tries it again, and the new time replaces the old. Without that, one slow batch
    of a padded bucket (a busy moment) would make the rule fill for good, and filling never times that bucket again
    (measured: 12 callers on this CPU, bench/results/bucket_policy_cpu_20261202T043801.json). The price: at most one
    batch in ``refresh_after`` padded where filling was right.
    """

    def __init__(self, buckets: Sequence[int], smoothing: float = 0.2, refresh_after: int = 50) -> None:
        self._buckets = tuple(buckets)
        self._smoothing = smoothing
        self._refresh_after = refresh_after
        self._seconds: dict[int, float] = {}
        self._seen: collections.Counter[int] = collections.Counter()
        self._batches = 0
        self._last_timed: dict[int, int] = {}  # bucket -> self._batches when it last ran

    def observe(self, rows: int, seconds: float) -> None:
        bucket = bucket_for(rows, self._buckets)
        stale = self._batches - self._last_timed.get(bucket, 0) >= self._refresh_after
        self._batches += 1
        self._last_timed[bucket] = self._batches
        self._seen[bucket] += 1
        previous = self._seconds.get(bucket)
        if previous is not None and self._seen[bucket] > 2 and not stale:
            seconds = previous + self._smoothing * (seconds - previous)
        self._seconds[bucket] = seconds  # a first, second or stale time is replaced, not averaged

    def timed(self, rows: int) -> bool:
        """Whether the bucket of `rows` has been timed past its first batch, recently enough to trust."""
        bucket = bucket_for(rows, self._buckets)
        fresh = self._batches - self._last_timed.get(bucket, 0) < self._refresh_after
        return self._seen[bucket] >= 2 and fresh

    def estimate(self, rows: int) -> float | None:
        bucket = bucket_for(rows, self._buckets)
        if bucket in self._seconds:
            return self._seconds[bucket]
        if not self._seconds:
            return None
        if len(self._seconds) == 1:
            ((seen, seconds),) = self._seconds.items()
            return seconds * bucket / seen
        xs, ys = list(self._seconds), list(self._seconds.values())
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        spread = sum((x - mean_x) ** 2 for x in xs)
        per_row = max(0.0, sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread)
        return max(0.0, mean_y - per_row * mean_x) + per_row * bucket


def pad_beats_waiting(sizes: Sequence[int], take: int, costs: ComputeCosts, remainder_wait_s: float) -> bool:
    """Whether running all gathered requests padded frees the device sooner than taking only `take` of them.

    The cost is the time from now until every gathered row is done, which is also when the device is free for the
    rows that arrive meanwhile:
    - pad: one batch of the next bucket up, ``C(bucket(total))``;
    - fill: the `take` requests' p rows, then the r remaining ones once that batch is done and their own window
      (``remainder_wait_s`` from now) has closed: ``max(C(bucket(p)), remainder_wait_s) + C(bucket(r))``.
    Why not the mean latency of the rows at hand, which favours the p rows done early: under load their callers (or
    as many newcomers) are back while the remainder runs and wait for it. Measured so (closed loop, 12 callers,
    bench/results/bucket_policy_cpu_20261202T042032.json), a mean-latency rule filled where padding served 40% more
    images/s. Where per-batch overhead dominates (a GPU's small graphs: C(1) ~ C(8)), padding wins; where cost
    follows rows and the buckets double, filling does unless the remainder would wait out a window of its own. A tie
    fills: no row is computed for nothing.

    A padded bucket not timed yet, or not for a while (``ComputeCosts.timed``), is tried (padding wins): filling never
    runs it, so a guess that it is dear would never be corrected.
    """
    total, rows_taken = sum(sizes), sum(sizes[:take])
    remainder = total - rows_taken
    if remainder == 0:
        return False
    if not costs.timed(total):
        return True
    padded, taken, rest = (costs.estimate(rows) for rows in (total, rows_taken, remainder))
    if padded is None or taken is None or rest is None:
        return False
    return padded < max(taken, remainder_wait_s) + rest


def requests_to_take(
    policy: BucketPolicy,
    sizes: Sequence[int],
    buckets: Sequence[int],
    costs: ComputeCosts,
    remainder_wait_s: Callable[[int], float],
) -> int:
    """How many of the gathered requests (row counts, arrival order) the closing batch takes under `policy`.

    ``remainder_wait_s(i)``: seconds from now until the delay window of request i (the first one left) closes.
    """
    if policy is BucketPolicy.PAD:
        return len(sizes)
    take = fill_count(sizes, buckets)
    if take == len(sizes) or policy is BucketPolicy.FILL:
        return take
    return len(sizes) if pad_beats_waiting(sizes, take, costs, remainder_wait_s(take)) else take
