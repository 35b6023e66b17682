"""The frontend-engine transport alone: a Unix socket with our frames against ZeroMQ (pyzmq), CPU per round trip.

Issue 12 asks for ZeroMQ or pipes, measured. Both sides here carry what the engine's link carries per request: a
request of `--request-bytes` (an INFER header and model name: the tensor itself stays in a shared-memory slot) and
an answer of `--answer-bytes` (a RESULT header and ten logits), matched by request id. A peer process answers each
request at once, as an engine with a free model would; this process runs `--callers` coroutines, each sending one
request and awaiting its answer, `--requests` times a round.

- `unix`: asyncio streams on a Unix socket, length-prefixed frames, the answers written in one event-loop turn leave
  in one send (service.multiprocess.messages: what the engine and its frontends use).
- `zmq`: pyzmq, a DEALER here and a ROUTER in the peer over `ipc://`, one ZeroMQ message per request, on the
  asyncio loop through the socket's file descriptor (ZmqPump: each wake-up reads every message already queued,
  which costs less than pyzmq's zmq.asyncio sockets and their awaited recv per message).

Per round trip: the callers' process CPU, the peer's CPU (from /proc), and round trips per second. Median with
spread over `--rounds` rounds after a warm-up round; JSON to <--out-dir>/transport_cpu_<date>.json.

    python -m bench.transport [--transport unix zmq] [--callers 32] [--requests 500] [--rounds 5] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import json
import logging
import multiprocessing
import struct
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import zmq

from bench.common import RESULTS, machine, spread_of_rounds
from bench.process_cpu import tree_cpu_seconds
from service.multiprocess import messages
from service.multiprocess.messages import Kind

TRANSPORTS = ("unix", "zmq")
_ID = struct.Struct("<Q")
logger = logging.getLogger("bench.transport")


def answer_to(request: bytes, answer_bytes: int) -> bytes:
    """The peer's answer: the request's id, padded to `answer_bytes`."""
    return request[: _ID.size] + bytes(answer_bytes - _ID.size)


async def unix_peer(address: str, answer_bytes: int) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        out = messages.CoalescingWriter(writer)
        while (message := await messages.read_frame(reader)) is not None:
            out.write(messages.frame(Kind.RESULT, answer_to(message[1], answer_bytes)))
        out.close()

    server = await asyncio.start_unix_server(serve, path=address)
    async with server:
        await server.serve_forever()


class ZmqPump:
    """A ZeroMQ socket on the asyncio loop, the way pyzmq documents integrating one: its file descriptor is
    edge-triggered, so every wake-up reads until ZMQ_EVENTS says nothing is queued, and so does the loop turn after a
    send (sending can consume the edge). One wake-up reads every message already there, as the unix transport does.
    """

    def __init__(self, socket: zmq.Socket, on_message: Callable[[list[bytes]], None]) -> None:
        self._socket = socket
        self._on_message = on_message
        self._loop = asyncio.get_running_loop()
        self._scheduled = False
        self._loop.add_reader(socket.getsockopt(zmq.FD), self._pump)

    def send(self, parts: list[bytes]) -> None:
        self._socket.send_multipart(parts, zmq.NOBLOCK)  # queued for ZeroMQ's I/O thread
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._pump)

    def close(self) -> None:
        self._loop.remove_reader(self._socket.getsockopt(zmq.FD))
        self._socket.close(linger=0)

    def _pump(self) -> None:
        self._scheduled = False
        while self._socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._on_message(self._socket.recv_multipart(zmq.NOBLOCK))


async def zmq_peer(address: str, answer_bytes: int) -> None:
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.bind(address)
    pump: ZmqPump | None = None

    def answer(parts: list[bytes]) -> None:
        identity, request = parts
        assert pump is not None
        pump.send([identity, answer_to(request, answer_bytes)])

    pump = ZmqPump(router, answer)
    await asyncio.Event().wait()


def run_peer(transport: str, address: str, answer_bytes: int) -> None:
    """The peer process: answers until terminated."""
    asyncio.run((unix_peer if transport == "unix" else zmq_peer)(address, answer_bytes))


class Caller:
    """Sends a request and returns when its answer is back; answers are matched to their request by id."""

    def __init__(self) -> None:
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._ids = itertools.count()

    def _new(self, request_bytes: int) -> tuple[bytes, asyncio.Future[bytes]]:
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        return _ID.pack(request_id) + bytes(request_bytes - _ID.size), future

    def _answered(self, answer: bytes) -> None:
        self._pending.pop(_ID.unpack_from(answer)[0]).set_result(answer)


class UnixCaller(Caller):
    async def connect(self, address: str) -> None:
        reader, writer = await asyncio.open_unix_connection(address)
        self._writer = messages.CoalescingWriter(writer)
        self._reading = asyncio.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while (message := await messages.read_frame(reader)) is not None:
            self._answered(message[1])

    async def call(self, request_bytes: int) -> bytes:
        request, future = self._new(request_bytes)
        self._writer.write(messages.frame(Kind.INFER, request))
        return await future

    def close(self) -> None:
        self._writer.close()
        self._reading.cancel()


class ZmqCaller(Caller):
    async def connect(self, address: str) -> None:
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.connect(address)
        self._pump = ZmqPump(dealer, lambda parts: self._answered(parts[0]))

    async def call(self, request_bytes: int) -> bytes:
        request, future = self._new(request_bytes)
        self._pump.send([request])
        return await future

    def close(self) -> None:
        self._pump.close()


async def measure(transport: str, address: str, peer_pid: int, args: argparse.Namespace) -> list[dict]:
    caller = UnixCaller() if transport == "unix" else ZmqCaller()
    await caller.connect(address)
    await caller.call(args.request_bytes)  # the peer is up (ZeroMQ queues until it is)

    async def loop(call: Callable[[int], Awaitable[bytes]]) -> None:
        for _ in range(args.requests):
            await call(args.request_bytes)

    rounds = []
    for index in range(args.rounds + 1):
        peer_cpu, own_cpu, started = tree_cpu_seconds(peer_pid), time.process_time(), time.perf_counter()
        await asyncio.gather(*(loop(caller.call) for _ in range(args.callers)))
        seconds, trips = time.perf_counter() - started, args.callers * args.requests
        measured = {
            "round_trips_per_s": trips / seconds,
            "caller_cpu_us_per_round_trip": (time.process_time() - own_cpu) / trips * 1e6,
            "peer_cpu_us_per_round_trip": (tree_cpu_seconds(peer_pid) - peer_cpu) / trips * 1e6,
        }
        logger.info("%s round %d%s: %s", transport, index, " (warm-up)" if index == 0 else "", measured)
        if index:
            rounds.append(measured)
    caller.close()
    return rounds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.transport", description=__doc__.splitlines()[0])
    parser.add_argument("--transport", nargs="+", choices=TRANSPORTS, default=list(TRANSPORTS))
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument("--requests", type=int, default=500, help="per caller and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--request-bytes", type=int, default=64, help="an INFER header and a model name")
    parser.add_argument("--answer-bytes", type=int, default=80, help="a RESULT header and ten float32 logits")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    results = {}
    for transport in args.transport:
        with tempfile.TemporaryDirectory(prefix="transport-") as run_dir:
            path = Path(run_dir) / "peer.sock"
            address = str(path) if transport == "unix" else f"ipc://{path}"
            peer = multiprocessing.get_context("spawn").Process(
                target=run_peer, args=(transport, address, args.answer_bytes)
            )
            peer.start()
            try:
                while transport == "unix" and not path.exists():
                    time.sleep(0.01)
                assert peer.pid is not None
                rounds = asyncio.run(measure(transport, address, peer.pid, args))
            finally:
                peer.terminate()
                peer.join(10)
        summary = spread_of_rounds(rounds)
        for key, values in summary.items():
            logger.info("%s %s: %.1f (p20 %.1f, p80 %.1f)", transport, key, *values.values())
        results[transport] = {"rounds": rounds, **summary}

    now = datetime.datetime.now(datetime.UTC)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"transport_cpu_{now:%Y%m%dT%H%M%S}.json"
    settings = {key: value for key, value in vars(args).items() if key != "out_dir"}
    out.write_text(json.dumps({"machine": machine(), "settings": settings, "transports": results}, indent=2) + "\n")
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
