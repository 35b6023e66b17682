"""Bearer-token authentication for every gRPC method and HTTP route but health (off unless a token is configured).

A client sends `authorization: Bearer TOKEN` (gRPC metadata or an HTTP header); a call without it, or with another
token, gets UNAUTHENTICATED (HTTP 401) before any handler runs. grpc.health.v1 and HTTP /v2/health/* stay open, since
load balancers and container healthchecks probe them without credentials, and so does gRPC reflection, which only
describes the public protos (grpcurl lists the services without a token); /metrics is a separate HTTP port and is not
covered either.
"""

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web

from service.http.errors import error_response

EXEMPT_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
)
HTTP_EXEMPT_PREFIX = "/v2/health/"
_BEARER = "bearer "


class AuthConfigError(ValueError):
    """The token file cannot be read or holds no token."""


def load_token(token: str | None, token_file: Path | None) -> str | None:
    """The token from `token` (the environment) or else the first line of `token_file`; None: authentication off."""
    if token:
        return token
    if token_file is None:
        return None
    try:
        text = token_file.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise AuthConfigError(f"cannot read the auth token file {token_file}: {error}") from error
    if not text:
        raise AuthConfigError(f"the auth token file {token_file} is empty")
    return text.splitlines()[0].strip()


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """`on_refused(method)` is called for each call refused, with the method's short name (e.g. "Classify")."""

    def __init__(self, token: str, on_refused: Callable[[str], None]) -> None:
        self._expected = token.encode()
        self._on_refused = on_refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(EXEMPT_PREFIXES) or self._authorized(handler_call_details):
            return handler
        self._on_refused(method.rsplit("/", 1)[-1])
        return _refusing(handler)

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == "authorization" and isinstance(value, str):
                return is_authorized(value, self._expected)
        return False


def is_authorized(authorization: str | None, expected: bytes) -> bool:
    """`authorization` is "Bearer <expected>" (the scheme in any case, as RFC 6750 allows)."""
    if authorization is None or authorization[: len(_BEARER)].lower() != _BEARER:
        return False
    # Constant time: how long a comparison takes must not tell how much of a guess was right.
    return hmac.compare_digest(authorization[len(_BEARER) :].strip().encode(), expected)


def bearer_token_middleware(token: str, on_refused: Callable[[], None]) -> Any:
    """aiohttp middleware: every route but /v2/health/* needs `Authorization: Bearer <token>`, else 401 with Triton's
    {"error": ...} body. It runs inside json_errors, before routing's 404: a client without the token learns nothing
    about which paths exist."""
    expected = token.encode()

    @web.middleware
    async def require_bearer_token(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path.startswith(HTTP_EXEMPT_PREFIX) or is_authorized(request.headers.get("Authorization"), expected):
            return await handler(request)
        on_refused()
        message = "missing or wrong bearer token: send the header 'Authorization: Bearer <token>'"
        return error_response(401, message, {"WWW-Authenticate": "Bearer"})

    return require_bearer_token


async def _refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (metadata authorization)")


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind that refuses the call."""
    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_refuse, **serializers)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_refuse, **serializers)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_refuse, **serializers)
    return grpc.unary_unary_rpc_method_handler(_refuse, **serializers)
