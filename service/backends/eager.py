"""The reference backend: the unfused PyTorch model, as built."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from service.backends.base import is_raw_images, refuse_raw_images, warm_up_batch, warm_up_images
from service.backends.normalize import NormalizeImages


class EagerBackend:
    """PyTorch eager forward. ``channels_last`` (default on): oneDNN's CPU convolutions work NHWC natively, so the
    model and each batch are kept NHWC and no layout conversion happens around each convolution. ResNet-18, batch
    16, 224x224 on this 2-core CPU, NHWC and NCHW alternated on a busy machine: NHWC 20-35% faster in each of three
    runs (e.g. medians 2.36 s against 3.14 s); bench/backend_throughput.py measures both.
    The model is converted in place: the backend owns it. With input_mean/input_std (models.fuse's meaning) it also
    takes uint8 NHWC images and normalizes them on its device, in float32, before the cast to the compute dtype.
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
        input_mean: Sequence[float] | None = None,
        input_std: Sequence[float] | None = None,
    ) -> None:
        self.device = device
        self.dtype = dtype
        self._memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # Module.to takes memory_format (torch's docs) though its overloads in torch's stubs leave it out.
        self._model = model.eval().to(device=device, dtype=dtype, memory_format=self._memory_format)  # type: ignore[call-overload]
        self._normalize = None
        if input_mean is not None and input_std is not None:
            self._normalize = NormalizeImages(input_mean, input_std).to(device)
            self.run(warm_up_images(1, input_size))
        self.run(warm_up_batch(1, input_size))

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [n, H, W, 3] or float32 [n, 3, H, W] (CPU) -> float32 logits [n, classes] (CPU)."""
        with torch.inference_mode():
            x = batch.to(self.device, non_blocking=True)
            if is_raw_images(x):
                if self._normalize is None:
                    raise refuse_raw_images(self.name)
                x = self._normalize(x)
            x = x.to(self.dtype).contiguous(memory_format=self._memory_format)
            return self._model(x).float().cpu()
