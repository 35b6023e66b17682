"""bench.decode: rows for both decoders, the scaled one with its speedup and its distance from the plain pixels."""

import subprocess
import sys
from pathlib import Path

from bench import decode

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_measure_times_both_decoders_and_compares_their_pixels():
    rows = decode.measure(decode.photo_jpeg(1100, 1040), "1100x1040", reps=2, warmup=0)
    assert [row["decoder"] for row in rows] == ["pillow", "pillow-draft"]
    assert all(row["reps"] == 2 and row["p20_ms"] <= row["median_ms"] <= row["p80_ms"] for row in rows)
    assert rows[1]["speedup"] > 0 and 0 <= rows[1]["mean_abs_diff"] < 3  # 1/2 scale: close to the full decode


def test_help_names_the_command_to_type():
    done = subprocess.run(
        [sys.executable, "-m", "bench.decode", "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m bench.decode "), done.stdout.splitlines()[0]
