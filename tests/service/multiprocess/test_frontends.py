"""`python -m service --frontends 2` end to end (a subprocess on 127.0.0.1): two frontends on one port beside one
engine answer as eager does in this process; requests and batches are counted once across the processes; a killed
frontend or engine is restarted, the engine's in-flight requests get UNAVAILABLE (never a hang), and SIGTERM drains
every process and exits 0 (the `serving` context checks it)."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch

import models
from models import digits
from service._proto import grpc_service_pb2 as pb
from service._proto import grpc_service_pb2_grpc
from tests.support.numerics import CROSS_BACKEND_TOLERANCE, assert_relative_close
from tests.support.server import CPU_ONLY, ServerProcess, is_serving, serving, write_repository

SIZE = digits.INPUT_SIZE
DIGITS = {"arch": "digits_resnet", "weights": "pretrained", "input_size": SIZE, "backend": "eager"}
CALLERS = 16  # connections: SO_REUSEPORT spreads them over both frontends


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("frontends")
    repository = write_repository(directory / "models.toml", {"digits": DIGITS})
    with serving(directory, "--frontends", "2", repository=repository, env=CPU_ONLY) as process:
        yield process
    log = process.log()
    assert log.count("] stopped") == 3, log  # both frontends and the supervisor said so, after the engine drained


def infer_request(datatype: str, array: np.ndarray) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype=datatype, shape=array.shape)
    return pb.ModelInferRequest(model_name="digits", inputs=[tensor], raw_input_contents=[array.tobytes()])


def logits_of(response: pb.ModelInferResponse) -> torch.Tensor:
    logits = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(list(response.outputs[0].shape))
    return torch.from_numpy(logits.copy())


def pids_of(server: ServerProcess, role: str) -> list[int]:
    """Every pid the supervisor started `role` with, oldest first."""
    return [int(pid) for pid in re.findall(rf"{role} started \(pid (\d+)\)", server.log())]


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def test_answers_equal_eager_in_this_process_for_fp32_and_uint8(server: ServerProcess) -> None:
    network = models.build("digits_resnet", weights="pretrained").eval()
    spec = models.input_spec("digits_resnet", SIZE)
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    rng = np.random.default_rng(7)
    floats = rng.standard_normal((3, 3, SIZE, SIZE), dtype=np.float32)
    images = rng.integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    with server.channel() as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        served_floats = logits_of(stub.ModelInfer(infer_request("FP32", floats), timeout=30))
        served_images = logits_of(stub.ModelInfer(infer_request("UINT8", images), timeout=30))
    with torch.inference_mode():
        expected_floats = network(torch.from_numpy(floats))
        normalized = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
        expected_images = network(normalized)
    assert_relative_close(served_floats, expected_floats, CROSS_BACKEND_TOLERANCE)
    assert_relative_close(served_images, expected_images, CROSS_BACKEND_TOLERANCE)


def test_requests_and_batches_are_counted_once_across_the_processes(server: ServerProcess) -> None:
    image = np.random.default_rng(1).integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)
    requests_before = server.metric("resnet_requests_total", method="ModelInfer", code="OK")
    inferences_before = server.metric("nv_inference_count", model="digits")

    def statistics() -> pb.InferStatistics:
        with server.channel() as channel:
            stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            return stub.ModelStatistics(pb.ModelStatisticsRequest(name="digits"), timeout=10).model_stats[0]

    successes_before = statistics().inference_stats.success.count
    per_caller = 5

    def call() -> None:
        with server.channel() as channel:  # a connection of its own
            stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(per_caller):
                stub.ModelInfer(infer_request("UINT8", image), timeout=30)

    callers = [threading.Thread(target=call) for _ in range(CALLERS)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(timeout=60)
    total = CALLERS * per_caller
    assert server.metric("resnet_requests_total", method="ModelInfer", code="OK") - requests_before == total
    assert server.metric("nv_inference_count", model="digits") - inferences_before == total
    # A frontend's counts reach the engine's statistics right after its answer, on its own connection.
    wait_for(lambda: statistics().inference_stats.success.count - successes_before == total, 10, "the statistics")


def test_a_killed_frontend_is_restarted_while_the_port_keeps_serving(server: ServerProcess) -> None:
    (victim,) = pids_of(server, "frontend-0")[-1:]
    served_before = server.metric("resnet_requests_total", method="ModelInfer", code="OK")
    os.kill(victim, signal.SIGKILL)
    # Connections the kernel had queued on the killed frontend's socket are reset (UNAVAILABLE to those clients);
    # once the supervisor has seen it die, its socket is gone and new connections all reach the other frontend.
    ended = f"frontend-0 (pid {victim}) ended with SIGKILL; restarting it"
    wait_for(lambda: ended in server.log(), 30, "the supervisor to see frontend-0 die")
    image = np.zeros((1, SIZE, SIZE, 3), dtype=np.uint8)
    for _ in range(10):
        with server.channel() as channel:
            grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                infer_request("UINT8", image), timeout=30
            )
    wait_for(lambda: pids_of(server, "frontend-0")[-1] != victim, 30, "frontend-0 to be restarted")
    restarted = pids_of(server, "frontend-0")[-1]
    # Connected to the engine, so serving (and past its start-up, where a SIGTERM would find no handler yet).
    wait_for(lambda: f"frontend 0 (pid {restarted}) connected" in server.log(), 60, "the new frontend-0 to serve")
    # The dead frontend's counts stay in the sums.
    assert server.metric("resnet_requests_total", method="ModelInfer", code="OK") >= served_before + 10


def test_a_killed_engine_fails_in_flight_requests_with_unavailable_then_serves_again(server: ServerProcess) -> None:
    (engine,) = pids_of(server, "engine")[-1:]
    image = np.zeros((1, SIZE, SIZE, 3), dtype=np.uint8)
    codes: Counter[grpc.StatusCode] = Counter()
    stop = threading.Event()
    lock = threading.Lock()

    def call_until_stopped() -> None:
        with server.channel() as channel:
            stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            while not stop.is_set():
                try:
                    stub.ModelInfer(infer_request("UINT8", image), timeout=10)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as error:
                    code = error.code()
                    time.sleep(0.01)
                with lock:
                    codes[code] += 1

    callers = [threading.Thread(target=call_until_stopped) for _ in range(8)]
    for caller in callers:
        caller.start()
    try:
        wait_for(lambda: codes[grpc.StatusCode.OK] >= 20, 30, "calls to succeed")
        os.kill(engine, signal.SIGKILL)
        wait_for(lambda: len(pids_of(server, "engine")) >= 2, 30, "the engine to be restarted")
        with server.channel() as channel:
            wait_for(lambda: is_serving(channel), 90, "SERVING again")
        ok_after_restart = codes[grpc.StatusCode.OK]
        wait_for(lambda: codes[grpc.StatusCode.OK] >= ok_after_restart + 20, 30, "calls to succeed again")
    finally:
        stop.set()
        for caller in callers:
            caller.join(timeout=30)
    assert not any(caller.is_alive() for caller in callers), "a call hung"
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
