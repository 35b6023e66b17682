"""The HTTP body ⇄ ModelInferRequest/Response translation on its own (service/http/tensors.py): the parts the served
model cannot show, since it takes one FP32/FP16 input: other datatypes, several inputs mixing JSON and binary, output
parameters passed on to the servicer, outputs with no JSON form."""

import json

import grpc
import numpy as np
import pytest

from service._proto import grpc_service_pb2 as pb
from service.http.tensors import OutputEncoding, infer_response_body, parse_infer_request
from service.rpc import RpcError


def body_of(header: dict, binary: bytes = b"") -> tuple[bytes, str | None]:
    encoded = json.dumps(header).encode()
    return encoded + binary, (str(len(encoded)) if binary else None)


def test_inputs_mixing_binary_and_json_reach_the_servicer_as_raw_bytes_in_order():
    first = np.arange(6, dtype="<i4").reshape(2, 3) - 3
    header = {
        "id": "r1",
        "inputs": [
            {"name": "a", "datatype": "INT32", "shape": [2, 3], "parameters": {"binary_data_size": first.nbytes}},
            {"name": "b", "datatype": "BOOL", "shape": [3], "data": [True, False, True]},
            {"name": "c", "datatype": "FP64", "shape": [1, 2], "data": [[0.5, -2]]},
        ],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True, "classification": 3, "tag": "x"}}],
    }
    request, encoding = parse_infer_request("m", "1", *body_of(header, first.tobytes()))
    assert [tensor.name for tensor in request.inputs] == ["a", "b", "c"]
    assert request.raw_input_contents == [first.tobytes(), b"\x01\x00\x01", np.array([0.5, -2.0], "<f8").tobytes()]
    assert (request.model_name, request.model_version, request.id) == ("m", "1", "r1")
    (output,) = request.outputs
    # binary_data is HTTP's own; the rest (the classification extension's count) goes on as the gRPC client sends it.
    assert dict(output.parameters) == {
        "classification": pb.InferParameter(int64_param=3),
        "tag": pb.InferParameter(string_param="x"),
    }
    assert encoding.is_binary("logits") and not encoding.is_binary("other")


@pytest.mark.parametrize(("tensor", "fragment"), [
    ({"name": "b", "datatype": "BOOL", "shape": [2], "data": [1, 0]}, "only booleans"),
    ({"name": "x", "datatype": "INT32", "shape": [2], "data": [1.5, True, "2"]}, "only numbers"),
    ({"name": "x", "datatype": "BYTES", "shape": [1], "data": ["abc"]}, "cannot be sent as JSON"),
    ({"name": "x", "datatype": "FP32", "shape": [True], "data": [1.0]}, "non-negative integers"),
    ({"name": 5, "datatype": "FP32", "shape": [1], "data": [1.0]}, "'name' must be a string"),
])  # fmt: skip
def test_malformed_tensors_are_invalid_argument(tensor: dict, fragment: str):
    with pytest.raises(RpcError) as raised:
        parse_infer_request("m", "", *body_of({"inputs": [tensor]}))
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in str(raised.value)


def test_an_output_without_a_json_form_goes_back_in_binary():
    strings = b"\x03\x00\x00\x00abc"  # Triton's BYTES: a 4-byte little-endian length before each element
    logits = np.array([[1.5, -2.0]], dtype="<f4")
    response = pb.ModelInferResponse(
        model_name="m", model_version="1",
        outputs=[pb.ModelInferResponse.InferOutputTensor(name="logits", datatype="FP32", shape=[1, 2]),
                 pb.ModelInferResponse.InferOutputTensor(name="labels", datatype="BYTES", shape=[1])],
        raw_output_contents=[logits.tobytes(), strings],
    )  # fmt: skip
    body, headers = infer_response_body(response, OutputEncoding())
    length = int(headers["Inference-Header-Content-Length"])
    header = json.loads(body[:length])
    assert header["outputs"][0]["data"] == [1.5, -2.0]
    assert header["outputs"][1]["parameters"] == {"binary_data_size": len(strings)}
    assert body[length:] == strings
