"""Registers a servicer's unary RPCs so that their request is read as bytes and parsed inside our error mapping.

grpc's generated `add_*Servicer_to_server` parses each request before any code of ours runs: undecodable bytes are
answered UNKNOWN with a Python class in the message (and never reach /metrics), and a unary call whose client sends
no message is never answered at all (grpc.aio's unary path waits for a message that does not come). Here each unary
method is registered as client-streaming with no deserializer: the client sees an ordinary unary method (the wire
format is the same), we read up to two messages, and `@rpc_handler` parses them (service/rpc.py `WireRequest`).
Only the methods a servicer implements with `@rpc_handler` are registered; grpc answers UNIMPLEMENTED for the rest.
"""

from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass

from service.rpc import WireRequest, is_scoped


def add_unary_servicer(server: grpc.aio.Server, service: ServiceDescriptor, servicer: object) -> None:
    """Serves `service`'s unary methods that `servicer` implements with `@rpc_handler`."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        behaviour = getattr(servicer, method.name, None)
        if method.client_streaming or method.server_streaming or not is_scoped(behaviour):
            continue
        handlers[method.name] = grpc.stream_unary_rpc_method_handler(
            _reading_wire_request(behaviour, GetMessageClass(method.input_type)),
            request_deserializer=None,  # bytes: parsed by the handler's scope
            response_serializer=GetMessageClass(method.output_type).SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def _reading_wire_request(behaviour: Any, message_type: Any) -> Any:
    async def handle(messages: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
        received: list[bytes] = []
        async for message in messages:
            received.append(message)
            if len(received) == 2:  # already one too many; reading on would let a client stream unbounded bytes
                break
        return await behaviour(WireRequest(received, message_type), context)

    return handle
