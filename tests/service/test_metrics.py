"""/metrics of a real server (`python -m service` on 127.0.0.1): only that path, the process and Python collectors, and
Triton's nv_inference_* families counting exactly the inference requests sent, over gRPC and over HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from models import digits
from service._proto import grpc_service_pb2 as pb
from service._proto import grpc_service_pb2_grpc
from service.gpu_metrics import gpu_collector
from tests.support.kserve_http import call, infer_body
from tests.support.server import CPU_ONLY, ServerProcess, serving, write_repository

SIZE = digits.INPUT_SIZE
REPOSITORY = {
    "digits": {"arch": "digits_resnet", "weights": "pretrained", "input_size": SIZE, "backend": "eager",
               "max_batch_size": 8, "max_queue_delay_us": 500},
}  # fmt: skip
LABELS = {"model": "digits", "version": "1"}
TRITON_FAMILIES = (
    "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count", "nv_inference_exec_count",
    "nv_inference_request_duration_us", "nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us",
)  # fmt: skip
GPU_FAMILIES = ("nv_gpu_utilization", "nv_gpu_memory_total_bytes", "nv_gpu_memory_used_bytes")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    directory = tmp_path_factory.mktemp("metrics")
    repository = write_repository(directory / "models.toml", REPOSITORY)
    with serving(directory, repository=repository, env=CPU_ONLY) as running:
        yield running


def family_names(server: ServerProcess) -> set[str]:
    return {family.name for family in text_string_to_metric_families(server.metrics_text())}


def test_only_the_metrics_path_answers(server: ServerProcess):
    for path in ("/", "/healthz", "/metrics/x"):
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}{path}", timeout=10)
        assert raised.value.code == 404, path
        assert "serves /metrics only" in json.loads(raised.value.read())["error"]
    names = family_names(server)
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "python_info", "python_gc_collections"} <= names
    assert "resnet_requests" in names  # our own, beside


def test_gpu_families_only_where_there_is_a_gpu(server: ServerProcess):
    # The server and this process see the same host: NVML answers for both or for neither.
    present = set(GPU_FAMILIES) & family_names(server)
    assert present == (set(GPU_FAMILIES) if gpu_collector() is not None else set())


def test_triton_families_count_the_inference_requests(server: ServerProcess):
    before = {name: server.metric(name, **LABELS) for name in TRITON_FAMILIES}
    rows = (1, 3, 2)
    arrays = [np.random.default_rng(n).standard_normal((n, 3, SIZE, SIZE), dtype=np.float32) for n in rows]
    with server.channel() as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for array in arrays[:2]:
            tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=array.shape)
            stub.ModelInfer(
                pb.ModelInferRequest(model_name="digits", inputs=[tensor], raw_input_contents=[array.tobytes()])
            )
        # Not inference requests of a model: metadata calls, and (below) a model that does not exist.
        stub.ModelMetadata(pb.ModelMetadataRequest(name="digits"))
    body = {"name": "input", "datatype": "FP32", "shape": list(arrays[2].shape), "data": arrays[2].ravel().tolist()}
    assert call(f"{server.http_url}/v2/models/nope/infer", *infer_body([body])).status == 404
    assert call(f"{server.http_url}/v2/models/digits/infer", *infer_body([body])).status == 200
    bad = {**body, "shape": [2, 3, SIZE, SIZE + 1]}
    assert call(f"{server.http_url}/v2/models/digits/infer", *infer_body([bad])).status == 400

    delta = {name: server.metric(name, **LABELS) - before[name] for name in TRITON_FAMILIES}
    assert delta["nv_inference_request_success"] == len(rows)
    assert delta["nv_inference_request_failure"] == 1
    assert server.metric("nv_inference_request_failure", reason="OTHER", **LABELS) >= 1
    assert delta["nv_inference_count"] == sum(rows)
    assert 1 <= delta["nv_inference_exec_count"] <= len(rows)
    # A request's queue wait and its batch's compute lie inside its duration.
    assert delta["nv_inference_queue_duration_us"] + delta["nv_inference_compute_infer_duration_us"] > 0
    assert (
        delta["nv_inference_queue_duration_us"] + delta["nv_inference_compute_infer_duration_us"]
        <= delta["nv_inference_request_duration_us"]
    )
    assert server.metric("nv_inference_request_success", model="_unknown") == 0
    assert server.metric("nv_inference_request_failure", model="_unknown") == 0
