"""Runs a local cluster (scripts/cluster.sh or `python -m deploy.cluster`) as a subprocess, finds its replicas, reads
Envoy's per-replica statistics, and drives it with closed-loop KServe ModelInfer callers.

Not a test module. Every wait is bounded; a cluster that dies or never gets ready fails the test with its logs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from deploy.cluster import GRPC_CLUSTER
from deploy.processes import children
from service._proto import grpc_service_pb2 as pb
from service._proto import grpc_service_pb2_grpc
from tests.support.server import CPU_ONLY, REPO_ROOT, free_port, write_repository

# The shipped trained model on onnxruntime: a request costs about a millisecond of this machine's CPU.
DIGITS_REPOSITORY = {
    "digits_resnet": {
        "arch": "digits_resnet", "weights": "pretrained", "input_size": 32, "backend": "onnxruntime",
        "max_batch_size": 16, "max_queue_delay_us": 1000,
    }
}  # fmt: skip


def command_line(pid: int) -> list[str]:
    return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode().split("\0")[:-1]


@dataclass
class ClusterProcess:
    process: subprocess.Popen
    port: int
    admin_port: int
    log_dir: Path
    stdout_path: Path
    stderr_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def logs(self) -> str:
        paths = [self.stderr_path, *sorted(self.log_dir.glob("*.log"))]
        return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-6000:]}" for path in paths)

    def wait_until_ready(self, timeout_s: float) -> str:
        """The one line the cluster prints when every replica is ready."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            printed = self.stdout_path.read_text()
            if printed.endswith("\n"):
                return printed
            if self.process.poll() is not None:
                raise AssertionError(f"cluster exited with {self.process.returncode}:\n{self.logs()}")
            time.sleep(0.2)
        raise AssertionError(f"cluster not ready after {timeout_s} s:\n{self.logs()}")

    def replica_pids(self) -> dict[int, int]:
        """{gRPC port: pid} of the replicas running now."""
        found = {}
        for pid in children(self.process.pid):
            with contextlib.suppress(OSError):
                arguments = command_line(pid)
                if arguments[1:3] == ["-m", "service"]:
                    found[int(arguments[arguments.index("--port") + 1])] = pid
        return found

    def host_stats(self) -> dict[int, dict[str, str]]:
        """{replica gRPC port: {"rq_total": ..., "health_flags": ..., ...}} from Envoy's /clusters."""
        url = f"http://127.0.0.1:{self.admin_port}/clusters"
        with urllib.request.urlopen(url, timeout=5) as response:
            lines = response.read().decode().splitlines()
        stats: dict[int, dict[str, str]] = {}
        for line in lines:
            parts = line.split("::")  # cluster::host:port::stat::value, or cluster::outlier::... for the whole cluster
            if len(parts) == 4 and parts[0] == GRPC_CLUSTER and parts[1].rpartition(":")[2].isdigit():
                stats.setdefault(int(parts[1].rpartition(":")[2]), {})[parts[2]] = parts[3]
        return stats

    def stop(self, timeout_s: float) -> int:
        """SIGTERM to the cluster's pid, then its exit code (killed, with its group, and failed when late)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            raise AssertionError(f"cluster ignored SIGTERM for {timeout_s} s:\n{self.logs()}") from None


def start_cluster(command: Sequence[str], replicas: int, tmp_path: Path, *server_args: str) -> ClusterProcess:
    """`command --replicas N --port P ...` on free ports, serving digits_resnet on onnxruntime without a GPU, in a
    session of its own (so that its process group is its own, and can be checked and cleaned up)."""
    repository = write_repository(tmp_path / "models.toml", DIGITS_REPOSITORY)
    port, admin_port = free_port(), free_port()
    log_dir = tmp_path / "cluster-logs"
    arguments = [*command, "--replicas", str(replicas), "--port", str(port), "--admin-port", str(admin_port)]
    arguments += ["--replica-port-base", "0", "--metrics-port-base", "0", "--log-dir", str(log_dir)]
    arguments += ["--model-repository", str(repository), *server_args]
    stdout_path, stderr_path = tmp_path / "cluster.out", tmp_path / "cluster.err"
    with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            arguments, cwd=REPO_ROOT, stdout=stdout, stderr=stderr, env={**os.environ, **CPU_ONLY},
            start_new_session=True,
        )  # fmt: skip
    return ClusterProcess(process, port, admin_port, log_dir, stdout_path, stderr_path)


@contextlib.contextmanager
def cleaned_up(cluster: ClusterProcess) -> Iterator[ClusterProcess]:
    """Whatever the test did, nothing of the cluster outlives it (its group killed if it is still there)."""
    try:
        yield cluster
    finally:
        if cluster.process.poll() is None:
            cluster.stop(timeout_s=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(cluster.process.pid, signal.SIGKILL)


@dataclass
class ClosedLoopCallers:
    """`count` callers, each sending one ModelInfer, waiting for its answer, and sending the next, until stopped."""

    address: str
    count: int
    timeout_s: float = 10.0
    codes: Counter = field(default_factory=Counter)
    failures: list[tuple[float, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> ClosedLoopCallers:
        for index in range(self.count):
            thread = threading.Thread(target=self._call_in_a_loop, args=(index,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout_s + 5)
        assert not any(thread.is_alive() for thread in self._threads), "a caller is still waiting for an answer"

    @property
    def answered(self) -> int:
        with self._lock:
            return sum(self.codes.values())

    def _call_in_a_loop(self, index: int) -> None:
        image = np.random.default_rng(index).standard_normal((1, 3, 32, 32), dtype=np.float32)
        tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=image.shape)
        contents = [image.tobytes()]
        request = pb.ModelInferRequest(model_name="digits_resnet", inputs=[tensor], raw_input_contents=contents)
        # A subchannel pool of its own: one connection per caller, as separate clients have (channels to one address
        # otherwise share one).
        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(self.address, options=options) as channel:
            stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            while not self._stop.is_set():
                try:
                    stub.ModelInfer(request, timeout=self.timeout_s)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as error:
                    code = error.code()
                    with self._lock:
                        self.failures.append((time.monotonic(), f"{code.name}: {error.details()}"))
                with self._lock:
                    self.codes[code] += 1
