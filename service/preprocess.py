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

Large JPEGs are decoded scaled down (libjpeg's DCT scaling, through Pillow's `draft`: 1/2, 1/4 or 1/8 of each side,
no new dependency) when the image is at least 4x the size the recipe resizes to: the decoder then still leaves at
least twice those pixels, so the bilinear resize that follows keeps doing a real reduction, and a photo decodes in a
fraction of the time (bench/decode.py measures it) with the same class as the full decode
(tests/service/test_preprocess.py). Other formats have no such mode and decode in full.
"""

from __future__ import annotations

import io
import logging
import math
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
# The scaled JPEG decode keeps at least this many times the pixels per side the recipe resizes to.
DRAFT_MARGIN = 2


class InvalidImageError(ValueError):
    """Empty, truncated, corrupt or non-image bytes, or a format other than JPEG/PNG/WebP/BMP (INVALID_ARGUMENT)."""


class ImageTooLargeError(Exception):
    """The image header claims more pixels than allowed (RESOURCE_EXHAUSTED). Not a ValueError on purpose."""


def decode_image(data: bytes, spec: InputSpec, *, max_pixels: int, scaled_jpeg: bool = True) -> torch.Tensor:
    """Encoded image bytes -> uint8 [input_size, input_size, 3] (NHWC), prepared as the model of `spec` takes it.

    scaled_jpeg: decode a large JPEG scaled down (the module's rule); False decodes every image in full.
    Raises InvalidImageError or ImageTooLargeError (header checked against `max_pixels` before decoding), nothing else.
    """
    image = read_header(data, max_pixels=max_pixels, draft_for=spec if scaled_jpeg else None)
    return finish_decode(image, len(data), spec)


def open_image(data: bytes, *, max_pixels: int, draft_for: InputSpec | None = None) -> Image.Image:
    """Decode fully, with EXIF orientation applied. The header's size is checked before the pixels are decoded.

    draft_for: a large JPEG is decoded scaled down to what this recipe still needs (the module's rule).

    Raises InvalidImageError or ImageTooLargeError, nothing else.
    """
    return load_pixels(read_header(data, max_pixels=max_pixels, draft_for=draft_for), len(data))


def read_header(data: bytes, *, max_pixels: int, draft_for: InputSpec | None = None) -> Image.Image:
    """The image, its pixels not decoded yet: the cheap first half of open_image. Its `size` is what decoding it will
    produce (a large JPEG's scaled-down size with `draft_for`), so a caller can weigh the work before doing it.

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
        if draft_for is not None and image.format == "JPEG":
            image.draft(image.mode, draft_size(image.size, draft_for))
        return image
    except ImageTooLargeError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(str(error)) from error
    except UnidentifiedImageError as error:
        raise InvalidImageError(f"not a JPEG, PNG, WebP or BMP image ({len(data)} bytes)") from error
    except Exception as error:
        raise _invalid(error, len(data)) from error


def load_pixels(image: Image.Image, data_size: int) -> Image.Image:
    """Decodes `image` from read_header (of `data_size` bytes), with EXIF orientation applied.

    Raises InvalidImageError, nothing else.
    """
    try:
        image.load()  # the real decode: truncated or corrupt data fails here
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy for the usual image without a rotation
        return image
    except Exception as error:
        raise _invalid(error, data_size) from error


def finish_decode(image: Image.Image, data_size: int, spec: InputSpec) -> torch.Tensor:
    """The second half of decode_image: `image` from read_header (of `data_size` bytes) -> uint8 [S, S, 3] (NHWC).

    Raises InvalidImageError, nothing else.
    """
    loaded = load_pixels(image, data_size)
    try:
        return torch.from_numpy(prepare_pixels(loaded, spec))
    except Exception as error:
        raise _invalid(error, data_size) from error


def draft_size(size: tuple[int, int], spec: InputSpec) -> tuple[int, int]:
    """The least (width, height) a JPEG of `size` may be decoded to: DRAFT_MARGIN times what the recipe resizes to
    (the shorter side to spec.resize; both sides to input_size for grayscale). Pillow's draft picks the smallest DCT
    scale that keeps both sides at least this, so an image under twice the margin decodes in full."""
    width, height = size
    if spec.grayscale:
        return (DRAFT_MARGIN * spec.input_size,) * 2
    scale = DRAFT_MARGIN * spec.resize / min(width, height)
    return math.ceil(width * scale), math.ceil(height * scale)


def _invalid(error: Exception, size: int) -> InvalidImageError:
    """The client's error for `error`; kinds other than Pillow's usual ones are logged, throttled."""
    kind = type(error)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    if not isinstance(error, _DECODE_ERRORS):
        _unexpected_errors.log(logger, f"unexpected {name} decoding a {size}-byte image", error)
    detail = str(error)[:_MAX_DETAIL_CHARS]  # bounded: the message travels in the status trailer
    return InvalidImageError(f"cannot decode image: {name}: {detail}")
