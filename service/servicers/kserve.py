"""inference.GRPCInferenceService (KServe v2 / Open Inference Protocol) with Triton's extensions.

Every model has one input, "input": UINT8 raw images [-1, S, S, 3] or FP32/FP16 normalized ones [-1, 3, S, S]
(service/tensor_input.py parses it; ModelMetadata/ModelConfig advertise the repository's `advertised_input`), and one
output, "logits", FP32 [-1, classes] in raw_output_contents. With a
`classification` parameter (tritonclient's class_count) on the requested output, "logits" is instead Triton's BYTES
[-1, class_count] of "score:index:label". Implemented besides the core RPCs: ModelStreamInfer, ModelConfig,
ModelStatistics, RepositoryIndex, RepositoryModelLoad/Unload (EXTENSIONS); shared memory, trace and log settings
answer UNIMPLEMENTED with a message that says so.

`InferenceServicer.infer` is ModelInfer without gRPC (validate, batch, answer), for any frontend.
"""

import asyncio
import functools
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc

from service._proto import grpc_service_pb2 as pb
from service._proto import grpc_service_pb2_grpc
from service.echo import echo
from service.lifecycle import Loaded
from service.metrics import ServiceMetrics
from service.rpc import CallScope, Failure, RpcError, deadline_of, invalid_argument, rpc_handler, run_blocking
from service.served_models import ServedModels
from service.servicers.kserve_messages import (
    MODEL_VERSION,
    OUTPUT_NAME,
    classification_output,
    model_config,
    model_metadata,
    model_statistics,
    repository_index,
)
from service.statistics import RequestTimes
from service.tensor_input import converts_cheaply, input_tensor

SERVER_NAME = "fused-resnet"
# What ServerMetadata lists: exactly the Triton extensions this server implements.
EXTENSIONS = ("classification", "model_configuration", "model_repository", "statistics")
CLASSIFICATION_PARAMETER = "classification"
# The HTTP/REST transport's hint for a requested output; a frontend that turns JSON into a ModelInferRequest may
# leave it in, and it changes nothing here.
_TRANSPORT_PARAMETERS = ("binary_data",)
# unload_dependents: tritonclient always sends it; this server has no ensembles, so nothing depends on a model.
_UNLOAD_PARAMETERS = ("unload_dependents",)


# (what is not supported, what to do instead) for the RPCs of a feature this server lacks.
_SYSTEM_SHARED_MEMORY = ("system shared memory is", "send tensors in raw_input_contents")
_CUDA_SHARED_MEMORY = ("CUDA shared memory is", "send tensors in raw_input_contents")


def _unsupported(method: str, feature: str, instead: str) -> Callable[..., Awaitable[Any]]:
    """An RPC of the protocol this server does not implement: UNIMPLEMENTED, with what to do instead."""

    async def refuse(servicer: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise RpcError(grpc.StatusCode.UNIMPLEMENTED, f"{method}: {feature} not supported by this server; {instead}")

    refuse.__name__ = method
    return rpc_handler()(refuse)


class InferenceServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """`is_ready()` is the server's readiness (models settled, not draining)."""

    def __init__(
        self,
        models: ServedModels,
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
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=server_version(), extensions=list(EXTENSIONS))

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
        return model_metadata(self._models.find(model.name), model)

    @rpc_handler(lambda request: request.name)
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        served = self._models.find(request.name)
        _check_version(served.name, request.version)
        return pb.ModelConfigResponse(config=model_config(served, self._models.ready_model(served.name)))

    @rpc_handler(lambda request: request.name)
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        """One model's statistics, or every model's when no name is given (whatever their state: counters stay)."""
        if request.name:
            models = [self._models.find(request.name)]
            _check_version(request.name, request.version)
        elif request.version:
            raise invalid_argument(f"version {echo(request.version)} given without a model name")
        else:
            models = self._models.models
        statistics = await self._models.statistics_snapshot()
        return pb.ModelStatisticsResponse(
            model_stats=[model_statistics(model.name, statistics.of(model.name)) for model in models]
        )

    @rpc_handler()
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        _check_repository(request.repository_name)
        return repository_index(self._models.models, ready_only=request.ready)

    @rpc_handler(lambda request: request.model_name)
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        _check_repository(request.repository_name)
        if request.parameters:
            raise invalid_argument(
                f"load parameters {sorted(request.parameters)} are not supported: a model loads as the repository "
                "file configures it (edit the file to change it)"
            )
        await self._models.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @rpc_handler(lambda request: request.model_name)
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        _check_repository(request.repository_name)
        unknown = sorted(set(request.parameters) - set(_UNLOAD_PARAMETERS))
        if unknown:
            raise invalid_argument(f"unload parameters {unknown} are not supported; only {list(_UNLOAD_PARAMETERS)}")
        await self._models.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    @rpc_handler(lambda request: request.model_name)
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return await self.infer(request, deadline_of(context))

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Answers each request of the stream as soon as it is done (so in the order they finish: match them by
        `id`, as with Triton). A request that fails is answered with its error_message; the stream carries on."""
        deadline = deadline_of(context)
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()

        async def answer(request: pb.ModelInferRequest) -> None:
            outcome = await self.call_scope.attempt(
                "ModelStreamInfer", request.model_name, context, lambda: self.infer(request, deadline)
            )
            if isinstance(outcome, Failure):
                failed = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
                answers.put_nowait(pb.ModelStreamInferResponse(error_message=outcome.message, infer_response=failed))
            else:
                answers.put_nowait(pb.ModelStreamInferResponse(infer_response=outcome))

        async def read_all() -> None:
            try:
                async with asyncio.TaskGroup() as tasks:
                    async for request in request_iterator:
                        tasks.create_task(answer(request))
            finally:
                answers.put_nowait(None)  # the client closed its side and every request is answered

        reader = asyncio.create_task(read_all())
        try:
            while (response := await answers.get()) is not None:
                yield response
            await reader  # raises what ended the reading, if anything did
        finally:
            reader.cancel()

    async def infer(self, request: pb.ModelInferRequest, deadline: float | None) -> pb.ModelInferResponse:
        """ModelInfer for any frontend: validates `request`, batches it, answers; `deadline` in time.monotonic()
        seconds or None. Raises what service/rpc.py maps to status codes, and counts the request in the model's
        statistics (a failure too, once the model is known to serve)."""
        started = time.perf_counter_ns()
        async with self._models.serving(request.model_name) as model:
            stats = self._models.request_statistics(model.name)
            try:
                response, rows, times = await self._infer_loaded(model, request, deadline)
            except Exception:
                stats.record_failure(time.perf_counter_ns() - started)
                raise
        stats.record_success(rows, time.perf_counter_ns() - started, times)
        return response

    async def _infer_loaded(
        self, model: Loaded, request: pb.ModelInferRequest, deadline: float | None
    ) -> tuple[pb.ModelInferResponse, int, RequestTimes]:
        _check_version(model.name, request.model_version)
        class_count = _requested_class_count(request, model)
        input_started = time.perf_counter_ns()
        input_size = model.preprocessing.input_size
        if converts_cheaply(request):
            inputs = input_tensor(request, model.name, input_size)
        else:  # up to a whole message of bytes to copy (and widen from FP16): off the event loop
            inputs = await run_blocking(self._tensor_executor, input_tensor, request, model.name, input_size)
        input_ns = time.perf_counter_ns() - input_started
        result = await model.batcher.submit(inputs, deadline=deadline)
        output_started = time.perf_counter_ns()
        self._metrics.record_batched(model.name, result.queue_us, result.compute_us)
        logits = result.logits.contiguous().numpy().astype("<f4", copy=False)
        if class_count is None:
            output = pb.ModelInferResponse.InferOutputTensor(name=OUTPUT_NAME, datatype="FP32", shape=logits.shape)
            raw = logits.tobytes()
        else:
            output, raw = classification_output(logits, class_count, model.output.labels)
        response = pb.ModelInferResponse(
            model_name=model.name,
            model_version=MODEL_VERSION,
            id=request.id,
            outputs=[output],
            raw_output_contents=[raw],
        )
        times = RequestTimes(
            queue_ns=result.queue_us * 1000,
            compute_input_ns=input_ns,
            compute_infer_ns=result.compute_us * 1000,
            compute_output_ns=time.perf_counter_ns() - output_started,
        )
        return response, len(logits), times

    SystemSharedMemoryStatus = _unsupported("SystemSharedMemoryStatus", *_SYSTEM_SHARED_MEMORY)
    SystemSharedMemoryRegister = _unsupported("SystemSharedMemoryRegister", *_SYSTEM_SHARED_MEMORY)
    SystemSharedMemoryUnregister = _unsupported("SystemSharedMemoryUnregister", *_SYSTEM_SHARED_MEMORY)
    CudaSharedMemoryStatus = _unsupported("CudaSharedMemoryStatus", *_CUDA_SHARED_MEMORY)
    CudaSharedMemoryRegister = _unsupported("CudaSharedMemoryRegister", *_CUDA_SHARED_MEMORY)
    CudaSharedMemoryUnregister = _unsupported("CudaSharedMemoryUnregister", *_CUDA_SHARED_MEMORY)
    TraceSetting = _unsupported(
        "TraceSetting", "request tracing is", "every answer carries an x-request-id, also in the server's log"
    )
    LogSettings = _unsupported("LogSettings", "changing log settings at run time is", "start it with --log-level")


@functools.cache
def server_version() -> str:
    """The installed package's version, or, run from a checkout that is not installed (PYTHONPATH, as on the GPU
    machines), the one its pyproject.toml declares: perf_analyzer asks ServerMetadata before anything else."""
    try:
        return metadata.version(SERVER_NAME)
    except metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        return tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"]


def _requested_class_count(request: pb.ModelInferRequest, model: Loaded) -> int | None:
    """The class_count asked for on the requested output (at most the model's classes, as Triton clamps it), or None
    for the raw logits. RpcError(INVALID_ARGUMENT) for an unknown output or parameter."""
    if len(request.outputs) > 1:
        raise invalid_argument(f"{len(request.outputs)} outputs requested; the model has one, 'logits'")
    class_count = None
    for output in request.outputs:
        if output.name != OUTPUT_NAME:
            raise invalid_argument(f"unknown output {echo(output.name)}; the model's output is 'logits'")
        for key, value in output.parameters.items():
            if key == CLASSIFICATION_PARAMETER:
                if value.WhichOneof("parameter_choice") != "int64_param" or value.int64_param < 1:
                    got = str(value).strip() or "nothing"
                    raise invalid_argument(
                        f"output parameter 'classification' (class_count) must be an int64 >= 1, got {got}"
                    )
                class_count = min(value.int64_param, model.output.num_classes)
            elif key not in _TRANSPORT_PARAMETERS:
                raise invalid_argument(
                    f"unknown output parameter {echo(key)}; supported: 'classification' (class_count)"
                )
    return class_count


def _check_version(name: str, version: str) -> None:
    if version not in ("", MODEL_VERSION):
        raise RpcError(grpc.StatusCode.NOT_FOUND, f"model {name!r} has no version {echo(version)}, only '1'")


def _check_repository(name: str) -> None:
    if name:
        raise invalid_argument(f"unknown repository {echo(name)}: this server has one repository, named ''")
