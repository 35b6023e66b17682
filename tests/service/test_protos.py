"""The committed stubs are what the .proto files generate, and our KServe v2 proto is wire-compatible with
tritonclient's (same package, names, field numbers and types), checked against tritonclient's own descriptors in a
separate process (both register `inference.*` in protobuf's default pool; see docs/ARCHITECTURE.md, "Pitfalls")."""

import json
import subprocess
import sys
from pathlib import Path

from service import protogen
from service._proto import grpc_service_pb2, model_config_pb2

_DUMP_TRITON_DESCRIPTORS = """
import json
from tritonclient.grpc import model_config_pb2, service_pb2

def fields(message):
    return {f.name: [f.number, f.type, f.is_repeated, f.message_type.full_name if f.message_type else ""]
            for f in message.fields}

def walk(message, out):
    out[message.full_name] = fields(message)
    for nested in message.nested_types:
        walk(nested, out)

messages = {}
for module in (service_pb2, model_config_pb2):
    for message in module.DESCRIPTOR.message_types_by_name.values():
        walk(message, messages)
service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
methods = {m.name: [m.input_type.full_name, m.output_type.full_name] for m in service.methods}
print(json.dumps({"package": service_pb2.DESCRIPTOR.package, "service": service.full_name,
                  "messages": messages, "methods": methods}))
"""


def _fields(message) -> dict[str, list]:
    return {
        f.name: [f.number, f.type, f.is_repeated, f.message_type.full_name if f.message_type else ""]
        for f in message.fields
    }


def _our_messages() -> dict[str, dict[str, list]]:
    out: dict[str, dict[str, list]] = {}

    def walk(message) -> None:
        out[message.full_name] = _fields(message)
        for nested in message.nested_types:
            walk(nested)

    for module in (grpc_service_pb2, model_config_pb2):
        for message in module.DESCRIPTOR.message_types_by_name.values():
            walk(message)
    return out


def test_committed_stubs_match_the_protos(tmp_path: Path):
    generated = protogen.generate(tmp_path)
    assert {path.name for path in generated} == {
        "classifier_pb2.py", "classifier_pb2.pyi", "classifier_pb2_grpc.py",
        "grpc_service_pb2.py", "grpc_service_pb2.pyi", "grpc_service_pb2_grpc.py",
        "model_config_pb2.py", "model_config_pb2.pyi", "model_config_pb2_grpc.py",
    }  # fmt: skip
    committed_dir = protogen.REPO_ROOT / protogen.STUB_PACKAGE_PATH
    stale = [path.name for path in generated if path.read_bytes() != (committed_dir / path.name).read_bytes()]
    assert not stale, f"stale stubs {stale}: run `python -m service.protogen`"


def test_inference_proto_is_wire_compatible_with_tritonclient():
    completed = subprocess.run(
        [sys.executable, "-c", _DUMP_TRITON_DESCRIPTORS], capture_output=True, text=True, timeout=60, check=True
    )
    triton = json.loads(completed.stdout)
    ours = _our_messages()
    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]

    assert grpc_service_pb2.DESCRIPTOR.package == triton["package"] == "inference"
    assert service.full_name == triton["service"]
    # Every RPC of Triton's service is declared (the unsupported ones answer UNIMPLEMENTED with a reason).
    assert {method.name for method in service.methods} == set(triton["methods"])
    for method in service.methods:
        assert [method.input_type.full_name, method.output_type.full_name] == triton["methods"][method.name]
    for name, fields in ours.items():
        assert name in triton["messages"], f"{name} is not a message of the protocol"
        for field_name, spec in fields.items():
            assert triton["messages"][name].get(field_name) == spec, f"{name}.{field_name}: ours {spec}"
    # The messages our RPCs use carry every field the protocol defines for them (map entries included).
    for name in ours:
        assert set(ours[name]) == set(triton["messages"][name]), name
