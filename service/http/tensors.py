"""KServe v2 inference bodies over HTTP ⇄ the gRPC messages, with Triton's binary tensor extension.

A request body is a JSON header, optionally followed by binary tensor data: `Inference-Header-Content-Length` says how
many leading bytes are JSON, and each input sent in binary says its byte count in `parameters.binary_data_size`, in
input order. Inputs given as JSON `data` (flat or nested, row-major) are packed into raw bytes of their declared
datatype, so every input reaches the servicer in raw_input_contents, exactly as a gRPC client sends it: the servicer's
checks (names, datatype, shape, byte count) are the same for both protocols. Outputs go back as JSON `data`, or in
binary after the JSON header when the request asks (an output's `parameters.binary_data`, or the request's
`parameters.binary_data_output`).
"""

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from service._proto import grpc_service_pb2 as pb
from service.rpc import invalid_argument

HEADER_LENGTH = "Inference-Header-Content-Length"
# Triton's datatypes that have a numpy dtype, little-endian as on the wire. BYTES and BF16 have none.
NUMPY_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in {
        "BOOL": "?", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "i1", "INT16": "<i2",
        "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
    }.items()
}  # fmt: skip
_INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class OutputEncoding:
    """Which outputs go back in binary: the named ones, or all when `all_binary`."""

    binary: frozenset[str] = frozenset()
    all_binary: bool = False

    def is_binary(self, name: str) -> bool:
        return self.all_binary or name in self.binary


def parse_infer_request(
    model_name: str, model_version: str, body: bytes, header_length: str | None
) -> tuple[pb.ModelInferRequest, OutputEncoding]:
    """The ModelInferRequest an HTTP infer body stands for; RpcError(INVALID_ARGUMENT) naming what is wrong."""
    json_length = _json_length(header_length, len(body))
    header = _object(_json(body[:json_length]), "the request")
    binary = memoryview(body)[json_length:]
    request = pb.ModelInferRequest(model_name=model_name, model_version=model_version, id=_string(header, "id", ""))
    raw_inputs_bytes = 0
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise invalid_argument("'inputs' must be a non-empty list of tensors")
    for index, tensor in enumerate(inputs):
        name, binary_part = _input(_object(tensor, f"inputs[{index}]"), index, binary[raw_inputs_bytes:])
        if binary_part is None:
            raw = _json_tensor_bytes(tensor, name)
        else:
            raw = bytes(binary_part)
            raw_inputs_bytes += len(raw)
        request.inputs.add(name=name, datatype=tensor["datatype"], shape=tensor["shape"])
        request.raw_input_contents.append(raw)
    if raw_inputs_bytes != len(binary):
        raise invalid_argument(
            f"the body carries {len(binary)} bytes after its JSON header, the inputs' binary_data_size add up to "
            f"{raw_inputs_bytes}"
        )
    parameters = _object(header.get("parameters", {}), "'parameters'")
    all_binary = parameters.get("binary_data_output", False)
    if not isinstance(all_binary, bool):
        raise invalid_argument("'parameters.binary_data_output' must be true or false")
    binary_outputs = set()
    outputs = header.get("outputs", [])
    if not isinstance(outputs, list):
        raise invalid_argument("'outputs' must be a list")
    for index, output in enumerate(outputs):
        output = _object(output, f"outputs[{index}]")
        name = _string(output, "name")
        output_parameters = dict(_object(output.get("parameters", {}), f"outputs[{index}].parameters"))
        as_binary = output_parameters.pop("binary_data", False)
        if not isinstance(as_binary, bool):
            raise invalid_argument(f"outputs[{index}].parameters.binary_data must be true or false")
        if as_binary:
            binary_outputs.add(name)
        requested = request.outputs.add(name=name)
        for key, value in output_parameters.items():
            requested.parameters[key].CopyFrom(_parameter(value, f"outputs[{index}].parameters.{key}"))
    return request, OutputEncoding(frozenset(binary_outputs), all_binary)


def infer_response_body(response: pb.ModelInferResponse, encoding: OutputEncoding) -> tuple[bytes, dict[str, str]]:
    """The HTTP body and headers of `response`: JSON, or a JSON header and binary outputs after it."""
    outputs = []
    binary_parts = []
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        output: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        dtype = NUMPY_DTYPES.get(tensor.datatype)
        if encoding.is_binary(tensor.name) or dtype is None:  # no JSON form: binary whatever was asked
            output["parameters"] = {"binary_data_size": len(raw)}
            binary_parts.append(raw)
        else:
            output["data"] = np.frombuffer(raw, dtype=dtype).tolist()
        outputs.append(output)
    header: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        header["id"] = response.id
    header["outputs"] = outputs
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    if not binary_parts:
        return header_bytes, {"Content-Type": "application/json"}
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header_bytes))}
    return b"".join((header_bytes, *binary_parts)), headers


def _json_length(header_length: str | None, body_length: int) -> int:
    if header_length is None:
        return body_length
    if not header_length.isdigit() or not 0 < int(header_length) <= body_length:
        raise invalid_argument(
            f"{HEADER_LENGTH} {header_length!r} is not a byte count within the {body_length}-byte body"
        )
    return int(header_length)


def _json(data: bytes | memoryview) -> object:
    try:
        return json.loads(bytes(data))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise invalid_argument(f"the request's JSON header is not valid JSON: {error}") from None
    except RecursionError:
        raise invalid_argument("the request's JSON header is nested too deeply") from None


def _input(tensor: dict[str, Any], index: int, binary: memoryview) -> tuple[str, memoryview | None]:
    """The input's name and its binary data (None when it comes as JSON `data`), after checking its fields."""
    name = _string(tensor, "name")
    datatype = _string(tensor, "datatype")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d <= _INT64_MAX for d in shape):
        raise invalid_argument(f"input {name!r}: 'shape' must be a list of non-negative integers, got {shape!r}")
    parameters = _object(tensor.get("parameters", {}), f"inputs[{index}].parameters")
    size = parameters.get("binary_data_size")
    if size is None:
        if "data" not in tensor:
            raise invalid_argument(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
        return name, None
    if "data" in tensor:
        raise invalid_argument(f"input {name!r} has both 'data' and parameters.binary_data_size; send one")
    if type(size) is not int or size < 0:
        raise invalid_argument(f"input {name!r}: binary_data_size must be a non-negative integer, got {size!r}")
    if size > len(binary):
        raise invalid_argument(
            f"input {name!r} declares {size} binary bytes, the body has {len(binary)} left ({datatype})"
        )
    return name, binary[:size]


def _json_tensor_bytes(tensor: dict[str, Any], name: str) -> bytes:
    """JSON `data` as raw bytes of the tensor's datatype, once its values are numbers of the right count."""
    datatype, shape = tensor["datatype"], tensor["shape"]
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise invalid_argument(f"input {name!r}: datatype {datatype!r} cannot be sent as JSON data; send it in binary")
    try:
        values = np.asarray(tensor["data"])
    except ValueError:  # lists of unequal lengths
        raise invalid_argument(f"input {name!r}: 'data' is not a regular (non-ragged) list of numbers") from None
    allowed_kinds = "b" if datatype == "BOOL" else "iuf"
    if values.dtype.kind not in allowed_kinds:
        raise invalid_argument(
            f"input {name!r}: 'data' must hold only {'booleans' if datatype == 'BOOL' else 'numbers'}"
        )
    if values.size != math.prod(shape):
        raise invalid_argument(
            f"input {name!r}: 'data' has {values.size} values, {datatype} {shape} needs {math.prod(shape)}"
        )
    return values.astype(dtype).tobytes()


def _parameter(value: object, where: str) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int) and abs(value) <= _INT64_MAX:
        return pb.InferParameter(int64_param=value)
    if isinstance(value, str):
        return pb.InferParameter(string_param=value)
    raise invalid_argument(f"{where} must be a boolean, an integer or a string, got {value!r}")


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid_argument(f"{what} must be a JSON object")
    return value


def _string(mapping: dict[str, Any], key: str, default: str | None = None) -> str:
    value = mapping.get(key, default)
    if not isinstance(value, str):
        raise invalid_argument(f"{key!r} must be a string, got {value!r}")
    return value
