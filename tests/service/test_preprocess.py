"""Image decoding and per-model preprocessing: formats, the normalization recipe, EXIF, limits, malformed bytes."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile

import models
from models import digits
from models.inputs import IMAGENET_MEAN, IMAGENET_STD
from service.preprocess import ImageTooLargeError, InvalidImageError, decode_image

MAX_PIXELS = 4_000_000
SPEC = models.input_spec("resnet18", 32)  # resize 37, crop 32: small, and the crop offset (2.5) exercises the rounding


def random_rgb(height: int, width: int) -> np.ndarray:
    return np.random.randint(0, 256, (height, width, 3), dtype=np.uint8)


def encode(pixels: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def reference(pixels: np.ndarray, crop: int) -> torch.Tensor:
    """Hand-written recipe on an image whose shorter side is already `resize`: center crop, /255, ImageNet mean/std."""
    height, width, _ = pixels.shape
    top, left = round((height - crop) / 2.0), round((width - crop) / 2.0)  # torchvision's CenterCrop
    x = torch.from_numpy(pixels[top : top + crop, left : left + crop]).permute(2, 0, 1).double() / 255
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)
    return ((x - mean) / std).float()


def png_header_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG whose IHDR claims width x height, with one tiny IDAT: a decompression bomb's header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt, options", [("PNG", {}), ("BMP", {}), ("WEBP", {"lossless": True})])
def test_lossless_formats_match_the_hand_computed_recipe(fmt, options):
    pixels = random_rgb(37, 45)  # shorter side == SPEC.resize, so only crop and normalization apply
    out = decode_image(encode(pixels, fmt, **options), SPEC, max_pixels=MAX_PIXELS)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, reference(pixels, 32), rtol=0, atol=1e-5)


def test_jpeg_decodes_close_to_its_source():
    pixels = np.kron(random_rgb(5, 6), np.ones((8, 8, 1), dtype=np.uint8))[:37, :45]  # blocky: JPEG keeps it well
    out = decode_image(encode(pixels, "JPEG", quality=95, subsampling=0), SPEC, max_pixels=MAX_PIXELS)
    error = (out - reference(pixels, 32)).abs()
    assert error.mean() < 0.05, f"mean abs error {error.mean():.3f}"  # 0.05 is ~3 grey levels after the std


@pytest.mark.parametrize("height, width", [(60, 45), (45, 60), (37, 37), (100, 41)])
def test_resize_shorter_side_then_center_crop(height, width):
    pixels = random_rgb(height, width)
    out = decode_image(encode(pixels, "PNG"), SPEC, max_pixels=MAX_PIXELS)
    # Independent reference: torch's antialiased bilinear resize (matches Pillow to within a grey level).
    new_long = int(SPEC.resize * max(height, width) / min(height, width))
    size = (new_long, SPEC.resize) if height > width else (SPEC.resize, new_long)  # (H, W)
    x = torch.from_numpy(pixels).permute(2, 0, 1).double().unsqueeze(0)
    resized = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    resized = resized.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    torch.testing.assert_close(out, reference(resized, 32), rtol=0, atol=2.5 / 255 / min(IMAGENET_STD))


def test_exif_orientation_is_applied():
    pixels = random_rgb(37, 45)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; display rotated 90 degrees clockwise
    rotated = decode_image(encode(pixels, "PNG", exif=exif), SPEC, max_pixels=MAX_PIXELS)
    upright = np.ascontiguousarray(np.rot90(pixels, k=-1))  # [45, 37, 3]
    torch.testing.assert_close(rotated, reference(upright, 32), rtol=0, atol=1e-5)


def test_size_limit_is_checked_from_the_header_before_decoding(monkeypatch):
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self) or real_load(self))
    with pytest.raises(ImageTooLargeError, match="5000x4000"):
        decode_image(png_header_claiming(5000, 4000), SPEC, max_pixels=MAX_PIXELS)
    # Past Pillow's own bomb limit (2 x 89 MP) Pillow refuses in open(); that is reported the same way.
    with pytest.raises(ImageTooLargeError):
        decode_image(png_header_claiming(30000, 30000), SPEC, max_pixels=MAX_PIXELS)
    assert decoded == []
    assert not issubclass(ImageTooLargeError, ValueError)  # A maps it to RESOURCE_EXHAUSTED, not INVALID_ARGUMENT


def test_size_limit_boundary():
    data = encode(random_rgb(40, 50), "PNG")
    assert decode_image(data, SPEC, max_pixels=2000).shape == (3, 32, 32)
    with pytest.raises(ImageTooLargeError):
        decode_image(data, SPEC, max_pixels=1999)


def truncated(fmt: str) -> bytes:
    data = encode(random_rgb(64, 64), fmt)
    return data[: len(data) * 2 // 3]


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"hello, this is not an image\n" * 4, id="text"),
        pytest.param(truncated("PNG"), id="truncated-png"),
        pytest.param(truncated("JPEG"), id="truncated-jpeg"),
        pytest.param(truncated("BMP"), id="truncated-bmp"),
        pytest.param(encode(random_rgb(8, 8), "GIF"), id="gif-not-allowed"),
        pytest.param(encode(random_rgb(8, 8), "TIFF"), id="tiff-not-allowed"),
        pytest.param(png_header_claiming(8, 8)[:40], id="png-header-only"),
    ],
)
def test_malformed_or_unsupported_bytes_are_invalid(data):
    with pytest.raises(InvalidImageError) as raised:
        decode_image(data, SPEC, max_pixels=MAX_PIXELS)
    assert isinstance(raised.value, ValueError)


def test_digits_path_equals_models_digits_preprocess():
    _, test = digits.load_split()
    spec = models.input_spec("digits_resnet", digits.INPUT_SIZE)
    for image in test.images[:16]:
        served = decode_image(digits.to_png(image), spec, max_pixels=MAX_PIXELS)
        torch.testing.assert_close(served, digits.preprocess(Image.fromarray(image)), rtol=0, atol=0)


def test_digits_path_converts_color_uploads_like_training():
    pixels = random_rgb(20, 24)
    spec = models.input_spec("digits_resnet", digits.INPUT_SIZE)
    served = decode_image(encode(pixels, "PNG"), spec, max_pixels=MAX_PIXELS)
    torch.testing.assert_close(served, digits.preprocess(Image.fromarray(pixels)), rtol=0, atol=0)


def test_the_model_registry_says_how_each_model_takes_its_input():
    assert models.input_spec("resnet50", 224).resize == 256
    assert models.input_spec("preact_resnet18", 64).mean == IMAGENET_MEAN
    assert models.input_spec("digits_resnet", 32) == digits.INPUT and digits.INPUT.grayscale
    for name in models.MODEL_NAMES:  # every registered model has a recipe
        assert models.input_spec(name, 32).input_size == 32
    with pytest.raises(ValueError, match="32"):
        models.input_spec("digits_resnet", 64)
    with pytest.raises(ValueError, match="unknown model"):
        models.input_spec("resnet19", 224)
