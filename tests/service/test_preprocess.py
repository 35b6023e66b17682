"""Image decoding and per-model preprocessing: formats, the normalization recipe, EXIF, limits, malformed bytes."""

import io
import logging
import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile

import models
from models import digits
from models.inputs import IMAGENET_MEAN, IMAGENET_STD, InputSpec
from service import preprocess
from service.backends.normalize import NormalizeImages
from service.preprocess import ImageTooLargeError, InvalidImageError, decode_image, open_image
from service.throttled_log import TracebackThrottle

MAX_PIXELS = 4_000_000
SPEC = models.input_spec("resnet18", 32)  # resize 37, crop 32: small, and the crop offset (2.5) exercises the rounding


def served(data: bytes, spec: InputSpec = SPEC, *, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """What the model sees: the decoder's uint8 [S, S, 3], normalized as the backends do it -> float32 [3, S, S]."""
    pixels = decode_image(data, spec, max_pixels=max_pixels)
    size = spec.input_size
    assert pixels.shape == (size, size, 3) and pixels.dtype == torch.uint8 and pixels.is_contiguous()
    with torch.no_grad():
        return NormalizeImages(spec.mean, spec.std)(pixels.unsqueeze(0))[0]


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
    out = served(encode(pixels, fmt, **options))
    torch.testing.assert_close(out, reference(pixels, 32), rtol=0, atol=1e-5)


def test_jpeg_decodes_close_to_its_source():
    pixels = np.kron(random_rgb(5, 6), np.ones((8, 8, 1), dtype=np.uint8))[:37, :45]  # blocky: JPEG keeps it well
    out = served(encode(pixels, "JPEG", quality=95, subsampling=0))
    error = (out - reference(pixels, 32)).abs()
    assert error.mean() < 0.05, f"mean abs error {error.mean():.3f}"  # 0.05 is ~3 grey levels after the std


@pytest.mark.parametrize("height, width", [(60, 45), (45, 60), (37, 37), (100, 41)])
def test_resize_shorter_side_then_center_crop(height, width):
    pixels = random_rgb(height, width)
    out = served(encode(pixels, "PNG"))
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
    rotated = served(encode(pixels, "PNG", exif=exif))
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
    assert decode_image(data, SPEC, max_pixels=2000).shape == (32, 32, 3)
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
        out = served(digits.to_png(image), spec)
        # Float32 both ways, in two arithmetic orders: equal to a few ulps.
        torch.testing.assert_close(out, digits.preprocess(Image.fromarray(image)), rtol=0, atol=1e-5)


def test_digits_path_converts_color_uploads_like_training():
    pixels = random_rgb(20, 24)
    spec = models.input_spec("digits_resnet", digits.INPUT_SIZE)
    out = served(encode(pixels, "PNG"), spec)
    torch.testing.assert_close(out, digits.preprocess(Image.fromarray(pixels)), rtol=0, atol=1e-5)


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


def tiff_ifd(entries: list[tuple[int, int, int, bytes]]) -> bytes:
    """A little-endian TIFF header with one IFD of (tag, type, count, 4-byte value) entries: raw EXIF."""
    out = b"II*\x00" + struct.pack("<IH", 8, len(entries))
    for tag, kind, count, value in entries:
        out += struct.pack("<HHI", tag, kind, count) + value.ljust(4, b"\x00")
    return out + b"\x00\x00\x00\x00"


def test_exif_with_a_tag_of_an_unexpected_type_is_invalid_with_one_traceback_a_minute(caplog, monkeypatch):
    monkeypatch.setattr(preprocess, "_unexpected_errors", TracebackThrottle(interval_s=60.0))
    # Orientation 6, plus StripByteCounts (0x0117) stored as ASCII (type 2): exif_transpose raises struct.error.
    exif = b"Exif\x00\x00" + tiff_ifd([(0x0112, 3, 1, struct.pack("<H", 6)), (0x0117, 2, 4, b"abc\x00")])
    data = encode(random_rgb(24, 24), "JPEG", exif=exif)
    assert len(data) < 2000  # a small image: the was 1.7 KB
    with caplog.at_level("WARNING", logger="service.preprocess"):
        for _ in range(3):
            with pytest.raises(InvalidImageError, match=r"struct\.error|TypeError"):
                decode_image(data, SPEC, max_pixels=MAX_PIXELS)
    tracebacks = [record for record in caplog.records if record.exc_info is not None]
    assert len(tracebacks) == 1 and tracebacks[0].exc_info[0].__name__ == "error"  # struct.error


def test_traceback_throttle_logs_each_kind_once_per_interval(caplog):
    throttle = TracebackThrottle(interval_s=60.0)
    logger = logging.getLogger("test.throttle")
    with caplog.at_level("WARNING", logger="test.throttle"):
        logged = [throttle.log(logger, "odd", error) for error in (TypeError("a"), TypeError("b"), KeyError("c"))]
    assert logged == [True, False, True]
    assert [record.exc_info[0] for record in caplog.records if record.exc_info] == [TypeError, KeyError]


def grey_scans(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Real 8-bit digit scans enlarged so resizing has something to do, [count, 64, 64] uint8, and their labels."""
    _, test = digits.load_split()
    return np.kron(test.images[:count], np.ones((1, 8, 8), dtype=np.uint8)), test.labels[:count]


def test_a_16_bit_copy_of_an_8_bit_scan_decodes_and_classifies_like_it():
    scans, labels = grey_scans(8)
    spec = models.input_spec("digits_resnet", digits.INPUT_SIZE)
    eight = [digits.to_png(scan) for scan in scans]
    sixteen = [encode(scan.astype(np.uint16) * 257, "PNG") for scan in scans]  # 0..255 -> 0..65535: same intensities
    assert Image.open(io.BytesIO(sixteen[0])).mode.startswith("I")
    for eight_bit, sixteen_bit in zip(eight, sixteen, strict=True):
        torch.testing.assert_close(
            decode_image(sixteen_bit, spec, max_pixels=MAX_PIXELS),
            decode_image(eight_bit, spec, max_pixels=MAX_PIXELS),
            rtol=0, atol=0,
        )  # fmt: skip
    model = models.build("digits_resnet", "pretrained")
    with torch.inference_mode():
        classes = [model(torch.stack([served(data, spec) for data in batch])).argmax(1) for batch in (eight, sixteen)]
    torch.testing.assert_close(classes[1], classes[0])
    assert (classes[0] == torch.from_numpy(labels)).sum() >= 7  # and they are the digits' classes


def rgba_png(rgb: np.ndarray, alpha: np.ndarray) -> bytes:
    return encode(np.concatenate([rgb, alpha[..., None]], axis=2), "PNG")


def test_alpha_is_composited_over_black():
    rgb = random_rgb(37, 45)
    alpha = np.zeros((37, 45), np.uint8)
    alpha[:, 20:] = 255
    alpha[:, 30:] = 128
    out = decode_image(rgba_png(rgb, alpha), SPEC, max_pixels=MAX_PIXELS).numpy()  # only the crop applies
    expected = (rgb.astype(np.uint16) * alpha[..., None] + 127) // 255
    np.testing.assert_array_equal(out, expected[2:34, 6:38])


def test_palette_with_transparency_and_la_and_cmyk():
    rgb = random_rgb(37, 45)
    palette = Image.fromarray(rgb).quantize(16)  # mode P
    transparent = int(np.asarray(palette)[0, 0])
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=transparent)
    out = decode_image(buffer.getvalue(), SPEC, max_pixels=MAX_PIXELS).numpy()
    opaque = np.asarray(palette.convert("RGB"))[2:34, 6:38]
    hidden = (np.asarray(palette) == transparent)[2:34, 6:38]
    np.testing.assert_array_equal(out[hidden], 0)
    np.testing.assert_array_equal(out[~hidden], opaque[~hidden])

    grey = rgb[..., 0]
    la = Image.fromarray(np.stack([grey, np.full_like(grey, 255)], axis=2), mode="LA")
    buffer = io.BytesIO()
    la.save(buffer, format="PNG")
    out = decode_image(buffer.getvalue(), SPEC, max_pixels=MAX_PIXELS).numpy()
    np.testing.assert_array_equal(out, np.repeat(grey[2:34, 6:38, None], 3, axis=2))  # opaque: the grey itself

    buffer = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buffer, format="JPEG", quality=100, subsampling=0)
    out = decode_image(buffer.getvalue(), SPEC, max_pixels=MAX_PIXELS).numpy().astype(int)
    assert np.abs(out - rgb[2:34, 6:38].astype(int)).mean() < 8  # a lossy JPEG, but the colours, not their inverse


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "1", "L", "RGB"])
def test_every_single_channel_depth_scales_to_8_bits(mode):
    from models.image_modes import to_8bit

    grey = np.random.randint(0, 256, (9, 7), dtype=np.uint8)
    if mode == "1":
        grey = np.where(grey > 127, 255, 0).astype(np.uint8)
    source = {
        "I;16": Image.fromarray(grey.astype(np.uint16) * 257),
        "I": Image.fromarray(grey.astype(np.int32) * 257),
        "F": Image.fromarray(grey.astype(np.float32)),
        "1": Image.fromarray(grey).convert("1"),
        "L": Image.fromarray(grey),
        "RGB": Image.fromarray(np.repeat(grey[..., None], 3, axis=2)),
    }[mode]
    assert source.mode == mode
    out = np.asarray(to_8bit(source))
    np.testing.assert_array_equal(out if out.ndim == 2 else out[..., 0], grey)


def test_a_large_jpeg_decodes_scaled_down_and_classifies_like_the_full_decode():
    scans, labels = grey_scans(8)
    spec = models.input_spec("digits_resnet", digits.INPUT_SIZE)
    large = [encode(np.kron(scan, np.ones((8, 8), np.uint8)), "JPEG", quality=90) for scan in scans]  # 512 x 512
    drafted = open_image(large[0], max_pixels=MAX_PIXELS, draft_for=spec)
    assert drafted.size == (64, 64)  # 1/8 scale: still twice the 32 x 32 the recipe resizes to
    assert open_image(large[0], max_pixels=MAX_PIXELS).size == (512, 512)
    model = models.build("digits_resnet", "pretrained")
    with torch.inference_mode():
        classes = [
            model(torch.stack([served_with(data, spec, scaled) for data in large])).argmax(1)
            for scaled in (False, True)
        ]
    torch.testing.assert_close(classes[1], classes[0])
    assert (classes[0] == torch.from_numpy(labels)).sum() >= 7


def served_with(data: bytes, spec: InputSpec, scaled_jpeg: bool) -> torch.Tensor:
    pixels = decode_image(data, spec, max_pixels=MAX_PIXELS, scaled_jpeg=scaled_jpeg)
    return NormalizeImages(spec.mean, spec.std)(pixels.unsqueeze(0))[0]


def test_scaled_jpeg_pixels_stay_close_to_the_full_decode_and_small_images_decode_in_full():
    smooth = np.asarray(Image.fromarray(random_rgb(9, 12)).resize((1200, 900), Image.Resampling.BICUBIC))
    data = encode(smooth, "JPEG", quality=92)
    assert open_image(data, max_pixels=MAX_PIXELS, draft_for=SPEC).size == (150, 113)  # 1/8: short side >= 2 x 37
    plain = decode_image(data, SPEC, max_pixels=MAX_PIXELS, scaled_jpeg=False).int()
    scaled = decode_image(data, SPEC, max_pixels=MAX_PIXELS).int()
    assert (plain - scaled).abs().float().mean() < 3  # grey levels
    small = encode(random_rgb(60, 80), "JPEG")  # under 4x the recipe's 37: no DCT scale keeps enough
    assert open_image(small, max_pixels=MAX_PIXELS, draft_for=SPEC).size == (80, 60)
