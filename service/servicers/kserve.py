"""inference.GRPCInferenceService (KServe v2 / Open Inference Protocol): raw tensors in, raw logits out.

Every model has one input, "input", FP32 or FP16 [-1, 3, S, S] (FP16 is widened to float32 before batching), and
one output, "logits", FP32 [-1, classes]; tensors travel in raw_input_contents / raw_output_contents.
"""

import math
from collections.abc import Callable
from concurrent.futures import Executor
from importlib import metadata

import grpc
import numpy as np
import torch

from service._proto import grpc_service_pb2 as pb
from service._proto import grpc_service_pb2_grpc
from service.echo import echo
from service.lifecycle import Loaded
from service.metrics import ServiceMetrics
from service.model_manager import ModelManager
from service.rpc import CallScope, RpcError, deadline_of, rpc_handler, run_blocking

SERVER_NAME = "fused-resnet"
MODEL_VERSION = "1"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
# Wire byte order is little-endian, whatever the host's.
_INPUT_DTYPES: dict[str, np.dtype] = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2")}


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
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"unknown output {echo(output.name)}; the model's output is 'logits'",
                )
        # Up to a whole message of bytes to copy (and widen from FP16): off the event loop.
        inputs = await run_blocking(self._tensor_executor, _input_tensor, request, model)
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


def _input_tensor(request: pb.ModelInferRequest, model: Loaded) -> torch.Tensor:
    """The request's "input" as float32 [n, 3, S, S]; RpcError(INVALID_ARGUMENT) when it is not exactly that."""
    size = model.preprocessing.input_size
    if len(request.inputs) != 1 or request.inputs[0].name != INPUT_NAME:
        names = [tensor.name for tensor in request.inputs]
        raise _invalid(f"model {model.name!r} takes one input named 'input', got {names}")
    tensor = request.inputs[0]
    dtype = _INPUT_DTYPES.get(tensor.datatype)
    if dtype is None:
        raise _invalid(f"input datatype {tensor.datatype!r} is not supported; send FP32 or FP16")
    shape = list(tensor.shape)
    if len(shape) != 4 or shape[0] < 1 or shape[1:] != [3, size, size]:
        raise _invalid(f"input shape {shape} does not match the model's [-1, 3, {size}, {size}]")
    if len(request.raw_input_contents) != 1:
        raise _invalid("send the input tensor in raw_input_contents (one entry); typed contents are not accepted")
    raw = request.raw_input_contents[0]
    expected_bytes = math.prod(shape) * dtype.itemsize
    if len(raw) != expected_bytes:
        raise _invalid(f"input holds {len(raw)} bytes; {tensor.datatype} {shape} needs {expected_bytes}")
    # astype copies into a writable float32 array (frombuffer views the read-only request bytes).
    return torch.from_numpy(np.frombuffer(raw, dtype=dtype).reshape(shape).astype(np.float32))


def _check_version(name: str, version: str) -> None:
    if version not in ("", MODEL_VERSION):
        raise RpcError(grpc.StatusCode.NOT_FOUND, f"model {name!r} has no version {echo(version)}, only '1'")


def _invalid(message: str) -> RpcError:
    return RpcError(grpc.StatusCode.INVALID_ARGUMENT, message)
