"""TLS, optionally mutual, for the gRPC and KServe HTTP ports (off unless --tls-cert and --tls-key are given).

The files are read and checked once at start, before anything binds: loading them into an `ssl.SSLContext` reports
a key that is not the certificate's by name, where gRPC's own error would only say that the port could not be bound.
/metrics keeps its own plaintext port.
"""

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

logger = logging.getLogger(__name__)


class TlsConfigError(ValueError):
    """A certificate, key or CA file that cannot be used; the message names the flag and the file."""


@dataclass(frozen=True)
class ServerTls:
    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None  # set: clients must present a certificate this CA signed
    ssl_context: ssl.SSLContext  # the HTTP port's

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


def load_tls(cert: Path | None, key: Path | None, client_ca: Path | None) -> ServerTls | None:
    """None when neither `cert` nor `key` is given (plaintext); raises TlsConfigError saying which file is wrong."""
    if cert is None and key is None:
        if client_ca is not None:
            raise TlsConfigError("--tls-client-ca needs --tls-cert and --tls-key: mutual TLS is TLS first")
        return None
    if cert is None or key is None:
        raise TlsConfigError("--tls-cert and --tls-key go together: give both or neither")
    tls = ServerTls(
        cert_chain=_read("--tls-cert", cert),
        private_key=_read("--tls-key", key),
        client_ca=None if client_ca is None else _read("--tls-client-ca", client_ca),
        ssl_context=_ssl_context(cert, key, client_ca),
    )
    logger.info("TLS on%s", " with client certificates required (mutual TLS)" if client_ca else "")
    return tls


def _read(flag: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise TlsConfigError(f"{flag} {path}: {error.strerror or error}") from None


def _ssl_context(cert: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert), str(key))
    except ssl.SSLError as error:
        raise TlsConfigError(
            f"--tls-cert {cert} / --tls-key {key}: not a PEM certificate and its key ({error.reason or error})"
        ) from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=str(client_ca))
        except ssl.SSLError as error:
            raise TlsConfigError(
                f"--tls-client-ca {client_ca}: not a PEM CA bundle ({error.reason or error})"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context
