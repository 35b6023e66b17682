"""service/decoding.py without a server: which images take the large-image lane, its bounded queue, the pool's size."""

from __future__ import annotations

import asyncio
import io
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

import models
from service import decoding
from service.decoding import ImageDecoder
from service.preprocess import ImageTooLargeError, InvalidImageError

SPEC = models.input_spec("resnet18", 32)


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buffer, "PNG")
    return buffer.getvalue()


def run_decodes(images: list[bytes], large_image_pixels: int) -> list[torch.Tensor | BaseException]:
    async def decode_all() -> list[torch.Tensor | BaseException]:
        with ThreadPoolExecutor(4) as pool:
            decoder = ImageDecoder(pool, threads=4, max_pixels=10**8, large_image_pixels=large_image_pixels)
            try:
                decodes = (decoder.decode(image, SPEC) for image in images)
                return await asyncio.gather(*decodes, return_exceptions=True)
            finally:
                decoder.shutdown()

    return asyncio.run(decode_all())


def test_small_and_large_images_decode_to_the_same_pixels():
    small, large = run_decodes([png(40, 40), png(400, 400)], large_image_pixels=50_000)
    assert isinstance(small, torch.Tensor) and isinstance(large, torch.Tensor)
    assert small.shape == large.shape == (32, 32, 3) and torch.equal(small, large)


def test_the_large_image_lane_refuses_past_its_queue_and_every_call_is_answered():
    capacity = decoding.LARGE_QUEUE_PER_WORKER  # 4 threads: a lane of one worker
    truncated = png(3000, 3000)[:20_000]  # ~10 ms each, then its rest: all arrive while the first decodes
    results = run_decodes([truncated] * (3 * capacity), large_image_pixels=1_000_000)
    refused = [result for result in results if isinstance(result, ImageTooLargeError)]
    decoded = [result for result in results if isinstance(result, InvalidImageError)]  # truncated, from the worker
    assert len(refused) + len(decoded) == len(results), results
    assert len(refused) >= capacity and len(decoded) >= 1
    assert all("already waiting to be decoded: retry later" in str(error) for error in refused)


@pytest.mark.parametrize("threads", [1, 8])
def test_the_lane_is_a_quarter_of_the_pool(threads: int):
    with ThreadPoolExecutor(1) as pool:
        decoder = ImageDecoder(pool, threads=threads, max_pixels=100, large_image_pixels=10)
        assert decoder._lane._max_workers == max(1, threads // 4)
        decoder.shutdown()
