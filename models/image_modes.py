"""Every image mode Pillow opens, brought to 8-bit "L" or "RGB" with its values scaled, never clipped.

Pillow's own `convert` clips 16-bit samples to 255 (a 16-bit PNG comes out almost white) and drops alpha, which
shows whatever colour the transparent pixels happen to hold. Here:
- 16- and 32-bit integer samples ("I;16*", "I") are taken as 16-bit and scaled by 255/65535, rounded: Pillow opens
  16-bit grayscale PNGs as one of these;
- "F" (float samples) follows Pillow's own convention of 0..255, clipped;
- alpha (RGBA, LA, PA, premultiplied RGBa/La, RGBA palettes, images with a `transparency` entry) is composited
  over black, i.e. each colour is weighted by its coverage: a transparent pixel is dark, whatever it held;
- "1", palette, CMYK, YCbCr, LAB, HSV and the rest go through Pillow's conversion to RGB.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MAX = 65535


def to_8bit(image: Image.Image) -> Image.Image:
    """`image` as "L" (single-channel sources) or "RGB" with 8-bit samples; the rules are the module's."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        samples = np.clip(np.asarray(image, dtype=np.int64), 0, _SIXTEEN_BIT_MAX)
        return Image.fromarray(((samples * 255 + _SIXTEEN_BIT_MAX // 2) // _SIXTEEN_BIT_MAX).astype(np.uint8))
    if mode == "F":
        return Image.fromarray(np.clip(np.rint(np.asarray(image, dtype=np.float32)), 0, 255).astype(np.uint8))
    if mode in _ALPHA_MODES or "transparency" in image.info or _has_alpha_palette(image):
        single_channel = mode in ("L", "LA", "La")
        with_alpha = np.asarray(image.convert("LA" if single_channel else "RGBA"), dtype=np.uint16)
        colour, alpha = with_alpha[..., :-1], with_alpha[..., -1:]
        flattened = ((colour * alpha + 127) // 255).astype(np.uint8)
        return Image.fromarray(flattened[..., 0] if single_channel else flattened)
    if mode in ("L", "RGB"):
        return image
    return image.convert("RGB")


def _has_alpha_palette(image: Image.Image) -> bool:
    return image.mode == "P" and image.palette is not None and image.palette.mode == "RGBA"
