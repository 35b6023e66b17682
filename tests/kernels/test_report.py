"""The sm_90 / sm_80 compile report (`python -m kernels.report`) over every kernel module's compile_cases().

The report runs as a subprocess without TRITON_INTERPRET, so it compiles real GPU code on this CPU-only machine.
Each arch compiles the covering subset (`kernels.report --cover`): every config and every fused variant of each
kernel and dtype at least once, every variant at the config likeliest to spill (200 of sm_90's 504 cases, 97 of
sm_80's 237, the TMA kernels being sm_90 only). The full product took 880 s of one of CI's 2 cores on a slow day,
which the suite's 20 minutes cannot hold; `python -m kernels.report` compiles it, as before any GPU run. Each arch
is compiled once per session however the tests are spread over xdist workers.
The TMA and warp-specialization counts are checked on probe kernels (tests/kernels/report_probes.py) whose SASS
must have them or must not.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXPECTED_KERNELS = {"conv_bn_act", "max_pool2d_nhwc", "avgpool_linear", "split_k_epilogue", "space_to_depth"}
SM90_ONLY_KERNELS = {"conv1x1_tma", "conv_tma"}  # TMA and wgmma: CompileCase.min_arch = 90
# The most dynamic shared memory one program may take: 227 KB on sm_90 (H100/H200), 163 KB on sm_80 (A100).
SHARED_MEMORY_LIMIT = {90: 232_448, 80: 166_912}


def _compile_report(arch: int, directory: Path) -> dict:
    """The report for `arch`, compiled once per test session: pytest-xdist workers share `directory`, and the first
    to take the lock compiles while the others wait for its JSON (each arch takes minutes)."""
    path, outcome = directory / f"sm_{arch}.json", directory / f"sm_{arch}.outcome.json"
    with open(directory / f"sm_{arch}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not outcome.exists():
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            command = [sys.executable, "-m", "kernels.report", "--arch", str(arch), "--json", str(path), "--cover"]
            proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
            outcome.write_text(json.dumps({"returncode": proc.returncode, "stderr": proc.stderr}))
    result = json.loads(outcome.read_text())
    if not path.exists():
        pytest.fail(f"the report wrote no JSON (exit {result['returncode']}):\n{result['stderr'][-4000:]}")
    return {**json.loads(path.read_text()), **result}


@pytest.fixture(scope="session")
def report_dir(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    # Under xdist each worker has its own basetemp inside one per-session directory; without it, basetemp is ours.
    base = tmp_path_factory.getbasetemp()
    directory = (base if worker_id == "master" else base.parent) / "compile-report"
    directory.mkdir(exist_ok=True)
    return directory


@pytest.fixture(scope="module", params=[90, 80], ids=lambda arch: f"sm_{arch}")
def report(request: pytest.FixtureRequest, report_dir: Path) -> dict:
    return _compile_report(request.param, report_dir)


@pytest.fixture(scope="module")
def report_sm90(report_dir: Path) -> dict:
    return _compile_report(90, report_dir)


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
    expected = EXPECTED_KERNELS | (SM90_ONLY_KERNELS if report["arch"] == 90 else set())
    assert {case["kernel"] for case in report["cases"]} >= expected
    if report["arch"] == 80:
        assert not {case["kernel"] for case in report["cases"]} & SM90_ONLY_KERNELS


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


def test_every_case_fits_in_shared_memory(report):
    limit = SHARED_MEMORY_LIMIT[report["arch"]]
    over = [f"{_name(c)}: {c['shared_bytes']} B" for c in report["cases"] if (c["shared_bytes"] or 0) > limit]
    assert not over, f"more than {limit} bytes of shared memory (the launch would fail):\n" + "\n".join(over)


def test_half_precision_1x1_convolutions_use_tma(report_sm90):
    # The kernels models.conv_forms runs 1x1 layers on at float16/bfloat16 on sm_90: the persistent GEMM (stride 1)
    # and the tap kernel's strided view (downsample shortcuts). The pointer kernel's 1x1 cases are the fallback for
    # cards before sm_90 and unaligned channel counts, and are not held to this.
    cases = [
        case
        for case in report_sm90["cases"]
        if case["error"] is None
        and case["dtype"] in ("float16", "bfloat16")
        and (case["kernel"] == "conv1x1_tma" or (case["kernel"] == "conv_tma" and " 1x1/2" in case["variant"]))
    ]
    assert {c["kernel"] for c in cases} == SM90_ONLY_KERNELS
    without = [_name(case) for case in cases if not case["tma"] or not case["hgmma"]]
    assert not without, "no TMA or no HGMMA in:\n" + "\n".join(without)


def test_tma_kernels_use_tma_in_every_case(report_sm90):
    cases = [c for c in report_sm90["cases"] if c["error"] is None and c["kernel"] in SM90_ONLY_KERNELS]
    assert cases and not [_name(c) for c in cases if c["tma"] == 0]


def test_warp_specialized_configs_reallocate_registers(report_sm90):
    # Configs marked "ws" ask for tl.range(warp_specialize=True); setmaxnreg is what the specialization compiles to
    # (DESIGN.md: with flatten=True, or at 8 warps, it silently does nothing).
    cases = [c for c in report_sm90["cases"] if c["error"] is None and c["kernel"] == "conv1x1_tma"]
    specialized = [c for c in cases if c["variant"].endswith(" ws")]
    assert specialized and all(c["setmaxnreg"] > 0 for c in specialized), [_name(c) for c in specialized]
    assert all(c["setmaxnreg"] == 0 for c in cases if not c["variant"].endswith(" ws"))
