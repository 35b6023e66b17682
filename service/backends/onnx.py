"""ONNX Runtime backend: the model exported to ONNX at load, with a dynamic batch axis, run by an InferenceSession."""

from __future__ import annotations

import io
import logging
import os
import warnings

import onnxruntime as ort
import torch
from torch import nn

from service.backends.base import warm_up_batch

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def export_onnx(model: nn.Module, input_size: int) -> bytes:
    """The ONNX model (bytes) of `model`: input "input" float32 [batch, 3, S, S] -> "logits" float32 [batch, classes].

    Uses torch's TorchScript-based exporter (dynamo=False): it needs only the onnx package, is deterministic (same
    bytes on every export) and takes ~2 s for ResNet-18 against ~13 s for the torch.export-based one on this CPU.
    torch 2.13 still ships it, with a DeprecationWarning that is silenced here.
    """
    example = warm_up_batch(2, input_size)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model.eval().cpu().float(),
            (example,),
            buffer,  # type: ignore[arg-type]  # a file object works (torch's docs); its annotation says path only
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
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
    with one intra-op thread per CPU this process may use. Float32 only: the exported graph is float32.
    """

    name = "onnxruntime"
    dtype = torch.float32
    preferred_batch_sizes: tuple[int, ...] = ()  # a dynamic batch axis: any size runs as it is

    def __init__(self, model: nn.Module, *, input_size: int, device: torch.device) -> None:
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            else:
                logger.warning("this onnxruntime build has no CUDA execution provider; running on the CPU")
        threads = len(os.sched_getaffinity(0))
        self._session = ort.InferenceSession(
            export_onnx(model, input_size), session_options(threads), providers=providers
        )
        on_cuda = self._session.get_providers()[0] == "CUDAExecutionProvider"
        self.device = torch.device("cuda" if on_cuda else "cpu")
        logger.info("onnxruntime session on %s (%d intra-op threads)", self._session.get_providers()[0], threads)
        self.run(warm_up_batch(1, input_size))

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        """float32 [n, 3, H, W] (CPU) -> float32 logits [n, classes] (CPU)."""
        x = batch.detach().to("cpu", torch.float32).contiguous().numpy()  # a view when already so: no copy
        (logits,) = self._session.run([OUTPUT_NAME], {INPUT_NAME: x})
        return torch.from_numpy(logits)
