"""What a model takes as input, and how a decoded image becomes it: the recipes `models.input_spec` hands out.

Two recipes. ImageNet models (torchvision's evaluation recipe): shorter side resized (bilinear) to 256/224 of the
input size, center crop, ImageNet mean/std. Grayscale models (digits_resnet): the whole image converted to luminance,
resized (bilinear) to the input size, normalized with the training set's mean/std, replicated to three channels.
Training, evaluation and serving all make the pixels with `prepare_pixels`, so served accuracy equals the measured
one. Serving stops at the uint8 pixels (the backends normalize on their device, `normalization_affine`); training and
evaluation call `prepare_image`, the same pixels normalized here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from models.image_modes import to_8bit

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's evaluation recipe: resize to 256, crop 224; the same ratio at other input sizes.
_IMAGENET_RESIZE_RATIO = 256 / 224


@dataclass(frozen=True)
class InputSpec:
    """How one model's input is made from an image: uint8 pixels [S, S, 3], normalized with mean/std."""

    input_size: int
    grayscale: bool  # True: luminance, resized whole to input_size (no crop), replicated to 3 channels
    resize: int  # shorter side before the center crop (RGB); input_size itself for grayscale
    mean: tuple[float, float, float]  # per channel, of intensities in [0, 1]
    std: tuple[float, float, float]


def imagenet_input(input_size: int) -> InputSpec:
    if input_size < 1:
        raise ValueError(f"input_size must be positive, got {input_size}")
    return InputSpec(input_size, False, round(input_size * _IMAGENET_RESIZE_RATIO), IMAGENET_MEAN, IMAGENET_STD)


def normalization_affine(
    mean: Sequence[float], std: Sequence[float], channels: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) [C] float32 that map raw 0..255 values to (x/255 - mean) / std, as x * scale + shift.

    mean, std: per channel, in 0..1 units as torchvision writes them. ValueError unless there are `channels` of each,
    finite, with every std positive.
    """
    mean_t = torch.as_tensor(mean, dtype=torch.float64).flatten()
    std_t = torch.as_tensor(std, dtype=torch.float64).flatten()
    if mean_t.numel() != channels or std_t.numel() != channels:
        raise ValueError(f"input_mean and input_std need {channels} values each (one per channel)")
    if not (torch.isfinite(mean_t).all() and torch.isfinite(std_t).all() and (std_t > 0).all()):
        raise ValueError(f"input_std must be positive and input_mean finite, got mean {mean} std {std}")
    return (1 / (255 * std_t)).float(), (-mean_t / std_t).float()


def prepare_image(image: Image.Image, spec: InputSpec) -> torch.Tensor:
    """Any decoded PIL image -> float32 [3, input_size, input_size], contiguous, as the model of `spec` takes it."""
    pixels = prepare_pixels(image, spec).transpose(2, 0, 1)  # [3, S, S] view
    # numpy, not torch: torch would run these element-wise ops on its intra-op thread pool, which under concurrent
    # decoder threads and a busy backend costs tens of milliseconds per image in synchronization (measured: 50 ms
    # against 0.3 ms for a 224x224 image on this 2-core machine).
    out = pixels.astype(np.float32, order="C")
    # (x / 255 - mean) / std as one subtract and one multiply in the 0..255 domain.
    out -= np.asarray(spec.mean, dtype=np.float32).reshape(3, 1, 1) * 255
    out *= 1 / (np.asarray(spec.std, dtype=np.float32).reshape(3, 1, 1) * 255)
    return torch.from_numpy(out)


def prepare_pixels(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """Any decoded PIL image -> uint8 [input_size, input_size, 3] (HWC, contiguous), resized and cropped as the model
    of `spec` takes it, not yet normalized. Every mode Pillow opens is brought to 8 bits first (`to_8bit`)."""
    image = to_8bit(image)
    if spec.grayscale:
        size = spec.input_size
        gray = np.asarray(image.convert("L").resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
        # The three channels are one luminance: digits_resnet was trained on it replicated.
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.array(_resize_and_crop(image.convert("RGB"), spec), dtype=np.uint8)  # a writable copy, for torch


def _resize_and_crop(image: Image.Image, spec: InputSpec) -> Image.Image:
    """RGB image -> S x S: resize shorter side (bilinear), center crop as torchvision does."""
    width, height = image.size
    # torchvision's Resize(int), same arithmetic: the shorter side becomes `resize`, the longer one is truncated.
    if width <= height:
        size = (spec.resize, int(spec.resize * height / width))
    else:
        size = (int(spec.resize * width / height), spec.resize)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    crop = spec.input_size
    left = round((size[0] - crop) / 2)
    top = round((size[1] - crop) / 2)
    return image.crop((left, top, left + crop, top + crop))
