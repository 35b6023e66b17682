"""Triton's gRPC extensions end to end: `python -m service` on 127.0.0.1, called by tritonclient (in its own process),
perf_analyzer, grpcurl and our own stubs.

Models: `digits` and `spare` are called only by the tritonclient probe (so its statistics are exact), `shared` by
perf_analyzer and the bad-input tests, `uint8_advertised` (advertised_input = "uint8_nhwc") by perf_analyzer in UINT8,
`missing_weights` never loads.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from models import digits
from service._proto import grpc_service_pb2 as pb
from service._proto import grpc_service_pb2_grpc
from service.reflection import V1_SERVICE_NAME
from service.servicers.kserve import EXTENSIONS
from tests.support.server import CPU_ONLY, REPO_ROOT, ServerProcess, serving, write_repository

ROWS = 2
MAX_BATCH = 8
QUEUE_DELAY_US = 2000
_DIGITS = {
    "arch": "digits_resnet", "weights": "pretrained", "input_size": digits.INPUT_SIZE, "backend": "eager",
    "max_batch_size": MAX_BATCH, "max_queue_delay_us": QUEUE_DELAY_US,
}  # fmt: skip
REPOSITORY = {
    "digits": _DIGITS,
    "spare": _DIGITS,
    "shared": _DIGITS,
    "uint8_advertised": {**_DIGITS, "advertised_input": "uint8_nhwc"},
    "missing_weights": {"arch": "resnet18", "weights": "absent.pt", "input_size": 48, "backend": "eager"},
}
UNSUPPORTED_RPCS = {
    "SystemSharedMemoryStatus": pb.SystemSharedMemoryStatusRequest(),
    "SystemSharedMemoryRegister": pb.SystemSharedMemoryRegisterRequest(name="r", key="/k", byte_size=8),
    "SystemSharedMemoryUnregister": pb.SystemSharedMemoryUnregisterRequest(name="r"),
    "CudaSharedMemoryStatus": pb.CudaSharedMemoryStatusRequest(),
    "CudaSharedMemoryRegister": pb.CudaSharedMemoryRegisterRequest(name="r", raw_handle=b"h", byte_size=8),
    "CudaSharedMemoryUnregister": pb.CudaSharedMemoryUnregisterRequest(name="r"),
    "TraceSetting": pb.TraceSettingRequest(),
    "LogSettings": pb.LogSettingsRequest(),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    directory = tmp_path_factory.mktemp("triton")
    repository = write_repository(directory / "models.toml", REPOSITORY)
    with serving(directory, repository=repository, env=CPU_ONLY) as running:
        yield running


@pytest.fixture(scope="module")
def inference(server: ServerProcess) -> grpc_service_pb2_grpc.GRPCInferenceServiceStub:
    with server.channel() as channel:
        yield grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def scans() -> np.ndarray:
    """ROWS held-out digit scans as the model's input, [ROWS, 3, 32, 32] float32."""
    return digits.preprocess_images(digits.load_split()[1].images[:ROWS]).numpy()


def infer_request(model: str, array: np.ndarray, **overrides) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=array.shape)
    return pb.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[array.tobytes()], **overrides)


def classified_output(class_count: pb.InferParameter) -> pb.ModelInferRequest.InferRequestedOutputTensor:
    return pb.ModelInferRequest.InferRequestedOutputTensor(name="logits", parameters={"classification": class_count})


def bytes_elements(raw: bytes) -> list[str]:
    """Triton's BYTES wire layout: each element behind its 4-byte little-endian length."""
    elements, offset = [], 0
    while offset < len(raw):
        length = int.from_bytes(raw[offset : offset + 4], "little")
        elements.append(raw[offset + 4 : offset + 4 + length].decode())
        offset += 4 + length
    return elements


def expected_classes(logits: np.ndarray, count: int) -> list[list[str]]:
    order = np.argsort(-logits, axis=1, kind="stable")[:, :count]
    return [[f"{row[i]:f}:{i}:{i}" for i in indices] for row, indices in zip(logits, order, strict=True)]


def test_tritonclient_calls_the_extensions_unchanged(server, scans, tmp_path):
    np.save(tmp_path / "inputs.npy", scans)
    probe = REPO_ROOT / "tests" / "support" / "tritonclient_extensions_probe.py"
    done = subprocess.run(
        [sys.executable, str(probe), server.address, "digits", "spare", str(tmp_path / "inputs.npy")],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + server.log()
    report = json.loads(done.stdout)
    logits = np.array(report["logits"], dtype=np.float32)
    assert logits.shape == (ROWS, 10)

    assert report["server"]["extensions"] == list(EXTENSIONS)
    config = report["config"]["config"]
    assert (config["name"], config["backend"], config["max_batch_size"]) == ("digits", "eager", MAX_BATCH)
    (model_input,) = config["input"]
    assert [model_input[key] for key in ("name", "data_type", "dims")] == ["input", "TYPE_FP32", ["3", "32", "32"]]
    assert model_input["format"] == "FORMAT_NCHW"
    assert config["output"] == [{"name": "logits", "data_type": "TYPE_FP32", "dims": ["10"]}]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == str(QUEUE_DELAY_US)
    assert config["instance_group"] == [{"name": "digits_0", "kind": "KIND_CPU", "count": 1}]

    index = {model["name"]: model for model in report["index"]["models"]}
    assert set(index) == set(REPOSITORY)
    assert index["digits"]["state"] == "READY" and index["missing_weights"]["state"] == "UNAVAILABLE"
    assert "no such weights file" in index["missing_weights"]["reason"]

    assert report["classification"] == expected_classes(logits, 3)

    answered = {answer.get("id", "error"): answer for answer in report["stream"]}
    assert set(answered) == {"first", "third", "error"}, report["stream"]
    assert "no model named 'no_such_model'" in answered["error"]["error"]
    for request_id in ("first", "third"):  # the stream stayed open after the error
        np.testing.assert_array_equal(np.array(answered[request_id]["logits"], dtype=np.float32), logits)

    (stats,) = report["statistics"]["model_stats"]
    inference_stats = stats["inference_stats"]
    # Four infers before the statistics were read: two ModelInfer, two good ones on the stream (a third one failed
    # for another model, counted nowhere here).
    assert inference_stats["success"]["count"] == "4" and "count" not in inference_stats["fail"]
    for phase in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert int(inference_stats[phase]["ns"]) > 0, phase
    assert int(stats["inference_count"]) == 4 * ROWS and int(stats["last_inference"]) > 0
    batch_runs = sum(int(batch["compute_infer"]["count"]) for batch in stats["batch_stats"])
    assert batch_runs == int(stats["execution_count"]) and 1 <= batch_runs <= 4
    assert all(int(batch["batch_size"]) <= MAX_BATCH for batch in stats["batch_stats"])

    assert report["spare_ready_after_unload"] is False
    assert "UNAVAILABLE" in report["spare_infer_after_unload"] and "unloaded" in report["spare_infer_after_unload"]
    assert report["spare_ready_after_load"] is True
    np.testing.assert_array_equal(np.array(report["spare_logits_after_load"], dtype=np.float32), logits)
    assert "NOT_FOUND" in report["load_unknown"]
    assert "UNIMPLEMENTED" in report["shared_memory"] and "not supported" in report["shared_memory"]


def test_perf_analyzer_drives_the_server_over_grpc_without_errors(server, inference, tmp_path):
    before = inference.ModelStatistics(pb.ModelStatisticsRequest(name="shared")).model_stats[0].inference_stats
    report = tmp_path / "perf.csv"
    done = subprocess.run(
        [str(REPO_ROOT / "scripts" / "perf_analyzer.sh"), "-m", "shared", "-i", "grpc", "-u", server.address,
         "--concurrency-range", "1:16:15", "--measurement-mode", "count_windows", "--measurement-request-count", "30",
         "--max-trials", "3", "--stability-percentage", "1000", "-f", str(report)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    rows = list(csv.DictReader(report.open()))
    # perf_analyzer orders its CSV by throughput, which a loaded machine can invert.
    assert sorted(int(row["Concurrency"]) for row in rows) == [1, 16]
    assert all(float(row["Inferences/Second"]) > 0 for row in rows)
    after = inference.ModelStatistics(pb.ModelStatisticsRequest(name="shared")).model_stats[0].inference_stats
    assert after.fail.count == before.fail.count
    assert after.success.count - before.success.count >= 2 * 30


def test_perf_analyzer_sends_uint8_nhwc_to_a_model_that_advertises_it(server, inference, tmp_path):
    metadata = inference.ModelMetadata(pb.ModelMetadataRequest(name="uint8_advertised"), timeout=60)
    (advertised,) = metadata.inputs
    assert (advertised.datatype, list(advertised.shape)) == ("UINT8", [-1, digits.INPUT_SIZE, digits.INPUT_SIZE, 3])
    report = tmp_path / "perf.csv"
    done = subprocess.run(
        [str(REPO_ROOT / "scripts" / "perf_analyzer.sh"), "-m", "uint8_advertised", "-i", "grpc", "-u", server.address,
         "--concurrency-range", "4", "--measurement-mode", "count_windows", "--measurement-request-count", "30",
         "--max-trials", "3", "--stability-percentage", "1000", "-f", str(report)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    (row,) = csv.DictReader(report.open())
    assert float(row["Inferences/Second"]) > 0
    stats = inference.ModelStatistics(pb.ModelStatisticsRequest(name="uint8_advertised")).model_stats[0]
    assert stats.inference_stats.fail.count == 0 and stats.inference_stats.success.count >= 30


def test_a_model_advertising_uint8_still_takes_fp32_nchw(inference, scans):
    uint8_model = inference.ModelInfer(infer_request("uint8_advertised", scans), timeout=60)
    fp32_model = inference.ModelInfer(infer_request("shared", scans), timeout=60)
    assert list(uint8_model.outputs[0].shape) == [ROWS, 10]
    np.testing.assert_array_equal(
        np.frombuffer(uint8_model.raw_output_contents[0], "<f4"),
        np.frombuffer(fp32_model.raw_output_contents[0], "<f4"),
    )


def test_classification_clamps_to_the_classes_and_matches_the_logits(inference, scans):
    logits_response = inference.ModelInfer(infer_request("shared", scans), timeout=60)
    logits = np.frombuffer(logits_response.raw_output_contents[0], dtype="<f4").reshape(ROWS, 10)
    for asked, given in ((1, 1), (50, 10)):
        request = infer_request("shared", scans, outputs=[classified_output(pb.InferParameter(int64_param=asked))])
        response = inference.ModelInfer(request, timeout=60)
        (output,) = response.outputs
        assert (output.name, output.datatype, list(output.shape)) == ("logits", "BYTES", [ROWS, given])
        elements = bytes_elements(response.raw_output_contents[0])
        assert [elements[i * given : (i + 1) * given] for i in range(ROWS)] == expected_classes(logits, given)


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ([classified_output(pb.InferParameter(int64_param=0))], "'classification' (class_count) must be an int64 >= 1"),
        ([classified_output(pb.InferParameter(string_param="3"))], "must be an int64 >= 1, got string_param"),
        (
            [pb.ModelInferRequest.InferRequestedOutputTensor(name="logits", parameters={"top": pb.InferParameter()})],
            "unknown output parameter 'top'",
        ),
        ([pb.ModelInferRequest.InferRequestedOutputTensor(name="logits")] * 2, "2 outputs requested"),
    ],
)
def test_bad_classification_requests_are_invalid_argument(inference, scans, outputs, message):
    with pytest.raises(grpc.RpcError) as raised:
        inference.ModelInfer(infer_request("shared", scans, outputs=outputs), timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in raised.value.details()


@pytest.mark.parametrize(
    ("method", "request_message", "code", "message"),
    [
        ("ModelConfig", pb.ModelConfigRequest(name="typo"), "NOT_FOUND", "no model named 'typo'"),
        ("ModelConfig", pb.ModelConfigRequest(name="shared", version="2"), "NOT_FOUND", "has no version '2'"),
        ("ModelConfig", pb.ModelConfigRequest(name="missing_weights"), "UNAVAILABLE", "no such weights file"),
        ("ModelStatistics", pb.ModelStatisticsRequest(name="typo"), "NOT_FOUND", "no model named 'typo'"),
        ("ModelStatistics", pb.ModelStatisticsRequest(version="1"), "INVALID_ARGUMENT", "without a model name"),
        ("RepositoryIndex", pb.RepositoryIndexRequest(repository_name="other"), "INVALID_ARGUMENT", "one repository"),
        ("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="typo"), "NOT_FOUND", "no model named"),
        (
            "RepositoryModelLoad",
            pb.RepositoryModelLoadRequest(model_name="shared", parameters={"config": pb.ModelRepositoryParameter()}),
            "INVALID_ARGUMENT", "load parameters ['config'] are not supported",
        ),
        (
            "RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="missing_weights"),
            "UNAVAILABLE", "'missing_weights' failed to load: ",
        ),
        ("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name="typo"), "NOT_FOUND", "no model named"),
        (
            "RepositoryModelUnload",
            pb.RepositoryModelUnloadRequest(model_name="shared", parameters={"force": pb.ModelRepositoryParameter()}),
            "INVALID_ARGUMENT", "unload parameters ['force'] are not supported",
        ),
        *((method, request, "UNIMPLEMENTED", "not supported by this server")
          for method, request in UNSUPPORTED_RPCS.items()),
    ],
    ids=lambda value: value if isinstance(value, str) and value[0].isupper() and " " not in value else None,
)  # fmt: skip
def test_bad_calls_to_the_extensions_get_a_clear_status(inference, scans, method, request_message, code, message):
    with pytest.raises(grpc.RpcError) as raised:
        getattr(inference, method)(request_message, timeout=60)
    assert raised.value.code().name == code and message in raised.value.details(), raised.value.details()
    # ... and harm nothing: the model still serves.
    assert len(inference.ModelInfer(infer_request("shared", scans), timeout=60).raw_output_contents) == 1


def test_the_stream_answers_each_request_and_survives_bad_ones(inference, scans):
    bad_shape = infer_request("shared", scans[:, :, :8, :8], id="bad-shape")
    requests = [infer_request("shared", scans, id="a"), bad_shape, infer_request("shared", scans, id="b")]
    answers = {answer.infer_response.id: answer for answer in inference.ModelStreamInfer(iter(requests), timeout=60)}
    assert set(answers) == {"a", "bad-shape", "b"}
    assert "input shape [2, 3, 8, 8] does not match the model's [-1, 3, 32, 32]" in answers["bad-shape"].error_message
    for good in ("a", "b"):
        assert answers[good].error_message == "" and answers[good].infer_response.outputs[0].shape == [ROWS, 10]


def _reflect(server: ServerProcess, service: str, requests: list) -> list:
    with server.channel() as channel:
        call = channel.stream_stream(
            f"/{service}/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        return list(call(iter(requests), timeout=30))


def test_reflection_v1_lists_and_describes_the_services(server):
    # v1's messages are v1alpha's on the wire; only the service name differs.
    listed, described = _reflect(
        server,
        V1_SERVICE_NAME,
        [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService"),
        ],
    )
    services = {service.name for service in listed.list_services_response.service}
    assert {"inference.GRPCInferenceService", "resnet.v1.Classifier", V1_SERVICE_NAME} <= services
    assert any(
        b"ModelStatisticsResponse" in proto for proto in described.file_descriptor_response.file_descriptor_proto
    )


def test_grpcurl_lists_and_describes_the_services(server):
    grpcurl = str(Path(sys.executable).parent / "grpcurl")
    listed = subprocess.run([grpcurl, "-plaintext", server.address, "list"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert {"inference.GRPCInferenceService", "resnet.v1.Classifier", "grpc.health.v1.Health"} <= set(
        listed.stdout.split()
    )
    # The service, and a message of model_config.proto, which grpcurl reaches through the import.
    described = {}
    for symbol in ("inference.GRPCInferenceService", "inference.ModelConfig"):
        done = subprocess.run(
            [grpcurl, "-plaintext", server.address, "describe", symbol], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        described[symbol] = done.stdout
    assert (
        "rpc ModelConfig ( .inference.ModelConfigRequest ) returns ( .inference.ModelConfigResponse );"
        in (described["inference.GRPCInferenceService"])
    )
    assert ".inference.ModelDynamicBatching dynamic_batching = 11;" in described["inference.ModelConfig"]
