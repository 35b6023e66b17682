"""Padded rows counted by a running server: the real gRPC server, servicers, batcher and metrics in this process, the
real digits model behind a backend that pads every batch to its bucket (bench.bucket_policy.BucketedBackend), as the
fused backend's CUDA graphs do on a GPU. On a CPU no real backend pads, so the model loader is the one stand-in."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

import models
from bench.bucket_policy import BucketedBackend
from models import digits
from service._proto import grpc_service_pb2 as pb
from service._proto import grpc_service_pb2_grpc
from service.backends.eager import EagerBackend
from service.model_loader import ModelParts, load_model_parts
from service.repository import ModelConfig
from service.server import InferenceServer, ServerSettings
from tests.support.server import free_port

BUCKETS = (1, 2, 4)
CONFIG = ModelConfig(
    name="digits_bucketed", arch="digits_resnet", weights="pretrained", input_size=digits.INPUT_SIZE,
    max_batch_size=4, max_queue_delay_us=0, backend="eager",
)  # fmt: skip


def load_bucketed(config: ModelConfig, backend_kind: str) -> ModelParts:
    parts = load_model_parts(config, backend_kind)
    assert isinstance(parts.backend, EagerBackend)
    return ModelParts(BucketedBackend(parts.backend, BUCKETS), parts.preprocessing, parts.output)


def infer(stub: grpc_service_pb2_grpc.GRPCInferenceServiceStub, rows: np.ndarray) -> np.ndarray:
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=rows.shape)
    request = pb.ModelInferRequest(model_name=CONFIG.name, inputs=[tensor], raw_input_contents=[rows.tobytes()])
    response = stub.ModelInfer(request, timeout=60)
    return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(tuple(response.outputs[0].shape))


def test_padded_rows_counter_moves_by_the_rows_a_batch_was_padded(tmp_path: Path):
    settings = ServerSettings(host="127.0.0.1", port=free_port(), metrics_port=free_port(), model_repository=tmp_path)

    async def main() -> None:
        server = InferenceServer(settings, [CONFIG], load_parts=load_bucketed)
        await server.start()
        try:
            for _ in range(600):
                if server.is_ready():
                    break
                await asyncio.sleep(0.05)
            assert server.is_ready()

            def padded() -> float:  # as a Prometheus scrape reads it
                url = f"http://127.0.0.1:{settings.metrics_port}/metrics"
                with urllib.request.urlopen(url, timeout=10) as response:
                    text = response.read().decode()
                samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
                wanted = {"model": CONFIG.name}
                (value,) = [s.value for s in samples if s.name == "resnet_padded_rows_total" and s.labels == wanted]
                return value

            rng = np.random.default_rng(0)
            rows = rng.standard_normal((4, 3, digits.INPUT_SIZE, digits.INPUT_SIZE), dtype=np.float32)
            with grpc.insecure_channel(f"127.0.0.1:{settings.port}") as channel:
                stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
                answers = {n: await asyncio.to_thread(infer, stub, rows[:n]) for n in (2, 3, 4)}
                after_exact = await asyncio.to_thread(padded)
                await asyncio.to_thread(infer, stub, rows[:3])  # 3 rows computed as bucket 4
                after_three = await asyncio.to_thread(padded)
            assert after_exact == 1.0  # of 2, 3 and 4 rows only the 3 was padded, by one row
            assert after_three == 2.0
            with torch.inference_mode():
                expected = models.build("digits_resnet", "pretrained")(torch.from_numpy(rows)).numpy()
            for n, logits in answers.items():  # padding changes no caller's answer
                np.testing.assert_allclose(logits, expected[:n], rtol=1e-4, atol=1e-4)
        finally:
            await server.stop(grace_s=5)

    asyncio.run(main())
