"""Compile every kernel specialization for sm_90 or sm_80 without a GPU, and tabulate what ptxas made of it.

    python -m kernels.report [--arch 90|80] [--json PATH] [--jobs N] [--cover] [--kernel NAME ...]

The cases come from ``compile_cases()`` of every module in ``kernels/`` that defines a kernel (one without it is
logged and listed in the JSON as uncovered). For each case: registers, spills (the byte counts ptxas reports and the
LDL/STL instructions in the SASS), shared memory, tensor-core instructions (HGMMA is wgmma on sm_90, HMMA is
mma.sync), tensor-memory-accelerator copies (TMA: UTMALDG loads and UTMASTG stores, sm_90), register reallocation
between warp groups (USETMAXREG, PTX setmaxnreg: the mark of Hopper warp specialization) and compile seconds.
Pointer arguments are compiled as 16-byte aligned, as Triton's launch specializes every tensor torch allocates;
integer arguments are left unspecialized, the worst case (a launch with, say, C a multiple of 16 gets vector loads
and needs fewer registers). Exits with 1 when a case fails to compile.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import logging
import math
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import ModuleType

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction, KernelInterface

from kernels._common import CompileCase

logger = logging.getLogger(__name__)

NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
RESOURCES_RE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)")
# "/*0a30*/  @!P0 HGMMA.64x64x16.F32.BF16 ..." -> "HGMMA"
OPCODE_RE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", re.MULTILINE)


@dataclasses.dataclass
class CaseReport:
    """What one compiled specialization costs on the target; the measurements stay None when it failed."""

    kernel: str
    variant: str
    dtype: str
    tile: str
    block_m: int | None
    warps: int
    stages: int
    registers: int | None = None
    spill_store_bytes: int | None = None
    spill_load_bytes: int | None = None
    spill_instructions: int | None = None  # LDL + STL in the SASS
    stack_bytes: int | None = None
    shared_bytes: int | None = None  # what Triton asks for at launch (dynamic shared memory)
    hgmma: int | None = None
    hmma: int | None = None
    tma: int | None = None  # UTMALDG + UTMASTG
    setmaxnreg: int | None = None  # USETMAXREG
    compile_seconds: float | None = None
    error: str | None = None


def _defines_kernel(module: ModuleType) -> bool:
    """Whether ``module`` itself defines a Triton kernel (jitted, autotuned or interpreted)."""
    for value in vars(module).values():
        if isinstance(value, KernelInterface):
            fn = value
            while hasattr(fn, "fn"):  # Autotuner -> JITFunction -> the Python function
                fn = fn.fn
            if getattr(fn, "__module__", None) == module.__name__:
                return True
    return False


def kernel_modules() -> list[ModuleType]:
    """The public modules of the ``kernels`` package that define a kernel (not config or helper modules)."""
    package = importlib.import_module("kernels")
    names = sorted(f"kernels.{m.name}" for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))
    modules = (importlib.import_module(name) for name in names)
    return [module for module in modules if _defines_kernel(module)]


def _run_tool(tool: str, *args: str) -> str:
    return subprocess.run([str(NVIDIA_BIN / tool), *args], check=True, capture_output=True, text=True).stdout


def _measure(module_name: str, index: int, arch: int) -> CaseReport:
    """Case ``index`` of ``module_name``'s compile_cases() measured for ``sm_<arch>``; runs in a pool worker."""
    return measure_case(importlib.import_module(module_name).compile_cases()[index], arch)


def measure_case(case: CompileCase, arch: int) -> CaseReport:
    """Compile ``case`` for ``sm_<arch>`` and read its resources. Needs TRITON_DUMP_PTXAS_LOG=1 for the spill byte
    counts and TRITON_ALWAYS_COMPILE=1 (a cache hit skips ptxas), as `main` sets for its workers."""
    report = CaseReport(
        kernel=case.kernel,
        variant=case.variant,
        dtype=str(case.dtype).removeprefix("torch."),
        tile=" ".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in case.constexprs.items() if k.startswith("BLOCK_")),
        block_m=case.block_m,
        warps=case.num_warps,
        stages=case.num_stages,
    )
    arg_names = list(case.signature)
    aligned = {(arg_names.index(a),): [["tt.divisibility", 16]] for a, t in case.signature.items() if t[0] == "*"}
    source = ASTSource(fn=JITFunction(case.fn), signature=case.signature, constexprs=case.constexprs, attrs=aligned)
    ptxas_log = io.StringIO()
    start = time.perf_counter()
    try:
        # Triton prints ptxas's -v log (with the spill byte counts) when TRITON_DUMP_PTXAS_LOG is set (see main).
        with contextlib.redirect_stdout(ptxas_log):
            compiled = triton.compile(
                source,
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": case.num_warps, "num_stages": case.num_stages},
            )
    except Exception as e:  # a failed case is a row of the report, not the end of it
        report.error = f"{type(e).__name__}: {e}"
        return report
    report.compile_seconds = round(time.perf_counter() - start, 2)

    if spills := SPILL_RE.search(ptxas_log.getvalue()):
        report.spill_store_bytes, report.spill_load_bytes = map(int, spills.groups())
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        resource_usage = _run_tool("cuobjdump", "--dump-resource-usage", str(cubin))
        opcodes = Counter(OPCODE_RE.findall(_run_tool("nvdisasm", str(cubin))))
    resources = RESOURCES_RE.search(resource_usage)
    if resources is None:
        raise RuntimeError(f"cuobjdump printed no register and stack usage:\n{resource_usage[:2000]}")
    report.registers, report.stack_bytes = int(resources.group(1)), int(resources.group(2))
    report.shared_bytes = compiled.metadata.shared
    report.spill_instructions = opcodes["LDL"] + opcodes["STL"]
    report.hgmma, report.hmma = opcodes["HGMMA"], opcodes["HMMA"]
    report.tma = opcodes["UTMALDG"] + opcodes["UTMASTG"]
    report.setmaxnreg = opcodes["USETMAXREG"]
    return report


def collect_cases() -> tuple[list[tuple[str, int, CompileCase]], list[str]]:
    """(module name, index, case) of every compile case, and the kernel modules without ``compile_cases()``."""
    cases, uncovered = [], []
    for module in kernel_modules():
        if not hasattr(module, "compile_cases"):
            logger.warning("%s has no compile_cases(): its kernels are not in the report", module.__name__)
            uncovered.append(module.__name__)
            continue
        cases += [(module.__name__, i, case) for i, case in enumerate(module.compile_cases())]
    return cases, uncovered


def covering_subset(cases: list[CompileCase]) -> list[int]:
    """Indices of a subset of ``cases`` that still has every config and every fused variant of each kernel and dtype.

    Per kernel and dtype: every variant (the constexprs other than the tile) at the config with the most tile
    elements per warp, the most registers per thread and so the likeliest to spill (the first listed on ties), and
    then each config and variant not seen yet, once.
    """

    def config(case: CompileCase) -> tuple:
        blocks = sorted((k, v) for k, v in case.constexprs.items() if k.startswith("BLOCK_"))
        return (tuple(blocks), case.num_warps, case.num_stages)

    def variant(case: CompileCase) -> tuple:
        return tuple(sorted((k, repr(v)) for k, v in case.constexprs.items() if not k.startswith("BLOCK_")))

    def elements_per_warp(case: CompileCase) -> float:
        return math.prod(v for k, v in case.constexprs.items() if k.startswith("BLOCK_")) / case.num_warps

    groups: dict[tuple, list[int]] = {}
    for i, case in enumerate(cases):
        groups.setdefault((case.kernel, case.dtype), []).append(i)
    chosen = []
    for members in groups.values():
        widest = config(cases[max(members, key=lambda i: elements_per_warp(cases[i]))])
        picked = [i for i in members if config(cases[i]) == widest]
        configs, variants = {widest}, {variant(cases[i]) for i in picked}
        for i in members:
            if config(cases[i]) not in configs or variant(cases[i]) not in variants:
                picked.append(i)
                configs.add(config(cases[i]))
                variants.add(variant(cases[i]))
        chosen += picked
    return sorted(chosen)


def format_table(reports: list[CaseReport]) -> str:
    header = (
        "kernel",
        "variant",
        "dtype",
        "tile",
        "warps",
        "stages",
        "regs",
        "spill B st/ld",
        "LDL+STL",
        "smem B",
        "HGMMA",
        "HMMA",
        "TMA",
        "setmaxnreg",
        "secs",
    )
    rows: list[tuple[object, ...]] = [header]
    for r in reports:
        row = (r.kernel, r.variant, r.dtype, r.tile, r.warps, r.stages)
        if r.error is not None:
            rows.append((*row, f"FAILED: {r.error.splitlines()[0][:80]}"))
            continue
        spills = f"{r.spill_store_bytes}/{r.spill_load_bytes}"
        resources = (r.registers, spills, r.spill_instructions, r.shared_bytes, r.hgmma, r.hmma, r.tma, r.setmaxnreg)
        rows.append((*row, *resources, r.compile_seconds))
    widths = [max(len(str(row[i])) for row in rows if i < len(row)) for i in range(len(header))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=False)).rstrip() for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.report", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, choices=(90, 80), default=90, help="compute capability to compile for")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--jobs", type=int, default=2, help="compiler processes")
    parser.add_argument(
        "--cover",
        action="store_true",
        help="compile only a subset covering every config and every fused variant of each kernel and dtype "
        "(see covering_subset); the full product takes minutes per arch",
    )
    parser.add_argument("--kernel", action="append", help="only this kernel (CompileCase.kernel); repeatable")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    # The compiler needs @triton.jit to build JITFunctions: under TRITON_INTERPRET=1 kernel modules (and the jitted
    # helpers they call) hold interpreter functions that triton.compile cannot lower. So the variable is removed
    # before any kernel module is imported, and the compiling happens in spawned workers, which inherit the cleaned
    # environment and import the kernels afresh, even where this process had imported them under the interpreter.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a cache hit would skip ptxas: no log, no compile time
    cases, uncovered = collect_cases()
    cases = [entry for entry in cases if entry[2].min_arch <= args.arch]
    total = len(cases)
    if args.kernel:
        cases = [entry for entry in cases if entry[2].kernel in args.kernel]
    if args.cover:
        cases = [cases[i] for i in covering_subset([case for _, _, case in cases])]
    logger.info("compiling %d of %d cases for sm_%d in %d processes", len(cases), total, args.arch, args.jobs)
    with tempfile.TemporaryDirectory(prefix="kernels-report-") as cache_dir:
        os.environ["TRITON_CACHE_DIR"] = cache_dir  # leave the user's Triton cache alone
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_measure, module, index, args.arch) for module, index, _ in cases]
            reports = [future.result() for future in futures]

    for r in reports:
        if r.error is not None:
            logger.error("%s %s failed to compile: %s", r.kernel, r.variant, r.error)
    sys.stdout.write(format_table(reports) + "\n")
    if args.json is not None:
        results = {
            "arch": args.arch,
            "kernel_modules": [module.__name__ for module in kernel_modules()],
            "uncovered_modules": uncovered,
            "total_cases": total,
            "cases": [dataclasses.asdict(r) for r in reports],
        }
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if any(r.error is not None for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
