"""Image bytes -> model input: safe decoding with Pillow, then each model's preprocessing.

ImageNet models: shorter side resized to `resize` (bilinear), center crop to `input_size`, ImageNet mean/std, the
torchvision reference recipe. digits_resnet: `models.digits.preprocess`, the very function its training and
evaluation use, so served accuracy equals the measured one.

Decoding is defensive: only JPEG/PNG/WebP/BMP are identified, the pixel count the header claims is checked before
any pixel is decoded, and the full decode happens inside the error handling so truncated data is caught here.
Called off the event loop (CPU-bound).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from models import digits

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's evaluation recipe: resize to 256, crop 224; the same ratio at other input sizes.
_IMAGENET_RESIZE_RATIO = 256 / 224
DIGITS_ARCH = "digits_resnet"


class InvalidImageError(ValueError):
    """Empty, truncated, corrupt or non-image bytes, or a format other than JPEG/PNG/WebP/BMP (INVALID_ARGUMENT)."""


class ImageTooLargeError(Exception):
    """The image header claims more pixels than allowed (RESOURCE_EXHAUSTED). Not a ValueError on purpose."""


@dataclass(frozen=True)
class PreprocessSpec:
    input_size: int  # output is [3, input_size, input_size]
    grayscale: bool  # True: the digits path (models.digits.preprocess); resize/mean/std are then its constants
    resize: int  # shorter side before the center crop
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def spec_for(arch: str, input_size: int) -> PreprocessSpec:
    """Preprocessing of model `arch` served at `input_size` (digits_resnet accepts only its trained 32)."""
    if input_size < 1:
        raise ValueError(f"input_size must be positive, got {input_size}")
    if arch == DIGITS_ARCH:
        if input_size != digits.INPUT_SIZE:
            raise ValueError(f"{DIGITS_ARCH} takes {digits.INPUT_SIZE}x{digits.INPUT_SIZE} inputs, not {input_size}")
        return PreprocessSpec(input_size, True, digits.INPUT_SIZE, (digits.MEAN,) * 3, (digits.STD,) * 3)
    resize = round(input_size * _IMAGENET_RESIZE_RATIO)
    return PreprocessSpec(input_size, False, resize, IMAGENET_MEAN, IMAGENET_STD)


def decode_image(data: bytes, spec: PreprocessSpec, *, max_pixels: int) -> torch.Tensor:
    """Encoded image bytes -> float32 [3, input_size, input_size], normalized for the model of `spec`.

    Raises InvalidImageError or ImageTooLargeError (header checked against `max_pixels` before decoding).
    """
    image = open_image(data, max_pixels=max_pixels)
    if spec.grayscale:
        return digits.preprocess(image)
    return _imagenet_tensor(image.convert("RGB"), spec)


def open_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode fully, with EXIF orientation applied. The header's size is checked before the pixels are decoded."""
    if not data:
        raise InvalidImageError("empty image")
    try:
        with warnings.catch_warnings():
            # Pillow warns between its own limit and twice it; our max_pixels check is the one that decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)  # lazy: reads the header only
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLargeError(f"image is {width}x{height} = {width * height} pixels, the limit is {max_pixels}")
        image.load()  # the real decode: truncated or corrupt data fails here
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy for the usual image without a rotation
        return image
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(str(error)) from error
    except UnidentifiedImageError as error:
        raise InvalidImageError(f"not a JPEG, PNG, WebP or BMP image ({len(data)} bytes)") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        # Pillow's decoders report truncated or corrupt data with any of these.
        raise InvalidImageError(f"cannot decode image: {error}") from error


def _imagenet_tensor(image: Image.Image, spec: PreprocessSpec) -> torch.Tensor:
    """RGB image -> [3, S, S]: resize shorter side (bilinear), center crop as torchvision does, normalize."""
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
    image = image.crop((left, top, left + crop, top + crop))
    # numpy, not torch: torch would run these element-wise ops on its intra-op thread pool, which under concurrent
    # decoder threads and a busy backend costs tens of milliseconds per image in synchronization (measured: 50 ms
    # against 0.3 ms for a 224x224 image on this 2-core machine).
    pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)  # [3, S, S] view
    out = pixels.astype(np.float32, order="C")
    # (x / 255 - mean) / std as one subtract and one multiply in the 0..255 domain.
    out -= np.asarray(spec.mean, dtype=np.float32).reshape(3, 1, 1) * 255
    out *= 1 / (np.asarray(spec.std, dtype=np.float32).reshape(3, 1, 1) * 255)
    return torch.from_numpy(out)
