"""Served images/s against the backend alone: ResNet-18 (random weights) at 224x224 through `python -m service`.

`--callers` client threads (16) each send one JPEG at a time through Classify and wait for its answer; the ceiling is
`backend.run` at batch `--callers` in this process (bench.backend_throughput's timing), measured first, on the same
machine, in the same run. A round is every caller sending `--requests` images; its rate is images / wall time. Median
with spread over rounds (after one warm-up round), JSON to <--out-dir>/serve_throughput_<cpu|cuda>_<date>.json
(bench/results by default).

    python -m bench.serve_throughput [--backend auto] [--callers 16] [--requests 4] [--rounds 5] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from bench.backend_throughput import ARCH, load, summarize
from bench.common import RESULTS, command_name, machine, time_cpu
from service._proto import classifier_pb2, classifier_pb2_grpc
from service.backends import resolve_backend_kind

INPUT_SIZE = 224
logger = logging.getLogger("bench.serve_throughput")


def backend_alone(kind: str, batch: int, reps: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = load(kind, INPUT_SIZE, batch, device)
    x = torch.randn(batch, 3, INPUT_SIZE, INPUT_SIZE)
    return summarize(kind, backend, time_cpu(functools.partial(backend.run, x), warmup=2, reps=reps), batch, INPUT_SIZE)


def photo_like_jpeg(seed: int = 0) -> bytes:
    """A 320x240 JPEG of smooth colour gradients plus mild noise: the size and entropy of a small photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:240, 0:320].astype(np.float32)
    channels = [np.sin(x / rng.uniform(20, 60) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(20, 60)) for _ in "rgb"]
    pixels = (np.stack(channels, axis=-1) * 100 + 128 + rng.normal(0, 8, (240, 320, 3))).clip(0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def start_server(kind: str, batch: int, directory: Path) -> tuple[subprocess.Popen, str]:
    repository = directory / "models.toml"
    # A delay window far shorter than one batch's compute but longer than the callers take to send again, so
    # batches fill up to `batch` and are dispatched the moment they are full.
    repository.write_text(
        f'[models.{ARCH}]\narch = "{ARCH}"\nweights = "random"\ninput_size = {INPUT_SIZE}\n'
        f'backend = "{kind}"\nmax_batch_size = {batch}\nmax_queue_delay_us = 100000\n'
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0"]
    with (directory / "server.log").open("wb") as log:
        process = subprocess.Popen([*command, "--model-repository", str(repository)], stdout=log, stderr=log)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if (
                    health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return process, address
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"server did not become ready:\n{(directory / 'server.log').read_text()}")


def served_round(stub: classifier_pb2_grpc.ClassifierStub, image: bytes, callers: int, requests: int) -> dict:
    """Every caller sends `requests` images one at a time; returns the round's images/s and mean batch size."""
    start_together = threading.Barrier(callers)
    request = classifier_pb2.ClassifyRequest(model=ARCH, image=image, top_k=1)

    def caller(_: int) -> list[int]:
        start_together.wait()
        return [stub.Classify(request, timeout=600).batch_size for _ in range(requests)]

    started = time.perf_counter()
    with ThreadPoolExecutor(callers) as pool:
        batch_sizes = [size for sizes in pool.map(caller, range(callers)) for size in sizes]
    seconds = time.perf_counter() - started
    return {"images_per_s": len(batch_sizes) / seconds, "seconds": seconds, "mean_batch": float(np.mean(batch_sizes))}


def main() -> None:
    parser = argparse.ArgumentParser(
        prog=command_name(), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", default="auto", help="auto, eager, fused or onnxruntime")
    parser.add_argument("--callers", type=int, default=16, help="concurrent callers; also the batch of the ceiling")
    parser.add_argument("--requests", type=int, default=4, help="images each caller sends per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=5, help="timed batches of the backend alone")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    kind = resolve_backend_kind(args.backend)
    load_before = os.getloadavg()

    ceiling = backend_alone(kind, args.callers, args.reps)
    logger.info(
        "backend alone, batch %d: %.1f images/s (median; batch p20 %.0f ms, p80 %.0f ms)",
        args.callers, ceiling["images_per_s_median"], ceiling["p20_ms"], ceiling["p80_ms"],
    )  # fmt: skip

    image = photo_like_jpeg()
    with tempfile.TemporaryDirectory() as directory:
        process, address = start_server(kind, args.callers, Path(directory))
        try:
            with grpc.insecure_channel(address) as channel:
                stub = classifier_pb2_grpc.ClassifierStub(channel)
                served_round(stub, image, args.callers, args.requests)  # warm-up
                rounds = [served_round(stub, image, args.callers, args.requests) for _ in range(args.rounds)]
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)

    rates = [r["images_per_s"] for r in rounds]
    p20, p50, p80 = (float(np.quantile(rates, q)) for q in (0.2, 0.5, 0.8))
    ratio = p50 / ceiling["images_per_s_median"]
    logger.info(
        "served, %d callers one image at a time: %.1f images/s (median; p20 %.1f, p80 %.1f), mean batch %.1f",
        args.callers, p50, p20, p80, float(np.mean([r["mean_batch"] for r in rounds])),
    )  # fmt: skip
    logger.info("served / backend alone: %.2f", ratio)

    now = datetime.datetime.now(datetime.UTC)
    report = {
        "question": "served images/s (Classify, JPEG, concurrent callers one image at a time) vs the backend alone",
        "date": now.isoformat(timespec="seconds"),
        "machine": machine(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "image_bytes": len(image),
        "callers": args.callers,
        "requests_per_caller": args.requests,
        "backend_alone": ceiling,
        "served_rounds": rounds,
        "served_images_per_s": {"median": p50, "p20": p20, "p80": p80},
        "served_over_backend": ratio,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = args.out_dir / f"serve_throughput_{device}_{now:%Y%m%dT%H%M%S}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    logger.info("wrote %s", path)


if __name__ == "__main__":
    main()
