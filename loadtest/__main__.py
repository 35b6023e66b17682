"""`python -m loadtest`: sweep concurrency against one server per backend, with Locust headless and/or NVIDIA's
perf_analyzer (C++, no GIL: it can drive a server that one Locust process cannot), and report.

Writes into --out: Locust's CSVs and log per step (`<backend>_u<users>_*`), perf_analyzer's CSV and log per step
(`<backend>_u<users>_perf_analyzer.*`), each started server's log, summary.json (RPS, p50/p90/p95/p99 ms, failures
and mean batch size per step, each step naming its generator and workload) and summary.png. Exits 1 when any step
fails (a failed request, a generator's non-zero exit) or a server does not start, serve or stop cleanly.
"""

import argparse
import datetime
import importlib.metadata
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from loadtest import perf_analyzer, server
from loadtest.payloads import write_digits_pngs
from loadtest.report import plot, write_summary
from loadtest.step import GENERATOR as LOCUST
from loadtest.step import StepResult, StepSettings, run_step
from service.repository import DEFAULT_REPOSITORY

logger = logging.getLogger("loadtest")


def _csv_list(item_type):
    def parse(text: str) -> list:
        return [item_type(item) for item in text.split(",") if item]

    return parse


class _ListAction(argparse.Action):
    """One flat list from comma-separated and space-separated values alike: `1,4 16 64` -> [1, 4, 16, 64]."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, [item for group in values for item in group])


def _list_option(parser: argparse.ArgumentParser, flag: str, item_type, help_text: str, **kwargs) -> None:
    parser.add_argument(
        flag, nargs="+", type=_csv_list(item_type), action=_ListAction, help=f"{help_text} (comma or space separated)",
        **kwargs,
    )  # fmt: skip


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


GENERATORS = (LOCUST, perf_analyzer.GENERATOR)


def _generator(text: str) -> str:
    if text not in GENERATORS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(GENERATORS)}")
    return text


def default_backends() -> list[str]:
    import torch  # here: a --host run never needs it

    return ["eager", "onnxruntime", *(["fused"] if torch.cuda.is_available() else [])]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Load-test the ResNet gRPC service with Locust over a range of concurrency, per backend.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", help="HOST:PORT of a running server to load instead of starting one per backend")
    parser.add_argument("--metrics-url", help="with --host: the server's /metrics URL, for the mean batch size")
    _list_option(parser, "--backends", str, "servers to start; default eager,onnxruntime(,fused)")
    parser.add_argument("--model", default="digits_resnet", help="served model to call")
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY, help="where --model is defined")
    _list_option(parser, "--users", int, "concurrency steps, e.g. 1,4,16", default=[1, 4, 16, 64])
    parser.add_argument("--duration", type=int, default=20, help="seconds of load per step")
    _list_option(parser, "--generators", _generator, f"load generators per step: {', '.join(GENERATORS)}",
                 default=[LOCUST])  # fmt: skip
    _list_option(
        parser, "--user-classes", str, "locustfile users: ClassifyUser, ModelInferUser (FP32 NCHW), "
        "ModelInferUint8User (UINT8 NHWC)", default=["ClassifyUser"],
    )  # fmt: skip
    parser.add_argument("--image-dir", default="", help="JPEG/PNG files for Classify; default: the digits PNGs")
    parser.add_argument("--locust-processes", type=_positive_int, default=1,
                        help="Locust processes sharing each step's users (its --processes): one may not saturate a "
                        "fast server")  # fmt: skip
    parser.add_argument("--pa-stability-percentage", type=float, default=perf_analyzer.ANY_WINDOWS,
                        help="perf_analyzer: spread (%%) of its three windows taken as stable, beyond which the step "
                        "fails; the default takes any three, a fixed-duration step as Locust's (perf_analyzer's own "
                        "10 is rarely met on a shared CPU)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("loadtest-report"), help="folder for CSVs, JSON and PNG")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the arguments and that the repository serves --model; start nothing")  # fmt: skip
    return parser


def _dry_run(args: argparse.Namespace, backends: Sequence[str | None]) -> int:
    """What --dry-run checks: the model is in its repository (unless loading --host) and --out can be written."""
    if args.host is None:
        server.write_single_model_repository(args.model_repository, args.model, args.out / "repository-dry-run.toml")
    logger.info("dry run: %s, %s users x %d s on %s with %s", args.model, args.users, args.duration, backends,
                args.generators)  # fmt: skip
    return 0


def _sweep(target: server.Target, backend: str, args: argparse.Namespace) -> list[StepResult]:
    settings = StepSettings(args.model, args.duration, tuple(args.user_classes), args.image_dir, args.locust_processes)
    pa_settings = perf_analyzer.PerfAnalyzerSettings(args.model, args.duration, args.pa_stability_percentage)
    results = []
    for users in args.users:
        for generator in args.generators:
            logger.info("%s: %d users for %d s with %s", backend, users, args.duration, generator)
            if generator == LOCUST:
                result = run_step(target, backend, users, settings, args.out)
            else:
                result = perf_analyzer.run_perf_analyzer_step(target, backend, users, pa_settings, args.out)
            logger.info(
                "%s, %d users, %s: %d requests, %d failed, %.1f req/s, p50 %s ms, p99 %s ms, mean batch %s",
                backend, users, generator, result.requests, result.failures, result.rps, result.p50_ms,
                result.p99_ms, "n/a" if result.mean_batch_size is None else f"{result.mean_batch_size:.2f}",
            )  # fmt: skip
            results.append(result)
    return results


def _run_backend(backend: str | None, args: argparse.Namespace) -> list[StepResult]:
    """Starts the server for `backend` (or uses --host when it is None), sweeps, stops it; ServerError on trouble."""
    if backend is None:
        target = server.Target(args.host, args.metrics_url)
    else:
        repository = server.write_single_model_repository(
            args.model_repository, args.model, args.out / f"repository-{backend}.toml"
        )
        target = server.start(backend, repository, args.out / f"server-{backend}.log")
    try:
        served_backend = server.wait_ready(target, args.model)
        logger.info("%s serves %s on %s", target.address, args.model, served_backend)
        return _sweep(target, served_backend, args)
    finally:
        server.stop(target)


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


_RECORDED_ENV = ("OMP_", "MKL_", "RESNET_SERVE_")


def _run_info(args: argparse.Namespace, backends: Sequence[str | None]) -> dict[str, object]:
    return {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": args.model,
        "backends": [backend or args.host for backend in backends],
        "generators": args.generators,
        "user_classes": args.user_classes,
        "duration_s": args.duration,
        "locust_processes": args.locust_processes,
        "machine": f"{_cpu_name()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        # Server and Locust share the CPUs (and with whatever else runs): a high load makes the figures noisy.
        "load_average_at_start": os.getloadavg()[0],
        "locust": importlib.metadata.version("locust"),
        "perf_analyzer_stability_percentage": args.pa_stability_percentage,
        # What the servers started here inherit and that shapes their figures (thread counts, OpenMP's wait policy).
        "environment": {key: value for key, value in sorted(os.environ.items()) if key.startswith(_RECORDED_ENV)},
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    backends = [None] if args.host else (args.backends or default_backends())
    if args.dry_run:
        try:
            return _dry_run(args, backends)
        except (server.ServerError, OSError) as error:
            logger.error("dry run: %s", error)
            return 1
    run_info = _run_info(args, backends)
    if LOCUST in args.generators and "ClassifyUser" in args.user_classes and not args.image_dir:
        # Written once here, read by every Locust process in milliseconds: making them from scikit-learn's digits
        # (torch and scikit-learn imports, PNG encoding) takes each process seconds of a busy machine, during which
        # a short step's users wait in on_start with the clock running.
        args.image_dir = str(write_digits_pngs(args.out / "digits_images"))
    steps: list[StepResult] = []
    failed = False
    for backend in backends:
        try:
            steps += _run_backend(backend, args)
        except (server.ServerError, subprocess.TimeoutExpired, OSError, ValueError) as error:
            logger.error("%s: %s", backend or args.host, error)
            failed = True
    failed |= any(step.failures or step.exit_code for step in steps)
    for step in steps:
        if step.requests == 0:
            logger.error("%s, %d users, %s: no request completed in %d s", step.backend, step.users, step.generator,
                         args.duration)  # fmt: skip
            failed = True
    summary = write_summary(args.out / "summary.json", steps, run_info)
    logger.info("wrote %s", summary)
    if steps:
        workloads = ", ".join(dict.fromkeys(step.workload for step in steps))
        logger.info("wrote %s", plot(args.out / "summary.png", steps, f"{args.model}: {workloads}"))
    if failed:
        logger.error("load test FAILED (see the errors above)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
