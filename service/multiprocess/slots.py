"""Fixed-size shared-memory slots: one file per frontend under the run directory, mapped by it and by the engine.

A slot belongs to one request from the moment the frontend writes its tensor until the engine's answer for it has
been read, so nothing writes into a slot another request still needs. The frontend hands slots out (SlotPool); the
engine only reads and writes the slot a request names (SlotFile). Files, not multiprocessing.shared_memory: Python
3.11's resource tracker unlinks a segment when any process that attached it exits, which a restarted frontend would
trip over; the supervisor creates and removes the files.
"""

from __future__ import annotations

import math
import mmap
import os
from pathlib import Path

import torch


def create_slot_file(path: Path, slots: int, slot_bytes: int) -> None:
    """A sparse file of `slots` x `slot_bytes` (on tmpfs, pages cost memory only once written)."""
    with path.open("wb") as file:
        file.truncate(slots * slot_bytes)


class SlotFile:
    """`path` mapped read-write, divided into `slot_bytes`-sized slots."""

    def __init__(self, path: Path, slot_bytes: int) -> None:
        descriptor = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(descriptor, 0)
        finally:
            os.close(descriptor)
        self.slot_bytes = slot_bytes
        self.slots = len(self._map) // slot_bytes

    def view(self, slot: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """Slot `slot`'s first bytes as a tensor of `dtype` and `shape` (no copy: it aliases the shared memory).
        ValueError when the slot does not exist or the tensor would not fit in it."""
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is not one of the {self.slots} slots")
        count = math.prod(shape)
        if count * dtype.itemsize > self.slot_bytes:
            raise ValueError(f"a {dtype} tensor of shape {shape} does not fit a {self.slot_bytes}-byte slot")
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self._map, dtype=dtype, count=count, offset=slot * self.slot_bytes).view(shape)

    def close(self) -> None:
        self._map.close()


class SlotPool:
    """The frontend's side: which slots are free. Single-threaded (the event loop)."""

    def __init__(self, slot_file: SlotFile) -> None:
        self.file = slot_file
        self._free = list(range(slot_file.slots - 1, -1, -1))

    def fits(self, tensor: torch.Tensor) -> bool:
        return tensor.numel() * tensor.element_size() <= self.file.slot_bytes

    def take(self) -> int | None:
        """A free slot, or None when all are in use."""
        return self._free.pop() if self._free else None

    def give_back(self, slot: int) -> None:
        self._free.append(slot)

    @property
    def free(self) -> int:
        return len(self._free)
