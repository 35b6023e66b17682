"""`python -m bench.cluster_cpu --pid PID --admin-port A --out FILE [--since EARLIER]`: the CPU time a running local
cluster (./scripts/cluster.sh, pid PID) has used, Envoy's and its replicas', and the requests Envoy has proxied; with
--since, the difference from an earlier report of the same cluster, and CPU microseconds per request.

bench/cluster_scaling.sh takes one report once the cluster is ready and one after the load test, so the figures
cover the load alone (no start-up): the cores a host needs per replica and for Envoy (README, "Scaling out").
"""

import argparse
import json
import logging
import os
import urllib.request
from pathlib import Path

from deploy.processes import children

logger = logging.getLogger(__name__)

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` (Linux /proc; its own, not its children's)."""
    fields = (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S  # utime, stime: fields 14 and 15 of stat


def proxied_requests(admin_port: int) -> int:
    url = f"http://127.0.0.1:{admin_port}/stats?filter=^cluster\\.grpc_replicas\\.upstream_rq_total$"
    with urllib.request.urlopen(url, timeout=5) as response:
        return int(response.read().decode().rpartition(": ")[2])


def snapshot(pid: int, admin_port: int) -> dict:
    programs = {child: (Path("/proc") / str(child) / "cmdline").read_bytes().split(b"\0")[0] for child in children(pid)}
    envoy = [child for child, program in programs.items() if program.endswith(b"envoy")]
    return {
        "requests": proxied_requests(admin_port),
        "envoy_cpu_s": sum(cpu_seconds(child) for child in envoy),
        "replicas_cpu_s": sum(cpu_seconds(child) for child in programs if child not in envoy),
        "replicas": len(programs) - len(envoy),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster_cpu", description=__doc__)
    parser.add_argument("--pid", type=int, required=True, help="the cluster's pid (cluster.sh's)")
    parser.add_argument("--admin-port", type=int, required=True, help="its Envoy's admin port")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--since", type=Path, help="an earlier report of the same cluster: report the difference")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    report = snapshot(args.pid, args.admin_port)
    if args.since is not None:
        earlier = json.loads(args.since.read_text())
        for key in ("requests", "envoy_cpu_s", "replicas_cpu_s"):
            report[key] -= earlier[key]
        requests = max(report["requests"], 1)
        report["envoy_us_per_request"] = 1e6 * report["envoy_cpu_s"] / requests
        report["replicas_us_per_request"] = 1e6 * report["replicas_cpu_s"] / requests
        report["note"] = "between the two reports; requests: Envoy's upstream_rq_total (retries included)"
        logger.info("envoy %.0f us, replicas %.0f us of CPU per request (%d requests)",
                    report["envoy_us_per_request"], report["replicas_us_per_request"], report["requests"])  # fmt: skip
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
