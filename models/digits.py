"""The digits data path, shared by training and serving so that served accuracy equals the measured one.

Data: scikit-learn's `load_digits`, 1797 real 8x8 scans of handwritten digits (UCI), intensities 0..16, split once
with a fixed seed. Serving receives PNG bytes; `preprocess` turns any decoded PIL image into the model's input, by
the grayscale recipe of `INPUT` (models/inputs.py), which serving applies too.
"""

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from models.inputs import InputSpec, prepare_image

INPUT_SIZE = 32
# Of the training split after the resize to 32x32, intensities in [0, 1] (computed once; fixed so they never drift).
MEAN = 0.3057
STD = 0.3235
INPUT = InputSpec(INPUT_SIZE, grayscale=True, resize=INPUT_SIZE, mean=(MEAN,) * 3, std=(STD,) * 3)
_SPLIT_SEED = 0
_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class DigitsSplit:
    images: np.ndarray  # [N, 8, 8] uint8, 0..255, bright ink on a dark background
    labels: np.ndarray  # [N] int64, 0..9


def load_split() -> tuple[DigitsSplit, DigitsSplit]:
    """(train, test): a stratified 80/20 split of the 1797 scans, the same on every call."""
    # Imported here: scikit-learn is a test/training dependency, and serving never calls this.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    train_images, test_images, train_labels, test_labels = train_test_split(
        images, labels, test_size=_TEST_FRACTION, stratify=labels, random_state=_SPLIT_SEED
    )
    return DigitsSplit(train_images, train_labels), DigitsSplit(test_images, test_labels)


def to_png(image: np.ndarray) -> bytes:
    """PNG bytes (8-bit grayscale) of one [H, W] uint8 image, as a client would send it."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def preprocess(image: Image.Image) -> torch.Tensor:
    """Any PIL image -> [3, 32, 32] float32: grayscale, bilinear resize, normalised, replicated to RGB."""
    return prepare_image(image, INPUT)


def preprocess_images(images: np.ndarray) -> torch.Tensor:
    """[N, H, W] uint8 -> [N, 3, 32, 32] float32, through `preprocess` one image at a time."""
    return torch.stack([preprocess(Image.fromarray(image)) for image in images])
