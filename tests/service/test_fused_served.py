"""The fused backend served: on the GPU when there is one, else under the Triton interpreter (slow: two digit images),
and refused with the reason, while the server stays up, where it can run neither on a GPU nor under the interpreter."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

import models
from models import digits
from service._proto import classifier_pb2, classifier_pb2_grpc
from tests.support.server import is_serving, serving, start_server, write_repository

DIGITS_FUSED = {
    "arch": "digits_resnet", "weights": "pretrained", "input_size": digits.INPUT_SIZE, "backend": "fused",
    # Both images in one batch: a batch of two costs the interpreter about as much as two of one.
    "max_batch_size": 2, "max_queue_delay_us": 5_000_000,
}  # fmt: skip


def test_fused_backend_matches_eager(tmp_path: Path):
    repository = write_repository(tmp_path / "models.toml", {"digits_fused": DIGITS_FUSED})
    on_gpu = torch.cuda.is_available()
    with serving(
        tmp_path,
        repository=repository,
        env=None if on_gpu else {"TRITON_INTERPRET": "1"},
        unset_env=("TRITON_INTERPRET",) if on_gpu else (),
    ) as server:
        images = digits.load_split()[1].images[20:22]
        start_together = threading.Barrier(len(images))
        with server.channel() as channel:
            classifier = classifier_pb2_grpc.ClassifierStub(channel)
            (info,) = classifier.ListModels(classifier_pb2.ListModelsRequest()).models
            assert (info.ready, info.backend) == (True, "fused")

            def classify(image: np.ndarray) -> classifier_pb2.ClassifyResponse:
                start_together.wait(timeout=30)
                request = classifier_pb2.ClassifyRequest(model="digits_fused", image=digits.to_png(image), top_k=10)
                return classifier.Classify(request, timeout=600)

            with ThreadPoolExecutor(len(images)) as pool:
                responses = list(pool.map(classify, images))
        with torch.inference_mode():
            reference = torch.softmax(models.build("digits_resnet", "pretrained")(digits.preprocess_images(images)), 1)
        for response, probabilities in zip(responses, reference, strict=True):
            indices = [prediction.index for prediction in response.predictions]
            assert indices[0] == int(probabilities.argmax())
            scores = np.array([prediction.score for prediction in response.predictions])
            # 5e-3: the GPU may compute float32 convolutions in TF32 (docs/ARCHITECTURE.md, "Numerics").
            np.testing.assert_allclose(scores, probabilities[indices].numpy(), rtol=5e-3, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the fused backend loads")
def test_fused_backend_without_gpu_or_interpreter_is_not_ready_with_the_reason(tmp_path: Path):
    repository = write_repository(tmp_path / "models.toml", {"digits_fused": DIGITS_FUSED})
    server = start_server(tmp_path, repository=repository, unset_env=("TRITON_INTERPRET",))
    try:
        deadline = time.monotonic() + 120
        with server.channel() as channel:
            classifier = classifier_pb2_grpc.ClassifierStub(channel)
            while True:
                assert server.process.poll() is None and time.monotonic() < deadline, server.log()
                try:
                    (info,) = classifier.ListModels(classifier_pb2.ListModelsRequest(), timeout=5).models
                except grpc.RpcError:
                    info = None  # not bound yet
                if info is not None and info.reason != "loading":
                    break
                time.sleep(0.2)
            assert not info.ready and "TRITON_INTERPRET=1" in info.reason, info.reason
            # Up and answering, but not ready: no model can serve.
            assert not is_serving(channel)
            with pytest.raises(grpc.RpcError) as raised:
                classifier.Classify(classifier_pb2.ClassifyRequest(model="digits_fused", image=b"x"))
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        assert server.stop() == 0, server.log()
