"""Registers a servicer so that its unary RPCs read their request as bytes, parsed inside our error mapping.

grpc's generated `add_*Servicer_to_server` parses each request before any code of ours runs: undecodable bytes are
answered UNKNOWN with a Python class in the message (and never reach /metrics), and a unary call whose client sends
no message is never answered at all (grpc.aio's unary path waits for a message that does not come). Here each unary
method a servicer implements with `@rpc_handler` is registered as client-streaming with no deserializer: the client
sees an ordinary unary method (the wire format is the same), we read up to two messages, and `@rpc_handler` parses
them (service/rpc.py `WireRequest`). Every other method (streaming, or not decorated) is registered as the generated
code would, from the same service descriptor.
"""

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from service.rpc import WireRequest, is_scoped

# (client streaming, server streaming) -> grpc's handler factory for that kind of method.
_HANDLER_OF_KIND: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_servicer(server: grpc.aio.Server, service: ServiceDescriptor, servicer: object) -> None:
    """Serves every method of `service` from `servicer` (a subclass of the generated servicer base, whose methods
    answer UNIMPLEMENTED for what it does not override)."""
    handlers = {method.name: _handler(method, getattr(servicer, method.name)) for method in service.methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def _handler(method: MethodDescriptor, behaviour: Any) -> grpc.RpcMethodHandler:
    request_type = GetMessageClass(method.input_type)
    serialize = GetMessageClass(method.output_type).SerializeToString
    unary = not (method.client_streaming or method.server_streaming)
    if unary and is_scoped(behaviour):
        # No deserializer: bytes, parsed by the handler's scope.
        return grpc.stream_unary_rpc_method_handler(
            _reading_wire_request(behaviour, request_type), response_serializer=serialize
        )
    kind = _HANDLER_OF_KIND[(method.client_streaming, method.server_streaming)]
    return kind(behaviour, request_deserializer=request_type.FromString, response_serializer=serialize)


def _reading_wire_request(behaviour: Any, message_type: type[Message]) -> Any:
    async def handle(messages: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
        received: list[bytes] = []
        async for message in messages:
            received.append(message)
            if len(received) == 2:  # already one too many; reading on would let a client stream unbounded bytes
                break
        return await behaviour(WireRequest(received, message_type), context)

    return handle
