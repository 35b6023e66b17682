"""Does decoding JPEGs scaled down keep up? Classify's decoder with libjpeg's DCT scaling (Pillow's draft) against the
plain Pillow decode, for photos of several sizes, on one CPU thread.

Each row times `service.preprocess.decode_image` (decode, EXIF, resize and crop to uint8 [224, 224, 3], ImageNet's
recipe) over one JPEG, plain (scaled_jpeg=False) and scaled, median with the p20/p80 spread, and says how far the
scaled pixels are from the plain ones (mean |difference| in grey levels). The photos are made here (smooth colour
fields with sensor-like noise, quality 90), so the run needs no download. Writes bench/results/decode_cpu_<...>.json
and .md.

    python -m bench.decode [--reps 20] [--sizes 640x480 1920x1080 4032x3024]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import io
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import RESULTS, WALL, Column, machine, quantiles_ms, result_stem, time_cpu, write_results
from models.inputs import imagenet_input
from service.preprocess import decode_image

logger = logging.getLogger("bench.decode")

INPUT_SIZE = 224
MAX_PIXELS = 40_000_000
COLUMNS = (
    Column("photo", "photo"),
    Column("JPEG KiB", "jpeg_kib", "{:.0f}"),
    Column("decoder", "decoder"),
    Column("median ms", "median_ms", "{:.2f}"),
    Column("p20 ms", "p20_ms", "{:.2f}"),
    Column("p80 ms", "p80_ms", "{:.2f}"),
    Column("images/s", "images_per_s", "{:.0f}"),
    Column("speedup", "speedup", "{:.2f}x"),
    Column("mean abs diff (levels)", "mean_abs_diff", "{:.2f}"),
)


def photo_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """A photo-like JPEG: a smooth colour field (bicubic from 8x6 values) with mild noise, quality 90."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC
    )
    noisy = np.asarray(field, dtype=np.int16) + rng.integers(-6, 7, (height, width, 3), dtype=np.int16)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def measure(data: bytes, photo: str, reps: int, warmup: int) -> list[dict]:
    spec = imagenet_input(INPUT_SIZE)
    rows = []
    outputs = {}
    for decoder, scaled in (("pillow", False), ("pillow-draft", True)):
        outputs[decoder] = decode_image(data, spec, max_pixels=MAX_PIXELS, scaled_jpeg=scaled)
        decode = functools.partial(decode_image, data, spec, max_pixels=MAX_PIXELS, scaled_jpeg=scaled)
        seconds = time_cpu(decode, warmup, reps)
        median, p20, p80 = quantiles_ms(seconds)
        rows.append({
            "photo": photo, "jpeg_kib": len(data) / 1024, "decoder": decoder, "timing": WALL, "reps": len(seconds),
            "median_ms": median, "p20_ms": p20, "p80_ms": p80, "images_per_s": 1e3 / median,
        })  # fmt: skip
    plain, scaled_row = rows
    scaled_row["speedup"] = plain["median_ms"] / scaled_row["median_ms"]
    difference = (outputs["pillow"].int() - outputs["pillow-draft"].int()).abs().float().mean()
    scaled_row["mean_abs_diff"] = float(difference)
    for row in rows:
        logger.info(
            "%-10s %-13s median %7.2f ms  [p20 %7.2f, p80 %7.2f]  %6.0f images/s", row["photo"], row["decoder"],
            row["median_ms"], row["p20_ms"], row["p80_ms"], row["images_per_s"],
        )  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.decode", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sizes", nargs="+", default=["640x480", "1920x1080", "4032x3024"])
    parser.add_argument("--out-dir", type=str, default=str(RESULTS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)  # decoding runs on one decoder thread per request in the server

    load_before = os.getloadavg()
    rows = []
    for size in args.sizes:
        width, height = (int(side) for side in size.split("x"))
        rows += measure(photo_jpeg(width, height), size, args.reps, args.warmup)
    now = datetime.datetime.now(datetime.UTC)
    report = {
        "question": "JPEG decode + resize to 224 (Classify's decoder): Pillow's DCT-scaled draft against plain Pillow",
        "date": now.isoformat(timespec="seconds"),
        "machine": machine(),
        # The machine may be shared: load averages (1, 5, 15 min) before and after tell how quiet it was.
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "pillow": Image.__version__,
        "rows": rows,
    }
    stem = result_stem("decode", torch.device("cpu"), "uint8", now)
    for path in write_results(report, COLUMNS, Path(args.out_dir), stem, report["question"]):
        logger.info("wrote %s", path)


if __name__ == "__main__":
    main()
