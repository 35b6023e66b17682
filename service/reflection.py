"""gRPC server reflection, v1 (grpc.reflection.v1, what grpcurl and Postman ask first) beside v1alpha.

grpcio-reflection 1.81 ships only v1alpha. v1 is the same protocol under a new package name: its messages are
v1alpha's, field for field (grpc/reflection/v1/reflection.proto), so the v1 method is served by the v1alpha servicer,
its requests and answers (de)serialized as the v1alpha messages they are identical to on the wire.
"""

from collections.abc import Iterable

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME


def enable_server_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Both reflection services on `server`, each listing `service_names` and itself."""
    names = (*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
    servicer = reflection.aio.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                V1_SERVICE_NAME,
                {
                    "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                        servicer.ServerReflectionInfo,
                        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
                    )
                },
            ),
        )
    )
