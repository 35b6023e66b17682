"""Overload, deadlines, shutdown and start-up of `python -m service` (a subprocess on 127.0.0.1).

A deliberately slow model (resnet34 at 320x320 on eager on the CPU, one image per batch, ~70 ms each on an idle
machine here) makes queues and in-flight work observable. The last test starts the packaged default repository offline.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

import models
from models import digits
from service._proto import classifier_pb2, classifier_pb2_grpc, grpc_service_pb2_grpc
from service._proto import grpc_service_pb2 as pb
from tests.support.server import CPU_ONLY, REPO_ROOT, ServerProcess, is_serving, serving, start_server, write_repository

SLOW_SIZE = 320
SLOW_MODEL = {
    "arch": "resnet34", "weights": "random", "seed": 3, "input_size": SLOW_SIZE, "backend": "eager",
    "max_batch_size": 1, "max_queue_delay_us": 0,
}  # fmt: skip
SLOW_QUEUE = 8


def slow_request(seed: int) -> pb.ModelInferRequest:
    image = np.random.default_rng(seed).standard_normal((1, 3, SLOW_SIZE, SLOW_SIZE), dtype=np.float32)
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=image.shape)
    return pb.ModelInferRequest(model_name="slow", inputs=[tensor], raw_input_contents=[image.tobytes()])


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.005)


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    directory = tmp_path_factory.mktemp("slow")
    repository = write_repository(directory / "models.toml", {"slow": {**SLOW_MODEL, "max_queue_size": SLOW_QUEUE}})
    with serving(directory, repository=repository, env=CPU_ONLY) as running:
        yield running


@pytest.fixture(scope="module")
def inference(slow_server: ServerProcess) -> grpc_service_pb2_grpc.GRPCInferenceServiceStub:
    with slow_server.channel() as channel:
        yield grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)


def test_full_queue_is_resource_exhausted(slow_server, inference):
    callers = 3 * SLOW_QUEUE
    start_together = threading.Barrier(callers)

    def call(index: int) -> grpc.StatusCode:
        start_together.wait(timeout=30)
        return code_of(lambda: inference.ModelInfer(slow_request(index), timeout=60))

    with ThreadPoolExecutor(callers) as pool:
        codes = Counter(pool.map(call, range(callers)))
    # One computing plus SLOW_QUEUE waiting fit; the rest are refused at once instead of queuing without bound.
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert codes[grpc.StatusCode.OK] >= SLOW_QUEUE + 1, codes
    assert code_of(lambda: inference.ModelInfer(slow_request(99), timeout=60)) == grpc.StatusCode.OK


def test_expired_deadline_is_deadline_exceeded_and_never_computed(slow_server, inference):
    batches_before = slow_server.metric("resnet_batch_size_count", model="slow")
    expired_before = slow_server.metric("resnet_requests_total", model="slow", code="DEADLINE_EXCEEDED")
    occupying = SLOW_QUEUE
    with ThreadPoolExecutor(occupying) as pool:
        occupants = [pool.submit(inference.ModelInfer, slow_request(i), timeout=60) for i in range(occupying)]
        # One computing and the others queued (one slot left): whatever comes next waits for several whole batches,
        # far longer than its deadline (long enough, though, for the server to receive it before it expires).
        wait_for(lambda: slow_server.metric("resnet_queue_depth", model="slow") == occupying - 1, 30, "queued requests")
        with pytest.raises(grpc.RpcError) as raised:
            inference.ModelInfer(slow_request(7), timeout=0.2)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert all(len(occupant.result().raw_output_contents) == 1 for occupant in occupants)
    wait_for(
        lambda: slow_server.metric("resnet_requests_total", model="slow", code="DEADLINE_EXCEEDED") > expired_before,
        10,
        "the server to count the expired request",
    )
    assert slow_server.metric("resnet_batch_size_count", model="slow") == batches_before + occupying


def test_call_cancelled_by_its_client_is_counted_as_cancelled(slow_server, inference):
    cancelled_before = slow_server.metric("resnet_requests_total", model="slow", code="CANCELLED")
    expired_before = slow_server.metric("resnet_requests_total", model="slow", code="DEADLINE_EXCEEDED")
    occupying = SLOW_QUEUE
    with ThreadPoolExecutor(occupying) as pool:
        occupants = [pool.submit(inference.ModelInfer, slow_request(i), timeout=60) for i in range(occupying)]
        wait_for(lambda: slow_server.metric("resnet_queue_depth", model="slow") == occupying - 1, 30, "queued requests")
        # Far from its deadline: the client gives up, which is not the deadline passing.
        call = inference.ModelInfer.future(slow_request(8), timeout=60)
        wait_for(lambda: slow_server.metric("resnet_queue_depth", model="slow") == occupying, 30, "the call to queue")
        assert call.cancel()
        assert all(len(occupant.result().raw_output_contents) == 1 for occupant in occupants)
    wait_for(
        lambda: slow_server.metric("resnet_requests_total", model="slow", code="CANCELLED") > cancelled_before,
        10,
        "the server to count the cancelled request",
    )
    assert slow_server.metric("resnet_requests_total", model="slow", code="DEADLINE_EXCEEDED") == expired_before


def test_sigterm_under_load_finishes_in_flight_requests_and_exits_0(tmp_path: Path):
    repository = write_repository(tmp_path / "models.toml", {"slow": SLOW_MODEL})
    server = start_server(tmp_path, "--grace-period", "60", repository=repository, env=CPU_ONLY)
    try:
        server.wait_until_serving()
        callers = 8
        with server.channel() as channel, ThreadPoolExecutor(callers) as pool:
            inference = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            in_flight = [
                pool.submit(inference.ModelInfer, slow_request(index), timeout=120) for index in range(callers)
            ]

            def all_received() -> bool:
                # With a request computing, queued + computed + 1 counts every request the server has received.
                queued = server.metric("resnet_queue_depth", model="slow")
                return queued >= 1 and queued + server.metric("resnet_batch_size_count", model="slow") >= callers - 1

            wait_for(all_received, 30, "every request to be queued")
            server.process.send_signal(subprocess.signal.SIGTERM)

            wait_for(lambda: not is_serving(channel), 10, "health to leave SERVING")
            assert code_of(lambda: inference.ModelInfer(slow_request(99), timeout=10)) == grpc.StatusCode.UNAVAILABLE
            answers = [future.result() for future in in_flight]
        assert all(list(answer.outputs[0].shape) == [1, 1000] for answer in answers)
        assert server.process.wait(timeout=60) == 0, server.log()
        assert "shutdown requested" in server.log()
    finally:
        server.stop()


def test_default_repository_offline_serves_digits_and_lists_resnet50_not_ready(tmp_path: Path):
    # An empty torch hub cache and an unreachable proxy: resnet50's checkpoint can be neither found nor downloaded.
    offline = {
        "TORCH_HOME": str(tmp_path / "torch"),
        "https_proxy": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }
    with serving(tmp_path, env={**offline, **CPU_ONLY}) as server:  # CPU: "auto" means onnxruntime
        with server.channel() as channel:
            listed = classifier_pb2_grpc.ClassifierStub(channel).ListModels(classifier_pb2.ListModelsRequest())
        models_by_name = {info.name: info for info in listed.models}
        assert models_by_name["digits_resnet"].ready and models_by_name["digits_resnet"].backend == "onnxruntime"
        assert not models_by_name["resnet50"].ready
        assert "WeightsUnavailableError" in models_by_name["resnet50"].reason, models_by_name["resnet50"].reason

        # The README's first call: the shipped scans, no --model (the first ready model, digits_resnet).
        scans = sorted((REPO_ROOT / "examples" / "digits").glob("digit_*.png"))
        assert len(scans) == 3
        completed = subprocess.run(
            [sys.executable, "-m", "service.client", *map(str, scans), "--top-k", "2", "--address", server.address],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert completed.returncode == 0, completed.stderr
        lines = completed.stdout.splitlines()
        network = models.build("digits_resnet", "pretrained")
        for scan, header, first_prediction in zip(scans, lines[0::3], lines[1::3], strict=True):
            assert header.startswith(f"{scan}: digits_resnet,"), completed.stdout
            with torch.inference_mode(), Image.open(scan) as image:
                expected = int(network(digits.preprocess(image)[None]).argmax())
            assert expected == int(scan.stem.removeprefix("digit_"))  # a real scan of the digit its name says
            assert first_prediction.split()[1:] == [str(expected), f"({expected})"], completed.stdout
