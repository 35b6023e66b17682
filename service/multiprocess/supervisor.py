"""`python -m service --frontends N` (N >= 1): starts the engine and N frontends, restarts any that dies, and drains
them in order at SIGTERM or SIGINT (frontends first, then the engine), exiting 0.

The supervisor binds the gRPC and HTTP ports itself first (SO_REUSEPORT, never listening: connections go only to the
frontends' listening sockets), so `--port 0` names one port for every frontend and the ports stay ours while a
frontend restarts. A child that exits with code 1 could not start (a port, a file, the kernel cache): that is
permanent, so everything stops and the supervisor exits 1. A child that dies any other way is restarted after
RESTART_DELAY_S; its in-flight requests have already had their answer (UNAVAILABLE: remote_models.py).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from prometheus_client import multiprocess as prometheus_multiprocess

from service.cpus import machine_threads
from service.log import configure_logging
from service.metrics import MULTIPROCESS_DIR_ENV
from service.multiprocess.engine import serve_engine
from service.multiprocess.frontend import serve_frontend, slot_file_path
from service.multiprocess.slots import create_slot_file
from service.process_tree import end_with_parent
from service.repository import ModelConfig, load_repository
from service.server import ServerSettings, ServerStartError, use_kernel_cache

logger = logging.getLogger(__name__)

RESTART_DELAY_S = 1.0
START_FAILED = 1  # a child's exit code when it could not start (ServerStartError)
SLOTS_PER_FRONTEND = 32
SLOT_ROWS = 2  # a slot holds this many float32 images of the largest model input (8x as many uint8 ones)
_PAGE = 4096
_POLL_S = 0.5


def default_frontends(cpus: int) -> int:
    """`--frontends auto`: one frontend per two CPUs, the other CPU of each pair left to the engine, the decode lane
    and the kernel; none below 4 CPUs, where the processes would only compete for the cores (README "Frontends")."""
    return 0 if cpus < 4 else cpus // 2


def slot_bytes_for(configs: Sequence[ModelConfig]) -> int:
    largest = max((config.input_size for config in configs), default=224)
    size = SLOT_ROWS * 3 * largest * largest * 4
    return -(-size // _PAGE) * _PAGE


@dataclass
class _Child:
    name: str
    start: Callable[[], BaseProcess]
    process: BaseProcess | None = None
    restart_at: float = 0.0


def supervise(settings: ServerSettings, frontends: int, log_level: str) -> int:
    """Runs the engine and `frontends` frontends until SIGTERM or SIGINT; the exit code."""
    configs = load_repository(settings.model_repository)
    run_dir = Path(tempfile.mkdtemp(prefix="resnet-serve-", dir=_shared_memory_dir()))
    reservations: list[socket.socket] = []
    try:
        settings = _reserve_ports(settings, reservations)
        metrics_dir = run_dir / "metrics"
        metrics_dir.mkdir()
        # Read by prometheus-client when a child imports it: every child writes its values there.
        os.environ[MULTIPROCESS_DIR_ENV] = str(metrics_dir)
        slot_bytes = slot_bytes_for(configs)
        _make_slot_files(run_dir, frontends, slot_bytes)
        return _Supervisor(settings, configs, run_dir, frontends, slot_bytes, log_level).run()
    finally:
        for reservation in reservations:
            reservation.close()
        shutil.rmtree(run_dir, ignore_errors=True)


class _Supervisor:
    def __init__(
        self,
        settings: ServerSettings,
        configs: Sequence[ModelConfig],
        run_dir: Path,
        frontends: int,
        slot_bytes: int,
        log_level: str,
    ) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
        # The engine serves /metrics; a frontend has no metrics port, and the decode threads split the CPUs.
        decode_threads = settings.decode_threads or max(1, machine_threads() // frontends)
        frontend_settings = replace(settings, metrics_port=0, decode_threads=decode_threads)

        def engine() -> BaseProcess:
            return context.Process(
                target=_run_engine, args=(settings, configs, run_dir, log_level), name="engine", daemon=False
            )

        def frontend(index: int) -> Callable[[], BaseProcess]:
            def start() -> BaseProcess:
                args = (frontend_settings, configs, index, run_dir, slot_bytes, log_level)
                return context.Process(target=_run_frontend, args=args, name=f"frontend-{index}", daemon=False)

            return start

        self._engine = _Child("engine", engine)
        self._frontends = [_Child(f"frontend-{index}", frontend(index)) for index in range(frontends)]
        self._grace_s = settings.grace_period_s
        self._metrics_dir = run_dir / "metrics"
        self._stop_requested = False

    def run(self) -> int:
        for signal_number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signal_number, self._request_stop)
        logger.info("starting the engine and %d frontends", len(self._frontends))
        children = [self._engine, *self._frontends]
        for child in children:
            self._start(child)
        failed = False
        while not self._stop_requested and not failed:
            sentinels = [child.process.sentinel for child in children if child.process is not None]
            multiprocessing.connection.wait(sentinels, timeout=_POLL_S)
            for child in children:
                failed |= self._check(child)
        return START_FAILED if self._shut_down() or failed else 0

    def _request_stop(self, signal_number: int, _frame: object) -> None:
        logger.info("%s: stopping the frontends, then the engine", signal.Signals(signal_number).name)
        self._stop_requested = True

    def _start(self, child: _Child) -> None:
        child.process = child.start()
        child.process.start()
        logger.info("%s started (pid %d)", child.name, child.process.pid)

    def _check(self, child: _Child) -> bool:
        """Restarts `child` when it has died and its delay has passed; True when it could not start."""
        process = child.process
        if process is not None and process.exitcode is None:
            return False
        if process is not None:
            self._forget(process)
            child.process = None
            if process.exitcode == START_FAILED:
                logger.error("%s could not start; stopping", child.name)
                return True
            logger.error("%s (pid %d) ended with %s; restarting it", child.name, process.pid, _how(process.exitcode))
            child.restart_at = time.monotonic() + RESTART_DELAY_S
        if time.monotonic() >= child.restart_at and not self._stop_requested:
            self._start(child)
        return False

    def _shut_down(self) -> bool:
        """SIGTERM to the frontends, each given the grace period to drain, then to the engine; True when one had to
        be killed."""
        killed = _stop_all([child.process for child in self._frontends if child.process], self._grace_s + 10)
        if self._engine.process is not None:
            killed |= _stop_all([self._engine.process], self._grace_s + 10)
        logger.info("stopped")
        return killed

    def _forget(self, process: BaseProcess) -> None:
        """Its gauges go (its counters and histograms stay in the sums); see service/metrics.py."""
        if process.pid is not None:
            prometheus_multiprocess.mark_process_dead(process.pid, str(self._metrics_dir))


def _stop_all(processes: Sequence[BaseProcess], timeout_s: float) -> bool:
    for process in processes:
        if process.exitcode is None:
            process.terminate()
    deadline = time.monotonic() + timeout_s
    killed = False
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.exitcode is None:
            logger.error("%s ignored SIGTERM for %.0f s; killing it", process.name, timeout_s)
            process.kill()
            process.join()
            killed = True
    return killed


def _how(exit_code: int | None) -> str:
    if exit_code is not None and exit_code < 0:
        return signal.Signals(-exit_code).name
    return f"exit code {exit_code}"


def _shared_memory_dir() -> str | None:
    """/dev/shm where there is one: the slots are memory, and should not be written back to a disk."""
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def _make_slot_files(run_dir: Path, frontends: int, slot_bytes: int) -> None:
    needed = frontends * SLOTS_PER_FRONTEND * slot_bytes
    stats = os.statvfs(run_dir)
    free = stats.f_bavail * stats.f_frsize
    if needed > free:
        raise ServerStartError(
            f"the frontends' shared-memory slots need {needed / 2**20:.0f} MiB but {run_dir.parent} has "
            f"{free / 2**20:.0f} MiB free: give the container more shared memory (compose shm_size) or use fewer "
            "--frontends"
        )
    for index in range(frontends):
        path = slot_file_path(run_dir, index)
        create_slot_file(path, SLOTS_PER_FRONTEND, slot_bytes)
        # Allocated now, so a full tmpfs is this error at start and never a SIGBUS when a slot is first written.
        with path.open("r+b") as file:
            os.posix_fallocate(file.fileno(), 0, SLOTS_PER_FRONTEND * slot_bytes)


def _reserve_ports(settings: ServerSettings, reservations: list[socket.socket]) -> ServerSettings:
    """Binds the gRPC port (and the HTTP port, when served) without listening; the settings with the bound port."""
    try:
        grpc_socket = _reserve(settings.host, settings.port)
        reservations.append(grpc_socket)
        if settings.http_port:
            reservations.append(_reserve(settings.host, settings.http_port))
    except OSError as error:
        raise ServerStartError(f"cannot bind: {error}") from error
    return replace(settings, port=grpc_socket.getsockname()[1])


def _reserve(host: str, port: int) -> socket.socket:
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    reservation = socket.socket(family, socket.SOCK_STREAM)
    reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        reservation.bind((host, port))
    except OSError:
        reservation.close()
        raise
    return reservation


def _child_setup(role: str, log_level: str) -> None:
    """In a child: its log lines name it; it ends with the supervisor (SIGTERM when the supervisor dies, even by
    SIGKILL); a terminal's Ctrl-C reaches the supervisor, which stops the children in order, so they ignore it."""
    configure_logging(log_level, role=role)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    end_with_parent()


def _run_engine(settings: ServerSettings, configs: Sequence[ModelConfig], run_dir: Path, log_level: str) -> None:
    _child_setup("engine", log_level)

    async def serve() -> bool:
        if settings.kernel_cache_dir is not None:
            use_kernel_cache(settings.kernel_cache_dir)
        return await serve_engine(settings, configs, run_dir)

    _serve_child("the engine", serve)


def _run_frontend(
    settings: ServerSettings,
    configs: Sequence[ModelConfig],
    index: int,
    run_dir: Path,
    slot_bytes: int,
    log_level: str,
) -> None:
    _child_setup(f"frontend-{index}", log_level)
    _serve_child(f"frontend {index}", lambda: serve_frontend(settings, configs, index, run_dir, slot_bytes))


def _serve_child(what: str, serve: Callable[[], Coroutine[Any, Any, bool]]) -> None:
    """Runs a child's server to its end: exit START_FAILED when it cannot start (the supervisor then stops
    everything), and without the interpreter's shutdown when a model load is left in native code (as service/cli.py
    does)."""
    try:
        finished = asyncio.run(serve())
    except ServerStartError as error:
        logger.error("%s cannot start: %s", what, error)
        sys.exit(START_FAILED)
    if not finished:
        logging.shutdown()
        os._exit(0)
