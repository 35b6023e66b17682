"""`python -m deploy.cluster` (what `./scripts/cluster.sh` runs): N replicas of `python -m service` behind Envoy on
127.0.0.1, clients on --port (DESIGN.md contract 10).

Each replica gets its own ports and, where GPUs exist, its own CUDA_VISIBLE_DEVICES. Prints one line once every
replica serves and Envoy sees each one healthy. A replica that exits while the cluster runs is started again on its
ports (so `kill -TERM` of one replica restarts it without losing a request). SIGTERM or SIGINT drains: Envoy stops
taking requests and finishes those in flight, then the replicas drain, then Envoy quits; exit 0 when all exited 0.
Arguments it does not know go to every replica (e.g. `--backend onnxruntime --model-repository models.toml`).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from deploy.envoy_config import EnvoySettings, Upstream, render_yaml
from deploy.processes import Envoy, Replica, wait_for_exit
from service.cli import parse_settings
from service.log import configure_logging

logger = logging.getLogger("deploy.cluster")

HOST = "127.0.0.1"
GRPC_CLUSTER = "grpc_replicas"  # the cluster's name in deploy/envoy/envoy.yaml.tmpl
POLL_S = 0.2
# A replica that exits is restarted at once, and if it keeps dying after 1, 2, 4 ... up to 30 s; one that stayed up a
# minute is restarted at once again.
FIRST_RESTART_DELAY_S, NEXT_RESTART_DELAY_S, MAX_RESTART_DELAY_S, STABLE_AFTER_S = 0.0, 1.0, 30.0, 60.0
REPLICA_EXIT_MARGIN_S = 15.0  # beyond the server's grace period, for its batchers and threads


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for probe in sockets:
            probe.bind((HOST, 0))
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


def ports(base: int, count: int) -> list[int]:
    """`count` consecutive ports from `base`, or free ones when `base` is 0."""
    return free_ports(count) if base == 0 else list(range(base, base + count))


def visible_gpus() -> list[str]:
    """The GPUs replicas may use: CUDA_VISIBLE_DEVICES where it is set, else the ones nvidia-smi lists."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [gpu for gpu in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if gpu.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    listed = subprocess.run(
        ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
    )
    return listed.stdout.split() if listed.returncode == 0 else []


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="./scripts/cluster.sh",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--replicas", type=_positive_int, help="replicas; default: one per GPU, or 1 without GPUs")
    parser.add_argument("--port", type=int, default=8080, help="where clients connect (gRPC), on 127.0.0.1")
    parser.add_argument("--admin-port", type=int, default=9901, help="Envoy's admin API, on 127.0.0.1; 0: free port")
    parser.add_argument("--replica-port-base", type=int, default=50061,
                        help="replica i serves gRPC on BASE+i; 0: free ports")  # fmt: skip
    parser.add_argument("--metrics-port-base", type=int, default=9101,
                        help="replica i serves /metrics on BASE+i; 0: free ports")  # fmt: skip
    parser.add_argument("--log-dir", type=Path, default=Path("cluster-logs"), help="each replica's and Envoy's log")
    parser.add_argument("--ready-timeout", type=float, default=900.0,
                        help="seconds for every replica to load (and autotune) its models")  # fmt: skip
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds Envoy gets at shutdown to finish the requests in flight")  # fmt: skip
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


class Cluster:
    def __init__(self, replicas: list[Replica], envoy: Envoy, grace_period_s: float) -> None:
        self.replicas = replicas
        self.envoy = envoy
        self._stop_timeout_s = grace_period_s + REPLICA_EXIT_MARGIN_S
        self.stop_requested = False
        self._restart_at: dict[int, float] = {}
        self._restart_delay = {replica.index: FIRST_RESTART_DELAY_S for replica in replicas}

    def request_stop(self, signal_number: int, _frame: object) -> None:
        logger.info("%s: draining", signal.Signals(signal_number).name)
        self.stop_requested = True

    def start(self, ready_timeout_s: float) -> bool:
        """Starts everything and waits until every replica serves and Envoy sees it healthy."""
        for replica in self.replicas:
            replica.start()
        self.envoy.start()
        deadline = time.monotonic() + ready_timeout_s
        while not self.stop_requested and time.monotonic() < deadline:
            failed = [replica for replica in self.replicas if replica.exit_code() is not None]
            if failed or self.envoy.exit_code() is not None:
                for replica in failed:
                    logger.error("replica %d exited with %s before serving:\n%s", replica.index,
                                 replica.exit_code(), replica.log_path.read_text(errors="replace")[-4000:])  # fmt: skip
                if self.envoy.exit_code() is not None:
                    logger.error("envoy exited with %s:\n%s", self.envoy.exit_code(), self.envoy.log_path.read_text())
                return False
            if all(replica.is_serving() for replica in self.replicas) and self._envoy_sees_all_healthy():
                return True
            time.sleep(POLL_S)
        if not self.stop_requested:
            logger.error("not every replica was ready within %.0f s (logs in %s)", ready_timeout_s,
                         self.envoy.log_path.parent)  # fmt: skip
        return False

    def _envoy_sees_all_healthy(self) -> bool:
        try:
            health = self.envoy.host_health(GRPC_CLUSTER)
        except OSError:  # the admin port is not up yet
            return False
        return all(health.get(replica.address) == "healthy" for replica in self.replicas)

    def supervise(self) -> bool:
        """Restarts replicas that exit, until a stop is requested (True) or Envoy dies (False)."""
        while not self.stop_requested:
            if self.envoy.exit_code() is not None:
                logger.error("envoy exited with %s:\n%s", self.envoy.exit_code(), self.envoy.log_path.read_text())
                return False
            now = time.monotonic()
            for replica in self.replicas:
                self._restart_if_exited(replica, now)
            time.sleep(POLL_S)
        return True

    def _restart_if_exited(self, replica: Replica, now: float) -> None:
        code = replica.exit_code()
        if code is None:
            if now - replica.started_at > STABLE_AFTER_S:
                self._restart_delay[replica.index] = FIRST_RESTART_DELAY_S
            return
        if replica.index not in self._restart_at:
            delay = self._restart_delay[replica.index]
            logger.warning("replica %d exited with %s; restarting it in %g s", replica.index, code, delay)
            self._restart_at[replica.index] = now + delay
            self._restart_delay[replica.index] = min(max(2 * delay, NEXT_RESTART_DELAY_S), MAX_RESTART_DELAY_S)
        elif now >= self._restart_at[replica.index]:
            del self._restart_at[replica.index]
            replica.start()

    def stop(self, drain_timeout_s: float) -> bool:
        """Envoy stops taking requests and finishes those in flight, then the replicas drain, then Envoy quits."""
        if self.envoy.exit_code() is None:
            try:
                self.envoy.drain(drain_timeout_s)
            except OSError as error:
                logger.warning("could not drain envoy: %s", error)
        for replica in self.replicas:
            replica.terminate()
        codes = [wait_for_exit(replica.process, self._stop_timeout_s) for replica in self.replicas if replica.process]
        for replica in self.replicas:
            replica.close()
        envoy_code = self.envoy.quit() if self.envoy.process else 0
        clean = envoy_code == 0 and all(code == 0 for code in codes)
        logger.info("stopped: replicas exited with %s, envoy with %s", codes, envoy_code)
        return clean


def build_cluster(args: argparse.Namespace, server_args: Sequence[str]) -> Cluster:
    gpus = visible_gpus()
    count = args.replicas or max(len(gpus), 1)
    if gpus and count > len(gpus):
        logger.warning("%d replicas on %d GPUs: some GPUs serve more than one replica", count, len(gpus))
    args.log_dir.mkdir(parents=True, exist_ok=True)
    replicas = []
    for index, (port, metrics_port) in enumerate(
        zip(ports(args.replica_port_base, count), ports(args.metrics_port_base, count), strict=True)
    ):
        environment = dict(os.environ)
        if gpus:
            environment["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
        log_path = args.log_dir / f"replica-{index}.log"
        replicas.append(Replica(index, HOST, port, metrics_port, tuple(server_args), environment, log_path))
    admin_port = args.admin_port or free_ports(1)[0]
    settings = EnvoySettings(
        grpc_upstreams=tuple(Upstream(HOST, replica.port) for replica in replicas),
        grpc_port=args.port,
        admin_port=admin_port,
        listen_address=HOST,
    )
    config_path = args.log_dir / "envoy.yaml"
    config_path.write_text(render_yaml(settings))
    envoy = Envoy(config_path, admin_port, settings.drain_s, args.log_dir / "envoy.log")
    # The replicas' own parser reads their --grace-period (flag, environment or default), and rejects bad arguments.
    replica_settings, _ = parse_settings(server_args)
    return Cluster(replicas, envoy, replica_settings.grace_period_s)


def main(argv: Sequence[str] | None = None) -> int:
    args, server_args = build_parser().parse_known_args(argv)
    configure_logging(args.log_level)
    try:
        cluster = build_cluster(args, server_args)
    except (SystemExit, ValueError) as error:
        logger.error("bad arguments for the replicas %s: %s", list(server_args), error)
        return 2
    signal.signal(signal.SIGTERM, cluster.request_stop)
    signal.signal(signal.SIGINT, cluster.request_stop)
    healthy = cluster.start(args.ready_timeout)
    if healthy:
        first, last = cluster.replicas[0].port, cluster.replicas[-1].port
        sys.stdout.write(
            f"ready: {len(cluster.replicas)} replicas ({HOST}:{first}-{last}) behind Envoy on {HOST}:{args.port}, "
            f"admin http://{HOST}:{cluster.envoy.admin_port}\n"
        )
        sys.stdout.flush()
        healthy = cluster.supervise()
    # A stop requested while starting is a clean stop too; a replica or Envoy that failed is not.
    stopped_on_request = cluster.stop_requested
    clean = cluster.stop(args.drain_timeout)
    return 0 if clean and (healthy or stopped_on_request) else 1


if __name__ == "__main__":
    raise SystemExit(main())
