"""The server a sweep measures: `python -m service` started on free 127.0.0.1 ports (or one already running), its
readiness, and the batch-size histogram it exports on /metrics."""

import json
import logging
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from service._proto import classifier_pb2, classifier_pb2_grpc

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 300.0
# ModelInfo.reason while a model is still loading (proto/classifier.proto); any other reason is a failed load.
LOADING_REASON = "loading"
STOP_TIMEOUT_S = 60.0


class ServerError(RuntimeError):
    pass


@dataclass
class Target:
    """A server to load: its gRPC address and, when known, its /metrics URL."""

    address: str
    metrics_url: str | None = None
    process: subprocess.Popen | None = None  # set when this run started it
    log_path: Path | None = None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_single_model_repository(source: Path, model: str, destination: Path) -> Path:
    """A copy of repository `source` serving only `model`, so that the server loads nothing the sweep doesn't call."""
    with source.open("rb") as file:
        table = tomllib.load(file).get("models", {}).get(model)
    if table is None:
        raise ServerError(f"model {model!r} is not in the repository {source}")
    relative_base = source.parent.resolve()
    lines = [f"[models.{model}]"]
    for key, value in table.items():
        if key in ("weights", "labels") and (relative_base / str(value)).is_file():
            value = str(relative_base / str(value))  # paths in the repository are relative to its own folder
        lines.append(f"{key} = {json.dumps(value)}")  # a JSON scalar is a TOML scalar: strings, integers, booleans
    destination.write_text("\n".join(lines) + "\n")
    return destination


def start(backend: str, repository: Path, log_path: Path) -> Target:
    """`python -m service --backend BACKEND` on free ports, its output in `log_path`; call wait_ready next."""
    port, metrics_port = free_port(), free_port()
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--metrics-port", str(metrics_port), "--backend", backend, "--model-repository", str(repository)]
    command += ["--http-port", "0"]  # the Locust users speak gRPC
    logger.info("starting %s", " ".join(command))
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    return Target(f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", process, log_path)


def wait_ready(target: Target, model: str, timeout_s: float = READY_TIMEOUT_S) -> str:
    """Waits until ListModels says `model` serves; returns its backend. Raises ServerError at once when the server
    says the model failed to load (its reason in the message), instead of waiting out the timeout."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target.address) as channel:
        classifier = classifier_pb2_grpc.ClassifierStub(channel)
        while time.monotonic() < deadline:
            if target.process is not None and target.process.poll() is not None:
                raise ServerError(f"server exited with {target.process.returncode}; its log: {target.log_path}")
            try:
                listed = classifier.ListModels(classifier_pb2.ListModelsRequest(), timeout=2).models
            except grpc.RpcError:
                listed = None  # not listening yet
            if listed is not None:
                info = next((info for info in listed if info.name == model), None)
                if info is None:
                    names = ", ".join(info.name for info in listed) or "nothing"
                    raise ServerError(f"the server at {target.address} does not serve {model!r}; it lists {names}")
                if info.ready:
                    return info.backend
                if info.reason != LOADING_REASON:
                    raise ServerError(f"model {model!r} failed to load: {info.reason} (server log: {target.log_path})")
            time.sleep(0.2)
    raise ServerError(f"model {model!r} not ready at {target.address} after {timeout_s} s")


def stop(target: Target) -> None:
    """SIGTERM to a server this run started; ServerError when it does not exit cleanly."""
    if target.process is None:
        return
    target.process.send_signal(signal.SIGTERM)
    try:
        code = target.process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        target.process.kill()
        target.process.wait()
        raise ServerError(f"server ignored SIGTERM for {STOP_TIMEOUT_S} s; its log: {target.log_path}") from None
    if code != 0:
        raise ServerError(f"server exited with {code}; its log: {target.log_path}")


def batch_size_totals(target: Target, model: str) -> tuple[float, float] | None:
    """(sum, count) of the `resnet_batch_size` histogram for `model`; None without a /metrics URL."""
    if target.metrics_url is None:
        return None
    with urllib.request.urlopen(target.metrics_url, timeout=10) as response:
        text = response.read().decode()
    totals = {"resnet_batch_size_sum": 0.0, "resnet_batch_size_count": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals and sample.labels.get("model") == model:
                totals[sample.name] += sample.value
    return totals["resnet_batch_size_sum"], totals["resnet_batch_size_count"]
