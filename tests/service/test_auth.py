"""Bearer-token authentication over a real channel to `python -m service` on 127.0.0.1: every call but health needs
`authorization: Bearer TOKEN`; health and /metrics stay open. The token comes from the environment or a file."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from models import digits
from service._proto import classifier_pb2, classifier_pb2_grpc, grpc_service_pb2_grpc
from service._proto import grpc_service_pb2 as pb
from service.auth import AuthConfigError, load_token
from tests.support.server import CPU_ONLY, ServerProcess, serving, write_repository

TOKEN = "s3cret-token-for-the-test"
_DIGITS = {"arch": "digits_resnet", "weights": "pretrained", "input_size": digits.INPUT_SIZE, "backend": "eager"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    directory = tmp_path_factory.mktemp("auth")
    repository = write_repository(directory / "models.toml", {"digits": _DIGITS})
    token_file = directory / "token"
    token_file.write_text(TOKEN + "\n")
    # HTTP off: this module is about gRPC; tests/service/test_security.py covers the token on HTTP.
    args = ("--auth-token-file", str(token_file), "--http-port", "0")
    with serving(directory, *args, repository=repository, env=CPU_ONLY) as running:
        yield running


def classify(server: ServerProcess, metadata: tuple[tuple[str, str], ...]) -> classifier_pb2.ClassifyResponse:
    image = digits.to_png(digits.load_split()[1].images[0])
    with server.channel() as channel:
        return classifier_pb2_grpc.ClassifierStub(channel).Classify(
            classifier_pb2.ClassifyRequest(model="digits", image=image), metadata=metadata, timeout=30
        )


@pytest.mark.parametrize(
    "metadata",
    [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),), (("x-token", TOKEN),)],
    ids=["none", "wrong token", "no Bearer scheme", "other header"],
)
def test_calls_without_the_token_are_unauthenticated(server, metadata):
    counted_before = server.metric("resnet_requests_total", method="Classify", code="UNAUTHENTICATED")
    with pytest.raises(grpc.RpcError) as raised:
        classify(server, metadata)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert server.metric("resnet_requests_total", method="Classify", code="UNAUTHENTICATED") == counted_before + 1
    with server.channel() as channel, pytest.raises(grpc.RpcError) as raised:
        grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerReady(pb.ServerReadyRequest(), metadata=metadata)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_token_is_served_and_health_and_metrics_are_open(server):
    assert classify(server, (("authorization", f"Bearer {TOKEN}"),)).predictions
    with server.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert server.metric("resnet_requests_total", method="Classify", code="OK") == 1


def test_the_token_comes_from_the_environment_before_the_file(tmp_path: Path):
    token_file = tmp_path / "token"
    token_file.write_text("from-file\nignored\n")
    assert load_token("from-env", token_file) == "from-env"
    assert load_token(None, token_file) == "from-file"
    assert load_token(None, None) is None
    token_file.write_text("\n")
    with pytest.raises(AuthConfigError, match="is empty"):
        load_token(None, token_file)
    with pytest.raises(AuthConfigError, match="cannot read"):
        load_token(None, tmp_path / "absent")
