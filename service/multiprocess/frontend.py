"""A frontend process: the whole server (service/server.py) on the shared ports, its models the engine's."""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from service.metrics import ServiceMetrics
from service.multiprocess.engine import SOCKET_NAME
from service.multiprocess.messages import Hello
from service.multiprocess.remote_models import RemoteModels
from service.multiprocess.slots import SlotFile, SlotPool
from service.repository import ModelConfig
from service.server import InferenceServer, ServerSettings, serve_until_signalled


def slot_file_path(run_dir: Path, frontend: int) -> Path:
    return run_dir / f"slots-{frontend}"


async def serve_frontend(
    settings: ServerSettings, configs: Sequence[ModelConfig], frontend: int, run_dir: Path, slot_bytes: int
) -> bool:
    """Serves until SIGTERM (sent by the supervisor), then drains like a single server: in-flight requests still
    reach the engine, which stops only after every frontend has. As service.server.serve for the result."""
    path = slot_file_path(run_dir, frontend)
    slots = SlotPool(SlotFile(path, slot_bytes))
    hello = Hello(frontend, os.getpid(), str(path), slot_bytes)

    def make_models(metrics: ServiceMetrics, on_change: Callable[[], Awaitable[None]]) -> RemoteModels:
        return RemoteModels(
            configs,
            default_backend=settings.backend,
            default_queue_size=settings.queue_size,
            socket_path=run_dir / SOCKET_NAME,
            hello=hello,
            slots=slots,
            on_change=on_change,
        )

    server = InferenceServer(settings, configs, make_models=make_models, share_ports=True)
    return await serve_until_signalled(server, settings.grace_period_s, (signal.SIGTERM,))
