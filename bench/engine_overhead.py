"""The engine's CPU per request beside a near-free model: what bounds one engine process with `--frontends N`.

An engine process (service.multiprocess.engine.Engine, as the supervisor runs it) serves one model whose backend
returns zeros at once, so that what is measured is the serving path: the socket, the slots, the batcher, the answer.
This process plays `--frontends` frontends (each a service.multiprocess.remote_models.RemoteModels with its own
connection and slot file, as a frontend process has), each with `--callers` coroutines submitting one UINT8
[1, 32, 32, 3] image at a time, waiting for its logits and counting it in the model's statistics as a servicer does
(the counts reach the engine every 10 ms): the frontends' side without gRPC. The engine's metrics are in
prometheus-client's multiprocess mode, as under the supervisor. A round is every caller
sending `--requests` images; per request, the engine's CPU is its process's utime+stime (from /proc) over the round,
and the link's the CPU of this process (every frontend's link and caller together); the mean batch is from the
engine's statistics (the costs per batch are shared by its requests). Median with spread over
`--rounds` rounds after a warm-up round; JSON to <--out-dir>/engine_overhead_cpu_<date>.json.

    python -m bench.engine_overhead [--frontends 2] [--callers 16] [--requests 200] [--rounds 5] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import multiprocessing
import os
import signal
import tempfile
import time
from pathlib import Path

import torch

import models
from bench.common import RESULTS, machine, spread_of_rounds
from bench.process_cpu import tree_cpu_seconds
from service.lifecycle import OutputSpec
from service.metrics import MULTIPROCESS_DIR_ENV
from service.model_loader import ModelParts
from service.multiprocess.engine import Engine
from service.multiprocess.messages import Hello
from service.multiprocess.remote_models import RemoteModels
from service.multiprocess.slots import SlotFile, SlotPool, create_slot_file
from service.repository import ModelConfig
from service.server import ServerSettings, serve_until_signalled
from service.statistics import RequestTimes

MODEL = ModelConfig(name="near_free", arch="digits_resnet", input_size=32, max_batch_size=32, max_queue_delay_us=500)
CLASSES = 10
SLOTS = 64  # per frontend: more than its callers, so that nothing travels inline
SLOT_BYTES = 2 * 3 * MODEL.input_size * MODEL.input_size * 4  # as the supervisor sizes them: two float32 images
logger = logging.getLogger("bench.engine_overhead")


class NearFreeBackend:
    """Zeros at once: the model's share of the engine's CPU is next to nothing."""

    name = "eager"
    device = torch.device("cpu")
    dtype = torch.float32
    preferred_batch_sizes: tuple[int, ...] = ()

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.zeros(batch.shape[0], CLASSES)


def near_free_parts(config: ModelConfig, backend_kind: str) -> ModelParts:
    output = OutputSpec(tuple(str(i) for i in range(CLASSES)))
    return ModelParts(NearFreeBackend(), models.input_spec(config.arch, config.input_size), output)


def serve_engine(socket_path: Path) -> None:
    """The engine process: serves until SIGTERM."""
    engine = Engine(ServerSettings(metrics_port=0), [MODEL], socket_path, load_parts=near_free_parts)
    asyncio.run(serve_until_signalled(engine, ServerSettings().grace_period_s, (signal.SIGTERM,)))


async def nothing_to_do() -> None:
    """A frontend's reaction to the engine's model states: here none (the server would update its health)."""


async def drive(args: argparse.Namespace, run_dir: Path, engine_pid: int) -> list[dict]:
    frontends = []
    for index in range(args.frontends):
        slot_path = run_dir / f"slots-{index}"
        create_slot_file(slot_path, SLOTS, SLOT_BYTES)
        frontends.append(
            RemoteModels(
                [MODEL],
                default_backend="eager",
                default_queue_size=4 * args.frontends * args.callers,
                socket_path=run_dir / "engine.sock",
                hello=Hello(index, os.getpid(), str(slot_path), SLOT_BYTES),
                slots=SlotPool(SlotFile(slot_path, SLOT_BYTES)),
                on_change=nothing_to_do,
            )
        )
    for frontend in frontends:
        frontend.start_loading()
    async with asyncio.timeout(60):
        while not all(frontend.any_ready for frontend in frontends):
            await asyncio.sleep(0.01)
    image = torch.randint(0, 256, (1, MODEL.input_size, MODEL.input_size, 3), dtype=torch.uint8)

    async def caller(frontend: RemoteModels) -> None:
        batcher, statistics = frontend.ready_model(MODEL.name).batcher, frontend.request_statistics(MODEL.name)
        for _ in range(args.requests):
            started = time.perf_counter_ns()
            result = await batcher.submit(image)
            times = RequestTimes(result.queue_us * 1000, 0, result.compute_us * 1000, 0)
            statistics.record_success(1, time.perf_counter_ns() - started, times)

    async def batches_run() -> int:
        return (await frontends[0].statistics_snapshot()).of(MODEL.name).execution_count

    rounds = []
    for round_index in range(args.rounds + 1):
        batches = await batches_run()
        engine_cpu, own_cpu, started = tree_cpu_seconds(engine_pid), time.process_time(), time.perf_counter()
        await asyncio.gather(*(caller(frontend) for frontend in frontends for _ in range(args.callers)))
        seconds = time.perf_counter() - started
        engine_cpu, own_cpu = tree_cpu_seconds(engine_pid) - engine_cpu, time.process_time() - own_cpu
        requests = args.frontends * args.callers * args.requests
        measured = {
            "requests_per_s": requests / seconds,
            "engine_cpu_us_per_request": engine_cpu / requests * 1e6,
            "link_cpu_us_per_request": own_cpu / requests * 1e6,
            "mean_batch": requests / (await batches_run() - batches),
        }
        logger.info("round %d%s: %s", round_index, " (warm-up)" if round_index == 0 else "", measured)
        if round_index:
            rounds.append(measured)
    for frontend in frontends:
        await frontend.stop()
    return rounds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--frontends", type=int, default=2)
    parser.add_argument("--callers", type=int, default=16, help="per frontend")
    parser.add_argument("--requests", type=int, default=200, help="per caller and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="engine-overhead-", dir="/dev/shm") as name:
        run_dir = Path(name)
        (run_dir / "metrics").mkdir()
        os.environ[MULTIPROCESS_DIR_ENV] = str(run_dir / "metrics")  # read by the engine's imports
        engine = multiprocessing.get_context("spawn").Process(target=serve_engine, args=(run_dir / "engine.sock",))
        engine.start()
        try:
            assert engine.pid is not None
            rounds = asyncio.run(drive(args, run_dir, engine.pid))
        finally:
            engine.terminate()
            engine.join(30)

    summary = spread_of_rounds(rounds)
    for key, values in summary.items():
        logger.info("%s: %.1f (p20 %.1f, p80 %.1f)", key, values["median"], values["p20"], values["p80"])
    now = datetime.datetime.now(datetime.UTC)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"engine_overhead_cpu_{now:%Y%m%dT%H%M%S}.json"
    settings = {key: value for key, value in vars(args).items() if key != "out_dir"}
    result = {"machine": machine(), "model": MODEL.name, "settings": settings, "rounds": rounds, **summary}
    path.write_text(json.dumps(result, indent=2) + "\n")
    logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
