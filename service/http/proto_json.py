"""Protobuf messages as Triton's HTTP frontend renders them in JSON.

json_format.MessageToDict writes 64-bit integers as strings (proto3's JSON mapping); Triton's HTTP answers (model
configuration, statistics) carry them as numbers, and clients read them as numbers. So this walks the fields
itself: proto field names, integers as numbers, enums by name, unset fields left out, maps as objects.
"""

from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message


def message_json(message: Message) -> dict[str, Any]:
    return {field.name: _field_json(field, value) for field, value in message.ListFields()}


def _field_json(field: FieldDescriptor, value: Any) -> Any:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value_field = field.message_type.fields_by_name["value"]
        return {key: _single_json(value_field, item) for key, item in value.items()}
    if field.is_repeated:
        return [_single_json(field, item) for item in value]
    return _single_json(field, value)


def _single_json(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_json(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values_by_number[value].name
    if field.type == FieldDescriptor.TYPE_BYTES:
        return value.decode("utf-8", errors="replace")
    return value
