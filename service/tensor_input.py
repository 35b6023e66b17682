"""KServe v2 ModelInferRequest -> the batch layout a backend takes (service/backends/base.py), or INVALID_ARGUMENT.

The one input, "input", comes in one of two layouts:
- UINT8 [n, S, S, 3]: raw images, NHWC as images are decoded -> uint8 NHWC, normalized by the backend on its device;
- FP32 or FP16 [n, 3, S, S]: images already normalized (the model's mean/std), NCHW -> float32 NCHW (FP16 is widened
  exactly, here at the edge: no backend takes FP16 input).
ModelMetadata and ModelConfig list one datatype per input, as Triton's do: the layout the repository key
`advertised_input` names (service/input_layout.py): FP32 [-1, 3, S, S] by default, the layout every existing client
builds from it, or UINT8 [-1, S, S, 3] for clients such as perf_analyzer that send only what is advertised. Both
layouts are accepted whatever is advertised.

The values travel as Triton takes them: in `raw_input_contents` (one entry, little-endian bytes), or in the input's
typed `contents`: `fp32_contents` for FP32, `uint_contents` for UINT8. InferTensorContents has no field for FP16, so
FP16 travels raw, as with Triton. Unlike Triton, which keeps the low byte of each uint_contents element, a value above
255 is refused: truncating it would answer for a different image. Typed and raw contents for one input at once are
refused, as Triton refuses them. Every refusal is RpcError(INVALID_ARGUMENT) with a message that says what to send;
client values echoed in it are cut to a few dozen characters. Converting copies up to a message, so callers run it off
the event loop unless `converts_cheaply` says the request is small and raw.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from service._proto import grpc_service_pb2 as pb
from service.echo import echo
from service.input_layout import image_dims
from service.rpc import invalid_argument

INPUT_NAME = "input"
# Wire byte order is little-endian, whatever the host's.
_WIRE_DTYPES: dict[str, np.dtype] = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2"), "UINT8": np.dtype("u1")}
# The InferTensorContents field each datatype's typed values travel in (Triton's mapping); FP16 has none.
_TYPED_FIELDS = {"FP32": "fp32_contents", "UINT8": "uint_contents"}
_CONTENTS_FIELDS = (
    "bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents", "fp32_contents",
    "fp64_contents", "bytes_contents",
)  # fmt: skip


# Raw contents become one copy of their bytes (widened to float32 for FP16): up to this many, that costs less than the
# hop to an executor thread and back, which is two thread wake-ups and a GIL hand-over (tens of microseconds).
CHEAP_RAW_INPUT_BYTES = 256 * 1024  # a 224x224 UINT8 image is 147 KiB; its FP32 form, 588 KiB, hops


def converts_cheaply(request: pb.ModelInferRequest) -> bool:
    """Whether `input_tensor(request, ...)` is cheap enough for the event loop: no typed contents (a Python
    conversion per value) and at most CHEAP_RAW_INPUT_BYTES of raw contents. Whatever is malformed is cheap too."""
    if any(tensor.HasField("contents") for tensor in request.inputs):
        return False
    return sum(len(raw) for raw in request.raw_input_contents) <= CHEAP_RAW_INPUT_BYTES


def input_tensor(request: pb.ModelInferRequest, model_name: str, input_size: int) -> torch.Tensor:
    """The request's "input": uint8 [n, S, S, 3] for UINT8, float32 [n, 3, S, S] for FP32/FP16 (S = input_size).

    Raises RpcError(INVALID_ARGUMENT) when it is anything else, and nothing else.
    """
    if len(request.inputs) != 1 or request.inputs[0].name != INPUT_NAME:
        names = echo([tensor.name for tensor in request.inputs][:4])
        raise invalid_argument(f"model {echo(model_name)} takes one input named 'input', got {names}")
    tensor = request.inputs[0]
    dtype = _WIRE_DTYPES.get(tensor.datatype)
    if dtype is None:
        raise invalid_argument(f"input datatype {echo(tensor.datatype)} is not supported; send UINT8, FP32 or FP16")
    shape = list(tensor.shape)
    expected = image_dims(tensor.datatype, input_size)
    if len(shape) != 4 or shape[0] < 1 or shape[1:] != expected:
        raise invalid_argument(
            f"{tensor.datatype} input shape {echo(shape[:8])} does not match the model's {[-1, *expected]}"
            + ("; UINT8 images are NHWC" if tensor.datatype == "UINT8" else "; UINT8 raw images are [-1, S, S, 3]")
        )
    values = _values(request, tensor, dtype, math.prod(shape)).reshape(shape)
    if tensor.datatype == "UINT8":
        return torch.from_numpy(values)
    # astype copies into a writable float32 array (a raw view is read-only, FP16 needs widening anyway).
    return torch.from_numpy(values.astype(np.float32))


def _values(
    request: pb.ModelInferRequest, tensor: pb.ModelInferRequest.InferInputTensor, dtype: np.dtype, count: int
) -> np.ndarray:
    """The input's `count` values, flat, in `dtype` (UINT8) or the wire dtype (floats), from raw or typed contents."""
    typed = tensor.HasField("contents")
    if typed and request.raw_input_contents:
        raise invalid_argument("input 'input' carries both typed contents and raw_input_contents; send one of them")
    if typed:
        return _typed_values(tensor, count)
    if len(request.raw_input_contents) != 1:
        entries = len(request.raw_input_contents)
        raise invalid_argument(
            f"send the input's values in raw_input_contents (one entry, not {entries}) or typed contents"
        )
    raw = request.raw_input_contents[0]
    if len(raw) != count * dtype.itemsize:
        needed = count * dtype.itemsize
        raise invalid_argument(f"input holds {len(raw)} bytes; {tensor.datatype} {list(tensor.shape)} needs {needed}")
    values = np.frombuffer(raw, dtype=dtype)
    return values.copy() if dtype.itemsize == 1 else values  # uint8 goes to torch as is: it must own writable memory


def _typed_values(tensor: pb.ModelInferRequest.InferInputTensor, count: int) -> np.ndarray:
    field = _TYPED_FIELDS.get(tensor.datatype)
    if field is None:
        raise invalid_argument(f"{tensor.datatype} has no typed contents field; send it in raw_input_contents")
    used = [name for name in _CONTENTS_FIELDS if len(getattr(tensor.contents, name))]
    if used != [field]:
        raise invalid_argument(f"typed {tensor.datatype} values go in contents.{field} alone, got {used or 'none'}")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise invalid_argument(
            f"contents.{field} holds {len(values)} values; {tensor.datatype} {list(tensor.shape)} needs {count}"
        )
    if tensor.datatype == "FP32":
        return np.asarray(values, dtype=np.float32)
    wide = np.asarray(values, dtype=np.uint32)
    if wide.max(initial=0) > 255:
        raise invalid_argument(f"contents.uint_contents holds {int(wide.max())}; UINT8 values are 0..255")
    return wide.astype(np.uint8)
