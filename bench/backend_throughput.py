"""How fast is a backend alone? ResNet-18 (random weights), 224x224, batch 16: the ceiling the served rate is judged by.

Times `backend.run(batch)` only (no decoding, gRPC or batching), median with spread over repeated runs, and writes
JSON to bench/results/backend_throughput_<cpu|cuda>_<date>.json. On a CPU: onnxruntime, eager (channels_last, as
served) and eager NCHW (why the served eager backend uses channels_last).

    python -m bench.backend_throughput [--reps 10] [--batch 16] [--input-size 224]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import logging
import os
import statistics

import numpy as np
import torch

import models
from bench.common import RESULTS, machine, time_cpu
from service.backends import create_backend
from service.backends.base import Backend
from service.backends.eager import EagerBackend

ARCH = "resnet18"

logger = logging.getLogger("bench.backend_throughput")


def load(variant: str, input_size: int, batch: int, device: torch.device, arch: str = ARCH) -> Backend:
    model = models.build(arch, weights="random", seed=0)
    if variant == "eager-nchw":
        return EagerBackend(model, input_size=input_size, device=device, channels_last=False)
    return create_backend(variant, model, input_size=input_size, max_batch_size=batch, device=device)


def summarize(
    variant: str, backend: Backend, seconds: list[float], batch: int, input_size: int, arch: str = ARCH
) -> dict:
    p20, p50, p80 = (float(np.quantile(seconds, q)) for q in (0.2, 0.5, 0.8))
    return {
        "backend": variant,
        "device": str(backend.device),
        "arch": arch,
        "batch": batch,
        "input_size": input_size,
        "reps": len(seconds),
        "median_ms": p50 * 1e3,
        "p20_ms": p20 * 1e3,
        "p80_ms": p80 * 1e3,
        "min_ms": min(seconds) * 1e3,
        "max_ms": max(seconds) * 1e3,
        "stdev_ms": statistics.stdev(seconds) * 1e3 if len(seconds) > 1 else 0.0,
        "images_per_s_median": batch / p50,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backends", nargs="+", default=None, help="default: fused on CUDA; the CPU set otherwise")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    variants = args.backends or (
        ["fused", "onnxruntime", "eager"] if device.type == "cuda" else ["onnxruntime", "eager", "eager-nchw"]
    )
    x = torch.randn(args.batch, 3, args.input_size, args.input_size)
    load_before = os.getloadavg()
    results = []
    for variant in variants:
        backend = load(variant, args.input_size, args.batch, device)
        seconds = time_cpu(functools.partial(backend.run, x), args.warmup, args.reps)
        results.append(summarize(variant, backend, seconds, args.batch, args.input_size))
        row = results[-1]
        logger.info(
            "%-12s median %8.1f ms  [p20 %8.1f, p80 %8.1f]  %7.1f images/s",
            variant,
            row["median_ms"],
            row["p20_ms"],
            row["p80_ms"],
            row["images_per_s_median"],
        )
        del backend

    now = datetime.datetime.now(datetime.UTC)
    report = {
        "question": "backend alone, images/s at a fixed batch (the served-throughput ceiling)",
        "date": now.isoformat(timespec="seconds"),
        "machine": machine(),
        # The machine may be shared: load averages (1, 5, 15 min) before and after tell how quiet it was.
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"backend_throughput_{device.type}_{now:%Y%m%dT%H%M%S}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    logger.info("wrote %s", path)


if __name__ == "__main__":
    main()
