"""Where Classify's images are decoded: ordinary images on the shared decode pool, large ones in a lane of their own.

What an image costs to decode is known from its header before any pixel is decoded (the pixels the decoder will
produce: a large JPEG's scaled-down size, service/preprocess.py). An image over `large_image_pixels` is decoded in a
lane of max(1, threads // 4) worker processes, queued behind the other large images rather than in front of
everyone's: six clients sending 33 KiB truncated PNGs that claim 6000x6000 pixels once filled the whole pool, and
other clients' small images waited behind them (p50 2.3 -> 222 ms). Processes, not threads: in a thread of the
server, such a decode (144 MB mapped, faulted in and unmapped per image) still held small images up to 35 ms on a
2-core machine although Pillow releases the GIL; from another process it cost them nothing measurable. The workers
run at the lowest CPU priority (nice 19), and each spends at most LARGE_IMAGE_SHARE of its time decoding: after a
decode that took t seconds of its CPU time it rests t * (1 - share) / share, so large images get a bounded amount of
CPU per second whatever the machine's other load. The lane's queue is bounded: past LARGE_QUEUE_PER_WORKER images a
worker, a large image is refused at once (RESOURCE_EXHAUSTED, saying why and what to do), so it neither waits without
end nor holds memory.

The trade-offs: a legitimate large PNG waits behind other large images and gets a quarter of the lane's throughput;
each worker is a Python process with torch imported (started when the server starts). A JPEG photo is rarely large
here: it decodes scaled down.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import torch

from models.inputs import InputSpec
from service.preprocess import ImageTooLargeError, finish_decode, read_header
from service.process_tree import end_with_parent
from service.rpc import run_blocking

logger = logging.getLogger(__name__)

# Images queued or decoding in the large-image lane, per worker, before more are refused.
LARGE_QUEUE_PER_WORKER = 8
# The share of each worker's time that goes to decoding; the rest it waits.
LARGE_IMAGE_SHARE = 0.25
LANE_NICE = 19  # the lowest priority: a worker runs when no other process of the machine wants the core


class ImageDecoder:
    """Decodes Classify's images. `executor` is the shared decode pool (its threads: `threads`); the large-image lane
    is this object's own, closed by shutdown()."""

    def __init__(self, executor: Executor, *, threads: int, max_pixels: int, large_image_pixels: int) -> None:
        self._executor = executor
        self._max_pixels = max_pixels
        self._large_image_pixels = large_image_pixels
        self._lane_workers = max(1, threads // 4)
        self._lane = self._start_lane()
        self._lane_capacity = LARGE_QUEUE_PER_WORKER * self._lane_workers
        self._in_lane = 0  # only the event loop's thread changes it

    def _start_lane(self) -> ProcessPoolExecutor:
        # spawn: a fork of the server would copy its gRPC and torch threads' state.
        lane = ProcessPoolExecutor(
            self._lane_workers, mp_context=multiprocessing.get_context("spawn"), initializer=_set_up_lane_worker
        )
        for _ in range(self._lane_workers):
            lane.submit(time.sleep, 0)  # starts the workers now, not when the first large image arrives
        return lane

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
            loop = asyncio.get_running_loop()
            pixels = await loop.run_in_executor(self._lane, _decode_in_worker, data, spec, self._max_pixels)
            return torch.from_numpy(pixels)
        except BrokenProcessPool:  # a worker died (e.g. killed for memory): a new lane for the next image
            logger.error("a large-image decode worker died; restarting the lane")
            self._lane.shutdown(wait=False, cancel_futures=True)
            self._lane = self._start_lane()
            raise ImageTooLargeError(f"decoding this {width}x{height} image exhausted its worker") from None
        finally:
            self._in_lane -= 1

    def shutdown(self) -> None:
        """Cancels what waits in the lane and ends its workers now: once the server has drained, what they decode has
        no caller left, and a worker still starting (its interpreter and imports take seconds on a busy machine)
        would hold a graceful join that long. Ended here, not left to interpreter exit: in a process that
        multiprocessing started (a frontend), its exit joins the workers before concurrent.futures would tell them
        to stop, and would wait forever."""
        workers = list((self._lane._processes or {}).values())  # shutdown() drops them; no public way before 3.14
        self._lane.shutdown(wait=False, cancel_futures=True)
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.join()


_rest_until = 0.0  # a worker's: time.monotonic() before which it decodes nothing


def _decode_in_worker(data: bytes, spec: InputSpec, max_pixels: int) -> np.ndarray:
    """Lane worker: waits out the rest its last decode earned, decodes, and charges this one's CPU time."""
    global _rest_until
    rest_s = _rest_until - time.monotonic()
    if rest_s > 0:
        time.sleep(rest_s)
    start = time.process_time()
    try:
        image = read_header(data, max_pixels=max_pixels, draft_for=spec)
        return finish_decode(image, len(data), spec).numpy()
    finally:
        cost_s = time.process_time() - start
        _rest_until = time.monotonic() + cost_s * (1 - LARGE_IMAGE_SHARE) / LARGE_IMAGE_SHARE


def _set_up_lane_worker() -> None:
    """A lane worker's initializer: it ends with its server process, at nice LANE_NICE (raising one's own nice needs
    no privilege)."""
    end_with_parent()
    try:
        os.setpriority(os.PRIO_PROCESS, 0, LANE_NICE)
    except OSError as error:  # a sandbox that forbids it: the lane still bounds the work
        logger.warning("the large-image lane keeps the normal CPU priority: %s", error)
