"""What the Locust users send: encoded images for Classify, random tensors and raw pixels for KServe ModelInfer."""

from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def digits_pngs() -> list[bytes]:
    """PNG bytes of the digits held-out split (360 real 8x8 scans), the images digits_resnet was measured on."""
    # Imported here: models.digits needs scikit-learn (a test dependency), which --image-dir runs do without.
    from models.digits import load_split, to_png

    _, test = load_split()
    return [to_png(image) for image in test.images]


def write_digits_pngs(folder: Path) -> Path:
    """The digits held-out PNGs as files in `folder` (created), for --image-dir; returns `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, png in enumerate(digits_pngs()):
        (folder / f"digit_{index:03d}.png").write_bytes(png)
    return folder


def folder_images(folder: Path) -> list[bytes]:
    """The bytes of every JPEG/PNG file directly in `folder` (sorted by name); ValueError when there is none."""
    paths = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"no {'/'.join(IMAGE_SUFFIXES)} files in {folder}")
    return [path.read_bytes() for path in paths]


def images(image_dir: str) -> list[bytes]:
    """The images of `image_dir`, or the digits held-out PNGs when it is empty."""
    return folder_images(Path(image_dir)) if image_dir else digits_pngs()


def random_tensor(shape: tuple[int, ...], rng: np.random.Generator) -> bytes:
    """Little-endian float32 bytes of a standard-normal tensor of `shape` (e.g. [N, 3, S, S]), as raw_input_contents."""
    return rng.standard_normal(shape, dtype=np.float32).astype("<f4").tobytes()


def random_pixels(shape: tuple[int, ...], rng: np.random.Generator) -> bytes:
    """Uniform uint8 bytes 0..255 of `shape` (e.g. [N, S, S, 3], NHWC raw images), as raw_input_contents."""
    return rng.integers(0, 256, shape, dtype=np.uint8).tobytes()
