"""A model the repository marks `required` gates readiness: until it is ready, grpc.health.v1 says NOT_SERVING,
ServerReady is false and the container healthcheck (`python -m service.healthcheck`) fails, while the other models
serve. Against `python -m service` on 127.0.0.1."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from models import digits
from service._proto import grpc_service_pb2 as pb
from service._proto import grpc_service_pb2_grpc
from tests.support.server import CPU_ONLY, REPO_ROOT, is_serving, start_server, write_repository

_DIGITS = {"arch": "digits_resnet", "weights": "pretrained", "input_size": digits.INPUT_SIZE, "backend": "eager"}


def healthcheck(address: str) -> int:
    command = [sys.executable, "-m", "service.healthcheck", "--address", address]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, timeout=30).returncode


def test_a_required_model_that_cannot_load_fails_the_healthcheck_while_the_others_serve(tmp_path: Path):
    repository = write_repository(
        tmp_path / "models.toml",
        {"digits": _DIGITS, "needed": {**_DIGITS, "weights": "absent.pt", "required": True}},
    )
    server = start_server(tmp_path, repository=repository, env=CPU_ONLY)
    try:
        deadline = time.monotonic() + 120
        while "all models settled" not in server.log():
            assert server.process.poll() is None and time.monotonic() < deadline, server.log()
            time.sleep(0.2)
        with server.channel() as channel:
            inference = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert inference.ModelReady(pb.ModelReadyRequest(name="digits"), timeout=10).ready
            assert not inference.ModelReady(pb.ModelReadyRequest(name="needed"), timeout=10).ready
            assert not inference.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
            assert not is_serving(channel)
        assert healthcheck(server.address) == 1
        assert "required needed not ready" in server.log()
    finally:
        assert server.stop() == 0, server.log()


def test_without_required_models_one_ready_model_is_enough(tmp_path: Path):
    repository = write_repository(
        tmp_path / "models.toml", {"digits": _DIGITS, "optional": {**_DIGITS, "weights": "absent.pt"}}
    )
    server = start_server(tmp_path, repository=repository, env=CPU_ONLY)
    try:
        server.wait_until_serving()
        assert healthcheck(server.address) == 0
    finally:
        assert server.stop() == 0, server.log()
