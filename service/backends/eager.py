"""The reference backend: the unfused PyTorch model, as built."""

from __future__ import annotations

import torch
from torch import nn

from service.backends.base import warm_up_batch


class EagerBackend:
    """PyTorch eager forward. ``channels_last`` (default on): oneDNN's CPU convolutions work NHWC natively, so the
    model and each batch are kept NHWC and no layout conversion happens around each convolution. ResNet-18, batch
    16, 224x224 on this 2-core CPU, NHWC and NCHW alternated on a busy machine: NHWC 20-35% faster in each of three
    runs (e.g. medians 2.36 s against 3.14 s); bench/backend_throughput.py measures both.
    The model is converted in place: the backend owns it.
    """

    name = "eager"
    preferred_batch_sizes: tuple[int, ...] = ()  # oneDNN and cuDNN cost what the rows cost

    def __init__(
        self,
        model: nn.Module,
        *,
        input_size: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = True,
    ) -> None:
        self.device = device
        self.dtype = dtype
        self._memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # Module.to takes memory_format (torch's docs) though its overloads in torch's stubs leave it out.
        self._model = model.eval().to(device=device, dtype=dtype, memory_format=self._memory_format)  # type: ignore[call-overload]
        self.run(warm_up_batch(1, input_size))

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        """float32 [n, 3, H, W] (CPU) -> float32 logits [n, classes] (CPU)."""
        with torch.inference_mode():
            x = batch.to(self.device, self.dtype, non_blocking=True).contiguous(memory_format=self._memory_format)
            return self._model(x).float().cpu()
