"""ONNX Runtime backend: the model exported to ONNX at load, with a dynamic batch axis, run by an InferenceSession."""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from service.backends.base import is_raw_images, refuse_raw_images, warm_up_batch, warm_up_images
from service.backends.normalize import NormalizeImages

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
IMAGES_NAME = "images"
OUTPUT_NAME = "logits"


class _WithImages(nn.Module):
    """Both layouts in one graph: logits of cat(input, normalize(images)) along the batch axis.

    The session is fed the batch on one input and zero rows on the other, so one session (one copy of the weights)
    serves both layouts, and the uint8 images are normalized inside the ONNX graph.
    """

    def __init__(self, model: nn.Module, normalize: NormalizeImages) -> None:
        super().__init__()
        self.model = model
        self.normalize = normalize

    def forward(self, normalized: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        # normalized: [a, 3, S, S] float32, images: [b, S, S, 3] uint8 -> [a + b, classes]
        return self.model(torch.cat([normalized, self.normalize(images)]))


def export_onnx(
    model: nn.Module,
    input_size: int,
    input_mean: Sequence[float] | None = None,
    input_std: Sequence[float] | None = None,
) -> bytes:
    """The ONNX model (bytes) of `model`: input "input" float32 [batch, 3, S, S] -> "logits" float32 [batch, classes].

    With input_mean/input_std the graph has a second input, "images", uint8 [images, S, S, 3], normalized inside the
    graph; logits then has one row per row of "input" followed by one per image (see _WithImages).

    Uses torch's TorchScript-based exporter (dynamo=False): it needs only the onnx package, is deterministic (same
    bytes on every export) and takes ~2 s for ResNet-18 against ~13 s for the torch.export-based one on this CPU.
    torch 2.13 still ships it, with a DeprecationWarning that is silenced here.
    """
    model = model.eval().cpu().float()
    examples: tuple[torch.Tensor, ...] = (warm_up_batch(2, input_size),)
    names = [INPUT_NAME]
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    if input_mean is not None and input_std is not None:
        model = _WithImages(model, NormalizeImages(input_mean, input_std))
        examples = (*examples, warm_up_images(2, input_size))
        names.append(IMAGES_NAME)
        axes[IMAGES_NAME] = {0: "images"}
        axes[OUTPUT_NAME] = {0: "rows"}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            examples,
            buffer,  # type: ignore[arg-type]  # a file object works (torch's docs); its annotation says path only
            dynamo=False,
            input_names=names,
            output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
        )
    return buffer.getvalue()


def session_options(intra_op_threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1  # sequential graph: a second pool would only idle
    # Idle workers would otherwise spin between batches and take the cores the image decoders need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxRuntimeBackend:
    """CUDA execution provider when ``device`` is CUDA and this onnxruntime build has it, else the CPU provider
    with one intra-op thread per CPU this process may use. Float32 only: the exported graph is float32. With
    input_mean/input_std it also takes uint8 NHWC images, normalized inside the graph (export_onnx).
    """

    name = "onnxruntime"
    dtype = torch.float32
    preferred_batch_sizes: tuple[int, ...] = ()  # a dynamic batch axis: any size runs as it is

    def __init__(
        self,
        model: nn.Module,
        *,
        input_size: int,
        device: torch.device,
        input_mean: Sequence[float] | None = None,
        input_std: Sequence[float] | None = None,
    ) -> None:
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            else:
                logger.warning("this onnxruntime build has no CUDA execution provider; running on the CPU")
        threads = len(os.sched_getaffinity(0))
        self._session = ort.InferenceSession(
            export_onnx(model, input_size, input_mean, input_std), session_options(threads), providers=providers
        )
        self._takes_images = input_mean is not None
        # The zero-row feed of the input a batch does not use.
        self._no_rows: dict[str, np.ndarray] = {
            INPUT_NAME: np.zeros((0, 3, input_size, input_size), np.float32),
            IMAGES_NAME: np.zeros((0, input_size, input_size, 3), np.uint8),
        }
        on_cuda = self._session.get_providers()[0] == "CUDAExecutionProvider"
        self.device = torch.device("cuda" if on_cuda else "cpu")
        logger.info("onnxruntime session on %s (%d intra-op threads)", self._session.get_providers()[0], threads)
        if self._takes_images:
            self.run(warm_up_images(1, input_size))
        self.run(warm_up_batch(1, input_size))

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [n, H, W, 3] or float32 [n, 3, H, W] (CPU) -> float32 logits [n, classes] (CPU)."""
        raw = is_raw_images(batch)
        if raw and not self._takes_images:
            raise refuse_raw_images(self.name)
        on_cpu = batch.detach().cpu().contiguous()
        x = on_cpu.numpy() if raw else on_cpu.to(torch.float32).numpy()  # a view when already so: no copy
        feeds: dict[str, np.ndarray]
        if not self._takes_images:
            feeds = {INPUT_NAME: x}
        elif raw:
            feeds = {INPUT_NAME: self._no_rows[INPUT_NAME], IMAGES_NAME: x}
        else:
            feeds = {INPUT_NAME: x, IMAGES_NAME: self._no_rows[IMAGES_NAME]}
        (logits,) = self._session.run([OUTPUT_NAME], feeds)
        return torch.from_numpy(logits)
