"""The sm_90 / sm_80 compile report (`python -m kernels.report`) over every kernel module's compile_cases().

The report runs as a subprocess without TRITON_INTERPRET, so it compiles real GPU code on this CPU-only machine.
Every case, the full product of configs, dtypes and fused variants: about 170 s of compile time per arch here.
The TMA and warp-specialization counts are checked on probe kernels (tests/kernels/report_probes.py) whose SASS
must have them or must not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXPECTED_KERNELS = {"conv_bn_act", "max_pool2d_nhwc", "avgpool_linear"}


@pytest.fixture(scope="module", params=[90, 80], ids=lambda arch: f"sm_{arch}")
def report(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    arch = request.param
    path = tmp_path_factory.mktemp("report") / f"sm_{arch}.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "kernels.report", "--arch", str(arch), "--json", str(path)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if not path.exists():
        pytest.fail(f"the report wrote no JSON (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return {**json.loads(path.read_text()), "returncode": proc.returncode, "stderr": proc.stderr}


_MEASURE_PROBES = """
import dataclasses, json, os, sys, tempfile
os.environ.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1", TRITON_CACHE_DIR=tempfile.mkdtemp())
from kernels.report import measure_case
from tests.kernels.report_probes import compile_cases
print(json.dumps({case.variant: dataclasses.asdict(measure_case(case, 90)) for case in compile_cases()}))
"""


def _name(case: dict) -> str:
    return f"{case['kernel']} {case['variant']}"


def test_every_kernel_module_has_compile_cases(report):
    assert report["uncovered_modules"] == []
    assert {case["kernel"] for case in report["cases"]} >= EXPECTED_KERNELS


def test_every_case_compiles(report):
    failures = [f"{_name(case)}: {case['error']}" for case in report["cases"] if case["error"] is not None]
    assert not failures, "\n".join(failures)
    assert report["returncode"] == 0, report["stderr"][-4000:]


def test_no_case_spills(report):
    spilling = [
        f"{_name(case)}: {case['spill_store_bytes']}/{case['spill_load_bytes']} bytes stored/loaded, "
        f"{case['spill_instructions']} LDL/STL"
        for case in report["cases"]
        if case["error"] is None
        and (case["spill_store_bytes"], case["spill_load_bytes"], case["spill_instructions"]) != (0, 0, 0)
    ]
    assert not spilling, "\n".join(spilling)


def test_half_precision_tensor_core_tiles_use_tensor_cores(report):
    # wgmma (HGMMA) needs a 64-row tile on sm_90; sm_80 has only mma.sync (HMMA).
    instruction = "hgmma" if report["arch"] == 90 else "hmma"
    tiles = [
        case
        for case in report["cases"]
        if case["error"] is None and case["dtype"] in ("float16", "bfloat16") and (case["block_m"] or 0) >= 64
    ]
    without = [_name(case) for case in tiles if case[instruction] == 0]
    assert not without, f"no {instruction.upper()} in:\n" + "\n".join(without)


def test_report_counts_tma_copies_and_warp_specialization_in_the_sass():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-c", _MEASURE_PROBES]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    probes = json.loads(proc.stdout.splitlines()[-1])
    assert all(probe["error"] is None for probe in probes.values()), probes
    pointer, tma, specialized = probes["pointer"], probes["tma"], probes["tma warp-specialized"]
    assert (pointer["tma"], pointer["setmaxnreg"]) == (0, 0)
    assert tma["tma"] > 0 and tma["setmaxnreg"] == 0
    assert specialized["tma"] > 0 and specialized["setmaxnreg"] > 0
    assert tma["hgmma"] > 0 and specialized["hgmma"] > 0


def test_every_case_reports_tma_and_setmaxnreg(report):
    # DESIGN.md contract 9: the JSON carries "tma" per case (and "setmaxnreg" beside it).
    measured = [case for case in report["cases"] if case["error"] is None]
    assert measured and all(isinstance(case["tma"], int) and isinstance(case["setmaxnreg"], int) for case in measured)
