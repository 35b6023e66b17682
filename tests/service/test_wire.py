"""service/wire.py on a real grpc.aio server on 127.0.0.1, in process: `@rpc_handler` unary methods read bytes and
parse them in their scope; every other method is registered as grpc's generated code would, not dropped."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from service._proto import classifier_pb2, classifier_pb2_grpc
from service.metrics import ServiceMetrics
from service.rpc import CallScope, rpc_handler
from service.wire import add_servicer

CLASSIFIER = classifier_pb2.DESCRIPTOR.services_by_name["Classifier"]


class HalfDecorated(classifier_pb2_grpc.ClassifierServicer):
    """Classify through the scope; ListModels a plain method, as a servicer may leave one."""

    def __init__(self) -> None:
        self.call_scope = CallScope(ServiceMetrics(), lambda name: True)

    @rpc_handler(lambda request: request.model)
    async def Classify(self, request, context):
        return classifier_pb2.ClassifyResponse(model=request.model)

    async def ListModels(self, request, context):
        return classifier_pb2.ListModelsResponse(models=[classifier_pb2.ModelInfo(name=type(request).__name__)])


async def _calls() -> tuple[str, str, grpc.StatusCode]:
    server = grpc.aio.server()
    add_servicer(server, CLASSIFIER, HalfDecorated())
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = classifier_pb2_grpc.ClassifierStub(channel)
            classified = await stub.Classify(classifier_pb2.ClassifyRequest(model="m"), timeout=10)
            listed = await stub.ListModels(classifier_pb2.ListModelsRequest(), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await channel.unary_unary("/resnet.v1.Classifier/Classify")(b"\xff\xff", timeout=10)
            return classified.model, listed.models[0].name, raised.value.code()
    finally:
        await server.stop(0)


def test_scoped_methods_parse_bytes_and_the_others_are_served_as_generated():
    classified, listed, garbage = asyncio.run(_calls())
    assert classified == "m"
    assert listed == "ListModelsRequest"  # parsed by grpc, as the generated registration does
    assert garbage == grpc.StatusCode.INVALID_ARGUMENT
