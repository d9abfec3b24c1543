"""Hostile values, and what the value model says becomes of each.

The value model (DECISIONS.md): JSON values; numbers are doubles, integers exact
within +-2^53 (a Lua integer beyond is refused, never rounded); NaN and +-Inf are
refused; strings are UTF-8 text; Lua tables with keys 1..n (holes as null) are
arrays, other tables objects whose number keys become decimal text, two keys
becoming one string are refused; at most 32 levels deep; a message is at most
4 MiB (len(data) + the protobuf size of its body), past which RESOURCE_EXHAUSTED.

A JsonPlan is a value as a client sends it (a google.protobuf.Value, NaN
included); a LuaValue is a Lua expression and what must come out of it. Both
keep a short label, which is what Hypothesis prints in a reproducer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from google.protobuf import struct_pb2
from hypothesis import strategies as st

from llmos.values import from_value

MAX_MESSAGE_BYTES = 4 << 20  # llmosd --max-message-bytes, its default
MAX_DEPTH = 32  # so that whatever is accepted reads back through any protobuf parser (messaging.h)
NAME_MAX_CHARS = 256


class Shown:
    """Printed in a Hypothesis reproducer as its repr() (not field by field)."""

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


class Fate:
    """What the kernel must do with a value."""

    OK = "ok"              # accept, and give back the value
    INVALID = "invalid"    # refuse: INVALID_ARGUMENT
    TOO_BIG = "too big"    # refuse: RESOURCE_EXHAUSTED
    EITHER = "unspecified"  # the decisions do not say: anything documented


# -- text -------------------------------------------------------------------------------------
EDGE_CHARS = [
    "\x00", "\x01", "\x1b", "\x7f", "\x85", "\xa0", "\xad", "\u200b", "\u200e", "\u202e", "\u2028", "\u2066",
    "\ufeff", "\ufffd", "\uffff", "\U0001f600", "\U0010ffff", "\u0301", "\t", "\n", "\r", " ", "/", "\\", ".",
    "%", "'", '"', "é", "ß", "ǅ", "日",
]
EDGE_TEXTS = [
    "", " ", ".", "..", "/", "a/b", "../x", "/abs", "a//b", "a/", "a/./b", "%s%n", "'; DROP TABLE processes; --",
    "\u202egnp.exe", "a\x00b", "line\u0085break", "EXIT", "subscribed", "default", "\ud7ff", "x" * 255, "x" * 256,
    "x" * 257, "é" * 128, "é" * 129, "日" * 256, "日" * 257, "\U0001f600" * 300,
]


def hostile_text(max_size: int = 40) -> st.SearchStrategy[str]:
    """Text a client can send (no lone surrogates: protobuf refuses them before the wire)."""
    return st.one_of(
        st.sampled_from(EDGE_TEXTS),
        st.text(st.sampled_from(EDGE_CHARS + list("abcXYZ019_-")), max_size=max_size),
        st.text(max_size=max_size),
        st.builds(lambda c, n: c * n, st.sampled_from(["a", "é", "\u202e", "/", "\x00"]),
                  st.sampled_from([1000, 5000, 65536, 1 << 20])),
    )


def printable_name() -> st.SearchStrategy[str]:
    """Names the decisions accept: 1..256 printable characters."""
    return st.text(st.characters(codec="utf-8").filter(str.isprintable), min_size=1, max_size=24)


def name_is_valid(name: Any) -> bool:
    """DECISIONS.md: names are 1..256 characters, printable (str.isprintable())."""
    return isinstance(name, str) and 1 <= len(name) <= NAME_MAX_CHARS and name.isprintable()


# -- numbers ----------------------------------------------------------------------------------
HOSTILE_UINT64 = [0, 1, 2, 7, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
HOSTILE_INT64 = [-2**63, -2**62, -2**53 - 1, -1, 0, 1, 20, 200, 2**31, 2**53 + 1, 9 * 10**18, 2**63 - 1]
HOSTILE_INT32 = [-2**31, -1001, -21, -20, -1, 0, 1, 19, 20, 21, 1000, 2**31 - 1]
HOSTILE_UINT32 = [0, 1, 2, 100, 10_000, 10_001, 2**31, 2**32 - 1]
HOSTILE_FLOATS = [math.nan, math.inf, -math.inf, -0.0, 0.0, 5e-324, 1e-45, 0.5, 1.0, 2.0, 100.0, 3.4e38, -1.0, 1e308]


def ints(bits: int, signed: bool) -> st.SearchStrategy[int]:
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    edges = {(32, True): HOSTILE_INT32, (32, False): HOSTILE_UINT32, (64, True): HOSTILE_INT64,
             (64, False): HOSTILE_UINT64}[(bits, signed)]
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi), st.integers(-3 if signed else 0, 300))


# -- JSON bodies as a client sends them -------------------------------------------------------
class JsonPlan(Shown):
    """A body as a client sends it, built once on first use."""

    def __init__(self, label: str, build: Callable[[], struct_pb2.Value]) -> None:
        self.label = label
        self._build = build
        self._value: struct_pb2.Value | None = None

    def value(self) -> struct_pb2.Value:
        if self._value is None:
            self._value = self._build()
        return self._value

    @property
    def invalid(self) -> bool:
        """Refused whatever its size: NaN or +-Inf inside, or nested too deep."""
        v = self.value()
        return not all_finite(v) or depth_of(v) > MAX_DEPTH

    def fate(self, data_bytes: int = 0) -> str:
        if self.invalid:
            return Fate.INVALID
        if self.value().ByteSize() + data_bytes > MAX_MESSAGE_BYTES:
            return Fate.TOO_BIG
        return Fate.OK

    def expected(self) -> Any:
        return from_value(self.value())

    def __repr__(self) -> str:
        return self.label


def _number(x: float) -> struct_pb2.Value:
    v = struct_pb2.Value()
    v.number_value = x
    return v


def _string(s: str) -> struct_pb2.Value:
    v = struct_pb2.Value()
    v.string_value = s
    return v


def _null() -> struct_pb2.Value:
    v = struct_pb2.Value()
    v.null_value = struct_pb2.NULL_VALUE
    return v


def _bool(b: bool) -> struct_pb2.Value:
    v = struct_pb2.Value()
    v.bool_value = b
    return v


def _list(items: list[struct_pb2.Value]) -> struct_pb2.Value:
    v = struct_pb2.Value()
    v.list_value.SetInParent()
    for item in items:
        v.list_value.values.add().CopyFrom(item)
    return v


def _object(fields: dict[str, struct_pb2.Value]) -> struct_pb2.Value:
    v = struct_pb2.Value()
    v.struct_value.SetInParent()
    for k, item in fields.items():
        v.struct_value.fields[k].CopyFrom(item)
    return v


def nested_value(depth: int) -> struct_pb2.Value:
    """`depth` lists, one inside the other, around a 1."""
    v = _number(1)
    for _ in range(depth):
        v = _list([v])
    return v


def depth_of(v: struct_pb2.Value) -> int:
    """How many containers nest (a scalar is 0)."""
    deepest, todo = 0, [(v, 0)]
    while todo:
        item, depth = todo.pop()
        kind = item.WhichOneof("kind")
        if kind == "list_value":
            todo.extend((x, depth + 1) for x in item.list_value.values)
        elif kind == "struct_value":
            todo.extend((x, depth + 1) for x in item.struct_value.fields.values())
        deepest = max(deepest, depth + (kind in ("list_value", "struct_value")))
    return deepest


def all_finite(v: struct_pb2.Value) -> bool:
    todo = [v]
    while todo:
        item = todo.pop()
        kind = item.WhichOneof("kind")
        if kind == "number_value" and not math.isfinite(item.number_value):
            return False
        if kind == "list_value":
            todo.extend(item.list_value.values)
        elif kind == "struct_value":
            todo.extend(item.struct_value.fields.values())
    return True


def plan_of(label: str, build: Callable[[], struct_pb2.Value]) -> JsonPlan:
    return JsonPlan(label, build)


def _scalar_plans() -> st.SearchStrategy[JsonPlan]:
    return st.one_of(
        st.just(JsonPlan("null", _null)),
        st.booleans().map(lambda b: JsonPlan(repr(b), lambda: _bool(b))),
        st.sampled_from(HOSTILE_FLOATS + [2.0**53, 2.0**53 + 2, 2.0**63, 2.0**64, -(2.0**63), 1e300, 0.1])
        .map(lambda x: plan_of(repr(x), lambda: _number(x))),
        st.integers(-(2**53), 2**53).map(lambda n: plan_of(repr(n), lambda: _number(n))),
        hostile_text(20).map(lambda s: JsonPlan(repr(s) if len(s) < 40 else f"{s[:4]!r}+...({len(s)} chars)",
                                                lambda: _string(s))),
    )


def _sized_plans() -> st.SearchStrategy[JsonPlan]:
    """Deep, wide and big values around the limits."""
    return st.one_of(
        st.sampled_from([10, 31, 32, 48, 64, 65, 100, 150, 1000])
        .map(lambda d: plan_of(f"nested({d})", lambda: nested_value(d))),
        st.sampled_from([1000, 100_000])
        .map(lambda n: plan_of(f"wide_list({n})", lambda: _list([_number(i) for i in range(n)]))),
        st.sampled_from([1000, 50_000])
        .map(lambda n: plan_of(f"wide_object({n})", lambda: _object({f"k{i}": _null() for i in range(n)}))),
        st.sampled_from([(1 << 20), (4 << 20) - 16, (4 << 20) - 5, (4 << 20) - 4, (4 << 20) + 1])
        .map(lambda n: plan_of(f"'x'*{n}", lambda: _string("x" * n))),
    )


def _key_label(key: str) -> str:
    return repr(key) if len(key) <= 24 else f"{key[:8]!r}*{len(key)}"


def json_plans(sized: bool = True) -> st.SearchStrategy[JsonPlan]:
    """Any hostile body: scalars, containers of them, deep/wide/big ones."""
    base = st.one_of(_scalar_plans(), _sized_plans()) if sized else _scalar_plans()

    def extend(children: st.SearchStrategy[JsonPlan]) -> st.SearchStrategy[JsonPlan]:
        lists = st.lists(children, max_size=4).map(
            lambda xs: plan_of("[" + ", ".join(map(repr, xs)) + "]", lambda: _list([x.value() for x in xs])))
        objects = st.dictionaries(hostile_text(8), children, max_size=4).map(
            lambda d: plan_of("{" + ", ".join(f"{_key_label(k)}: {v!r}" for k, v in d.items()) + "}",
                              lambda: _object({k: v.value() for k, v in d.items()})))
        return st.one_of(lists, objects)

    return st.recursive(base, extend, max_leaves=6)


def same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values (1 == 1.0, -0.0 == 0; booleans are not numbers)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


# -- Lua values -------------------------------------------------------------------------------
@dataclass(frozen=True)
class LuaValue(Shown):
    """A Lua expression and its fate when it crosses into the kernel (a body, args,
    a result); `json` is what comes back when the fate is OK."""

    src: str
    fate: str
    json: Any = None
    label: str = ""
    depth: int = 0  # how many tables deep it nests

    def __repr__(self) -> str:
        return self.label or self.src


def _lua_ok(src: str, json: Any, label: str = "") -> LuaValue:
    return LuaValue(src, Fate.OK, json, label)


def _lua_bad(src: str, label: str = "", fate: str = Fate.INVALID) -> LuaValue:
    return LuaValue(src, fate, None, label)


def lua_string_literal(data: bytes) -> str:
    """A Lua string literal of arbitrary bytes."""
    out = []
    for b in data:
        c = chr(b)
        if c.isascii() and (c.isalnum() or c in " _-.,:;/+*=()[]{}<>!?@#$%^&|~`"):
            out.append(c)
        else:
            out.append(f"\\{b:03d}")
    return '"' + "".join(out) + '"'


LUA_SCALARS: list[LuaValue] = [
    _lua_ok("nil", None), _lua_ok("true", True), _lua_ok("false", False),
    _lua_ok("0", 0), _lua_ok("-1", -1), _lua_ok("42", 42), _lua_ok("1.5", 1.5), _lua_ok("-0.0", 0),
    _lua_ok("9007199254740992", 2**53, "2^53 (integer)"), _lua_ok("-9007199254740992", -(2**53)),
    _lua_bad("9007199254740993", "2^53+1 (integer)"), _lua_bad("-9007199254740993", "-(2^53+1) (integer)"),
    _lua_bad("math.maxinteger"), _lua_bad("math.mininteger"),
    _lua_ok("2^53", 2**53, "2^53 (float)"), _lua_ok("2^63", 2.0**63, "2^63 (float)"),
    _lua_ok("1e308", 1e308), _lua_ok("1e-320", 1e-320), _lua_ok("math.pi", math.pi),
    _lua_bad("0/0", "NaN"), _lua_bad("-(0/0)", "-NaN"), _lua_bad("math.huge"), _lua_bad("-math.huge"),
    _lua_ok('""', ""), _lua_ok('"hello"', "hello"), _lua_ok('"a\\0b"', "a\x00b", "'a\\0b'"),
    _lua_ok('"\\u{202E}x"', "\u202ex", "U+202E"), _lua_ok('"\\u{85}"', "\x85", "U+0085"),
    _lua_ok('"\\u{10FFFF}"', "\U0010ffff"), _lua_ok('"\\u{FEFF}"', "\ufeff"),
    _lua_bad('"\\xff"', "'\\xff' (not UTF-8)"), _lua_bad('"\\xed\\xa0\\x80"', "a UTF-8 surrogate"),
    _lua_bad('"\\xc0\\x80"', "overlong NUL"), _lua_bad('"\\u{110000}"', "beyond U+10FFFF"),
    _lua_bad('"\\u{7FFFFFFF}"', "\\u{7FFFFFFF}"), _lua_bad('"ok\\xfe"', "text then \\xfe"),
    _lua_bad("print", "a function"), _lua_bad("function() end", "a closure"),
    _lua_bad("coroutine.create(function() end)", "a coroutine"), _lua_bad("sys", "the sys table"),
    _lua_ok("string.rep('x', 2^20)", "x" * (1 << 20), "'x'*2^20"),
    LuaValue("string.rep('x', 4 * 2^20 + 1)", Fate.TOO_BIG, label="'x'*(4 MiB+1)"),
    LuaValue("string.rep('x', 8 * 2^20)", Fate.TOO_BIG, label="'x'*8 MiB"),
]


def _lua_nested(depth: int) -> LuaValue:
    src = f"(function() local t = {{}} for i = 2, {depth} do t = {{t}} end return t end)()"
    if depth > MAX_DEPTH:
        return _lua_bad(src, f"nested_tables({depth})")
    json: Any = {}
    for _ in range(depth - 1):
        json = [json]
    return LuaValue(src, Fate.OK, json, f"nested_tables({depth})", depth)


LUA_SHAPES: list[LuaValue] = [
    _lua_ok("{}", {}), _lua_ok("{1, 2, 3}", [1, 2, 3]), _lua_ok("{a = 1, b = 'x'}", {"a": 1, "b": "x"}),
    _lua_ok("{1, nil, 3}", [1, None, 3], "{1, nil, 3} (a hole)"),
    _lua_ok("{[1] = 'a', [2] = 'b', [4] = 'd'}", ["a", "b", None, "d"], "{[1],[2],[4]}"),
    LuaValue("{[1] = 1, [1000000] = 2}", Fate.EITHER, label="very sparse"),
    LuaValue("{[2^40] = 1}", Fate.EITHER, label="{[2^40] = 1}"),
    _lua_ok("{[0] = 'z'}", {"0": "z"}), _lua_ok("{[-1] = 'm'}", {"-1": "m"}), _lua_ok("{[1.5] = 'h'}", {"1.5": "h"}),
    _lua_ok("{1, 2, x = 3}", {"1": 1, "2": 2, "x": 3}, "mixed keys"),
    _lua_bad("{[1] = 'a', ['1'] = 'b'}", "keys 1 and '1'"), _lua_bad("{[true] = 1}", "a boolean key"),
    _lua_bad("{[{}] = 1}", "a table key"), _lua_bad("{[print] = 1}", "a function key"),
    _lua_bad('{["\\xff"] = 1}', "a key that is not UTF-8"), _lua_ok('{["a\\0b"] = 1}', {"a\x00b": 1}, "a NUL key"),
    LuaValue("{[math.huge] = 1}", Fate.EITHER, label="{[math.huge] = 1}"),
    _lua_bad("(function() local t = {} t.t = t return t end)()", "a cycle"),
    _lua_bad("{x = 0/0}", "NaN inside"), _lua_bad("{math.maxinteger}", "maxinteger inside"),
    _lua_bad("{f = print}", "a function inside"), _lua_bad("{coroutine.running()}", "a thread inside"),
    LuaValue("setmetatable({}, {__index = function() error('no') end, __pairs = error})", Fate.EITHER,
             label="a table with a metatable"),
    _lua_ok("(function() local t = {} for i = 1, 100000 do t[i] = i end return t end)()",
            list(range(1, 100001)), "wide array (100000)"),
    _lua_ok("(function() local t = {} for i = 1, 5000 do t['k' .. i] = i end return t end)()",
            {f"k{i}": i for i in range(1, 5001)}, "wide object (5000)"),
    _lua_ok("(function() local x = {} for i = 1, 3 do x = {x, x} end return x end)()",
            [[[{}, {}], [{}, {}]], [[{}, {}], [{}, {}]]], "small DAG (3)"),
    LuaValue("(function() local x = {} for i = 1, 22 do x = {x, x} end return x end)()", Fate.TOO_BIG,
             label="DAG of 2^22 paths"),
    LuaValue("(function() local s = string.rep('x', 2^20) local t = {} for i = 1, 256 do t[i] = s end return t end)()",
             Fate.TOO_BIG, label="1 MiB string x256"),
    _lua_nested(31), _lua_nested(32), _lua_nested(33), _lua_nested(64), _lua_nested(300),
]


def _combine_lua(items: list[LuaValue], keys: list[str] | None) -> LuaValue:
    fates = {i.fate for i in items}
    if keys is None:
        src = "{" + ", ".join(f"[{n}] = {i.src}" for n, i in enumerate(items, 1)) + "}"
        label = "[" + ", ".join(map(repr, items)) + "]"
        json: Any = [i.json for i in items]
        if any(i.src == "nil" for i in items):
            fates.add(Fate.EITHER)  # holes: how many make an array an object is not decided
    else:
        src = "{" + ", ".join(f"[{lua_string_literal(k.encode())}] = {i.src}" for k, i in zip(keys, items)) + "}"
        label = "{" + ", ".join(f"{k!r}: {i!r}" for k, i in zip(keys, items)) + "}"
        json = {k: i.json for k, i in zip(keys, items) if i.src != "nil"}
    depth = 1 + max(i.depth for i in items)
    if depth > MAX_DEPTH:
        fates.add(Fate.INVALID)
    for bad in (Fate.INVALID, Fate.TOO_BIG, Fate.EITHER):
        if bad in fates:
            return LuaValue(src, bad, None, label, depth)
    return LuaValue(src, Fate.OK, json, label, depth)


def lua_values() -> st.SearchStrategy[LuaValue]:
    base = st.sampled_from(LUA_SCALARS + LUA_SHAPES)
    small = st.sampled_from([v for v in LUA_SCALARS + LUA_SHAPES if len(v.src) < 120 and "2^20" not in v.src])

    def extend(children: st.SearchStrategy[LuaValue]) -> st.SearchStrategy[LuaValue]:
        arrays = st.lists(children, min_size=1, max_size=4).map(lambda xs: _combine_lua(xs, None))
        keys = st.lists(st.sampled_from(["a", "b", "k1", "\u202e", "x y", "é"]), min_size=1, max_size=3, unique=True)
        objects = st.tuples(keys, st.lists(children, min_size=3, max_size=3)).map(
            lambda kv: _combine_lua(kv[1][:len(kv[0])], kv[0]))
        return st.one_of(arrays, objects)

    return st.one_of(base, st.recursive(small, extend, max_leaves=5))
