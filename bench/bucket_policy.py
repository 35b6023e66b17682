"""The batcher's bucket policies (service/batch_plan.py) side by side: images/s, latency and padded rows.

A real model (ResNet-18, random weights): with `--backend eager` (default) behind `BucketedBackend`, which computes
every batch padded up to its bucket as the fused backend's CUDA graphs do, so that padding costs what it costs there;
with `--backend fused` (a GPU) the fused backend itself, its CUDA graphs and its batches in flight.
`--callers` asyncio callers each submit one image, wait for it, and submit again (closed loop), straight to a
DynamicBatcher: no gRPC, so the policy is what differs. Per policy and caller count: one warm-up round, then
`--rounds` rounds of `--requests` images per caller, the policies' rounds interleaved (the machine's load drifts);
images/s per round (median, p20, p80), each round's p50/p99 latency (their medians), the mean batch and the share of
computed rows that were padding. JSON to <--out-dir>/bucket_policy_<device>_<date>.json.

    python -m bench.bucket_policy [--callers 6 12] [--requests 6] [--rounds 5] [--input-size 64]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

import models
from bench.common import RESULTS, command_name, machine
from service.backends import Backend, LaunchesBatches, create_backend
from service.backends.eager import EagerBackend
from service.backends.fused import batch_buckets
from service.batch_plan import BucketPolicy, bucket_for
from service.batcher import DynamicBatcher

logger = logging.getLogger("bench.bucket_policy")


class BucketedBackend:
    """`inner` computing each batch of n rows as its bucket's rows, like a CUDA graph per bucket: the rows past n
    repeat the batch's last row (finite data; each row's logits depend on that row alone) and are dropped after."""

    def __init__(self, inner: Backend, buckets: Sequence[int]) -> None:
        self.name = inner.name
        self.device = inner.device
        self.dtype = inner.dtype
        self.preferred_batch_sizes = tuple(buckets)
        self._inner = inner

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        n = batch.shape[0]
        padding = bucket_for(n, self.preferred_batch_sizes) - n
        padded = torch.cat([batch, batch[-1:].expand(padding, *batch.shape[1:])]) if padding else batch
        return self._inner.run(padded)[:n]


async def closed_loop_round(batcher: DynamicBatcher, image: torch.Tensor, callers: int, requests: int) -> dict:
    latencies: list[float] = []
    sizes: list[int] = []

    async def caller() -> None:
        for _ in range(requests):
            started = time.perf_counter()
            result = await batcher.submit(image)
            latencies.append(time.perf_counter() - started)
            sizes.append(result.batch_size)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    wall = time.perf_counter() - started
    return {
        "images_per_s": callers * requests / wall,
        "p50_ms": float(np.quantile(latencies, 0.5)) * 1e3,
        "p99_ms": float(np.quantile(latencies, 0.99)) * 1e3,
        "mean_batch": float(np.mean(sizes)),  # per request: the batch it ran in
    }


class PolicyUnderTest:
    """One policy's batcher over the shared backend, and what it reported per batch."""

    def __init__(self, backend: Backend, policy: BucketPolicy, args: argparse.Namespace, callers: int) -> None:
        self.policy = policy
        self.padded: list[int] = []
        self.batches: list[int] = []
        self.rounds: list[dict] = []
        self.batcher = DynamicBatcher(
            backend.run,
            max_batch_size=args.max_batch_size,
            max_queue_delay_us=args.max_queue_delay_us,
            max_queue_size=4 * callers,
            preferred_batch_sizes=backend.preferred_batch_sizes,
            bucket_policy=policy,
            name=f"bench-{policy}",
            on_batch=lambda size, queue_us, compute_us: self.batches.append(size),
            on_padded_rows=self.padded.append,
            launch_batch=backend.launch if isinstance(backend, LaunchesBatches) else None,
        )

    def summary(self, callers: int) -> dict:
        rates = [r["images_per_s"] for r in self.rounds]
        return {
            "policy": str(self.policy),
            "callers": callers,
            "images_per_s": {f"p{int(q * 100)}": float(np.quantile(rates, q)) for q in (0.5, 0.2, 0.8)},
            "p50_ms_median": float(np.median([r["p50_ms"] for r in self.rounds])),
            "p99_ms_median": float(np.median([r["p99_ms"] for r in self.rounds])),
            "batches": len(self.batches),
            "mean_batch_rows": float(np.mean(self.batches)),
            "padded_share": sum(self.padded) / (sum(self.padded) + sum(self.batches)),
            "rounds": self.rounds,
        }


async def measure(backend: Backend, args: argparse.Namespace, callers: int) -> list[dict]:
    """Every policy at `callers`, their rounds interleaved so that a change in the machine's load hits them alike."""
    under_test = [PolicyUnderTest(backend, policy, args, callers) for policy in BucketPolicy]
    image = torch.randn(1, 3, args.input_size, args.input_size)
    for candidate in under_test:
        await candidate.batcher.start()
    try:
        for candidate in under_test:  # warm-up, and the cost rule's first times
            await closed_loop_round(candidate.batcher, image, callers, args.requests)
            candidate.padded.clear()
            candidate.batches.clear()
        for _ in range(args.rounds):
            for candidate in under_test:
                candidate.rounds.append(await closed_loop_round(candidate.batcher, image, callers, args.requests))
    finally:
        for candidate in under_test:
            await candidate.batcher.stop()
    rows = [candidate.summary(callers) for candidate in under_test]
    for row in rows:
        logger.info(
            "%-4s %2d callers: %6.1f images/s (p20 %.1f, p80 %.1f), p50 %.1f ms, p99 %.1f ms, mean batch %.1f, "
            "padded %.1f%%",
            row["policy"], callers, row["images_per_s"]["p50"], row["images_per_s"]["p20"],
            row["images_per_s"]["p80"], row["p50_ms_median"], row["p99_ms_median"], row["mean_batch_rows"],
            100 * row["padded_share"],
        )  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        prog=command_name(), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--callers", type=int, nargs="+", default=[6, 12])
    parser.add_argument("--requests", type=int, default=6, help="images each caller sends per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    parser.add_argument("--backend", choices=("eager", "fused"), default="eager")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    network = models.build("resnet18", weights="random", seed=0)
    buckets = batch_buckets(args.max_batch_size)
    backend: Backend
    if args.backend == "fused":
        if device.type != "cuda":
            parser.error("--backend fused needs a GPU here (CUDA graphs are what it measures)")
        backend = create_backend(
            "fused", network, input_size=args.input_size, max_batch_size=args.max_batch_size, device=device
        )
    else:
        inner = EagerBackend(network, input_size=args.input_size, device=device)
        for bucket in buckets:  # oneDNN's primitives per shape, as graph capture warms each bucket
            inner.run(torch.randn(bucket, 3, args.input_size, args.input_size))
        backend = BucketedBackend(inner, buckets)
    load_before = os.getloadavg()
    rows = [row for callers in args.callers for row in asyncio.run(measure(backend, args, callers))]
    now = datetime.datetime.now(datetime.UTC)
    report = {
        "question": "images/s, latency and padded rows of the batcher's bucket policies (closed-loop callers)",
        "date": now.isoformat(timespec="seconds"),
        "machine": machine(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "arch": "resnet18",
        "backend": args.backend,
        "buckets": list(backend.preferred_batch_sizes),
        "input_size": args.input_size,
        "max_batch_size": args.max_batch_size,
        "max_queue_delay_us": args.max_queue_delay_us,
        "requests_per_caller": args.requests,
        "results": rows,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"bucket_policy_{device.type}_{now:%Y%m%dT%H%M%S}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    logger.info("wrote %s", path)


if __name__ == "__main__":
    main()
