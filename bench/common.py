"""Helpers the benchmark scripts share: timing with quantiles, the machine's description, and result files.

A result is written as `<stem>.json` (everything) and `<stem>.md` (a table of the rows), where the stem names the
question, the device, the dtype, the torch and Triton versions and the UTC time, so results from different cards,
versions and days sit side by side in bench/results/.

Every timed row says how it was timed (its "timing", one of TIMINGS): device time inside a CUDA graph, CUDA events
around each call, or the host's clock around a call that ends synchronized.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.precision import PRECISIONS, Precision

RESULTS = Path(__file__).resolve().parent / "results"
QUANTILES = (0.5, 0.2, 0.8)  # median, p20, p80: the order triton.testing.do_bench returns them in

CUDA_GRAPH, CUDA_EVENTS, WALL = "cuda-graph", "cuda-events", "wall"
PROFILER_CUDA, PROFILER_CPU = "profiler-cuda", "profiler-cpu"
TIMINGS = {
    CUDA_GRAPH: "device time only: the call captured many times back to back in one CUDA graph, replayed "
    "(triton.testing.do_bench_cudagraph); no launch cost, L2 warm from the previous call",
    CUDA_EVENTS: "CUDA events around each call (triton.testing.do_bench, L2 flushed before each): device time, "
    "plus any time the GPU waits for the host to launch",
    WALL: "the host's clock around each call, which ends synchronized: everything a caller waits for",
    PROFILER_CUDA: "torch.profiler: the CUDA time of the kernels launched inside the range, as CUPTI measured them "
    "(device only, no launch gaps)",
    PROFILER_CPU: "torch.profiler: the range's CPU time (on a CPU the kernels run in the Triton interpreter)",
}
# Milliseconds of calls per CUDA graph replay; ten replays give the quantiles.
GRAPH_REP_MS = 10

logger = logging.getLogger(__name__)


class Skipped(Exception):
    """A benchmark row that cannot run here; the message is the row's reason."""


def kernels_run_on(device: torch.device) -> bool:
    """Whether our Triton kernels run on `device`: a GPU, or a CPU under the (slow) interpreter."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def compile_fresh(module: torch.nn.Module, **compile_options) -> Callable[..., torch.Tensor]:
    """torch.compile(module, dynamic=False, **compile_options) with Dynamo's caches emptied first.

    Dynamo counts recompilations per code object (say Bottleneck.forward) across every module and every input shape,
    and past torch._dynamo.config.recompile_limit (8) it runs that frame eagerly, with only a warning: a benchmark that
    compiles block after block, batch after batch, would time eager under a compile label. Each compiled module here
    is measured before the next one is made, so nothing of value is lost with the caches.
    """
    torch._dynamo.reset()
    return torch.compile(module, dynamic=False, **compile_options)


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """cuDNN and cuBLAS without TF32 inside the block (references are IEEE float32 even in a tf32 run)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def command_name() -> str | None:
    """ "python -m bench.model" for a script run with -m (argparse would say "model.py"), else None."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return None if spec is None else f"python -m {spec.name}"


def time_cpu(
    fn: Callable[[], object], warmup: int, reps: int, budget_s: float | None = None, min_reps: int = 1
) -> list[float]:
    """Seconds of each of up to `reps` calls of `fn` after `warmup` calls; stops early once `budget_s` is spent, but
    never before `min_reps` timed calls."""
    for _ in range(warmup):
        fn()
    seconds: list[float] = []
    deadline = None if budget_s is None else time.perf_counter() + budget_s
    while len(seconds) < reps and (deadline is None or len(seconds) < min_reps or time.perf_counter() < deadline):
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    return seconds


def spread(values: Sequence[float]) -> dict[str, float]:
    """{"median", "p20", "p80"} of `values`: how the throughput benches report their rounds."""
    median, p20, p80 = (float(np.quantile(values, q)) for q in QUANTILES)
    return {"median": median, "p20": p20, "p80": p80}


def spread_of_rounds(rounds: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """`spread` of each figure the rounds measured (the keys of the first)."""
    return {key: spread([measured[key] for measured in rounds]) for key in rounds[0]}


def quantiles_ms(seconds: Sequence[float]) -> tuple[float, float, float]:
    """(median, p20, p80) in milliseconds."""
    return tuple(float(np.quantile(seconds, q)) * 1e3 for q in QUANTILES)


def device_timing(device: torch.device, graph: bool = False) -> str:
    """How a call on `device` is timed: in a CUDA graph (`graph`) or by CUDA events on a GPU, by the clock on a CPU."""
    if device.type != "cuda":
        return WALL
    return CUDA_GRAPH if graph else CUDA_EVENTS


def bench_ms(fn: Callable[[], object], timing: str, reps: int = 20, budget_s: float = 5.0) -> dict:
    """{"median_ms", "p20_ms", "p80_ms", "reps", "timing"} of `fn`, timed as `timing` (a TIMINGS key) says.

    WALL: two warm-up calls (oneDNN picks and JITs its kernels on the first ones; a GPU backend allocates), then up to
    `reps` calls within `budget_s`, and at least five whatever they cost, so that p20/p80 mean something: ResNet-50 at
    batch 256 takes ~15 s a call on this machine's two cores. `fn` must return only once its work is done.
    """
    if timing == WALL:
        seconds = time_cpu(fn, warmup=2, reps=reps, budget_s=budget_s, min_reps=min(5, reps))
        median, p20, p80 = quantiles_ms(seconds)
        return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "reps": len(seconds), "timing": timing}
    import triton.testing

    if timing == CUDA_GRAPH:
        median, p20, p80 = triton.testing.do_bench_cudagraph(fn, rep=GRAPH_REP_MS, quantiles=list(QUANTILES))
    elif timing == CUDA_EVENTS:
        median, p20, p80 = triton.testing.do_bench(fn, quantiles=list(QUANTILES))
    else:
        raise ValueError(f"timing must be one of {', '.join(TIMINGS)}, got {timing!r}")
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "reps": None, "timing": timing}


def machine() -> dict:
    """Host, CPU, GPU, driver and library versions: what a reader needs to compare two result files."""
    import onnxruntime  # here: only the result header needs it
    import triton

    from kernels.autotune import driver_version

    cpu_names = [
        line.split(":", 1)[1].strip()
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("model name")
    ]
    return {
        "host": platform.node(),
        "cpu": cpu_names[0] if cpu_names else platform.processor(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "driver": driver_version() if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "onnxruntime": onnxruntime.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def device_tag(device: torch.device) -> str:
    """The device as a file-name fragment: "cpu", or the card's name ("nvidia-h100-80gb-hbm3")."""
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def versions_tag() -> str:
    """The torch and Triton versions as a file-name fragment: "torch-2.11.0+cu130_triton-3.6.0"."""
    import triton

    return f"torch-{torch.__version__}_triton-{triton.__version__}"


def result_stem(question: str, device: torch.device, precision: str, now: datetime.datetime) -> str:
    """File name without suffix: blocks_nvidia-h200_bfloat16_torch-2.11.0+cu130_triton-3.6.0_20261201T163405
    (`precision`: a models.precision name)."""
    return f"{question}_{device_tag(device)}_{precision}_{versions_tag()}_{now:%Y%m%dT%H%M%S}"


@dataclass(frozen=True)
class Column:
    """One markdown column: its header, the row key it shows, and the format of a present value."""

    header: str
    key: str
    fmt: str = "{}"


def markdown_table(rows: Iterable[dict], columns: Sequence[Column]) -> str:
    """A GitHub markdown table, one line per row; a missing or None value shows as "—", a "|" in a cell as "\\|"."""
    lines = ["| " + " | ".join(c.header for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = ["—" if row.get(c.key) is None else c.fmt.format(row[c.key]).replace("|", "\\|") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(
    report: dict,
    columns: Sequence[Column],
    out_dir: Path,
    stem: str,
    title: str,
    summary_columns: Sequence[Column] = (),
) -> list[Path]:
    """`report` (with a "rows" list and a "machine" dict) as <stem>.json and <stem>.md; returns both paths. With
    `summary_columns`, the markdown starts with the table of report["summary"]; the timings the rows used are
    explained under the header."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    header = ", ".join(f"{key} {value}" for key, value in report["machine"].items() if value is not None)
    used = dict.fromkeys(row["timing"] for row in report["rows"] if row.get("timing"))
    legend = "".join(f"- timing `{timing}`: {TIMINGS[timing]}\n" for timing in used)
    if legend:
        legend += "\n"
    tables = markdown_table(report["rows"], columns)
    if summary_columns:
        tables = f"## Summary\n\n{markdown_table(report['summary'], summary_columns)}\n## Rows\n\n{tables}"
    md_path.write_text(f"# {title}\n\n{report['date']}; {header}\n\n{legend}{tables}")
    return [json_path, md_path]


def progress(items: Sequence, description: str, label: Callable[[object], str] = str) -> Iterable:
    """tqdm over `items` where tqdm is installed (the `bench` extra); otherwise a log line per item, naming it by
    `label(item)` (one short line: an item holding a module would otherwise log its whole repr)."""
    try:
        from tqdm import tqdm
    except ImportError:
        logger.warning("tqdm is not installed (pip install '.[bench]'): logging progress per row instead")
        return _logged(items, description, label)
    return tqdm(items, desc=description)


def _logged(items: Sequence, description: str, label: Callable[[object], str]) -> Iterable:
    for index, item in enumerate(items, 1):
        logger.info("%s %d/%d: %s", description, index, len(items), label(item))
        yield item


INTERRUPTED = {"status": "interrupted", "reason": "stopped by SIGINT (e.g. timeout -s INT) before the next row"}


def collect(rows: Iterable[dict], checkpoint: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """The rows of a benchmark generator; on Ctrl-C / SIGINT, those measured so far plus an INTERRUPTED marker row,
    so that a time-boxed run (the GPU check script) still writes what it measured. `checkpoint` gets the rows so far
    after each one: a process killed outright (SIGINT lands in a compiler that holds on past the time box's grace,
    then SIGKILL) has then already written them."""
    collected: list[dict] = []
    try:
        for row in rows:
            collected.append(row)
            if checkpoint is not None:
                checkpoint(collected)
    except KeyboardInterrupt:
        logger.warning("interrupted after %d rows: writing those", len(collected))
        collected.append(dict(INTERRUPTED))
    return collected


def interrupted(rows: Sequence[dict]) -> bool:
    return bool(rows) and rows[-1].get("status") == INTERRUPTED["status"]


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend, or None (with a warning) where matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not installed (pip install '.[bench]'): no PNG chart")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass(frozen=True)
class RunArgs:
    """The command line the benchmark scripts share; `choices` is the list each one names (variants, backends)."""

    device: torch.device
    dtype: torch.dtype
    archs: list[str]
    batches: list[int]
    choices: list[str]
    input_size: int
    compile_budget_s: float
    cpu_seconds: float
    out_dir: Path
    allow_tf32: bool = False  # --dtype tf32: float32 with TF32 products, in our kernels and in cuDNN/cuBLAS
    inputs: list[str] = field(default_factory=list)  # bench.model: where each batch starts (device, pinned, ...)
    reps: int = 0  # bench.layers: profiled forward passes per batch
    dry_run: bool = False

    @property
    def precision(self) -> Precision:
        return Precision(self.dtype, self.allow_tf32)


def parse_run_args(
    doc: str,
    *,
    archs: Sequence[str],
    batches: Sequence[int],
    default_archs: Sequence[str] | None = None,
    choices_flag: str | None = None,
    choices: Sequence[str] = (),
    inputs: Sequence[str] = (),
    compile_budget_s: float | None = None,
    cpu_seconds: float | None = None,
    reps: int | None = None,
    argv: Sequence[str] | None = None,
) -> RunArgs:
    """Parses --device --dtype --arch --batch --input-size --out-dir --kernel-cache-dir --dry-run, and those of
    <choices_flag>, --inputs, --compile-budget-s, --cpu-seconds and --reps that the caller gives defaults for; sets up
    logging, sets TF32 for cuDNN and cuBLAS as --dtype says (off for float32: rows compare IEEE float32 with IEEE
    float32, as our kernels do unless asked; on for tf32: every row may take TF32, ours included) and points the
    kernels' cache at --kernel-cache-dir."""
    parser = argparse.ArgumentParser(
        prog=command_name(), description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", type=torch.device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=PRECISIONS, default=None, help="default: bfloat16 on CUDA, float32 on a CPU; tf32: GPU only"
    )
    parser.add_argument("--arch", nargs="+", choices=archs, default=list(default_archs or archs))
    parser.add_argument("--batch", nargs="+", type=_positive_int, default=list(batches))
    if choices_flag is not None:
        parser.add_argument(choices_flag, dest="choices", nargs="+", choices=choices, default=list(choices))
    if inputs:
        parser.add_argument("--inputs", nargs="+", choices=inputs, default=list(inputs), help="where a batch starts")
    parser.add_argument("--input-size", type=_positive_int, default=224)
    if compile_budget_s is not None:
        parser.add_argument("--compile-budget-s", type=float, default=compile_budget_s, help="torch.compile seconds")
    if cpu_seconds is not None:
        parser.add_argument("--cpu-seconds", type=float, default=cpu_seconds, help="timing budget per row on a CPU")
    if reps is not None:
        parser.add_argument("--reps", type=_positive_int, default=reps, help="profiled passes per batch")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--kernel-cache-dir",
        type=Path,
        help="keep compiled kernels and autotune results here, per platform, as the server's flag of that name does",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="check the arguments and list the rows, measuring nothing (any machine)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    precision = PRECISIONS[args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32")]
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = precision.allow_tf32
    if args.kernel_cache_dir is not None and not args.dry_run:
        from kernels import use_cache_dir

        use_cache_dir(args.kernel_cache_dir)
    return RunArgs(
        device=args.device,
        dtype=precision.dtype,
        archs=args.arch,
        batches=args.batch,
        choices=getattr(args, "choices", []),
        input_size=args.input_size,
        compile_budget_s=getattr(args, "compile_budget_s", 0.0),
        cpu_seconds=getattr(args, "cpu_seconds", 0.0),
        out_dir=args.out_dir,
        allow_tf32=precision.allow_tf32,
        inputs=getattr(args, "inputs", []),
        reps=getattr(args, "reps", 0),
        dry_run=args.dry_run,
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def dry_run(run: RunArgs, plan: Sequence[str]) -> None:
    """What --dry-run does: checks that the results folder can be written and logs the rows a run would measure."""
    run.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=run.out_dir):
        pass
    dtype = str(run.dtype).removeprefix("torch.")
    logger.info("dry run on %s, %s: %d rows would be measured, into %s", run.device, dtype, len(plan), run.out_dir)
    for line in plan:
        logger.info("  %s", line)


def run_and_write(
    rows: Iterable[dict],
    run: RunArgs,
    *,
    name: str,
    question: str,
    columns: Sequence[Column],
    title: str,
    plot: Callable[[list[dict], Path, str], None] | None = None,
    plot_title: str = "",
    summarize: Callable[[list[dict]], list[dict]] | None = None,
    summary_columns: Sequence[Column] = (),
) -> None:
    """Measures `rows`, rewriting <stem>.json and .md under run.out_dir after each one ("complete": false until the
    end; an interrupt keeps the rows done), then the .png (with `plot`); `summarize` turns the rows into the report's
    "summary" rows, shown first in the markdown by `summary_columns`."""
    started = datetime.datetime.now(datetime.UTC)
    dtype_name = run.precision.name
    stem = result_stem(name, run.device, dtype_name, started)
    host = machine()  # once: the checkpoints below rewrite the report after every row

    def write(measured: list[dict], complete: bool) -> list[Path]:
        report = {
            "question": question,
            "date": started.isoformat(timespec="seconds"),
            "machine": host,
            "device": str(run.device),
            "dtype": dtype_name,
            "input_size": run.input_size,
            "loadavg_after": os.getloadavg(),
            "complete": complete,
            "timings": TIMINGS,
            "rows": measured,
        }
        if summarize is not None:
            report["summary"] = summarize(measured)
        title_line = f"{title}, {run.device}, {dtype_name}"
        return write_results(report, columns, run.out_dir, stem, title_line, summary_columns)

    measured = collect(rows, checkpoint=lambda so_far: write(so_far, complete=False))
    logger.info("wrote %s", " and ".join(str(path) for path in write(measured, complete=not interrupted(measured))))
    if plot is not None:
        plot(measured, run.out_dir / f"{stem}.png", f"{plot_title}, {run.device}, {dtype_name}")
