"""`python -m service`: the server's command line (docs/ARCHITECTURE.md contract 4). Every flag can also come from the
environment as RESNET_SERVE_<FLAG> (e.g. --metrics-port: RESNET_SERVE_METRICS_PORT); a flag given wins.
"""

import argparse
import asyncio
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from service.backends.base import BACKEND_CHOICES
from service.cpus import machine_threads
from service.log import configure_logging
from service.multiprocess.supervisor import default_frontends, supervise
from service.repository import DEFAULT_REPOSITORY, RepositoryError
from service.server import ServerSettings, ServerStartError, serve

logger = logging.getLogger(__name__)

ENV_PREFIX = "RESNET_SERVE_"
# The bearer token itself comes only from the environment: a flag's value would show in every process listing.
AUTH_TOKEN_ENV = ENV_PREFIX + "AUTH_TOKEN"
_DEFAULTS = ServerSettings()
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0-65535)")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not a non-negative integer")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # rejects NaN too
        raise argparse.ArgumentTypeError(f"{value} is not a non-negative number")
    return value


def _frontend_count(text: str) -> int | None:
    """ "auto" (None) or a non-negative count."""
    return None if text == "auto" else _non_negative_int(text)


def _optional_path(text: str) -> Path | None:
    return Path(text) if text else None


def _one_of(choices: Sequence[str]):
    """An argparse type that also checks defaults: argparse checks `choices` only on the command line, not in env."""

    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return parse


# (flag, type, default, help); the settings field and the environment variable follow from the flag's name.
_FLAGS = (
    ("--host", str, _DEFAULTS.host, "address to bind gRPC and HTTP (and metrics, unless --metrics-host is set)"),
    ("--port", _port, _DEFAULTS.port, "gRPC port (0: any free port)"),
    ("--metrics-host", str, _DEFAULTS.metrics_host, "address to bind the metrics endpoint; empty: --host"),
    ("--metrics-port", _port, _DEFAULTS.metrics_port, "Prometheus /metrics HTTP port; 0 disables it"),
    ("--http-port", _port, _DEFAULTS.http_port, "KServe v2 HTTP/REST port; 0 disables it"),
    (
        "--backend",
        _one_of(BACKEND_CHOICES),
        _DEFAULTS.backend,
        "auto, eager, fused or onnxruntime; auto: fused on CUDA, else onnxruntime",
    ),
    ("--model-repository", Path, DEFAULT_REPOSITORY, "model repository TOML file"),
    ("--grace-period", _non_negative_float, _DEFAULTS.grace_period_s, "seconds in-flight requests get at shutdown"),
    ("--max-message-bytes", _positive_int, _DEFAULTS.max_message_bytes, "largest request accepted, in bytes"),
    ("--max-pixels", _positive_int, _DEFAULTS.max_pixels, "largest image (width x height) accepted for decoding"),
    ("--queue-size", _positive_int, _DEFAULTS.queue_size, "requests a model's batch queue holds before refusing"),
    (
        "--decode-threads",
        _non_negative_int,
        _DEFAULTS.decode_threads,
        "threads decoding images and tensors; 0: one per CPU this process may run on",
    ),
    (
        "--large-image-pixels",
        _positive_int,
        _DEFAULTS.large_image_pixels,
        "images decoding to more pixels wait in a lane of their own (worker processes, a quarter of the decode "
        "threads), so they cannot hold up other clients' images",
    ),
    ("--log-level", _one_of(_LOG_LEVELS), "INFO", ", ".join(_LOG_LEVELS)),
    (
        "--frontends",
        _frontend_count,
        "auto",
        "frontend processes sharing the gRPC and HTTP ports beside one engine process that batches for them all; "
        "0: one process does everything; auto: one per two CPUs this process may use (affinity and cgroup quota), "
        "0 below 4",
    ),
    (
        "--kernel-cache-dir",
        _optional_path,
        "",
        "directory keeping compiled Triton kernels and autotune results across restarts, one subdirectory per card, "
        "driver, torch and Triton version; empty: results are not kept and every start re-tunes",
    ),
    (
        "--auth-token-file",
        _optional_path,
        "",
        "file whose first line is the bearer token every call but health and reflection must carry (or set "
        f"{AUTH_TOKEN_ENV}); empty: no authentication",
    ),
    # service/tls.py; README "Security".
    (
        "--tls-cert",
        _optional_path,
        "",
        "PEM certificate chain: gRPC and HTTP over TLS (with --tls-key); empty: plaintext",
    ),
    ("--tls-key", _optional_path, "", "PEM private key of --tls-cert"),
    ("--tls-client-ca", _optional_path, "", "PEM CA bundle: clients must present a certificate it signed (mutual TLS)"),
)


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.removeprefix("--").replace("-", "_").upper()


def build_parser(environ: Mapping[str, str] = os.environ) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="Serve ResNet image classification over gRPC (resnet.v1.Classifier and KServe v2).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for flag, type_, default, help_text in _FLAGS:
        env = env_name(flag)
        # A string default goes through `type` like a command-line value, so a bad env value is reported the same way.
        parser.add_argument(flag, type=type_, default=environ.get(env, str(default)), help=f"{help_text} [{env}]")
    return parser


def parse_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ
) -> tuple[ServerSettings, str]:
    """(settings, log level) from the command line and the environment."""
    args = build_parser(environ).parse_args(argv)
    settings = ServerSettings(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        http_port=args.http_port,
        backend=args.backend,
        model_repository=args.model_repository,
        grace_period_s=args.grace_period,
        max_message_bytes=args.max_message_bytes,
        max_pixels=args.max_pixels,
        queue_size=args.queue_size,
        decode_threads=args.decode_threads,
        large_image_pixels=args.large_image_pixels,
        kernel_cache_dir=args.kernel_cache_dir,
        auth_token_file=args.auth_token_file,
        auth_token=environ.get(AUTH_TOKEN_ENV) or None,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        frontends=args.frontends,
    )
    return settings, args.log_level


def main(argv: Sequence[str] | None = None) -> int:
    settings, log_level = parse_settings(argv)
    configure_logging(log_level)
    frontends = default_frontends(machine_threads()) if settings.frontends is None else settings.frontends
    try:
        if frontends:
            return supervise(settings, frontends, log_level)
        finished = asyncio.run(serve(settings))
    except (RepositoryError, ServerStartError) as error:
        logger.error("cannot serve: %s", error)
        return 1
    if not finished:
        # Every request has been answered and every batcher stopped; only a model load is left, in native code that
        # interpreter finalization would abort under. Nothing of it is kept, so exit at once with the normal code.
        logging.shutdown()
        os._exit(0)
    return 0
