"""Runs `python -m service` as a subprocess on free 127.0.0.1 ports, for the tests of the served API.

Not a test module: the service tests import it. Every wait is bounded, and a server that dies or never becomes ready
fails the test with its log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVING = health_pb2.HealthCheckResponse.SERVING
# For servers whose answers are compared with eager on this process's CPU at tight tolerances, or whose slowness a
# test observes: no GPU even where there is one.
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_repository(path: Path, models: Mapping[str, Mapping[str, object]]) -> Path:
    """A repository TOML file with one [models.NAME] table per entry (string, integer and boolean values)."""
    lines = []
    for name, table in models.items():
        lines.append(f"[models.{name}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, int) else f'"{value}"'


def is_serving(channel: grpc.Channel) -> bool:
    """grpc.health.v1 says SERVING for the whole server (False when it says otherwise or does not answer)."""
    try:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status == SERVING
    except grpc.RpcError:
        return False


@dataclass
class ServerProcess:
    process: subprocess.Popen
    port: int
    metrics_port: int
    log_path: Path
    http_port: int = 0  # KServe v2 HTTP/REST; 0: not served
    channel_credentials: grpc.ChannelCredentials | None = None  # set: the server speaks TLS on both ports

    @property
    def http_url(self) -> str:
        scheme = "http" if self.channel_credentials is None else "https"
        return f"{scheme}://127.0.0.1:{self.http_port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def channel(self) -> grpc.Channel:
        if self.channel_credentials is None:
            return grpc.insecure_channel(self.address)
        return grpc.secure_channel(self.address, self.channel_credentials)

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            return response.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples called `name` whose labels include `labels` (0 when there is none)."""
        total = 0.0
        for family in text_string_to_metric_families(self.metrics_text()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def wait_until_serving(self, timeout_s: float = 180.0) -> None:
        """Polls grpc.health.v1 until the server says SERVING (all models settled, one ready)."""
        deadline = time.monotonic() + timeout_s
        with self.channel() as channel:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log()}")
                if is_serving(channel):
                    return
                time.sleep(0.2)
        raise AssertionError(f"server not SERVING after {timeout_s} s:\n{self.log()}")

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then its exit code (killed and failed if it does not exit in time)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"server ignored SIGTERM for {timeout_s} s:\n{self.log()}") from None


def start_server(
    log_dir: Path,
    *args: str,
    repository: Path | None = None,
    env: Mapping[str, str] | None = None,
    unset_env: tuple[str, ...] = (),
    channel_credentials: grpc.ChannelCredentials | None = None,
) -> ServerProcess:
    """`python -m service` on free ports with `args` appended, in this environment updated with `env` and without
    `unset_env`; call wait_until_serving before using it. `channel_credentials`: what channel() connects with (the
    server was given --tls-cert)."""
    port, metrics_port, http_port = free_port(), free_port(), free_port()
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--metrics-port", str(metrics_port), "--http-port", str(http_port), "--log-level", "INFO"]
    if repository is not None:
        command += ["--model-repository", str(repository)]
    if "--frontends" not in args:  # one process, whatever the machine's CPUs (--frontends auto)
        command += ["--frontends", "0"]
    environment = {key: value for key, value in {**os.environ, **(env or {})}.items() if key not in unset_env}
    log_path = log_dir / f"server-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*command, *args], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=environment
        )
    return ServerProcess(process, port, metrics_port, log_path, http_port, channel_credentials)


@contextlib.contextmanager
def serving(log_dir: Path, *args: str, **kwargs: object) -> Iterator[ServerProcess]:
    """`start_server(...)`, waited for until SERVING; on exit it must stop cleanly (exit 0)."""
    server = start_server(log_dir, *args, **kwargs)
    try:
        server.wait_until_serving()
        yield server
    finally:
        assert server.stop() == 0, server.log()
