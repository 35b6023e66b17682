"""Image bytes -> model input: safe decoding with Pillow, then the model's own recipe (models.InputSpec), to uint8.

Which recipe a model takes (size, crop, mean/std, grayscale) is the model registry's to say (`models.input_spec`);
this module knows no model by name. The result is the uint8 pixels [S, S, 3] (NHWC): normalization is the backend's,
on its device (service/backends/base.py), so nothing here widens an image to float32.

Decoding is defensive: only JPEG/PNG/WebP/BMP are identified, the pixel count the header claims is checked before any
pixel is decoded, and the full decode happens inside the error handling so truncated data is caught here. Every
exception raised while decoding or preparing an image is the client's bytes' doing as far as the client can tell:
it becomes InvalidImageError (INVALID_ARGUMENT). Pillow's usual decode errors are not logged; any other kind (e.g.
ImageOps.exif_transpose's struct.error or TypeError on an EXIF tag of an unexpected type) is logged with its traceback
at most once per kind per minute, so a client cannot flood the log with it. Called off the event loop (CPU-bound).
"""

from __future__ import annotations

import io
import logging
import warnings

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from models.inputs import InputSpec, prepare_pixels
from service.throttled_log import TracebackThrottle

logger = logging.getLogger(__name__)

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
# How Pillow's decoders report truncated or corrupt data: expected, so never logged.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)
_unexpected_errors = TracebackThrottle(interval_s=60.0)
_MAX_DETAIL_CHARS = 200


class InvalidImageError(ValueError):
    """Empty, truncated, corrupt or non-image bytes, or a format other than JPEG/PNG/WebP/BMP (INVALID_ARGUMENT)."""


class ImageTooLargeError(Exception):
    """The image header claims more pixels than allowed (RESOURCE_EXHAUSTED). Not a ValueError on purpose."""


def decode_image(data: bytes, spec: InputSpec, *, max_pixels: int) -> torch.Tensor:
    """Encoded image bytes -> uint8 [input_size, input_size, 3] (NHWC), prepared as the model of `spec` takes it.

    Raises InvalidImageError or ImageTooLargeError (header checked against `max_pixels` before decoding), nothing else.
    """
    image = open_image(data, max_pixels=max_pixels)
    try:
        return torch.from_numpy(prepare_pixels(image, spec))
    except Exception as error:
        raise _invalid(error, len(data)) from error


def open_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode fully, with EXIF orientation applied. The header's size is checked before the pixels are decoded.

    Raises InvalidImageError or ImageTooLargeError, nothing else.
    """
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
    except ImageTooLargeError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(str(error)) from error
    except UnidentifiedImageError as error:
        raise InvalidImageError(f"not a JPEG, PNG, WebP or BMP image ({len(data)} bytes)") from error
    except Exception as error:
        raise _invalid(error, len(data)) from error


def _invalid(error: Exception, size: int) -> InvalidImageError:
    """The client's error for `error`; kinds other than Pillow's usual ones are logged, throttled."""
    kind = type(error)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    if not isinstance(error, _DECODE_ERRORS):
        _unexpected_errors.log(logger, f"unexpected {name} decoding a {size}-byte image", error)
    detail = str(error)[:_MAX_DETAIL_CHARS]  # bounded: the message travels in the status trailer
    return InvalidImageError(f"cannot decode image: {name}: {detail}")
