"""The KServe tensor parser: UINT8 NHWC and FP32/FP16 NCHW, raw or typed contents, and what it refuses."""

import grpc
import numpy as np
import pytest
import torch

from service._proto import grpc_service_pb2 as pb
from service.rpc import RpcError
from service.tensor_input import CHEAP_RAW_INPUT_BYTES, converts_cheaply, input_tensor

SIZE = 4


def request(datatype: str, shape: list[int], *, raw: bytes | None = None, **contents) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype=datatype, shape=shape)
    if contents:
        tensor.contents.CopyFrom(pb.InferTensorContents(**contents))
    return pb.ModelInferRequest(model_name="m", inputs=[tensor], raw_input_contents=[] if raw is None else [raw])


def refused(req: pb.ModelInferRequest, match: str) -> None:
    with pytest.raises(RpcError, match=match) as raised:
        input_tensor(req, "m", SIZE)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_uint8_nhwc_raw_images_stay_uint8():
    images = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    out = input_tensor(request("UINT8", [2, SIZE, SIZE, 3], raw=images.tobytes()), "m", SIZE)
    assert out.dtype == torch.uint8 and out.shape == (2, SIZE, SIZE, 3)
    torch.testing.assert_close(out, torch.from_numpy(images), rtol=0, atol=0)
    out[0, 0, 0, 0] = 1  # it owns writable memory (torch warns on a read-only view of the request)


@pytest.mark.parametrize("datatype, dtype", [("FP32", np.float32), ("FP16", np.float16)])
def test_float_nchw_raw_is_widened_to_float32(datatype, dtype):
    values = np.random.default_rng(1).standard_normal((1, 3, SIZE, SIZE)).astype(dtype)
    out = input_tensor(request(datatype, [1, 3, SIZE, SIZE], raw=values.astype(f"<{values.dtype.char}").tobytes()),
                       "m", SIZE)  # fmt: skip
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.from_numpy(values.astype(np.float32)), rtol=0, atol=0)


def test_typed_contents_are_taken_as_triton_takes_them():
    values = np.random.default_rng(2).standard_normal(3 * SIZE * SIZE).astype(np.float32)
    out = input_tensor(request("FP32", [1, 3, SIZE, SIZE], fp32_contents=values), "m", SIZE)
    torch.testing.assert_close(out, torch.from_numpy(values.reshape(1, 3, SIZE, SIZE)), rtol=0, atol=0)
    pixels = np.arange(SIZE * SIZE * 3) % 256
    out = input_tensor(request("UINT8", [1, SIZE, SIZE, 3], uint_contents=pixels.tolist()), "m", SIZE)
    assert out.dtype == torch.uint8
    torch.testing.assert_close(out, torch.from_numpy(pixels.astype(np.uint8).reshape(1, SIZE, SIZE, 3)))


def test_only_small_raw_inputs_are_converted_on_the_event_loop():
    side = 224  # a UINT8 image of the usual size stays on the loop; its FP32 form and typed contents hop
    assert 3 * side * side <= CHEAP_RAW_INPUT_BYTES < 4 * 3 * side * side
    assert converts_cheaply(request("UINT8", [1, side, side, 3], raw=bytes(3 * side * side)))
    assert not converts_cheaply(request("FP32", [1, 3, side, side], raw=bytes(4 * 3 * side * side)))
    assert not converts_cheaply(request("UINT8", [1, SIZE, SIZE, 3], uint_contents=[0] * (3 * SIZE * SIZE)))
    two_entries = request("UINT8", [1, side, side, 3], raw=bytes(3 * side * side))
    two_entries.raw_input_contents.append(bytes(CHEAP_RAW_INPUT_BYTES))  # refused later; counted whole here
    assert not converts_cheaply(two_entries)


@pytest.mark.parametrize(
    "req, match",
    [
        pytest.param(request("FP32", [1, 3, SIZE, SIZE], raw=bytes(4 * 3 * SIZE * SIZE), fp32_contents=[0.0] * 48),
                     "both typed contents and raw", id="typed-and-raw"),
        pytest.param(request("UINT8", [1, SIZE, SIZE, 3], raw=bytes(48), uint_contents=[0] * 48),
                     "both typed contents and raw", id="typed-and-raw-uint8"),
        pytest.param(request("FP16", [1, 3, SIZE, SIZE], fp32_contents=[0.0] * 48), "no typed contents field",
                     id="fp16-typed"),
        pytest.param(request("FP32", [1, 3, SIZE, SIZE], int_contents=[0] * 48), r"contents\.fp32_contents alone",
                     id="wrong-typed-field"),
        pytest.param(request("UINT8", [1, SIZE, SIZE, 3], uint_contents=[256] + [0] * 47), "0..255",
                     id="uint8-out-of-range"),
        pytest.param(request("FP32", [1, 3, SIZE, SIZE], fp32_contents=[0.0] * 47), "holds 47 values",
                     id="typed-count"),
        pytest.param(request("UINT8", [1, 3, SIZE, SIZE], raw=bytes(48)), "NHWC", id="uint8-as-nchw"),
        pytest.param(request("FP32", [1, SIZE, SIZE, 3], raw=bytes(192)), r"UINT8 raw images are \[-1, S, S, 3\]",
                     id="fp32-as-nhwc"),
        pytest.param(request("UINT8", [1, SIZE, SIZE, 3], raw=bytes(47)), "holds 47 bytes", id="byte-count"),
        pytest.param(request("INT32", [1, 3, SIZE, SIZE], raw=bytes(192)), "send UINT8, FP32 or FP16",
                     id="datatype"),
        pytest.param(request("UINT8", [1, SIZE, SIZE, 3]), "raw_input_contents", id="no-contents"),
        # service.echo.echo: the quote's first 64 characters, then how many were left out.
        pytest.param(request("x" * 10_000, [1]), r"'x{63}\.\.\. \(9938 more characters\) is not supported",
                     id="long-datatype-echoed-short"),
    ],
)  # fmt: skip
def test_refusals_are_invalid_argument_with_a_message_that_says_what_to_send(req, match):
    refused(req, match)
