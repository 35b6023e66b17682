"""The gRPC server: Classifier, KServe v2 inference, health, reflection (v1, v1alpha) on one port; KServe v2 over
HTTP/REST on another (service/http), and /metrics on a third, all on one event loop.

Lifecycle: `start()` binds and answers at once while models load in the background (health NOT_SERVING until every
model has settled and one is ready); `stop(grace)` turns health NOT_SERVING, refuses new RPCs, lets in-flight ones
finish within `grace` seconds, then drains the batchers. `serve()` runs that between start and SIGTERM/SIGINT.
"""

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import models.kernel_cache
from service._proto import classifier_pb2, grpc_service_pb2
from service.auth import AuthConfigError, BearerTokenInterceptor, bearer_token_middleware, load_token
from service.backends.base import AUTO_BACKEND
from service.cpus import machine_threads
from service.decoding import ImageDecoder
from service.health import HealthServicer
from service.http.app import kserve_http_app
from service.http.site import start_site
from service.metrics import ServiceMetrics
from service.model_loader import load_model_parts
from service.model_manager import LoadParts, ModelManager
from service.reflection import enable_server_reflection
from service.repository import DEFAULT_REPOSITORY, ModelConfig, load_repository
from service.rpc import CallScope
from service.served_models import ServedModels
from service.servicers.classifier import ClassifierServicer
from service.servicers.kserve import InferenceServicer
from service.tls import TlsConfigError, load_tls
from service.wire import add_servicer

logger = logging.getLogger(__name__)

_CLASSIFIER = classifier_pb2.DESCRIPTOR.services_by_name["Classifier"]
_INFERENCE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
CLASSIFIER_SERVICE = _CLASSIFIER.full_name
INFERENCE_SERVICE = _INFERENCE.full_name
# Identity only: gRPC inflates a compressed message whole before it checks the size limit, so a 254 KiB gzip request
# cost 250 MiB of memory before being refused. Compressed requests get UNIMPLEMENTED ("Compression algorithm 'gzip'
# is disabled") before their message is read; clients that compress by default negotiate identity from the
# grpc-accept-encoding the server sends.
_IDENTITY_ONLY = 1
# "" is the whole server, as grpc.health.v1 defines it.
HEALTH_SERVICES = ("", CLASSIFIER_SERVICE, INFERENCE_SERVICE)
# The method label of HTTP requests refused for the token (resnet_requests_total{code="UNAUTHENTICATED"}).
HTTP_REFUSED_METHOD = "HTTP"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

# (metrics, on_change) -> the models a server serves; by default a ModelManager loading them in this process.
MakeModels = Callable[[ServiceMetrics, Callable[[], Awaitable[None]]], ServedModels]


class ServerStartError(RuntimeError):
    """A port could not be bound, the kernel cache directory could not be made, or the auth token or TLS files read."""


@dataclass(frozen=True)
class ServerSettings:
    """Everything the command line sets (service/cli.py)."""

    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int = 9100  # 0: no metrics endpoint
    metrics_host: str = ""  # "": the gRPC host; a scraper's network need not be the clients'
    http_port: int = 8000  # KServe v2 over HTTP/REST; 0: none
    backend: str = AUTO_BACKEND
    model_repository: Path = DEFAULT_REPOSITORY
    grace_period_s: float = 10.0
    max_message_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 40_000_000
    queue_size: int = 256
    decode_threads: int = 0  # 0: one per CPU this process may run on (service/cpus.py machine_threads)
    large_image_pixels: int = 4_000_000  # decoding more goes to the large-image lane (service/decoding.py)
    kernel_cache_dir: Path | None = None  # Triton's compiled kernels and autotune results; None: not kept
    auth_token_file: Path | None = None  # service/auth.py; neither this nor auth_token: authentication off
    auth_token: str | None = field(default=None, repr=False)  # from the environment only, never a flag (ps shows argv)
    # service/tls.py: both set, gRPC and HTTP speak TLS; tls_client_ca set too, clients need a certificate it signed.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # Frontend processes beside one engine process (service/multiprocess/); 0: this one process does everything;
    # None: as many as the machine's CPUs suit (service/multiprocess/supervisor.py default_frontends).
    frontends: int | None = None


def local_models(
    settings: ServerSettings,
    configs: Sequence[ModelConfig],
    metrics: ServiceMetrics,
    on_change: Callable[[], Awaitable[None]],
    load_parts: LoadParts = load_model_parts,
) -> ModelManager:
    """The models loaded and batched in this process, with the settings' defaults for what their entries leave out."""
    return ModelManager(
        configs,
        default_backend=settings.backend,
        default_queue_size=settings.queue_size,
        metrics=metrics,
        on_change=on_change,
        load_parts=load_parts,
    )


class InferenceServer:
    def __init__(
        self,
        settings: ServerSettings,
        configs: Sequence[ModelConfig],
        load_parts: LoadParts = load_model_parts,
        *,
        make_models: MakeModels | None = None,
        share_ports: bool = False,
    ) -> None:
        """`load_parts` loads one model (service/model_loader.py); tests serve stand-in backends through it.
        `make_models` replaces the models loaded here (a frontend's mirror of the engine's); `share_ports`: bind the
        gRPC and HTTP ports with SO_REUSEPORT, beside the other frontends."""
        self._settings = settings
        self._share_ports = share_ports
        self.metrics = ServiceMetrics()
        self.models: ServedModels
        if make_models is None:
            self.models = local_models(settings, configs, self.metrics, self._refresh_health, load_parts)
        else:
            self.models = make_models(self.metrics, self._refresh_health)
        self._health = HealthServicer()
        self._draining = False
        self._server: grpc.aio.Server | None = None
        self._decode_executor: ThreadPoolExecutor | None = None
        self._image_decoder: ImageDecoder | None = None
        self._http_runners: list[web.AppRunner] = []  # the KServe HTTP port and /metrics

    def is_ready(self) -> bool:
        """Every model settled, one ready, and every model the repository marks `required` ready."""
        models = self.models
        return not self._draining and models.settled and models.any_ready and not models.required_not_ready

    async def start(self) -> int:
        """Binds, starts serving and starts loading the models; returns the bound gRPC port."""
        settings = self._settings
        try:
            token = load_token(settings.auth_token, settings.auth_token_file)
            tls = load_tls(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        except (AuthConfigError, TlsConfigError) as error:
            raise ServerStartError(str(error)) from error
        for service_name in HEALTH_SERVICES:
            await self._health.set(service_name, health_pb2.HealthCheckResponse.NOT_SERVING)
        decode_threads = settings.decode_threads or machine_threads()
        self._decode_executor = ThreadPoolExecutor(decode_threads, thread_name_prefix="decode")
        self._image_decoder = ImageDecoder(
            self._decode_executor,
            threads=decode_threads,
            max_pixels=settings.max_pixels,
            large_image_pixels=settings.large_image_pixels,
        )
        logger.info(
            "%d decode threads; images over %d pixels decode in their own lane",
            decode_threads,
            settings.large_image_pixels,
        )
        scope = CallScope(self.metrics, self.models.is_known)
        server = grpc.aio.server(
            interceptors=[BearerTokenInterceptor(token, self._count_unauthenticated)] if token else [],
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                # Only frontends share a port; otherwise a second server on the same port would silently share it.
                ("grpc.so_reuseport", int(self._share_ports)),
                ("grpc.compression_enabled_algorithms_bitset", _IDENTITY_ONLY),
            ],
        )
        add_servicer(
            server,
            _CLASSIFIER,
            ClassifierServicer(self.models, scope, self.metrics, image_decoder=self._image_decoder),
        )
        inference = InferenceServicer(
            self.models, scope, self.metrics, tensor_executor=self._decode_executor, is_ready=self.is_ready
        )
        add_servicer(server, _INFERENCE, inference)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        enable_server_reflection((CLASSIFIER_SERVICE, INFERENCE_SERVICE, health.SERVICE_NAME), server)
        try:
            address = f"{settings.host}:{settings.port}"
            port = (
                server.add_insecure_port(address)
                if tls is None
                else server.add_secure_port(address, tls.grpc_credentials())
            )
            if settings.http_port:
                app = kserve_http_app(
                    inference,
                    self.models,
                    self._decode_executor,
                    max_body_bytes=settings.max_message_bytes,
                    middlewares=[bearer_token_middleware(token, self._count_unauthenticated_http)] if token else [],
                )
                site = start_site(
                    app,
                    settings.host,
                    settings.http_port,
                    grace_s=settings.grace_period_s,
                    ssl_context=None if tls is None else tls.ssl_context,
                    reuse_port=self._share_ports,
                )
                self._http_runners.append(await site)
                logger.info("KServe v2 HTTP/REST on %s:%d", settings.host, settings.http_port)
            if settings.metrics_port:
                metrics_host = settings.metrics_host or settings.host
                self._http_runners.append(await self.metrics.serve_http(metrics_host, settings.metrics_port))
        except (RuntimeError, OSError) as error:  # grpc reports a taken port as RuntimeError, aiohttp as OSError
            await self._stop_http()
            raise ServerStartError(f"cannot bind: {error}") from error
        await server.start()
        self._server = server
        protection = ("TLS" if tls else "plaintext") + ("; bearer token required but for probes" if token else "")
        logger.info("gRPC on %s:%d (%s)", settings.host, port, protection)
        self.models.start_loading()
        return port

    async def stop(self, grace_s: float) -> None:
        """Health NOT_SERVING, no new RPCs or HTTP requests, in-flight ones finish within `grace_s` (then are
        cancelled)."""
        self._draining = True
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            # The HTTP ports drain alongside (their grace is the settings' grace period); /metrics goes with them.
            await asyncio.gather(self._server.stop(grace_s), self._stop_http())
        # Only now: requests still in flight during the grace period need their batchers.
        await self.models.stop()
        if self._decode_executor is not None:
            self._decode_executor.shutdown(wait=False, cancel_futures=True)
        if self._image_decoder is not None:
            await asyncio.to_thread(self._image_decoder.shutdown)
        logger.info("stopped")

    def _count_unauthenticated(self, method: str) -> None:
        self.metrics.record_request("", method, grpc.StatusCode.UNAUTHENTICATED.name, 0.0)

    def _count_unauthenticated_http(self) -> None:
        # Refused before routing: no method to name, and a label per path a client chose would be unbounded.
        self._count_unauthenticated(HTTP_REFUSED_METHOD)

    async def _stop_http(self) -> None:
        runners, self._http_runners = self._http_runners, []
        await asyncio.gather(*(runner.cleanup() for runner in runners))

    async def _refresh_health(self) -> None:
        ready = self.is_ready()
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for service_name in HEALTH_SERVICES:
            await self._health.set(service_name, status)
        if self.models.settled:
            if ready:
                logger.info("all models settled; server ready")
            elif self.models.required_not_ready:
                logger.error("all models settled; server NOT ready: required %s not ready",
                             ", ".join(self.models.required_not_ready))  # fmt: skip
            else:
                logger.info("all models settled; server NOT ready: no model could load")


def use_kernel_cache(root: Path) -> None:
    """Compiled kernels and autotune results under root/<card, driver, torch, Triton>, before any model loads."""
    try:
        models.kernel_cache.use_kernel_cache(root)
    except OSError as error:
        raise ServerStartError(f"--kernel-cache-dir {root}: {error}") from error


async def serve(settings: ServerSettings) -> bool:
    """Runs the server until SIGTERM or SIGINT, then shuts it down gracefully. False when a model was still loading
    at the end of the grace period: the loader thread is then inside torch or onnxruntime native code, which the
    interpreter's own shutdown would abort under ("terminate called without an active exception"), so the caller
    must leave without it (service/cli.py)."""
    configs = load_repository(settings.model_repository)
    if settings.kernel_cache_dir is not None:
        use_kernel_cache(settings.kernel_cache_dir)
    return await serve_until_signalled(InferenceServer(settings, configs), settings.grace_period_s, STOP_SIGNALS)


class Servable(Protocol):
    """What serve_until_signalled runs: an InferenceServer, or the engine process (service/multiprocess/engine.py)."""

    @property
    def models(self) -> ServedModels: ...

    async def start(self) -> object: ...

    async def stop(self, grace_s: float) -> None: ...


async def serve_until_signalled(server: Servable, grace_period_s: float, stop_signals: Sequence[int]) -> bool:
    """Starts `server`, and at the first of `stop_signals` stops it gracefully; as `serve` for the result."""
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in stop_signals:
        loop.add_signal_handler(signal_number, stop_requested.set)
    await server.start()
    await stop_requested.wait()
    logger.info("shutdown requested: finishing in-flight requests (grace %.1f s)", grace_period_s)
    stopping = time.monotonic()
    await server.stop(grace_period_s)
    # A model part-way through loading gets what is left of the grace period to finish.
    return await server.models.wait_for_loader(max(0.0, grace_period_s - (time.monotonic() - stopping)))
