"""The served API end to end: `python -m service` in a subprocess on 127.0.0.1, called over gRPC.

One server for the module, with digits_resnet on eager and on onnxruntime, a small random resnet18, and a model whose
weights file is missing (never ready). Eager PyTorch in this process is the reference for every answer.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image

import models
from models import digits
from models.inputs import prepare_pixels
from service._proto import classifier_pb2, classifier_pb2_grpc, grpc_service_pb2_grpc
from service._proto import grpc_service_pb2 as pb
from tests.support.numerics import CROSS_BACKEND_TOLERANCE, assert_relative_close
from tests.support.server import CPU_ONLY, REPO_ROOT, ServerProcess, serving, write_repository

MAX_MESSAGE_BYTES = 1_000_000
SMALL_SIZE = 48  # resnet18_small's input
SMALL_SEED = 7
DIGITS_MAX_BATCH = 16
_DIGITS = {"arch": "digits_resnet", "weights": "pretrained", "input_size": digits.INPUT_SIZE}
REPOSITORY = {
    # A long delay window, so that concurrent callers visibly share batches.
    "digits_eager": {**_DIGITS, "backend": "eager", "max_batch_size": DIGITS_MAX_BATCH, "max_queue_delay_us": 20000},
    "digits_onnx": {**_DIGITS, "backend": "onnxruntime", "max_batch_size": DIGITS_MAX_BATCH},
    "resnet18_small": {
        "arch": "resnet18", "weights": "random", "seed": SMALL_SEED, "labels": "imagenet", "input_size": SMALL_SIZE,
        "backend": "onnxruntime", "max_batch_size": 8,
    },
    "missing_weights": {"arch": "resnet18", "weights": "absent.pt", "input_size": SMALL_SIZE, "backend": "eager"},
}  # fmt: skip
READY_MODELS = ("digits_eager", "digits_onnx", "resnet18_small")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    directory = tmp_path_factory.mktemp("api")
    repository = write_repository(directory / "models.toml", REPOSITORY)
    limit = ("--max-message-bytes", str(MAX_MESSAGE_BYTES))
    with serving(directory, *limit, repository=repository, env=CPU_ONLY) as running:
        yield running


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> grpc.Channel:
    with server.channel() as channel:
        yield channel


@pytest.fixture(scope="module")
def classifier(channel: grpc.Channel) -> classifier_pb2_grpc.ClassifierStub:
    return classifier_pb2_grpc.ClassifierStub(channel)


@pytest.fixture(scope="module")
def inference(channel: grpc.Channel) -> grpc_service_pb2_grpc.GRPCInferenceServiceStub:
    return grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def digits_test() -> digits.DigitsSplit:
    return digits.load_split()[1]


@pytest.fixture(scope="module")
def digits_eager_logits(digits_test: digits.DigitsSplit) -> torch.Tensor:
    """The reference: the eager digits model on the held-out split, [N, 10]."""
    with torch.inference_mode():
        return models.build("digits_resnet", "pretrained")(digits.preprocess_images(digits_test.images))


@pytest.fixture(scope="module")
def small_eager() -> torch.nn.Module:
    return models.build("resnet18", "random", seed=SMALL_SEED)


def infer_request(model: str, array: np.ndarray, datatype: str = "FP32", **overrides) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(
        name=overrides.pop("name", "input"), datatype=datatype, shape=overrides.pop("shape", array.shape)
    )
    return pb.ModelInferRequest(
        model_name=model, inputs=[tensor], raw_input_contents=[overrides.pop("raw", array.tobytes())], **overrides
    )


def logits_of(response: pb.ModelInferResponse) -> np.ndarray:
    (output,) = response.outputs
    assert (output.name, output.datatype) == ("logits", "FP32")
    return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(tuple(output.shape)).copy()


def random_inputs(rows: int, size: int) -> np.ndarray:
    return np.random.default_rng(rows * 1000 + size).standard_normal((rows, 3, size, size), dtype=np.float32)


def test_health_readiness_and_list_models(channel, classifier, inference):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "resnet.v1.Classifier", "inference.GRPCInferenceService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING, service
    assert inference.ServerLive(pb.ServerLiveRequest()).live
    assert inference.ServerReady(pb.ServerReadyRequest()).ready

    listed = {info.name: info for info in classifier.ListModels(classifier_pb2.ListModelsRequest()).models}
    assert list(listed) == list(REPOSITORY)
    for name in READY_MODELS:
        info = listed[name]
        assert info.ready and not info.reason and info.dtype == "float32", info
        assert (info.arch, info.backend, info.input_size) == (
            REPOSITORY[name]["arch"], REPOSITORY[name]["backend"], REPOSITORY[name]["input_size"]
        )  # fmt: skip
        assert inference.ModelReady(pb.ModelReadyRequest(name=name)).ready
    assert (listed["digits_eager"].num_classes, listed["resnet18_small"].num_classes) == (10, 1000)
    assert listed["digits_eager"].max_batch_size == DIGITS_MAX_BATCH
    missing = listed["missing_weights"]
    assert not missing.ready and "no such weights file" in missing.reason and missing.reason.endswith("absent.pt'")
    assert not inference.ModelReady(pb.ModelReadyRequest(name="missing_weights")).ready


def test_reflection_lists_every_service(channel):
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"resnet.v1.Classifier", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services


def test_metadata(inference):
    metadata = inference.ModelMetadata(pb.ModelMetadataRequest(name="resnet18_small"))
    (tensor_in,), (tensor_out,) = metadata.inputs, metadata.outputs
    assert (tensor_in.name, tensor_in.datatype, list(tensor_in.shape)) == ("input", "FP32", [-1, 3, 48, 48])
    assert (tensor_out.name, tensor_out.datatype, list(tensor_out.shape)) == ("logits", "FP32", [-1, 1000])
    assert metadata.platform == "onnxruntime" and list(metadata.versions) == ["1"]
    assert inference.ServerMetadata(pb.ServerMetadataRequest()).name == "fused-resnet"


@pytest.mark.parametrize("model", ["digits_eager", "digits_onnx"])
def test_held_out_digits_through_classify_match_eager(classifier, model, digits_test, digits_eager_logits):
    pngs = [digits.to_png(image) for image in digits_test.images]

    def classify(png: bytes) -> classifier_pb2.ClassifyResponse:
        return classifier.Classify(classifier_pb2.ClassifyRequest(model=model, image=png, top_k=3), timeout=60)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(classify, pngs))

    reference = torch.softmax(digits_eager_logits, dim=1)
    served_top1 = np.array([response.predictions[0].index for response in responses])
    eager_top1 = reference.argmax(dim=1).numpy()
    mismatches = np.flatnonzero(served_top1 != eager_top1)
    assert mismatches.size == 0, f"{model} disagrees with eager on images {mismatches.tolist()}"
    served_accuracy = (served_top1 == digits_test.labels).mean()
    assert served_accuracy == (eager_top1 == digits_test.labels).mean() > 0.9
    for response, probabilities in zip(responses, reference, strict=True):
        indices = [prediction.index for prediction in response.predictions]
        scores = np.array([prediction.score for prediction in response.predictions])
        assert response.model == model and len(indices) == 3
        assert [prediction.label for prediction in response.predictions] == [str(index) for index in indices]
        assert np.all(np.diff(scores) <= 0)
        np.testing.assert_allclose(scores, probabilities[indices].numpy(), rtol=1e-3, atol=1e-5)
        assert 1 <= response.batch_size <= DIGITS_MAX_BATCH


def test_top_k_zero_means_five(classifier, digits_test):
    response = classifier.Classify(
        classifier_pb2.ClassifyRequest(model="digits_onnx", image=digits.to_png(digits_test.images[0]))
    )
    assert len(response.predictions) == 5


def test_request_id_is_the_clients_or_a_fresh_one(classifier):
    request = classifier_pb2.ListModelsRequest()
    _, call = classifier.ListModels.with_call(request, metadata=[("x-request-id", "client-id-42")])
    assert ("x-request-id", "client-id-42") in call.trailing_metadata()
    ids = {dict(classifier.ListModels.with_call(request)[1].trailing_metadata())["x-request-id"] for _ in range(3)}
    assert len(ids) == 3 and "client-id-42" not in ids


def test_imagenet_labels_and_a_jpeg_of_other_size(classifier, small_eager):
    pixels = np.random.default_rng(3).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    response = classifier.Classify(
        classifier_pb2.ClassifyRequest(model="resnet18_small", image=buffer.getvalue(), top_k=1000)
    )
    labels = (REPO_ROOT / "models" / "imagenet_labels.txt").read_text().splitlines()
    assert len(response.predictions) == 1000
    assert all(prediction.label == labels[prediction.index] for prediction in response.predictions)
    assert sum(prediction.score for prediction in response.predictions) == pytest.approx(1.0, abs=1e-4)


def test_model_infer_fp32_and_fp16_match_eager(inference, small_eager):
    inputs = random_inputs(3, SMALL_SIZE)
    response = inference.ModelInfer(infer_request("resnet18_small", inputs, id="req-1"))
    assert (response.model_name, response.model_version, response.id) == ("resnet18_small", "1", "req-1")
    with torch.inference_mode():
        reference = small_eager(torch.from_numpy(inputs))
    assert_relative_close(logits_of(response), reference, CROSS_BACKEND_TOLERANCE, what="FP32 logits")

    # FP16 on the wire is widened to float32 exactly, so the reference is eager on the rounded values.
    inputs16 = inputs.astype(np.float16)
    response = inference.ModelInfer(infer_request("resnet18_small", inputs16, "FP16"))
    with torch.inference_mode():
        reference = small_eager(torch.from_numpy(inputs16.astype(np.float32)))
    assert_relative_close(logits_of(response), reference, CROSS_BACKEND_TOLERANCE, what="FP16 logits")


@pytest.mark.parametrize("model", ["digits_eager", "digits_onnx"])
def test_model_infer_uint8_images_classify_like_the_png_path(inference, classifier, model, digits_test):
    """UINT8 NHWC raw images, raw and typed: the same pixels Classify decodes from a PNG, the same logits."""
    images = digits_test.images[:3]
    pixels = np.stack([prepare_pixels(Image.fromarray(image), digits.INPUT) for image in images])  # [3, 32, 32, 3]
    raw = logits_of(inference.ModelInfer(infer_request(model, pixels, "UINT8")))
    typed_input = pb.ModelInferRequest.InferInputTensor(
        name="input",
        datatype="UINT8",
        shape=pixels.shape,
        contents=pb.InferTensorContents(uint_contents=pixels.ravel()),
    )
    typed = logits_of(inference.ModelInfer(pb.ModelInferRequest(model_name=model, inputs=[typed_input])))
    np.testing.assert_array_equal(typed, raw)
    for row, image in enumerate(images):
        response = classifier.Classify(classifier_pb2.ClassifyRequest(model=model, image=digits.to_png(image), top_k=1))
        assert response.predictions[0].index == int(raw[row].argmax())
        expected_score = float(torch.softmax(torch.from_numpy(raw[row]), 0).max())
        assert response.predictions[0].score == pytest.approx(expected_score, abs=1e-5)


def test_tritonclient_works_unchanged(server, tmp_path, small_eager, digits_eager_logits):
    inputs = {
        "digits_eager:0": random_inputs(2, digits.INPUT_SIZE),
        "digits_onnx:0": random_inputs(1, digits.INPUT_SIZE).astype(np.float16),
        "resnet18_small:0": random_inputs(3, SMALL_SIZE),
    }
    np.savez(tmp_path / "inputs.npz", **inputs)
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "support" / "tritonclient_probe.py"), server.address,
         str(tmp_path / "inputs.npz"), str(tmp_path / "outputs.npz")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    assert report["live"] and report["ready"] and report["server"]["name"] == "fused-resnet"
    digits_metadata = report["models"]["digits_eager"]["metadata"]
    assert digits_metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "3", "32", "32"]}]
    assert digits_metadata["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", "10"]}]
    assert all(model["ready"] for model in report["models"].values())

    outputs = np.load(tmp_path / "outputs.npz")
    digits_eager = models.build("digits_resnet", "pretrained")
    with torch.inference_mode():
        for key, eager in (("digits_eager:0", digits_eager), ("digits_onnx:0", digits_eager),
                           ("resnet18_small:0", small_eager)):  # fmt: skip
            reference = eager(torch.from_numpy(inputs[key].astype(np.float32)))
            assert outputs[key].dtype == np.float32 and outputs[key].shape == tuple(reference.shape)
            assert_relative_close(outputs[key], reference, CROSS_BACKEND_TOLERANCE, what=key)


def _png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header that claims width x height, followed by a few bytes of pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def _truncated_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()[: buffer.tell() * 2 // 3]


def _classify(model: str, image: bytes, top_k: int = 0) -> Callable:
    return lambda stubs: stubs[0].Classify(classifier_pb2.ClassifyRequest(model=model, image=image, top_k=top_k))


def _infer(request_factory: Callable[[], pb.ModelInferRequest]) -> Callable:
    return lambda stubs: stubs[1].ModelInfer(request_factory())


_DIGIT = random_inputs(1, digits.INPUT_SIZE)
_BAD_REQUESTS = {
    "empty image": (_classify("digits_eager", b""), grpc.StatusCode.INVALID_ARGUMENT),
    "truncated png": (_classify("digits_eager", _truncated_png()), grpc.StatusCode.INVALID_ARGUMENT),
    "text file": (_classify("digits_eager", b"name,value\nnot,an image\n" * 20), grpc.StatusCode.INVALID_ARGUMENT),
    "png claiming 30000x30000": (_classify("digits_eager", _png_claiming(30000, 30000)),
                                 grpc.StatusCode.RESOURCE_EXHAUSTED),
    "oversized message": (_classify("digits_eager", b"\xff" * (MAX_MESSAGE_BYTES + 1)),
                          grpc.StatusCode.RESOURCE_EXHAUSTED),
    "top_k above class count": (_classify("digits_eager", digits.to_png(np.eye(8, dtype=np.uint8) * 255), top_k=11),
                                grpc.StatusCode.INVALID_ARGUMENT),
    "unknown model (Classify)": (_classify("resnet19", b"x"), grpc.StatusCode.NOT_FOUND),
    "model not ready (Classify)": (_classify("missing_weights", b"x"), grpc.StatusCode.UNAVAILABLE),
    "unknown model (ModelInfer)": (_infer(lambda: infer_request("nope", _DIGIT)), grpc.StatusCode.NOT_FOUND),
    "model not ready (ModelMetadata)": (lambda stubs: stubs[1].ModelMetadata(pb.ModelMetadataRequest(
        name="missing_weights")), grpc.StatusCode.UNAVAILABLE),
    "unknown model (ModelReady)": (lambda stubs: stubs[1].ModelReady(pb.ModelReadyRequest(name="nope")),
                                   grpc.StatusCode.NOT_FOUND),
    "unknown version": (_infer(lambda: infer_request("digits_eager", _DIGIT, model_version="2")),
                        grpc.StatusCode.NOT_FOUND),
    "wrong shape": (_infer(lambda: infer_request("digits_eager", random_inputs(1, 31))),
                    grpc.StatusCode.INVALID_ARGUMENT),
    "wrong rank": (_infer(lambda: infer_request("digits_eager", _DIGIT[0])), grpc.StatusCode.INVALID_ARGUMENT),
    "wrong datatype": (_infer(lambda: infer_request("digits_eager", _DIGIT.astype(np.int32), "INT32")),
                       grpc.StatusCode.INVALID_ARGUMENT),
    "byte length": (_infer(lambda: infer_request("digits_eager", _DIGIT, raw=_DIGIT.tobytes()[:-4])),
                    grpc.StatusCode.INVALID_ARGUMENT),
    "fp16 bytes declared fp32": (_infer(lambda: infer_request("digits_eager", _DIGIT.astype(np.float16), "FP32")),
                                 grpc.StatusCode.INVALID_ARGUMENT),
    "unknown input name": (_infer(lambda: infer_request("digits_eager", _DIGIT, name="images")),
                           grpc.StatusCode.INVALID_ARGUMENT),
    "unknown output name": (_infer(lambda: infer_request("digits_eager", _DIGIT, outputs=[
        pb.ModelInferRequest.InferRequestedOutputTensor(name="probabilities")])), grpc.StatusCode.INVALID_ARGUMENT),
    "typed and raw contents": (_infer(lambda: pb.ModelInferRequest(model_name="digits_eager", inputs=[
        pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 3, 32, 32],
                                              contents=pb.InferTensorContents(fp32_contents=_DIGIT.ravel()))],
        raw_input_contents=[_DIGIT.tobytes()])), grpc.StatusCode.INVALID_ARGUMENT),
    "uint8 images as nchw": (_infer(lambda: infer_request("digits_eager", np.zeros((1, 3, 32, 32), np.uint8),
                                                          "UINT8")), grpc.StatusCode.INVALID_ARGUMENT),
    "batch above max_batch_size": (_infer(lambda: infer_request("digits_eager", random_inputs(DIGITS_MAX_BATCH + 1,
                                                                                            digits.INPUT_SIZE))),
                                   grpc.StatusCode.INVALID_ARGUMENT),
}  # fmt: skip


@pytest.mark.parametrize("case", list(_BAD_REQUESTS))
def test_bad_request_gets_its_code_and_the_next_good_one_succeeds(
    case, server, classifier, inference, digits_test, digits_eager_logits
):
    call, expected = _BAD_REQUESTS[case]
    counted_before = server.metric("resnet_requests_total", code=expected.name)
    with pytest.raises(grpc.RpcError) as raised:
        call((classifier, inference))
    assert raised.value.code() == expected, raised.value.details()
    if case != "oversized message":  # refused by gRPC itself before any handler runs
        assert server.metric("resnet_requests_total", code=expected.name) == counted_before + 1
        assert any(key == "x-request-id" for key, _ in raised.value.trailing_metadata())
    assert server.metric("resnet_requests_total", code="INTERNAL") == 0
    assert server.metric("resnet_requests_total", code="UNKNOWN") == 0

    good = classifier.Classify(
        classifier_pb2.ClassifyRequest(model="digits_eager", image=digits.to_png(digits_test.images[5]))
    )
    assert good.predictions[0].index == int(digits_eager_logits[5].argmax())


def test_64_concurrent_callers_on_mixed_models(server, classifier, inference, digits_test, digits_eager_logits,
                                               small_eager):  # fmt: skip
    callers = 64
    start_together = threading.Barrier(callers)
    rng = np.random.default_rng(1)
    # Every other caller sends a tensor of its own (1 to 3 rows), so swapped rows between callers would show.
    tensor_calls = {
        index: ("resnet18_small", SMALL_SIZE) if index % 4 == 2 else ("digits_eager", digits.INPUT_SIZE)
        for index in range(callers)
        if index % 4 in (2, 3)
    }
    tensors = {
        index: rng.standard_normal((1 + index % 3, 3, size, size), dtype=np.float32)
        for index, (_, size) in tensor_calls.items()
    }

    def call(index: int) -> object:
        start_together.wait(timeout=30)
        if index in tensor_calls:
            return inference.ModelInfer(infer_request(tensor_calls[index][0], tensors[index]), timeout=60)
        model = "digits_eager" if index % 4 == 0 else "digits_onnx"
        png = digits.to_png(digits_test.images[index])
        return classifier.Classify(classifier_pb2.ClassifyRequest(model=model, image=png), timeout=60)

    digits_batches_before = server.metric("resnet_batch_size_count", model="digits_eager")
    with ThreadPoolExecutor(callers) as pool:
        answers = list(pool.map(call, range(callers)))

    eager = {"resnet18_small": small_eager, "digits_eager": models.build("digits_resnet", "pretrained")}
    for model, network in eager.items():
        indices = [index for index, (name, _) in tensor_calls.items() if name == model]
        with torch.inference_mode():
            references = network(torch.from_numpy(np.concatenate([tensors[i] for i in indices])))
        for index, reference in zip(indices, references.split([len(tensors[i]) for i in indices]), strict=True):
            assert_relative_close(logits_of(answers[index]), reference, CROSS_BACKEND_TOLERANCE, what=f"call {index}")
    for index, answer in enumerate(answers):
        if index not in tensor_calls:
            assert answer.predictions[0].index == int(digits_eager_logits[index].argmax()), index
    # Fewer batches than requests for the model with the long window, and batches of more than one in /metrics.
    digits_batches = server.metric("resnet_batch_size_count", model="digits_eager") - digits_batches_before
    assert 1 <= digits_batches < callers // 2
    assert server.metric("resnet_batch_size_bucket", model="digits_eager", le="1.0") < server.metric(
        "resnet_batch_size_count", model="digits_eager"
    )
    assert max(answer.batch_size for answer in answers[::4]) > 1
