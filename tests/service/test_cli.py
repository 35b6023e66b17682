"""The server's command line (contract 4): defaults, every flag from the environment, flags winning over it; the
kernel cache directory reaching a started server."""

import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import triton

from kernels.autotune import Platform, driver_version
from service.cli import build_parser, env_name, parse_settings
from service.multiprocess.supervisor import default_frontends
from service.repository import DEFAULT_REPOSITORY
from service.server import ServerSettings
from tests.support.server import CPU_ONLY, REPO_ROOT, serving, write_repository

_DIGITS = {"arch": "digits_resnet", "input_size": 32, "backend": "eager"}


def test_contract_defaults():
    settings, log_level = parse_settings([], environ={})
    assert settings == ServerSettings()
    assert (settings.port, settings.metrics_port, settings.http_port, settings.backend) == (50051, 9100, 8000, "auto")
    assert settings.model_repository == DEFAULT_REPOSITORY
    assert settings.max_message_bytes == 16 * 1024 * 1024
    assert settings.kernel_cache_dir is None  # nothing kept unless asked
    assert log_level == "INFO"


def test_every_flag_comes_from_the_environment_and_a_flag_wins(tmp_path: Path):
    environ = {
        "RESNET_SERVE_HOST": "127.0.0.1",
        "RESNET_SERVE_PORT": "6000",
        "RESNET_SERVE_METRICS_PORT": "0",
        "RESNET_SERVE_METRICS_HOST": "127.0.0.2",
        "RESNET_SERVE_HTTP_PORT": "8001",
        "RESNET_SERVE_BACKEND": "eager",
        "RESNET_SERVE_MODEL_REPOSITORY": str(tmp_path / "r.toml"),
        "RESNET_SERVE_GRACE_PERIOD": "2.5",
        "RESNET_SERVE_MAX_MESSAGE_BYTES": "1000",
        "RESNET_SERVE_MAX_PIXELS": "77",
        "RESNET_SERVE_QUEUE_SIZE": "9",
        "RESNET_SERVE_DECODE_THREADS": "3",
        "RESNET_SERVE_LARGE_IMAGE_PIXELS": "5000",
        "RESNET_SERVE_LOG_LEVEL": "DEBUG",
        "RESNET_SERVE_KERNEL_CACHE_DIR": str(tmp_path / "kernels"),
        "RESNET_SERVE_AUTH_TOKEN_FILE": str(tmp_path / "token"),
        "RESNET_SERVE_TLS_CERT": str(tmp_path / "cert.pem"),
        "RESNET_SERVE_TLS_KEY": str(tmp_path / "key.pem"),
        "RESNET_SERVE_TLS_CLIENT_CA": str(tmp_path / "ca.pem"),
        "RESNET_SERVE_FRONTENDS": "3",
    }
    flags = [action.option_strings[0] for action in build_parser({})._actions if action.dest != "help"]
    assert sorted(env_name(flag) for flag in flags) == sorted(environ)

    settings, log_level = parse_settings([], environ=environ)
    assert settings == ServerSettings(
        host="127.0.0.1", port=6000, metrics_port=0, metrics_host="127.0.0.2", http_port=8001, backend="eager",
        model_repository=tmp_path / "r.toml", grace_period_s=2.5, max_message_bytes=1000, max_pixels=77, queue_size=9,
        decode_threads=3, large_image_pixels=5000, kernel_cache_dir=tmp_path / "kernels",
        auth_token_file=tmp_path / "token",
        tls_cert=tmp_path / "cert.pem", tls_key=tmp_path / "key.pem", tls_client_ca=tmp_path / "ca.pem",
        frontends=3,
    )  # fmt: skip
    assert log_level == "DEBUG"

    settings, _ = parse_settings(["--port", "7000", "--backend", "onnxruntime"], environ=environ)
    assert (settings.port, settings.backend, settings.queue_size) == (7000, "onnxruntime", 9)


@pytest.mark.parametrize(
    ("argv", "environ", "flag"),
    [
        ([], {"RESNET_SERVE_BACKEND": "tensorrt"}, "--backend"),
        ([], {"RESNET_SERVE_PORT": "70000"}, "--port"),
        ([], {"RESNET_SERVE_QUEUE_SIZE": "zero"}, "--queue-size"),
        (["--grace-period", "-1"], {}, "--grace-period"),
        (["--max-message-bytes", "0"], {}, "--max-message-bytes"),
        (["--backend", "cuda"], {}, "--backend"),
        (["--frontends", "-1"], {}, "--frontends"),
        ([], {"RESNET_SERVE_FRONTENDS": "many"}, "--frontends"),
    ],
)
def test_bad_values_are_refused(argv: list[str], environ: dict[str, str], flag: str, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as raised:
        parse_settings(argv, environ=environ)
    assert raised.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err


def test_frontends_auto_is_one_per_two_cpus_and_none_below_four():
    assert parse_settings([], environ={})[0].frontends is None  # auto
    assert parse_settings(["--frontends", "0"], environ={})[0].frontends == 0
    assert [default_frontends(cpus) for cpus in (1, 2, 3, 4, 16, 17)] == [0, 0, 0, 2, 8, 8]


def test_an_empty_kernel_cache_dir_keeps_nothing():
    settings, _ = parse_settings(["--kernel-cache-dir", ""], environ={"RESNET_SERVE_KERNEL_CACHE_DIR": "/x"})
    assert settings.kernel_cache_dir is None


def test_server_keeps_kernels_in_the_platform_directory_under_its_kernel_cache_dir(tmp_path: Path):
    repository = write_repository(tmp_path / "models.toml", {"digits": _DIGITS})
    env = {**CPU_ONLY, "RESNET_SERVE_KERNEL_CACHE_DIR": str(tmp_path / "kernels")}
    with serving(tmp_path, repository=repository, env=env) as server:
        pass
    platform = Platform("cpu", driver_version(), torch.__version__, triton.__version__)
    directory = tmp_path / "kernels" / platform.tag
    assert directory.is_dir()
    assert f"kernel cache (compiled kernels and autotune results): {directory}" in server.log()


def test_a_kernel_cache_dir_that_cannot_be_made_stops_the_server_with_the_reason(tmp_path: Path):
    (tmp_path / "file").write_text("")
    command = [sys.executable, "-m", "service", "--port", "0", "--metrics-port", "0"]
    command += ["--kernel-cache-dir", str(tmp_path / "file" / "kernels")]
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 1
    assert f"cannot serve: --kernel-cache-dir {tmp_path / 'file' / 'kernels'}" in completed.stderr


def test_the_metrics_endpoint_binds_its_own_host(tmp_path: Path):
    """gRPC on 127.0.0.1 and /metrics on 127.0.0.2 (loopback too): the metrics port answers on its host only."""
    repository = write_repository(tmp_path / "models.toml", {"digits": _DIGITS})
    with serving(tmp_path, "--metrics-host", "127.0.0.2", repository=repository, env=CPU_ONLY) as server:
        url = f"http://{{}}:{server.metrics_port}/metrics"
        with urllib.request.urlopen(url.format("127.0.0.2"), timeout=10) as response:
            assert b"resnet_requests" in response.read()
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(url.format("127.0.0.1"), timeout=10)
