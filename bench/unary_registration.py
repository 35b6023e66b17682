"""What registering a unary method as client-streaming costs (service/wire.py), against grpc's own unary path.

`python -m bench.unary_registration`: one grpc.aio server in this process with the same trivial handler registered
both ways, called by 16 concurrent callers over one channel, the two registrations interleaved round by round so that
the machine's load falls on both alike. Writes bench/results/unary_registration_cpu_<time>.json.
"""

import argparse
import asyncio
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import grpc

logger = logging.getLogger(__name__)
RESULTS = Path(__file__).parent / "results"
CALLERS = 16


async def _unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _client_streaming(messages, context: grpc.aio.ServicerContext) -> bytes:
    received = []
    async for message in messages:  # as service/wire.py reads: up to two messages
        received.append(message)
        if len(received) == 2:
            break
    return received[0]


async def measure(rounds: int, calls_per_round: int) -> dict[str, list[float]]:
    server = grpc.aio.server()
    handlers = {
        "unary": grpc.unary_unary_rpc_method_handler(_unary),
        "client_streaming": grpc.stream_unary_rpc_method_handler(_client_streaming),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    rates: dict[str, list[float]] = {name: [] for name in handlers}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            calls = {name: channel.unary_unary(f"/bench.Echo/{name}") for name in handlers}
            for _ in range(rounds):
                for name, call in calls.items():
                    started = time.perf_counter()
                    for _ in range(calls_per_round // CALLERS):
                        await asyncio.gather(*(call(b"x" * 100) for _ in range(CALLERS)))
                    rates[name].append(calls_per_round / (time.perf_counter() - started))
    finally:
        await server.stop(0)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.unary_registration", description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls-per-round", type=int, default=800)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rates = asyncio.run(measure(args.rounds, args.calls_per_round))
    summary = {
        name: {"median_calls_per_s": statistics.median(values), "min": min(values), "max": max(values)}
        for name, values in rates.items()
    }
    cost_us = 1e6 / summary["client_streaming"]["median_calls_per_s"] - 1e6 / summary["unary"]["median_calls_per_s"]
    record = {
        "question": "server-side cost of a unary method registered client-streaming (service/wire.py)",
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "grpcio": grpc.__version__,
        "callers": CALLERS,
        "rounds": args.rounds,
        "calls_per_round": args.calls_per_round,
        "rates": rates,
        "summary": summary,
        "extra_us_per_call_at_medians": cost_us,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = RESULTS / f"unary_registration_cpu_{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    logger.info("%s\nextra per call at the medians: %.0f us; %s", json.dumps(summary, indent=2), cost_us, path)


if __name__ == "__main__":
    main()
