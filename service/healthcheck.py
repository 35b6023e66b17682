"""`python -m service.healthcheck`: exit 0 when the server's grpc.health.v1 answers SERVING, else 1.

For container healthchecks (docker/Dockerfile); asks the overall service ("") unless --service names one. The server
says SERVING only once every model has settled, one is ready and every model its repository marks `required` is
ready (service/server.py `is_ready`), so this fails while a required model is loading or failed to load.
"""

import argparse
import logging
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

logger = logging.getLogger(__name__)


def check(address: str, service: str = "", timeout_s: float = 3.0) -> bool:
    """True when `service` on the server at `address` reports SERVING within `timeout_s`."""
    with grpc.insecure_channel(address) as channel:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.healthcheck", description=__doc__)
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--service", default="", help='gRPC service name; "" is the whole server')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    return 0 if check(args.address, args.service, args.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
