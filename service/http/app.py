"""The KServe v2 HTTP/REST routes, each a translation to the gRPC servicer's RPC of the same meaning.

Every call runs the servicer's own handler (service/servicers/kserve.py) through HttpCallContext (infer: the
handler's body, `InferenceServicer.infer`, in the servicer's CallScope), so HTTP and gRPC share the model manager,
the batcher, the checks, the metrics and the mapping of errors to status codes.
"""

import json
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from typing import Any

import grpc
from aiohttp import web

from service._proto import grpc_service_pb2 as pb
from service.echo import echo
from service.http.context import HttpCallContext
from service.http.errors import ENDPOINTS, HttpCallError, error_response, json_errors
from service.http.proto_json import message_json
from service.http.tensors import HEADER_LENGTH, OutputEncoding, infer_response_body, parse_infer_request
from service.rpc import run_blocking
from service.served_models import ServedModels
from service.servicers.kserve import InferenceServicer

# Paths with and without /versions/{version}; an absent version is "" as in gRPC (the model's only version).
_MODEL = "/v2/models/{model}"
_MODEL_VERSION = "/v2/models/{model}/versions/{version}"


def kserve_http_app(
    servicer: InferenceServicer,
    models: ServedModels,
    executor: Executor,
    *,
    max_body_bytes: int,
    middlewares: Sequence[Any] = (),
) -> web.Application:
    """The application; bodies over `max_body_bytes` (the gRPC message limit) are refused with 413. Request bodies
    are parsed on `executor` (the servicer's tensor threads). `middlewares` run inside json_errors (the bearer-token
    check of service/auth.py)."""
    routes = _Routes(servicer, models, executor)
    app = web.Application(middlewares=[json_errors, *middlewares], client_max_size=max_body_bytes)
    app[ENDPOINTS] = "the KServe v2 endpoints are under /v2"
    app.add_routes([
        web.get("/v2/health/live", routes.live),
        web.get("/v2/health/ready", routes.ready),
        web.get("/v2", routes.server_metadata),
        # Before /v2/models/{model}, which would take "stats" for a model's name (aiohttp matches in order).
        web.get("/v2/models/stats", routes.statistics),
        web.post("/v2/repository/index", routes.repository_index),
        web.post("/v2/repository/models/{model}/load", routes.load),
        web.post("/v2/repository/models/{model}/unload", routes.unload),
        *(web.get(path, routes.model_metadata) for path in (_MODEL, _MODEL_VERSION)),
        *(web.get(path + "/ready", routes.model_ready) for path in (_MODEL, _MODEL_VERSION)),
        *(web.get(path + "/config", routes.model_config) for path in (_MODEL, _MODEL_VERSION)),
        *(web.get(path + "/stats", routes.statistics) for path in (_MODEL, _MODEL_VERSION)),
        *(web.post(path + "/infer", routes.infer) for path in (_MODEL, _MODEL_VERSION)),
    ])  # fmt: skip
    return app


class _Routes:
    def __init__(self, servicer: InferenceServicer, models: ServedModels, executor: Executor) -> None:
        self._servicer = servicer
        self._models = models
        self._executor = executor

    async def live(self, request: web.Request) -> web.Response:
        context = HttpCallContext(request)
        answer = await self._servicer.ServerLive(pb.ServerLiveRequest(), context.as_servicer_context())
        return _health(answer.live, "server is not live", context)

    async def ready(self, request: web.Request) -> web.Response:
        context = HttpCallContext(request)
        answer = await self._servicer.ServerReady(pb.ServerReadyRequest(), context.as_servicer_context())
        why_not = "server is not ready: models are loading, none could load, or it is draining"
        return _health(answer.ready, why_not, context)

    async def server_metadata(self, request: web.Request) -> web.Response:
        context = HttpCallContext(request)
        answer = await self._servicer.ServerMetadata(pb.ServerMetadataRequest(), context.as_servicer_context())
        return _json({"name": answer.name, "version": answer.version, "extensions": list(answer.extensions)}, context)

    async def model_metadata(self, request: web.Request) -> web.Response:
        context = HttpCallContext(request)
        answer = await self._metadata(request, context)
        body = {
            "name": answer.name,
            "versions": list(answer.versions),
            "platform": answer.platform,
            "inputs": [_tensor_metadata(tensor) for tensor in answer.inputs],
            "outputs": [_tensor_metadata(tensor) for tensor in answer.outputs],
        }
        return _json(body, context)

    async def model_config(self, request: web.Request) -> web.Response:
        context = HttpCallContext(request)
        name, version = _model_of(request)
        answer = await self._servicer.ModelConfig(
            pb.ModelConfigRequest(name=name, version=version), context.as_servicer_context()
        )
        return _json(message_json(answer.config), context)

    async def statistics(self, request: web.Request) -> web.Response:
        """/v2/models/stats (every model) or one model's: Triton's {"model_stats": [...]}."""
        context = HttpCallContext(request)
        name, version = request.match_info.get("model", ""), request.match_info.get("version", "")
        answer = await self._servicer.ModelStatistics(
            pb.ModelStatisticsRequest(name=name, version=version), context.as_servicer_context()
        )
        return _json(message_json(answer), context)

    async def repository_index(self, request: web.Request) -> web.Response:
        """Triton's answer: a JSON array of {name, version, state, reason}; the body may ask {"ready": true}."""
        context = HttpCallContext(request)
        options = await _json_options(request, {"ready": bool})
        answer = await self._servicer.RepositoryIndex(
            pb.RepositoryIndexRequest(ready=options.get("ready", False)), context.as_servicer_context()
        )
        return web.json_response([message_json(model) for model in answer.models], headers=context.response_headers)

    async def load(self, request: web.Request) -> web.Response:
        return await self._repository_call(request, pb.RepositoryModelLoadRequest, self._servicer.RepositoryModelLoad)

    async def unload(self, request: web.Request) -> web.Response:
        return await self._repository_call(
            request, pb.RepositoryModelUnloadRequest, self._servicer.RepositoryModelUnload
        )

    async def _repository_call(
        self, request: web.Request, message_type: Callable[..., Any], rpc: Callable[..., Awaitable[object]]
    ) -> web.Response:
        """POST .../load or .../unload: the gRPC call with the body's parameters; 200 and no body."""
        context = HttpCallContext(request)
        options = await _json_options(request, {"parameters": dict})
        message = message_type(model_name=request.match_info["model"])
        _set_repository_parameters(message.parameters, options.get("parameters", {}))
        await rpc(message, context.as_servicer_context())
        return web.Response(status=200, headers=context.response_headers)

    async def _metadata(self, request: web.Request, context: HttpCallContext) -> pb.ModelMetadataResponse:
        name, version = _model_of(request)
        return await self._servicer.ModelMetadata(
            pb.ModelMetadataRequest(name=name, version=version), context.as_servicer_context()
        )

    async def model_ready(self, request: web.Request) -> web.Response:
        context = HttpCallContext(request)
        name, version = _model_of(request)
        answer = await self._servicer.ModelReady(
            pb.ModelReadyRequest(name=name, version=version), context.as_servicer_context()
        )
        return _health(answer.ready, f"model {name!r} is not ready", context)

    async def infer(self, request: web.Request) -> web.Response:
        context = HttpCallContext(request)
        name, version = _model_of(request)
        # Before the call's scope, as gRPC refuses an oversized message before the handler: 413 past client_max_size.
        body = await request.read()
        header_length = request.headers.get(HEADER_LENGTH)

        async def parse_and_infer() -> tuple[pb.ModelInferResponse, OutputEncoding]:
            # Parsing is the gRPC call's decoding; up to a whole body of JSON to read: off the event loop.
            infer_request, encoding = await run_blocking(
                self._executor, parse_infer_request, name, version, body, header_length
            )
            return await self._servicer.infer(infer_request, deadline=None), encoding

        # One scope for parsing and inference: a malformed body is counted and answered like a malformed message.
        answer, encoding = await self._servicer.call_scope.run(
            "ModelInfer", name, context.as_servicer_context(), parse_and_infer
        )
        response_body, headers = infer_response_body(answer, encoding)
        return web.Response(body=response_body, headers={**headers, **context.response_headers})


async def _json_options(request: web.Request, accepted: dict[str, type]) -> dict[str, Any]:
    """The optional JSON object body of a repository call, with only the `accepted` keys (and their types)."""
    body = await request.read()
    if not body.strip():
        return {}
    try:
        options = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HttpCallError(grpc.StatusCode.INVALID_ARGUMENT, f"the body is not JSON: {error}") from None
    if not isinstance(options, dict):
        raise HttpCallError(grpc.StatusCode.INVALID_ARGUMENT, "the body must be a JSON object")
    for key, value in options.items():
        if key not in accepted:
            # Unknown keys are refused rather than ignored: a client that sends one expects it to act.
            allowed = sorted(accepted) or "none"
            raise HttpCallError(
                grpc.StatusCode.INVALID_ARGUMENT, f"{echo(key)} is not supported here; accepted: {allowed}"
            )
        if not isinstance(value, accepted[key]):
            raise HttpCallError(grpc.StatusCode.INVALID_ARGUMENT, f"{echo(key)} must be {accepted[key].__name__}")
    return options


def _set_repository_parameters(target: Any, parameters: dict[str, Any]) -> None:
    """JSON load/unload parameters (tritonclient sends {"unload_dependents": false}) as the gRPC request's, so that the
    servicer accepts or refuses them exactly as over gRPC."""
    for name, value in parameters.items():
        if isinstance(value, bool):
            target[name].bool_param = value
        elif isinstance(value, int):
            target[name].int64_param = value
        elif isinstance(value, str):
            target[name].string_param = value
        else:
            raise HttpCallError(
                grpc.StatusCode.INVALID_ARGUMENT, f"parameter {echo(name)} must be a bool, an integer or a string"
            )


def _model_of(request: web.Request) -> tuple[str, str]:
    return request.match_info["model"], request.match_info.get("version", "")


def _tensor_metadata(tensor: pb.ModelMetadataResponse.TensorMetadata) -> dict[str, Any]:
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}


def _json(body: dict[str, Any], context: HttpCallContext) -> web.Response:
    return web.json_response(body, headers=context.response_headers)


def _health(ok: bool, why_not: str, context: HttpCallContext) -> web.Response:
    """200 when `ok`, else 400 as Triton answers a probe that fails (its body is empty; ours says why)."""
    if ok:
        return web.Response(status=200, headers=context.response_headers)
    return error_response(400, why_not, context.response_headers)
