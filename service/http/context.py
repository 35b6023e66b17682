"""An HTTP request seen by the gRPC servicer as its ServicerContext, so that both protocols run the same handlers.

The KServe handlers (service/servicers/kserve.py) run inside their CallScope (service/rpc.py): request id, metrics,
the mapping of errors to status codes. Handing them this context instead of a gRPC one runs an HTTP call through
exactly that path; the status CallScope aborts with comes back as HttpCallError, which service/http/errors.py maps to
Triton's HTTP status.
"""

from typing import NoReturn, cast

import grpc
from aiohttp import web

from service.http.errors import HttpCallError
from service.rpc import REQUEST_ID_KEY


class HttpCallContext:
    """The part of grpc.aio.ServicerContext that CallScope and the KServe handlers use. HTTP carries no deadline."""

    def __init__(self, request: web.Request) -> None:
        client_id = request.headers.get(REQUEST_ID_KEY)
        self._metadata = () if client_id is None else ((REQUEST_ID_KEY, client_id),)
        self.response_headers: dict[str, str] = {}

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def set_trailing_metadata(self, trailing_metadata: tuple[tuple[str, str], ...]) -> None:
        # CallScope sets the request id here; over HTTP it goes back as a response header.
        self.response_headers.update(trailing_metadata)

    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise HttpCallError(code, details, self.response_headers)

    def as_servicer_context(self) -> grpc.aio.ServicerContext:
        # The handlers are typed for gRPC's context; this object has every method they call (tests/service/test_http.py
        # runs each endpoint), not the streaming and auth ones a unary KServe handler has no use for.
        return cast(grpc.aio.ServicerContext, self)
