"""What in-kernel tensor descriptors (`tl.make_tensor_descriptor`, TMA on sm_90) need from a launcher."""

from __future__ import annotations

import torch
import triton

from kernels._common import interpreting

# TMA reads rows at 16-byte granularity: the base address and every stride but the innermost must be multiples.
TMA_ALIGNMENT = 16


def _descriptor_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    # Each program writes its descriptors to this global scratch before the first TMA load. torch's caching
    # allocator serves it (within a CUDA graph capture, from the graph's pool); 256-byte aligned, more than TMA needs.
    return torch.empty(size, dtype=torch.int8, device="cuda")


def set_descriptor_allocator() -> None:
    """Install the scratch allocator for device-side descriptors, in this thread's context.

    Triton keeps the allocator in a ContextVar: one set at import or in another thread (the server's executor
    threads run the model) is not seen here, so every TMA launcher calls this before it launches.
    """
    triton.set_allocator(_descriptor_scratch)


def tma_compatible(t: torch.Tensor) -> bool:
    """Whether a contiguous tensor can back a descriptor: aligned base and innermost rows a multiple of 16 bytes."""
    row_bytes = t.shape[-1] * t.element_size()
    return t.data_ptr() % TMA_ALIGNMENT == 0 and row_bytes % TMA_ALIGNMENT == 0


# Operand dtypes of the TMA kernels: the tensor-core ones. float32 takes them only as TF32; float32 with the IEEE dot
# runs on the FMA units, whose dot reads both tiles into registers anyway, and stays on the pointer kernel.
TMA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def tma_device(device: torch.device) -> bool:
    """Whether `device` runs the TMA kernels: sm_90 or newer (or the interpreter, which emulates descriptors)."""
    if device.type != "cuda":
        return interpreting()
    return torch.cuda.get_device_capability(device) >= (9, 0)


def tma_operands(dtype: torch.dtype, allow_tf32: bool) -> bool:
    """Whether the TMA kernels take operands of `dtype` (float32 only with TF32)."""
    return dtype in (torch.float16, torch.bfloat16) or (dtype == torch.float32 and allow_tf32)


def tma_channels_ok(c: int, k: int, dtype: torch.dtype) -> bool:
    """C -> K channels as TMA boxes: C in whole 16-channel steps, output rows a multiple of 16 bytes."""
    return c % 16 == 0 and k > 0 and (k * dtype.itemsize) % TMA_ALIGNMENT == 0
