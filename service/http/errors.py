"""gRPC status codes as the HTTP statuses Triton answers with, and errors as Triton's JSON body {"error": "..."}.

Triton's http_server.cc maps its errors so: NOT_FOUND 404, UNAVAILABLE 503, UNSUPPORTED 501, INTERNAL 500, everything
else (invalid argument, cancelled, ...) 400. Triton answers a full queue and an expired queue timeout with UNAVAILABLE,
so our RESOURCE_EXHAUSTED (queue full) and DEADLINE_EXCEEDED are 503 too. A body over the size limit is HTTP's 413.
"""

import logging
from collections.abc import Awaitable, Callable

import grpc
from aiohttp import web

logger = logging.getLogger(__name__)

HTTP_STATUS_OF_CODE: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.CANCELLED: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 503,
}


# What an application serves, in words, for the message of a 404 (every application using json_errors sets it).
ENDPOINTS = web.AppKey("endpoints", str)


class HttpCallError(Exception):
    """A call that ends with `code` (a gRPC status, mapped by HTTP_STATUS_OF_CODE) and `message`."""

    def __init__(self, code: grpc.StatusCode, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.headers = headers or {}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every failure as {"error": ...}: our handlers' HttpCallError, aiohttp's own (unknown path 404, wrong method 405,
    body too large 413), and a bug of ours (500, logged with its traceback)."""
    try:
        return await handler(request)
    except HttpCallError as error:
        return error_response(HTTP_STATUS_OF_CODE.get(error.code, 500), str(error), error.headers)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        allow = {"Allow": error.headers["Allow"]} if "Allow" in error.headers else None
        return error_response(error.status, _message(request, error, request.app[ENDPOINTS]), headers=allow)
    except Exception:
        logger.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal error")


def _message(request: web.Request, error: web.HTTPException, endpoints: str) -> str:
    if error.status == 404:
        return f"no endpoint {request.path!r}; {endpoints}"
    if error.status == 405:
        return f"{request.method} is not allowed on {request.path!r}; allowed: {error.headers.get('Allow', '')}"
    if error.status == 413:
        return f"{error.text} (the server's --max-message-bytes, as for gRPC)"
    return error.text or error.reason
