"""Served images/s against the backend alone: ResNet-18 (random weights) at 224x224 through `python -m service`.

`--callers` client threads (16) each send one image at a time and wait for its answer, as `--request` says:
`classify` (a JPEG through Classify), `infer-fp32` (ModelInfer FP32 [1, 3, S, S], normalized values) or `infer-uint8`
(ModelInfer UINT8 [1, S, S, 3], raw pixels); several are run one after the other against one server. The ceiling is
`backend.run` at batch `--callers` on float32 NCHW in this process (bench.backend_throughput's timing, and its CPU per
image), measured first, on the same machine, in the same run. A round is every caller sending `--requests` images;
its rate is images / wall time, its server CPU per request the CPU seconds of the server's processes (all of them,
from /proc: with `--frontends N` the supervisor, the engine, the frontends and their decode workers) over the round /
its requests. `--frontends 0 1 2` repeats everything against a fresh server per count (the sweep). Median with
spread over rounds (after one warm-up round), JSON to <--out-dir>/serve_throughput_<cpu|cuda>_<date>.json
(bench/results by default). The callers run on the same machine: on a small one they take CPU the server would
otherwise have.

    python -m bench.serve_throughput [--request classify infer-fp32 infer-uint8] [--backend auto] [--callers 16]
        [--requests 4] [--rounds 5] [--arch resnet18] [--input-size 224] [--frontends 0 1 2] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from bench.backend_throughput import ARCH, load, summarize
from bench.common import RESULTS, command_name, machine, spread, time_cpu
from bench.process_cpu import tree_cpu_seconds
from service._proto import classifier_pb2, classifier_pb2_grpc
from service._proto import grpc_service_pb2 as kserve_pb2
from service._proto import grpc_service_pb2_grpc as kserve_pb2_grpc
from service.backends import resolve_backend_kind

INPUT_SIZE = 224
REQUESTS = ("classify", "infer-fp32", "infer-uint8")
logger = logging.getLogger("bench.serve_throughput")


@dataclass(frozen=True)
class Workload:
    """What each caller sends: `send` makes one call and returns the batch it was computed in when the answer says so
    (Classify); otherwise `batch_counts` reads the server's batch executions by size so far (ModelStatistics)."""

    request: str
    payload: str
    send: Callable[[], int | None]
    batch_counts: Callable[[], Counter[int]] | None = None


def backend_alone(kind: str, arch: str, input_size: int, batch: int, reps: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = load(kind, input_size, batch, device, arch)
    run = functools.partial(backend.run, torch.randn(batch, 3, input_size, input_size))
    run(), run()  # warm-up, outside the CPU reading
    cpu_before = time.process_time()
    seconds = time_cpu(run, warmup=0, reps=reps)
    # This process's CPU (all its threads: onnxruntime's intra-op pool too) per image: the part of the server's CPU
    # per request that is the model's, not the serving's.
    cpu_ms_per_image = (time.process_time() - cpu_before) * 1e3 / (batch * len(seconds))
    return {**summarize(kind, backend, seconds, batch, input_size, arch), "cpu_ms_per_image": cpu_ms_per_image}


def photo_like_jpeg(seed: int = 0) -> bytes:
    """A 320x240 JPEG of smooth colour gradients plus mild noise: the size and entropy of a small photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:240, 0:320].astype(np.float32)
    channels = [np.sin(x / rng.uniform(20, 60) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(20, 60)) for _ in "rgb"]
    pixels = (np.stack(channels, axis=-1) * 100 + 128 + rng.normal(0, 8, (240, 320, 3))).clip(0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def workload(request: str, channel: grpc.Channel, model: str, input_size: int) -> Workload:
    """The `request` kind's one-image call on `channel`, its payload built once (seeded)."""
    if request == "classify":
        image = photo_like_jpeg()
        classify = classifier_pb2_grpc.ClassifierStub(channel).Classify
        message = classifier_pb2.ClassifyRequest(model=model, image=image, top_k=1)
        return Workload(request, f"JPEG 320x240, {len(image)} bytes", lambda: classify(message, timeout=600).batch_size)
    rng = np.random.default_rng(0)
    if request == "infer-fp32":
        datatype, shape = "FP32", [1, 3, input_size, input_size]
        values = rng.standard_normal(shape, dtype=np.float32).astype("<f4")
    elif request == "infer-uint8":
        datatype, shape = "UINT8", [1, input_size, input_size, 3]
        values = rng.integers(0, 256, shape, dtype=np.uint8)
    else:
        raise ValueError(f"unknown request {request!r}; one of {', '.join(REQUESTS)}")
    inference = kserve_pb2_grpc.GRPCInferenceServiceStub(channel)
    tensor = kserve_pb2.ModelInferRequest.InferInputTensor(name="input", datatype=datatype, shape=shape)
    message = kserve_pb2.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[values.tobytes()])

    def send() -> None:
        inference.ModelInfer(message, timeout=600)

    def batch_counts() -> Counter[int]:
        (stats,) = inference.ModelStatistics(kserve_pb2.ModelStatisticsRequest(name=model), timeout=60).model_stats
        return Counter({batch.batch_size: batch.compute_infer.count for batch in stats.batch_stats})

    return Workload(request, f"ModelInfer {datatype} {shape}, raw_input_contents", send, batch_counts)


def start_server(
    kind: str, arch: str, input_size: int, batch: int, frontends: int, directory: Path
) -> tuple[subprocess.Popen, str]:
    repository = directory / "models.toml"
    # A delay window far shorter than one batch's compute but longer than the callers take to send again, so
    # batches fill up to `batch` and are dispatched the moment they are full.
    repository.write_text(
        f'[models.{arch}]\narch = "{arch}"\nweights = "random"\ninput_size = {input_size}\n'
        f'backend = "{kind}"\nmax_batch_size = {batch}\nmax_queue_delay_us = 100000\n'
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0"]
    command += ["--http-port", "0", "--frontends", str(frontends)]
    with (directory / "server.log").open("wb") as log:
        process = subprocess.Popen([*command, "--model-repository", str(repository)], stdout=log, stderr=log)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        index = kserve_pb2_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if (
                    health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return process, address
                # A model that failed to load never becomes ready: stop now rather than wait out the deadline.
                if index(kserve_pb2.RepositoryIndexRequest(), timeout=2).models[0].state == "UNAVAILABLE":
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"server did not become ready:\n{(directory / 'server.log').read_text()}")


@dataclass(frozen=True)
class ServerPids:
    server: int  # `python -m service`: with --frontends N the supervisor, its children below it
    engine: int | None  # with --frontends N: the engine process, whose CPU is also reported on its own


def served_round(work: Workload, callers: int, requests: int, pids: ServerPids) -> dict:
    """Every caller sends `requests` images one at a time; the round's images/s, mean batch (as each request saw it:
    requests weighted, not batches) and the server's (and its engine's) and the callers' CPU per request."""
    start_together = threading.Barrier(callers)

    def caller(_: int) -> list[int | None]:
        start_together.wait()
        return [work.send() for _ in range(requests)]

    counts_before = work.batch_counts() if work.batch_counts else Counter()
    cpu_before, client_cpu_before = tree_cpu_seconds(pids.server), time.process_time()
    engine_before = 0.0 if pids.engine is None else tree_cpu_seconds(pids.engine)
    started = time.perf_counter()
    with ThreadPoolExecutor(callers) as pool:
        answers = [size for sizes in pool.map(caller, range(callers)) for size in sizes]
    seconds = time.perf_counter() - started
    cpu_seconds = tree_cpu_seconds(pids.server) - cpu_before
    client_cpu_seconds = time.process_time() - client_cpu_before
    engine_seconds = None if pids.engine is None else tree_cpu_seconds(pids.engine) - engine_before
    if work.batch_counts:
        executions = work.batch_counts() - counts_before
        mean_batch = sum(size * size * n for size, n in executions.items()) / sum(
            size * n for size, n in executions.items()
        )
    else:
        mean_batch = float(np.mean([size for size in answers if size is not None]))
    return {
        "images_per_s": len(answers) / seconds,
        "seconds": seconds,
        "mean_batch": mean_batch,
        "server_cpu_s": cpu_seconds,
        "server_cpu_ms_per_request": cpu_seconds * 1e3 / len(answers),
        # The engine's part of server_cpu_ms_per_request (the one process every request goes through); None
        # without frontends.
        "engine_cpu_ms_per_request": None if engine_seconds is None else engine_seconds * 1e3 / len(answers),
        # The callers share the machine with the server: what they took of it, per request.
        "client_cpu_ms_per_request": client_cpu_seconds * 1e3 / len(answers),
    }


def serve(work: Workload, args: argparse.Namespace, pids: ServerPids, ceiling: dict) -> dict:
    served_round(work, args.callers, args.requests, pids)  # warm-up
    rounds = [served_round(work, args.callers, args.requests, pids) for _ in range(args.rounds)]
    rate = spread([r["images_per_s"] for r in rounds])
    cpu = spread([r["server_cpu_ms_per_request"] for r in rounds])
    ratio = rate["median"] / ceiling["images_per_s_median"]
    logger.info(
        "%s, %d callers one image at a time: %.1f images/s (median; p20 %.1f, p80 %.1f), mean batch %.1f, "
        "server CPU %.2f ms/request (p20 %.2f, p80 %.2f); served / backend alone: %.2f",
        work.request, args.callers, rate["median"], rate["p20"], rate["p80"],
        float(np.mean([r["mean_batch"] for r in rounds])), cpu["median"], cpu["p20"], cpu["p80"], ratio,
    )  # fmt: skip
    engine = None if pids.engine is None else spread([r["engine_cpu_ms_per_request"] for r in rounds])
    return {
        "payload": work.payload,
        "rounds": rounds,
        "images_per_s": rate,
        "server_cpu_ms_per_request": cpu,
        "engine_cpu_ms_per_request": engine,
        "served_over_backend": ratio,
    }


def serve_all(args: argparse.Namespace, kind: str, frontends: int, ceiling: dict) -> dict[str, dict]:
    """Every `--request` against one fresh server with `frontends`."""
    served = {}
    with tempfile.TemporaryDirectory() as directory:
        process, address = start_server(kind, args.arch, args.input_size, args.callers, frontends, Path(directory))
        started = re.search(r"engine started \(pid (\d+)\)", (Path(directory) / "server.log").read_text())
        pids = ServerPids(process.pid, int(started.group(1)) if started else None)
        try:
            with grpc.insecure_channel(address) as channel:
                for request in args.request:
                    served[request] = serve(workload(request, channel, args.arch, args.input_size), args, pids, ceiling)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)
    return served


def main() -> None:
    parser = argparse.ArgumentParser(
        prog=command_name(), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--request", nargs="+", choices=REQUESTS, default=["classify"], help="what callers send")
    parser.add_argument("--backend", default="auto", help="auto, eager, fused or onnxruntime")
    parser.add_argument("--arch", default=ARCH, help="the served model (random weights), e.g. digits_resnet")
    parser.add_argument("--input-size", type=int, default=INPUT_SIZE)
    parser.add_argument("--callers", type=int, default=16, help="concurrent callers; also the batch of the ceiling")
    parser.add_argument("--requests", type=int, default=4, help="images each caller sends per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=5, help="timed batches of the backend alone")
    parser.add_argument(
        "--frontends", type=int, nargs="+", default=[0], help="the server's --frontends, one server per count"
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    kind = resolve_backend_kind(args.backend)
    load_before = os.getloadavg()

    ceiling = backend_alone(kind, args.arch, args.input_size, args.callers, args.reps)
    logger.info(
        "backend alone, batch %d: %.1f images/s (median; batch p20 %.0f ms, p80 %.0f ms), CPU %.2f ms/image",
        args.callers, ceiling["images_per_s_median"], ceiling["p20_ms"], ceiling["p80_ms"], ceiling["cpu_ms_per_image"],
    )  # fmt: skip

    served: dict[str, dict[str, dict]] = {}  # by --frontends, then by request
    for frontends in args.frontends:
        logger.info("--frontends %d", frontends)
        served[str(frontends)] = serve_all(args, kind, frontends, ceiling)

    now = datetime.datetime.now(datetime.UTC)
    report = {
        "question": "served images/s (concurrent callers one image at a time) and server CPU per request vs the "
        "backend alone",
        "date": now.isoformat(timespec="seconds"),
        "machine": machine(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "command": sys.argv[1:],
        "callers": args.callers,
        "requests_per_caller": args.requests,
        "cpus": len(os.sched_getaffinity(0)),
        "backend_alone": ceiling,
        "served": served,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = args.out_dir / f"serve_throughput_{device}_{now:%Y%m%dT%H%M%S}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    logger.info("wrote %s", path)


if __name__ == "__main__":
    main()
