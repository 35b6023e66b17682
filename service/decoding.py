"""Where Classify's images are decoded: ordinary images on the shared decode pool, large ones in a lane of their own.

What an image costs to decode is known from its header before any pixel is decoded (the pixels the decoder will
produce: a large JPEG's scaled-down size, service/preprocess.py). An image over `large_image_pixels` is decoded in a
lane of max(1, threads // 4) threads, queued behind the other large images rather than in front of everyone's: six
clients sending 33 KiB truncated PNGs that claim 6000x6000 pixels once filled the whole pool, and other clients'
small images waited behind them (p50 2.3 -> 222 ms). Now those clients wait for each other, and each lane thread
spends at most LARGE_IMAGE_SHARE of its time decoding: after a decode that took t seconds of its CPU time it rests
t * (1 - share) / share before the next one, so large images get a bounded amount of CPU per second whatever the
machine's other load (CPU time, not wall time, is what is charged). The lane's queue is bounded: past
LARGE_QUEUE_PER_THREAD images a thread, a large image is refused at once (RESOURCE_EXHAUSTED, saying why and what to
do), so it neither waits without end nor holds memory.

The trade-off: a legitimate large PNG waits behind other large images, and large images' throughput is a quarter of
the lane's threads. A JPEG photo is rarely large here: it decodes scaled down.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor

import torch
from PIL import Image

from models.inputs import InputSpec
from service.preprocess import ImageTooLargeError, finish_decode, read_header
from service.rpc import run_blocking

# Images queued or decoding in the large-image lane, per thread, before more are refused.
LARGE_QUEUE_PER_THREAD = 8
# The share of each lane thread's time that goes to decoding; the rest it waits.
LARGE_IMAGE_SHARE = 0.25


def machine_threads() -> int:
    """The CPUs this process may run on (its affinity, e.g. a container's cpuset), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class ImageDecoder:
    """Decodes Classify's images. `executor` is the shared decode pool (its threads: `threads`); the large-image lane
    is this object's own, closed by shutdown()."""

    def __init__(self, executor: Executor, *, threads: int, max_pixels: int, large_image_pixels: int) -> None:
        self._executor = executor
        self._max_pixels = max_pixels
        self._large_image_pixels = large_image_pixels
        lane_threads = max(1, threads // 4)
        self._lane = ThreadPoolExecutor(lane_threads, thread_name_prefix="decode-large")
        self._lane_capacity = LARGE_QUEUE_PER_THREAD * lane_threads
        self._in_lane = 0  # only the event loop's thread changes it
        self._lane_thread = threading.local()  # each lane thread's rest_until (time.monotonic)

    async def decode(self, data: bytes, spec: InputSpec) -> torch.Tensor:
        """preprocess.decode_image's result and errors, plus ImageTooLargeError when the large-image lane is full."""
        image = await run_blocking(self._executor, read_header, data, max_pixels=self._max_pixels, draft_for=spec)
        width, height = image.size
        if width * height <= self._large_image_pixels:
            return await run_blocking(self._executor, finish_decode, image, len(data), spec)
        if self._in_lane >= self._lane_capacity:
            raise ImageTooLargeError(
                f"image is {width}x{height} pixels and {self._in_lane} images over {self._large_image_pixels} pixels "
                "are already waiting to be decoded: retry later, or send a smaller image"
            )
        self._in_lane += 1
        try:
            # A call cancelled while queued (its deadline passed) leaves the queue without being decoded.
            return await run_blocking(self._lane, self._decode_in_lane, image, len(data), spec)
        finally:
            self._in_lane -= 1

    def _decode_in_lane(self, image: Image.Image, data_size: int, spec: InputSpec) -> torch.Tensor:
        """Lane thread: waits out the rest its last decode earned, decodes, and charges this one's CPU time."""
        rest_s = getattr(self._lane_thread, "rest_until", 0.0) - time.monotonic()
        if rest_s > 0:
            time.sleep(rest_s)
        start = time.thread_time()
        try:
            return finish_decode(image, data_size, spec)
        finally:
            cost_s = time.thread_time() - start
            self._lane_thread.rest_until = time.monotonic() + cost_s * (1 - LARGE_IMAGE_SHARE) / LARGE_IMAGE_SHARE

    def shutdown(self) -> None:
        self._lane.shutdown(wait=False, cancel_futures=True)
