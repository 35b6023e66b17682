"""Fuzzing the two parsers of client bytes: the image decoder and the KServe tensor parser, under Hypothesis.

Each may answer only with its documented errors: decode_image with InvalidImageError or ImageTooLargeError,
input_tensor with RpcError(INVALID_ARGUMENT); anything else (a struct.error, a TypeError, a numpy error) is a bug.
Bounded: few examples, a per-example deadline, tiny images, no shrinking database on disk.
"""

import io

import grpc
import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import models
from service._proto import grpc_service_pb2 as pb
from service.preprocess import ImageTooLargeError, InvalidImageError, decode_image
from service.rpc import RpcError
from service.tensor_input import input_tensor

SPEC = models.input_spec("resnet18", 16)
SIZE = 4
BOUNDED = settings(
    max_examples=150, deadline=2000, database=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


def _seed_images() -> list[bytes]:
    """Small valid images of each allowed format, with EXIF on one, for the fuzzer to mutate."""
    pixels = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    seeds = []
    for fmt, options in (("PNG", {}), ("JPEG", {"exif": exif}), ("WEBP", {}), ("BMP", {})):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=fmt, **options)
        seeds.append(buffer.getvalue())
    return seeds


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_seed_images())))
    for _ in range(draw(st.integers(0, 8))):  # flip bytes, header and EXIF included
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) if draw(st.booleans()) else bytes(data)


@BOUNDED
@given(st.one_of(mutated_images(), st.binary(max_size=256)))
def test_the_image_decoder_raises_only_its_documented_errors(data):
    try:
        pixels = decode_image(data, SPEC, max_pixels=100_000)
    except (InvalidImageError, ImageTooLargeError):
        return
    assert pixels.shape == (16, 16, 3) and pixels.dtype == torch.uint8


_DATATYPES = st.sampled_from(["UINT8", "FP32", "FP16", "INT32", "BYTES", "", "fp32"])
_SHAPES = st.lists(st.integers(-3, 2**40), max_size=5) | st.sampled_from(
    [[1, SIZE, SIZE, 3], [2, 3, SIZE, SIZE], [1, 3, SIZE, SIZE]]
)


@st.composite
def infer_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    inputs = []
    for _ in range(draw(st.integers(0, 2))):
        tensor = pb.ModelInferRequest.InferInputTensor(
            name=draw(st.sampled_from(["input", "images", ""])), datatype=draw(_DATATYPES), shape=draw(_SHAPES)
        )
        if draw(st.booleans()):
            tensor.contents.CopyFrom(
                pb.InferTensorContents(
                    fp32_contents=draw(st.lists(st.floats(width=32), max_size=100)),
                    uint_contents=draw(st.lists(st.integers(0, 2**32 - 1), max_size=100)),
                    int_contents=draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=3)),
                )
            )
        inputs.append(tensor)
    raw = draw(st.lists(st.binary(max_size=200) | st.sampled_from([bytes(48), bytes(192), bytes(96)]), max_size=2))
    return pb.ModelInferRequest(model_name="m", inputs=inputs, raw_input_contents=raw)


@BOUNDED
@given(infer_requests())
def test_the_tensor_parser_raises_only_invalid_argument(request):
    try:
        tensor = input_tensor(request, "m", SIZE)
    except RpcError as error:
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert len(str(error)) < 400  # client values are echoed short
        return
    assert tensor.shape[1:] in ((SIZE, SIZE, 3), (3, SIZE, SIZE))
    assert tensor.dtype in (torch.uint8, torch.float32)
