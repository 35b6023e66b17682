"""TLS and mutual TLS (service/tls.py) with bearer-token authentication (service/auth.py) on the gRPC and HTTP ports
of `python -m service` on 127.0.0.1, through real TLS channels with a CA and certificates this module makes
(tests/support/certificates.py). tests/service/test_auth.py covers the token over plaintext gRPC.

Two servers: TLS with the token from --auth-token-file, and mutual TLS with the token from RESNET_SERVE_AUTH_TOKEN.
Each refusal is followed by a good call, which must still succeed.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import subprocess
import sys
import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from models import digits
from service._proto import classifier_pb2, classifier_pb2_grpc, grpc_service_pb2_grpc
from service._proto import grpc_service_pb2 as pb
from service.auth import is_authorized
from service.cli import parse_settings
from service.tls import TlsConfigError, load_tls
from tests.support.certificates import Certificates, make_certificates
from tests.support.kserve_http import HttpAnswer, call
from tests.support.server import CPU_ONLY, REPO_ROOT, ServerProcess, serving, write_repository

TOKEN = "t0ken-for-the-test.suite_1"
REPOSITORY = {"digits": {"arch": "digits_resnet", "weights": "pretrained", "input_size": 32, "backend": "eager"}}
GOOD = (("authorization", f"Bearer {TOKEN}"),)
REFUSED_METADATA = {
    "none": (),
    "wrong token": (("authorization", "Bearer not-the-token"),),
    "token prefix": (("authorization", f"Bearer {TOKEN[:-1]}"),),
    "other scheme": (("authorization", f"Basic {TOKEN}"),),
    "token without scheme": (("authorization", TOKEN),),
}
TIMEOUT_S = 30
REFUSALS = "resnet_requests_total"  # with code="UNAUTHENTICATED" and the method (HTTP: "HTTP")


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certificates"))


def channel_credentials(certificates: Certificates, *, with_client_cert: bool = False) -> grpc.ChannelCredentials:
    client = certificates.client
    return grpc.ssl_channel_credentials(
        root_certificates=certificates.ca.read_bytes(),
        private_key=client.key.read_bytes() if with_client_cert else None,
        certificate_chain=client.cert.read_bytes() if with_client_cert else None,
    )


def client_tls(certificates: Certificates, *, with_client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certificates.ca))
    if with_client_cert:
        context.load_cert_chain(str(certificates.client.cert), str(certificates.client.key))
    return context


@pytest.fixture(scope="module")
def tls(certificates: Certificates) -> ssl.SSLContext:
    return client_tls(certificates)


@pytest.fixture(scope="module")
def mtls(certificates: Certificates) -> ssl.SSLContext:
    return client_tls(certificates, with_client_cert=True)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, certificates: Certificates) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("tls")
    (directory / "token").write_text(TOKEN + "\n")  # as `echo` writes it
    args = ("--tls-cert", str(certificates.server.cert), "--tls-key", str(certificates.server.key))
    args += ("--auth-token-file", str(directory / "token"))
    repository = write_repository(directory / "models.toml", REPOSITORY)
    credentials = channel_credentials(certificates)
    with serving(directory, *args, repository=repository, env=CPU_ONLY, channel_credentials=credentials) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory: pytest.TempPathFactory, certificates: Certificates) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("mtls")
    args = ("--tls-cert", str(certificates.server.cert), "--tls-key", str(certificates.server.key))
    args += ("--tls-client-ca", str(certificates.ca))
    repository = write_repository(directory / "models.toml", REPOSITORY)
    env = {**CPU_ONLY, "RESNET_SERVE_AUTH_TOKEN": TOKEN}
    credentials = channel_credentials(certificates, with_client_cert=True)
    with serving(directory, *args, repository=repository, env=env, channel_credentials=credentials) as server:
        yield server


def classify(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = GOOD) -> classifier_pb2.ClassifyResponse:
    image = digits.to_png(np.full((8, 8), 200, dtype=np.uint8))
    request = classifier_pb2.ClassifyRequest(model="digits", image=image, top_k=3)
    return classifier_pb2_grpc.ClassifierStub(channel).Classify(request, metadata=metadata, timeout=TIMEOUT_S)


def assert_good_calls_work(server: ServerProcess, tls: ssl.SSLContext) -> None:
    """A Classify over gRPC and a model metadata over HTTP, both with the token; `tls`: the HTTP client's context."""
    with server.channel() as channel:
        assert len(classify(channel).predictions) == 3
    answer = call(f"{server.http_url}/v2/models/digits", headers=bearer(TOKEN), tls=tls)
    assert answer.status == 200, answer.body
    assert json.loads(answer.body)["name"] == "digits"


def refusals(server: ServerProcess, method: str) -> float:
    return server.metric(REFUSALS, method=method, code="UNAUTHENTICATED")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_unauthenticated_json(answer: HttpAnswer) -> None:
    assert answer.status == 401, answer.body
    assert answer.headers.get("WWW-Authenticate") == "Bearer"
    assert "bearer token" in answer.error()


# --- gRPC -----------------------------------------------------------------------------------------------------------


def test_grpc_over_tls_with_the_token_classifies_and_answers_kserve(tls_server: ServerProcess):
    with tls_server.channel() as channel:
        assert len(classify(channel).predictions) == 3
        inference = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        metadata = inference.ModelMetadata(pb.ModelMetadataRequest(name="digits"), metadata=GOOD, timeout=TIMEOUT_S)
    assert metadata.name == "digits"


@pytest.mark.parametrize("metadata", REFUSED_METADATA.values(), ids=REFUSED_METADATA.keys())
def test_grpc_calls_without_the_right_token_are_unauthenticated_and_harm_no_one(
    tls_server: ServerProcess, metadata: tuple[tuple[str, str], ...], tls: ssl.SSLContext
):
    refused_before = refusals(tls_server, "Classify") + refusals(tls_server, "ServerMetadata")
    with tls_server.channel() as channel:
        with pytest.raises(grpc.RpcError) as refused:
            classify(channel, metadata)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "bearer token" in refused.value.details()
        inference = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            inference.ServerMetadata(pb.ServerMetadataRequest(), metadata=metadata, timeout=TIMEOUT_S)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert refusals(tls_server, "Classify") + refusals(tls_server, "ServerMetadata") == refused_before + 2
    assert_good_calls_work(tls_server, tls)


def test_a_streaming_call_without_the_token_is_unauthenticated(tls_server: ServerProcess):
    with tls_server.channel() as channel:
        inference = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        responses = inference.ModelStreamInfer(iter([pb.ModelInferRequest(model_name="digits")]), timeout=TIMEOUT_S)
        with pytest.raises(grpc.RpcError) as refused:
            list(responses)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_an_unparsable_request_without_the_token_is_unauthenticated_not_parsed(tls_server: ServerProcess):
    """The refusal comes before deserialization: garbage bytes get UNAUTHENTICATED, not a parsing error."""
    with tls_server.channel() as channel:
        raw = channel.unary_unary("/resnet.v1.Classifier/Classify")
        with pytest.raises(grpc.RpcError) as refused:
            raw(b"\xff\xff\xff not a protobuf", timeout=TIMEOUT_S)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_and_reflection_need_no_token(tls_server: ServerProcess):
    with tls_server.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT_S
        )
        services = {service.name for answer in answers for service in answer.list_services_response.service}
    assert "resnet.v1.Classifier" in services


def test_a_plaintext_grpc_client_cannot_call_the_tls_port(tls_server: ServerProcess, tls: ssl.SSLContext):
    with grpc.insecure_channel(tls_server.address) as channel, pytest.raises(grpc.RpcError) as refused:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert_good_calls_work(tls_server, tls)


def test_a_client_that_does_not_trust_the_servers_ca_refuses_it(tls_server: ServerProcess, certificates: Certificates):
    untrusting = grpc.ssl_channel_credentials(root_certificates=certificates.other_ca.read_bytes())
    with grpc.secure_channel(tls_server.address, untrusting) as channel, pytest.raises(grpc.RpcError) as refused:
        classify(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    untrusting_http = ssl.create_default_context(cafile=str(certificates.other_ca))
    with pytest.raises(urllib.error.URLError) as refused_http:
        call(f"{tls_server.http_url}/v2/health/live", tls=untrusting_http)
    assert isinstance(refused_http.value.reason, ssl.SSLCertVerificationError)


# --- HTTP -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, bearer("not-the-token"), {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN}],
    ids=["none", "wrong token", "other scheme", "token without scheme"],
)
@pytest.mark.parametrize("path", ["/v2", "/v2/models/digits", "/v2/models/digits/infer", "/v2/no/such/path"])
def test_http_routes_without_the_right_token_are_401_json(
    tls_server: ServerProcess, headers: dict, path: str, tls: ssl.SSLContext
):
    method = "POST" if path.endswith("/infer") else "GET"
    body = b"{}" if method == "POST" else None
    refused_before = refusals(tls_server, "HTTP")
    answer = call(tls_server.http_url + path, body, headers, method=method, tls=tls)
    assert_unauthenticated_json(answer)
    assert refusals(tls_server, "HTTP") == refused_before + 1
    assert_good_calls_work(tls_server, tls)


@pytest.mark.parametrize(
    "path", ["/v2/health/../models/digits", "/v2/health/%2e%2e/models/digits", "/v2/health/live/../../../v2"]
)
def test_a_health_prefix_does_not_open_other_routes(tls_server: ServerProcess, tls: ssl.SSLContext, path: str):
    """Sent as written (http.client does not normalize): whatever aiohttp routes it to, only health is open."""
    connection = http.client.HTTPSConnection("127.0.0.1", tls_server.http_port, context=tls, timeout=TIMEOUT_S)
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        status, body = answer.status, answer.read()
    finally:
        connection.close()
    assert status in (401, 404), body


def test_http_infer_over_tls_with_the_token(tls_server: ServerProcess, tls: ssl.SSLContext):
    inputs = np.zeros((1, 3, 32, 32), dtype=np.float32)
    tensor = {"name": "input", "datatype": "FP32", "shape": list(inputs.shape), "data": inputs.ravel().tolist()}
    body = json.dumps({"inputs": [tensor]}).encode()
    headers = {**bearer(TOKEN), "Content-Type": "application/json"}
    answer = call(f"{tls_server.http_url}/v2/models/digits/infer", body, headers, tls=tls)
    assert answer.status == 200, answer.body
    (output,) = json.loads(answer.body)["outputs"]
    assert output["shape"] == [1, 10]


@pytest.mark.parametrize("path", ["/v2/health/live", "/v2/health/ready"])
def test_http_health_needs_no_token(tls_server: ServerProcess, path: str, tls: ssl.SSLContext):
    assert call(tls_server.http_url + path, tls=tls).status == 200


def test_metrics_stay_open_on_their_own_plaintext_port(tls_server: ServerProcess):
    assert "resnet_" in tls_server.metrics_text()


def test_a_plaintext_http_client_cannot_call_the_tls_port(tls_server: ServerProcess, tls: ssl.SSLContext):
    with pytest.raises(OSError):  # the server drops a connection that does not start with a TLS handshake
        call(f"http://127.0.0.1:{tls_server.http_port}/v2/health/live")
    assert_good_calls_work(tls_server, tls)


# --- mutual TLS and the token from the environment ------------------------------------------------------------------


def test_mutual_tls_with_a_client_certificate_and_the_environments_token(
    mtls_server: ServerProcess, mtls: ssl.SSLContext
):
    assert_good_calls_work(mtls_server, mtls)
    with mtls_server.channel() as channel, pytest.raises(grpc.RpcError) as refused:
        classify(channel, metadata=())
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_mutual_tls_refuses_a_client_without_a_certificate(
    mtls_server: ServerProcess, certificates: Certificates, mtls: ssl.SSLContext
):
    without_cert = channel_credentials(certificates)
    with grpc.secure_channel(mtls_server.address, without_cert) as channel, pytest.raises(grpc.RpcError) as refused:
        classify(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(OSError):  # ssl.SSLError, or the connection reset when TLS 1.3 reports the refusal late
        call(f"{mtls_server.http_url}/v2/health/live", tls=client_tls(certificates))
    assert_good_calls_work(mtls_server, mtls)


def test_tritonclient_over_mutual_tls_with_the_token(mtls_server: ServerProcess, certificates: Certificates):
    client = certificates.client
    probe = REPO_ROOT / "tests" / "support" / "tritonclient_tls_probe.py"
    command = [sys.executable, str(probe), mtls_server.address, str(certificates.ca), str(client.cert), str(client.key)]
    completed = subprocess.run([*command, TOKEN], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout) == {"without_token": "StatusCode.UNAUTHENTICATED", "logits_shape": [1, 10]}


# --- settings -------------------------------------------------------------------------------------------------------


def test_tls_is_off_by_default():
    settings, _ = parse_settings([], environ={})
    assert (settings.tls_cert, settings.tls_key, settings.tls_client_ca) == (None, None, None)
    assert load_tls(None, None, None) is None


@pytest.mark.parametrize(
    ("authorization", "authorized"),
    [
        (f"Bearer {TOKEN}", True),
        (f"bearer {TOKEN}", True),
        (f"Bearer {TOKEN}x", False),
        ("Bearer ", False),
        (TOKEN, False),
        (None, False),
    ],
)
def test_is_authorized(authorization: str | None, authorized: bool):
    assert is_authorized(authorization, TOKEN.encode()) is authorized


# (cert, key, client CA) from the certificates and a directory holding a file "not-pem", what the error says
BAD_FILES: dict[str, tuple[Callable[[Certificates, Path], tuple[Path | None, Path | None, Path | None]], str]] = {
    "cert without key": (lambda c, _: (c.server.cert, None, None), "--tls-cert and --tls-key go together"),
    "client CA without TLS": (lambda c, _: (None, None, c.ca), "--tls-client-ca needs --tls-cert"),
    "missing key file": (lambda c, d: (c.server.cert, d / "absent.pem", None), "absent.pem: No such file"),
    "key of another cert": (lambda c, _: (c.server.cert, c.client.key, None), "not a PEM certificate and its key"),
    "CA that is not PEM": (lambda c, d: (c.server.cert, c.server.key, d / "not-pem"), "not a PEM CA bundle"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_unusable_tls_files_are_refused_with_the_flag_and_file(certificates: Certificates, tmp_path: Path, case: str):
    (tmp_path / "not-pem").write_text("not a certificate\n")
    files, message = BAD_FILES[case]
    with pytest.raises(TlsConfigError) as refused:
        load_tls(*files(certificates, tmp_path))
    assert message in str(refused.value)


def test_the_server_refuses_to_start_with_an_unusable_certificate(certificates: Certificates, tmp_path: Path):
    repository = write_repository(tmp_path / "models.toml", REPOSITORY)
    command = [sys.executable, "-m", "service", "--port", "0", "--metrics-port", "0", "--http-port", "0"]
    command += ["--model-repository", str(repository), "--tls-cert", str(certificates.server.cert)]
    env = {**os.environ, **CPU_ONLY}
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert completed.returncode == 1
    assert "cannot serve: --tls-cert and --tls-key go together" in completed.stderr


# `python -m service.healthcheck` (the container's HEALTHCHECK) with the server's TLS settings in its environment.
def healthcheck(server: ServerProcess, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """The healthcheck's exit code and log, in an environment holding only `env` of the server's settings."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("RESNET_SERVE_")}
    command = [sys.executable, "-m", "service.healthcheck", "--address", server.address, *args]
    return subprocess.run(
        command, cwd=REPO_ROOT, env={**environment, **env}, capture_output=True, text=True, timeout=TIMEOUT_S
    )


def server_tls_env(certificates: Certificates, *, mutual: bool = False) -> dict[str, str]:
    """What the server's container sets (RESNET_SERVE_TLS_*) and nothing else."""
    env = {"RESNET_SERVE_TLS_CERT": str(certificates.server.cert), "RESNET_SERVE_TLS_KEY": str(certificates.server.key)}
    if mutual:
        env["RESNET_SERVE_TLS_CLIENT_CA"] = str(certificates.ca)
    return env


def test_the_healthcheck_speaks_tls_with_the_servers_settings(tls_server: ServerProcess, certificates: Certificates):
    answered = healthcheck(tls_server, server_tls_env(certificates))  # no token: health is exempt
    assert answered.returncode == 0 and "SERVING" in answered.stderr, answered.stderr
    plaintext = healthcheck(tls_server, {})
    assert plaintext.returncode == 1 and "failed: UNAVAILABLE" in plaintext.stderr, plaintext.stderr


def test_the_healthcheck_checks_the_servers_name_and_ca(tls_server: ServerProcess, certificates: Certificates):
    env = server_tls_env(certificates)
    assert healthcheck(tls_server, env, "--tls-server-name", "localhost").returncode == 0  # in the certificate
    assert healthcheck(tls_server, env, "--tls-server-name", "other.example").returncode == 1
    # Instead of the server's own certificate, the CA that signed it; or one that did not.
    assert healthcheck(tls_server, {**env, "RESNET_SERVE_HEALTHCHECK_TLS_CA": str(certificates.ca)}).returncode == 0
    untrusted = healthcheck(tls_server, {**env, "RESNET_SERVE_HEALTHCHECK_TLS_CA": str(certificates.other_ca)})
    assert untrusted.returncode == 1 and "failed: UNAVAILABLE" in untrusted.stderr, untrusted.stderr


def test_the_healthcheck_presents_a_client_certificate_for_mutual_tls(
    mtls_server: ServerProcess, certificates: Certificates
):
    env = server_tls_env(certificates, mutual=True)
    without_cert = healthcheck(mtls_server, env)
    assert without_cert.returncode == 1 and "failed: UNAVAILABLE" in without_cert.stderr, without_cert.stderr
    client = {
        "RESNET_SERVE_HEALTHCHECK_TLS_CLIENT_CERT": str(certificates.client.cert),
        "RESNET_SERVE_HEALTHCHECK_TLS_CLIENT_KEY": str(certificates.client.key),
    }
    answered = healthcheck(mtls_server, {**env, **client})
    assert answered.returncode == 0 and "SERVING" in answered.stderr, answered.stderr


def test_the_healthcheck_refuses_half_a_client_identity_and_unreadable_files(
    tls_server: ServerProcess, certificates: Certificates, tmp_path: Path
):
    env = server_tls_env(certificates)
    half = healthcheck(tls_server, env, "--tls-client-cert", str(certificates.client.cert))
    assert half.returncode == 2 and "go together" in half.stderr, half.stderr
    missing = healthcheck(tls_server, {**env, "RESNET_SERVE_HEALTHCHECK_TLS_CA": str(tmp_path / "absent.pem")})
    assert missing.returncode == 1 and "absent.pem" in missing.stderr, missing.stderr
