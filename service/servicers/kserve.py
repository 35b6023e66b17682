"""inference.GRPCInferenceService (KServe v2 / Open Inference Protocol): raw tensors in, raw logits out.

Every model has one input, "input": UINT8 raw images [-1, S, S, 3] or FP32/FP16 normalized ones [-1, 3, S, S]
(service/tensor_input.py parses it), and one output, "logits", FP32 [-1, classes] in raw_output_contents.
"""

from collections.abc import Callable
from concurrent.futures import Executor
from importlib import metadata

import grpc

from service._proto import grpc_service_pb2 as pb
from service._proto import grpc_service_pb2_grpc
from service.metrics import ServiceMetrics
from service.model_manager import ModelManager
from service.rpc import CallScope, RpcError, deadline_of, rpc_handler, run_blocking
from service.tensor_input import INPUT_NAME, input_tensor

SERVER_NAME = "fused-resnet"
MODEL_VERSION = "1"
OUTPUT_NAME = "logits"


class InferenceServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """`is_ready()` is the server's readiness (models settled, not draining)."""

    def __init__(
        self,
        models: ModelManager,
        scope: CallScope,
        metrics: ServiceMetrics,
        *,
        tensor_executor: Executor,
        is_ready: Callable[[], bool],
    ) -> None:
        self._models = models
        self.call_scope = scope
        self._metrics = metrics
        self._tensor_executor = tensor_executor
        self._is_ready = is_ready

    @rpc_handler()
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @rpc_handler()
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._is_ready())

    @rpc_handler()
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=metadata.version(SERVER_NAME), extensions=[])

    @rpc_handler(lambda request: request.name)
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        model = self._models.find(request.name)
        _check_version(model.name, request.version)
        return pb.ModelReadyResponse(ready=model.ready)

    @rpc_handler(lambda request: request.name)
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        model = self._models.ready_model(request.name)
        _check_version(model.name, request.version)
        size = model.preprocessing.input_size
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[MODEL_VERSION],
            platform=model.backend.name,
            inputs=[
                pb.ModelMetadataResponse.TensorMetadata(name=INPUT_NAME, datatype="FP32", shape=[-1, 3, size, size])
            ],
            outputs=[
                pb.ModelMetadataResponse.TensorMetadata(
                    name=OUTPUT_NAME, datatype="FP32", shape=[-1, model.output.num_classes]
                )
            ],
        )

    @rpc_handler(lambda request: request.model_name)
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        model = self._models.ready_model(request.model_name)
        _check_version(model.name, request.model_version)
        for output in request.outputs:
            if output.name != OUTPUT_NAME:
                raise RpcError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"unknown output {output.name!r}; the model's output is 'logits'"
                )
        # Up to a whole message of bytes to copy (and widen from FP16): off the event loop.
        inputs = await run_blocking(
            self._tensor_executor, input_tensor, request, model.name, model.preprocessing.input_size
        )
        result = await model.batcher.submit(inputs, deadline=deadline_of(context))
        self._metrics.record_queue_wait(model.name, result.queue_us)
        logits = result.logits.contiguous().numpy().astype("<f4", copy=False)
        return pb.ModelInferResponse(
            model_name=model.name,
            model_version=MODEL_VERSION,
            id=request.id,
            outputs=[pb.ModelInferResponse.InferOutputTensor(name=OUTPUT_NAME, datatype="FP32", shape=logits.shape)],
            raw_output_contents=[logits.tobytes()],
        )


def _check_version(name: str, version: str) -> None:
    if version not in ("", MODEL_VERSION):
        raise RpcError(grpc.StatusCode.NOT_FOUND, f"model {name!r} has no version {version!r}, only '1'")
