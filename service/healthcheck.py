"""`python -m service.healthcheck`: exit 0 when the server's grpc.health.v1 answers SERVING, else 1.

For container healthchecks (docker/Dockerfile); asks the overall service ("") unless --service names one. The server
says SERVING only once every model has settled, one is ready and every model its repository marks `required` is
ready (service/server.py `is_ready`), so this fails while a required model is loading or failed to load.

With TLS on (the server's RESNET_SERVE_TLS_CERT is in the environment, as in its container, or --tls-ca is given) it
speaks TLS: it trusts --tls-ca, by default the server's own certificate file (gRPC takes a certificate of the bundle
as the anchor even when a CA signed it, so the server's settings alone are enough), checks the name --tls-server-name
(default: the address's host), and presents --tls-client-cert/--tls-client-key where the server requires client
certificates (mutual TLS). Each flag can come from the environment as RESNET_SERVE_HEALTHCHECK_<FLAG>. Health needs no
bearer token (service/auth.py exempts it).
"""

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

logger = logging.getLogger(__name__)


_ENV_PREFIX = "RESNET_SERVE_HEALTHCHECK_"
# The server's own setting (service/cli.py): set, the server speaks TLS.
_SERVER_TLS_CERT_ENV = "RESNET_SERVE_TLS_CERT"


@dataclass(frozen=True)
class ClientTls:
    trusted: Path  # PEM CA bundle, or the server's own certificate
    client_cert: Path | None = None  # both set: presented to a server that requires client certificates
    client_key: Path | None = None
    server_name: str | None = None  # the name checked in the server's certificate; None: the address's host

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.trusted.read_bytes(),
            private_key=None if self.client_key is None else self.client_key.read_bytes(),
            certificate_chain=None if self.client_cert is None else self.client_cert.read_bytes(),
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return [] if self.server_name is None else [("grpc.ssl_target_name_override", self.server_name)]


def _open_channel(address: str, tls: ClientTls | None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, tls.credentials(), options=tls.channel_options())


def check(address: str, service: str = "", timeout_s: float = 3.0, tls: ClientTls | None = None) -> bool:
    """True when `service` on the server at `address` reports SERVING within `timeout_s`; `tls` None: plaintext."""
    with _open_channel(address, tls) as channel:
        try:
            # types-grpcio-health-checking declares HealthStub without its methods; grpc generates Check.
            response = health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as error:
            logger.error("health check of %s failed: %s", address, error.code().name)
            return False
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    logger.info("%s %r: %s", address, service, status)
    return response.status == health_pb2.HealthCheckResponse.SERVING


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m service.healthcheck", description=__doc__)
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--service", default="", help='gRPC service name; "" is the whole server')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    tls_flags = (
        ("--tls-ca", environ.get(_SERVER_TLS_CERT_ENV, ""), "PEM CA bundle the server's certificate is checked with"),
        ("--tls-client-cert", "", "PEM certificate presented for mutual TLS"),
        ("--tls-client-key", "", "PEM private key of --tls-client-cert"),
        ("--tls-server-name", "", "name the server's certificate carries, where it is not the address's host"),
    )
    for flag, default, help_text in tls_flags:
        env = _ENV_PREFIX + flag.removeprefix("--").replace("-", "_").upper()
        parser.add_argument(flag, default=environ.get(env, default), help=f"{help_text} [{env}]")
    args = parser.parse_args(argv)
    if bool(args.tls_client_cert) != bool(args.tls_client_key):
        parser.error("--tls-client-cert and --tls-client-key go together: give both or neither")
    if args.tls_client_cert and not args.tls_ca:
        parser.error(
            "--tls-client-cert needs --tls-ca (or the server's RESNET_SERVE_TLS_CERT): mutual TLS is TLS first"
        )
    return args


def client_tls(args: argparse.Namespace) -> ClientTls | None:
    """The TLS `args` ask for; None: plaintext (no --tls-ca, and no server certificate in the environment)."""
    if not args.tls_ca:
        return None
    return ClientTls(
        trusted=Path(args.tls_ca),
        client_cert=Path(args.tls_client_cert) if args.tls_client_cert else None,
        client_key=Path(args.tls_client_key) if args.tls_client_key else None,
        server_name=args.tls_server_name or None,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    tls = client_tls(args)
    try:
        return 0 if check(args.address, args.service, args.timeout, tls) else 1
    except OSError as error:  # a certificate or key file that cannot be read
        logger.error("health check of %s failed: %s: %s", args.address, error.filename, error.strerror or error)
        return 1


if __name__ == "__main__":
    sys.exit(main())
