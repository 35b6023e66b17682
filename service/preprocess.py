"""Image bytes -> model input: safe decoding with Pillow, then the model's own recipe (models.InputSpec).

Which recipe a model takes (size, crop, mean/std, grayscale) is the model registry's to say (`models.input_spec`);
this module knows no model by name. Decoding is defensive: only JPEG/PNG/WebP/BMP are identified, the pixel count the
header claims is checked before any pixel is decoded, and the full decode happens inside the error handling so
truncated data is caught here. Called off the event loop (CPU-bound).
"""

from __future__ import annotations

import io
import warnings

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from models.inputs import InputSpec, prepare_image

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")


class InvalidImageError(ValueError):
    """Empty, truncated, corrupt or non-image bytes, or a format other than JPEG/PNG/WebP/BMP (INVALID_ARGUMENT)."""


class ImageTooLargeError(Exception):
    """The image header claims more pixels than allowed (RESOURCE_EXHAUSTED). Not a ValueError on purpose."""


def decode_image(data: bytes, spec: InputSpec, *, max_pixels: int) -> torch.Tensor:
    """Encoded image bytes -> float32 [3, input_size, input_size], prepared as the model of `spec` takes it.

    Raises InvalidImageError or ImageTooLargeError (header checked against `max_pixels` before decoding).
    """
    return prepare_image(open_image(data, max_pixels=max_pixels), spec)


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
