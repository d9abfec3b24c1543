"""Conversion between plain Python values and google.protobuf.Value.

Payloads in llmos are JSON-shaped: None, bool, int, float, str, list and
dict with str keys. Numbers travel as doubles (as in JSON); integral numbers
that fit in 2**53 come back as int so that pids and counters stay ints.
"""
from __future__ import annotations

import math
from typing import Any

from google.protobuf import struct_pb2

JSON = Any  # None | bool | int | float | str | list[JSON] | dict[str, JSON]

MAX_EXACT_INTEGER = 2**53  # integers beyond are not exact JSON numbers (doubles)
MAX_DURATION_MS = 315_360_000_000  # ten years: a longer duration (or +inf) means this, "for ever"
_MAX_EXACT = MAX_EXACT_INTEGER


def to_value(obj: JSON, _depth: int = 0) -> struct_pb2.Value:
    """Build a Value from a JSON-shaped Python object; TypeError/ValueError otherwise."""
    value = struct_pb2.Value()
    _fill(value, obj, _depth)
    return value


def fill_value(value: struct_pb2.Value, obj: JSON) -> None:
    """Set `value` (say, a field of a message being built) to a JSON-shaped object, as to_value."""
    _fill(value, obj, 0)


def _fill(value: struct_pb2.Value, obj: JSON, depth: int) -> None:
    if depth > 100:
        raise ValueError("value nests deeper than 100 levels")
    if obj is None:
        value.null_value = struct_pb2.NULL_VALUE
    elif obj is True or obj is False:
        value.bool_value = obj
    elif isinstance(obj, int):
        if abs(obj) > _MAX_EXACT:
            raise ValueError(f"integer {obj} does not fit a JSON number exactly")
        value.number_value = obj
    elif isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError("NaN and infinite numbers are not JSON values")
        value.number_value = obj
    elif isinstance(obj, str):
        value.string_value = obj
    elif isinstance(obj, (list, tuple)):
        items = value.list_value.values
        for item in obj:
            _fill(items.add(), item, depth + 1)
        if not obj:
            value.list_value.SetInParent()
    elif isinstance(obj, dict):
        fields = value.struct_value.fields
        for key, item in obj.items():
            if not isinstance(key, str):
                raise TypeError(f"object keys must be strings, not {type(key).__name__}")
            _fill(fields[key], item, depth + 1)
        if not obj:
            value.struct_value.SetInParent()
    else:
        raise TypeError(f"{type(obj).__name__} is not a JSON value")


def from_value(value: struct_pb2.Value | None) -> JSON:
    """The plain Python object for a Value; an unset Value is None."""
    if value is None:
        return None
    kind = value.WhichOneof("kind")
    if kind is None or kind == "null_value":
        return None
    if kind == "number_value":
        number = value.number_value
        if number.is_integer() and abs(number) <= _MAX_EXACT:
            return int(number)
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "list_value":
        return [from_value(v) for v in value.list_value.values]
    return {k: from_value(v) for k, v in value.struct_value.fields.items()}
