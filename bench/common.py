"""Helpers the benchmark scripts share: timing with quantiles, the machine's description, and result files.

A result is written as `<stem>.json` (everything) and `<stem>.md` (a table of the rows), where the stem names the
question, the device and the UTC time, so results from different cards and days sit side by side in bench/results/.
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
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.precision import PRECISIONS, Precision

RESULTS = Path(__file__).resolve().parent / "results"
QUANTILES = (0.5, 0.2, 0.8)  # median, p20, p80: the order triton.testing.do_bench returns them in

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


def quantiles_ms(seconds: Sequence[float]) -> tuple[float, float, float]:
    """(median, p20, p80) in milliseconds."""
    return tuple(float(np.quantile(seconds, q)) * 1e3 for q in QUANTILES)


def bench_ms(fn: Callable[[], object], device: torch.device, cpu_reps: int = 20, cpu_budget_s: float = 5.0) -> dict:
    """{"median_ms", "p20_ms", "p80_ms", "reps"} of `fn`: triton's do_bench on a GPU (it flushes L2 and syncs),
    a perf_counter loop on a CPU (two warm-up calls: oneDNN picks and JITs its kernels on the first ones; then
    up to `cpu_reps` calls within `cpu_budget_s`, and at least five whatever they cost, so that p20/p80 mean something:
    ResNet-50 at batch 256 takes ~15 s a call on this machine's two cores)."""
    if device.type == "cuda":
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(fn, quantiles=list(QUANTILES))
        return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "reps": None}
    seconds = time_cpu(fn, warmup=2, reps=cpu_reps, budget_s=cpu_budget_s, min_reps=min(5, cpu_reps))
    median, p20, p80 = quantiles_ms(seconds)
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "reps": len(seconds)}


def machine() -> dict:
    """Host, CPU, GPU and library versions: what a reader needs to compare two result files."""
    import onnxruntime  # here: only the result header needs it
    import triton

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
        "cuda": torch.version.cuda,
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


def result_stem(question: str, device: torch.device, precision: str, now: datetime.datetime) -> str:
    """File name without suffix: blocks_cpu_float32_20261126T163405 (`precision`: a models.precision name)."""
    return f"{question}_{device_tag(device)}_{precision}_{now:%Y%m%dT%H%M%S}"


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
    `summary_columns`, the markdown starts with the table of report["summary"]."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    header = ", ".join(f"{key} {value}" for key, value in report["machine"].items() if value is not None)
    tables = markdown_table(report["rows"], columns)
    if summary_columns:
        tables = f"## Summary\n\n{markdown_table(report['summary'], summary_columns)}\n## Rows\n\n{tables}"
    md_path.write_text(f"# {title}\n\n{report['date']}; {header}\n\n{tables}")
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
    """The command line both benchmark scripts share; `choices` is their one differing list (variants, backends)."""

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

    @property
    def precision(self) -> Precision:
        return Precision(self.dtype, self.allow_tf32)


def parse_run_args(
    doc: str,
    *,
    archs: Sequence[str],
    batches: Sequence[int],
    choices_flag: str,
    choices: Sequence[str],
    compile_budget_s: float,
    cpu_seconds: float,
) -> RunArgs:
    """Parses --device --dtype --arch --batch <choices_flag> --input-size --compile-budget-s --cpu-seconds --out-dir,
    sets up logging, and sets TF32 for cuDNN and cuBLAS as --dtype says: off for float32 (rows compare IEEE float32
    with IEEE float32, as our kernels do unless asked), on for tf32 (every row may take TF32, ours included)."""
    parser = argparse.ArgumentParser(
        prog=command_name(), description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=PRECISIONS, default=None, help="default: bfloat16 on CUDA, float32 on a CPU; tf32: GPU only"
    )
    parser.add_argument("--arch", nargs="+", choices=archs, default=list(archs))
    parser.add_argument("--batch", nargs="+", type=int, default=list(batches))
    parser.add_argument(choices_flag, nargs="+", choices=choices, default=list(choices))
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument(
        "--compile-budget-s", type=float, default=compile_budget_s, help="seconds torch.compile may take"
    )
    parser.add_argument("--cpu-seconds", type=float, default=cpu_seconds, help="timing budget per row on a CPU")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    precision = PRECISIONS[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = precision.allow_tf32
    return RunArgs(
        device=device,
        dtype=precision.dtype,
        archs=args.arch,
        batches=args.batch,
        choices=getattr(args, choices_flag.removeprefix("--").replace("-", "_")),
        input_size=args.input_size,
        compile_budget_s=args.compile_budget_s,
        cpu_seconds=args.cpu_seconds,
        out_dir=args.out_dir,
        allow_tf32=precision.allow_tf32,
    )


def run_and_write(
    rows: Iterable[dict],
    run: RunArgs,
    *,
    name: str,
    question: str,
    columns: Sequence[Column],
    title: str,
    plot: Callable[[list[dict], Path, str], None],
    plot_title: str,
    summarize: Callable[[list[dict]], list[dict]] | None = None,
    summary_columns: Sequence[Column] = (),
) -> None:
    """Measures `rows`, rewriting <stem>.json and .md under run.out_dir after each one ("complete": false until the
    end; an interrupt keeps the rows done), then the .png; `summarize` turns the rows into the report's "summary"
    rows, shown first in the markdown by `summary_columns`."""
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
            "rows": measured,
        }
        if summarize is not None:
            report["summary"] = summarize(measured)
        title_line = f"{title}, {run.device}, {dtype_name}"
        return write_results(report, columns, run.out_dir, stem, title_line, summary_columns)

    measured = collect(rows, checkpoint=lambda so_far: write(so_far, complete=False))
    logger.info("wrote %s", " and ".join(str(path) for path in write(measured, complete=not interrupted(measured))))
    plot(measured, run.out_dir / f"{stem}.png", f"{plot_title}, {run.device}, {dtype_name}")
