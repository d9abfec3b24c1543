"""Requests for every RPC, built from the .proto descriptors.

Each field gets hostile values by its type (extremes, NaN, unknown enum values,
edge-case text, deep/wide/big bodies), or by its name where the name says what
it is (a pid of the example's processes or one that cannot exist, a program, a
path, a duration). A new RPC or field is covered without a change here; a field
of a type this module does not know fails loudly.

Some values must be refused whatever else the request holds (DECISIONS.md):
a pid beyond 2^53 as the subject of a call, a priority outside [-20, 20], a
weight above 10000, a negative duration, a name that is empty or not
printable, a body the value model refuses, an unknown enum value, a file name
with a non-printable character. A request carrying one records why in
`refusals`; the call answering OK is then a violation.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import descriptor, message_factory
from google.protobuf.descriptor import FieldDescriptor as F
from hypothesis import strategies as st

from llmos.values import MAX_EXACT_INTEGER

from .harness import METHODS, may_block
from .values import (
    EDGE_TEXTS, HOSTILE_FLOATS, HOSTILE_UINT64, Fate, JsonPlan, Shown, hostile_text, ints, json_plans, name_is_valid,
    nested_value,
)

PRIORITY_RANGE = (-20, 20)
MAX_WEIGHT = 10_000

# Programs for Spawn: ordinary ones and the hostile ones of issue 12.
LUA_PROGRAMS = [
    "return 1", "return args", "sys.recv{}", "return sys.recv{timeout_ms = 5}", "sys.sleep(5) return 'slept'",
    "while true do end", "error('boom')", "error({code = 1})", "error(setmetatable({}, {__tostring = error}))",
    "return math.maxinteger", "return 0/0", "return '\\xff'", "return print", "return string.rep('x', 2^20)",
    "sys.exit(math.huge)", "return #string.rep('', 2^62)", "table.move({}, 1, 2^29, 2, {})",
    "local s = string.rep('a', 200000) return s:match(string.rep('.', 2000) .. 'b')",
    "return string.rep('(', 100000):find('%b()')",
    "local x = {} for i = 1, 22 do x = {x, x} end sys.send(sys.self(), x)",
    "sys.send(sys.self(), string.rep('x', 8 * 2^20))", "sys.sleep(1e300)", "sys.recv{timeout_ms = math.huge}",
    "sys.set_priority(sys.self(), 1e15) while true do end", "return load(function() while true do end end)",
    "for i = 1, 20 do sys.log(string.rep('y', 2^20)) end", "sys.recv{timeout = 10}",
    "local t = {} for i = 1, 100 do t = {t} end return t", "return coroutine.wrap(function() sys.recv{} end)()",
    "syntax error here (", "\0", "return ...", "--[[ unterminated",
]
PYTHON_PROGRAMS = [
    "pass", "import time\ntime.sleep(600)", "raise SystemExit(3)", "raise ValueError('x')", "def f(:\n",
    "while True:\n    pass", "x = '" + "a" * 100_000, "(" * 5000, "\0", "import os\nos._exit(0)",
]
PATHS = [
    "lua/echo.lua", "lua/ping_pong.lua", "lua/nonexistent.lua", "lua", "../pyproject.toml", "/etc/passwd",
    "lua/../../tools/fuzz.py", "", "a\x00b.lua", "x" * 5000 + ".lua", "python/coordinator.py", ".lua", "lua/\u202e.lua",
]
ROLES = ["system", "user", "assistant", "tool", "", "SYSTEM", "\x00"]

# Pid fields that name the subject of the call: a pid that cannot exist must be refused.
SUBJECT_PIDS = {
    ("GetProcessRequest", "pid"), ("WaitRequest", "pid"), ("KillRequest", "pid"), ("RecvRequest", "pid"),
    ("ReadLogRequest", "pid"), ("SetPriorityRequest", "pid"), ("RegisterRequest", "pid"), ("ExitRequest", "pid"),
    ("AcquireRequest", "pid"), ("ReleaseRequest", "pid"), ("InferRequest", "pid"), ("SendRequest", "from"),
    ("SendRequest", "to"), ("MonitorRequest", "watcher"), ("MonitorRequest", "target"), ("SpawnRequest", "parent"),
    ("WriteFileRequest", "pid"), ("CreateContextRequest", "pid"), ("ForkContextRequest", "pid"),
    ("DropContextRequest", "pid"),
}
# ...and of those, the ones where 0 ("unset") must be refused too.
REQUIRED_PIDS = {
    ("GetProcessRequest", "pid"), ("WaitRequest", "pid"), ("KillRequest", "pid"), ("RecvRequest", "pid"),
    ("ReadLogRequest", "pid"), ("SetPriorityRequest", "pid"), ("RegisterRequest", "pid"), ("ExitRequest", "pid"),
    ("AcquireRequest", "pid"), ("ReleaseRequest", "pid"), ("SendRequest", "to"), ("MonitorRequest", "watcher"),
    ("MonitorRequest", "target"), ("CreateContextRequest", "pid"), ("ForkContextRequest", "pid"),
    ("DropContextRequest", "pid"),
}
PID_FIELDS = {"pid", "from", "to", "parent", "watcher", "target"}
NAME_FIELDS = {("SpawnRequest", "name"), ("OpenPortRequest", "name"), ("RegisterRequest", "name"),
               ("AcquireRequest", "name")}
PRIORITY_FIELDS = {("SpawnRequest", "priority"), ("SetPriorityRequest", "priority")}
WEIGHT_FIELDS = {("SpawnRequest", "weight"), ("SetPriorityRequest", "weight")}
VALUE_FIELDS = {("SendRequest", "body"), ("SpawnRequest", "args"), ("ExitRequest", "result")}
FILE_PATHS = {("WriteFileRequest", "path"), ("FilePath", "path"), ("RenameFileRequest", "to_path"),
              ("RenameFileRequest", "from_path"), ("ReadFileRequest", "path")}
NEW_PATHS = {("WriteFileRequest", "path"), ("RenameFileRequest", "to_path")}  # where a name is made
FILE_METHODS_MAKING = {"WriteFile", "MakeDir", "RenameFile"}


@dataclass
class Pool:
    """What an example's requests may name: its processes (live, blocked, ended),
    their registered names, existing files."""

    pids: list[int]
    names: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


@dataclass
class Request(Shown):
    method: str
    messages: list[Any]
    refusals: list[str] = field(default_factory=list)  # why the call must not answer OK
    labels: dict[str, str] = field(default_factory=dict)  # field -> a short description of its value

    @property
    def message(self) -> Any:
        return self.messages if METHODS[self.method].client_streaming else self.messages[0]

    def timeout_ms(self) -> int | None:
        msg = self.messages[0] if self.messages else None
        if msg is None or "timeout_ms" not in msg.DESCRIPTOR.fields_by_name or not msg.HasField("timeout_ms"):
            return None
        return msg.timeout_ms

    def __repr__(self) -> str:
        several = len(self.messages) > 1
        parts = [describe(m, self.labels, str(i) if several else "") for i, m in enumerate(self.messages)]
        return f"{self.method}({' | '.join(parts)})"


def _short_value(v: Any) -> str:
    if isinstance(v, (str, bytes)) and len(v) > 60:
        head = v[:12]
        return f"{head!r}+...({len(v)} {'chars' if isinstance(v, str) else 'bytes'})"
    return repr(v)


def describe(msg: Any, labels: dict[str, str], prefix: str = "") -> str:
    """A message as `field=value, ...`, long values abbreviated, bodies by their label."""
    out = []
    for fd, value in msg.ListFields():
        key = f"{prefix}.{fd.name}" if prefix else fd.name
        if key in labels:
            out.append(f"{fd.name}={labels[key]}")
        elif fd.type == F.TYPE_MESSAGE and not fd.is_repeated:
            out.append(f"{fd.name}({describe(value, labels, key)})")
        elif fd.type == F.TYPE_MESSAGE:
            out.append(f"{fd.name}=[" + ", ".join(describe(v, labels, key) for v in value) + "]")
        elif fd.is_repeated:
            out.append(f"{fd.name}=[" + ", ".join(_short_value(v) for v in value) + "]")
        else:
            out.append(f"{fd.name}={_short_value(value)}")
    return ", ".join(out)


# -- field values ------------------------------------------------------------------------------
def pids(pool: Pool) -> st.SearchStrategy[int]:
    return st.one_of(
        st.sampled_from(pool.pids) if pool.pids else st.just(1),
        st.sampled_from(HOSTILE_UINT64),
    )


def durations() -> st.SearchStrategy[int]:
    return st.sampled_from([0, 1, 20, 100, 5000, -1, -2**63, 2**53 + 1, 9 * 10**18, 2**63 - 1])


def data_bytes() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=32),
        st.sampled_from([1 << 20, (4 << 20) - 8, (4 << 20) + 1]).map(lambda n: b"\xff" * n),
    )


def _file_paths(pool: Pool) -> st.SearchStrategy[str]:
    mine = st.sampled_from(pool.files) if pool.files else st.just("fz/a.txt")
    return st.one_of(mine, hostile_text(30), st.sampled_from(EDGE_TEXTS),
                     st.builds(lambda a, b: f"fz/{a}/{b}", hostile_text(8), hostile_text(8)))


def _enum_values(fd: descriptor.FieldDescriptor) -> st.SearchStrategy[int]:
    known = [v.number for v in fd.enum_type.values]
    return st.one_of(st.sampled_from(known), st.sampled_from([max(known) + 1, 99, -1, 2**31 - 1, -2**31]))


def _scalar(fd: descriptor.FieldDescriptor) -> st.SearchStrategy[Any]:
    t = fd.type
    if t in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
        return ints(32, True)
    if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
        return ints(32, False)
    if t in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return ints(64, True)
    if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
        return ints(64, False)
    if t in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        return st.sampled_from(HOSTILE_FLOATS)
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t == F.TYPE_STRING:
        return hostile_text()
    if t == F.TYPE_BYTES:
        return data_bytes()
    if t == F.TYPE_ENUM:
        return _enum_values(fd)
    raise TypeError(f"the fuzzer has no strategy for field {fd.full_name} of type {t}: add one in requests.py")


def _field_value(draw: Any, msg_name: str, fd: descriptor.FieldDescriptor, pool: Pool, req: Request,
                 path: str) -> Any:
    """One value for one (non-repeated, non-message) field, noting refusals."""
    key = (msg_name, fd.name)
    if fd.name in PID_FIELDS and fd.type in (F.TYPE_UINT64, F.TYPE_INT64):
        value = draw(pids(pool))
        if key in SUBJECT_PIDS and value > MAX_EXACT_INTEGER:
            req.refusals.append(f"{path}: pid {value} cannot exist")
        if key in REQUIRED_PIDS and value == 0:
            req.refusals.append(f"{path}: 0 is unset and the pid is required")
        return value
    if fd.name == "timeout_ms":
        value = draw(durations())
        if value < 0:
            req.refusals.append(f"{path}: a negative duration")
        return value
    if fd.name in ("lua",):
        return draw(st.sampled_from(LUA_PROGRAMS))
    if fd.name == "python":
        return draw(st.sampled_from(PYTHON_PROGRAMS))
    if key == ("SpawnRequest", "path"):
        return draw(st.sampled_from(PATHS))
    if key in FILE_PATHS:
        value = draw(_file_paths(pool))
        if key in NEW_PATHS and any(not c.isprintable() for c in value):
            req.refusals.append(f"{path}: a file name with a non-printable character")
        return value
    if key == ("SendRequest", "to_name"):
        return draw(st.one_of(st.sampled_from(pool.names or ["nobody"]), hostile_text()))
    if key in NAME_FIELDS:
        value = draw(st.one_of(st.just(""), hostile_text(), st.sampled_from(pool.names or ["x"])))
        required = msg_name in ("RegisterRequest", "AcquireRequest")
        if (value or required) and not name_is_valid(value):
            req.refusals.append(f"{path}: the name {_short_value(value)} is not 1..256 printable characters")
        return value
    if key in PRIORITY_FIELDS:
        value = draw(ints(32, True))
        if not PRIORITY_RANGE[0] <= value <= PRIORITY_RANGE[1]:
            req.refusals.append(f"{path}: priority {value} is outside [-20, 20]")
        return value
    if key in WEIGHT_FIELDS:
        value = draw(ints(32, False))
        if value > MAX_WEIGHT:
            req.refusals.append(f"{path}: weight {value} is above 10000")
        return value
    if key == ("SamplingParams", "max_tokens"):
        return draw(st.one_of(st.sampled_from([0, 1, 4, 16]), st.sampled_from([2**31, 2**32 - 1])))
    if key == ("ChatMessage", "role"):
        return draw(st.one_of(st.sampled_from(ROLES), hostile_text(10)))
    if key == ("EventsRequest", "pid"):
        return draw(pids(pool))
    return draw(_scalar(fd))


def _is_synthetic(oneof: descriptor.OneofDescriptor) -> bool:
    """The oneof protoc makes for a proto3 `optional` field."""
    return len(oneof.fields) == 1 and oneof.name == f"_{oneof.fields[0].name}"


def _fill(draw: Any, msg: Any, pool: Pool, req: Request, path: str = "", depth: int = 0) -> None:
    desc = msg.DESCRIPTOR
    chosen = {o.name: draw(st.one_of(st.sampled_from([f.name for f in o.fields]), st.none()))
              for o in desc.oneofs if not _is_synthetic(o)}
    bodies: list[tuple[str, JsonPlan]] = []
    for fd in desc.fields:
        fpath = f"{path}.{fd.name}" if path else fd.name
        oneof = fd.containing_oneof
        if oneof is not None and not _is_synthetic(oneof) and chosen[oneof.name] != fd.name:
            continue
        if fd.is_repeated:
            if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                raise TypeError(f"the fuzzer has no strategy for map field {fd.full_name}: add one in requests.py")
            for _ in range(draw(st.integers(0, 3))):
                if fd.type == F.TYPE_MESSAGE:
                    _fill(draw, getattr(msg, fd.name).add(), pool, req, fpath, depth + 1)
                else:
                    value = draw(_scalar(fd))
                    if fd.type == F.TYPE_ENUM and value not in [v.number for v in fd.enum_type.values]:
                        req.refusals.append(f"{fpath}: unknown enum value {value}")
                    getattr(msg, fd.name).append(value)
            continue
        optional = (oneof is not None and _is_synthetic(oneof)) or fd.type == F.TYPE_MESSAGE
        if optional and not draw(st.booleans()):
            continue
        if fd.type == F.TYPE_MESSAGE:
            if fd.message_type.full_name == "google.protobuf.Value":
                plan: JsonPlan = draw(json_plans())
                getattr(msg, fd.name).CopyFrom(plan.value())
                req.labels[fpath] = plan.label
                if (desc.name, fd.name) in VALUE_FIELDS:
                    bodies.append((fpath, plan))
                continue
            if depth > 4:
                continue
            _fill(draw, getattr(msg, fd.name), pool, req, fpath, depth + 1)
            continue
        setattr(msg, fd.name, _field_value(draw, desc.name, fd, pool, req, fpath))
    for fpath, plan in bodies:  # a message's size counts its data too
        fate = plan.fate(len(msg.data) if "data" in desc.fields_by_name else 0)
        if fate in (Fate.INVALID, Fate.TOO_BIG):
            req.refusals.append(f"{fpath}: the value model refuses {plan.label} ({fate})")


def check_strategies() -> None:
    """Every field of every request type has a strategy (TypeError naming the one that has not)."""
    seen: set[str] = set()

    def walk(desc: descriptor.Descriptor) -> None:
        if desc.full_name in seen or desc.full_name == "google.protobuf.Value":
            return
        seen.add(desc.full_name)
        for fd in desc.fields:
            if fd.is_repeated and fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                raise TypeError(f"the fuzzer has no strategy for map field {fd.full_name}: add one in requests.py")
            if fd.type == F.TYPE_MESSAGE:
                walk(fd.message_type)
            else:
                _scalar(fd)

    for m in METHODS.values():
        walk(m.input_type)


def request(method: str, pool: Pool) -> st.SearchStrategy[Request]:
    """Hostile requests for `method`, naming the pool's processes."""
    m = METHODS[method]
    cls = message_factory.GetMessageClass(m.input_type)

    @st.composite
    def build(draw: Any) -> Request:
        req = Request(method, [])
        count = draw(st.integers(0, 3)) if m.client_streaming else 1
        for i in range(count):
            msg = cls()
            sub = Request(method, [])
            _fill(draw, msg, pool, sub)
            req.messages.append(msg)
            prefix = str(i) if m.client_streaming else ""
            req.labels.update({(f"{prefix}.{k}" if prefix else k): v for k, v in sub.labels.items()})
            if i == 0:  # later messages of a stream carry only data
                req.refusals.extend(sub.refusals)
        if m.client_streaming and count == 0:
            req.refusals.append("a WriteFile stream with no message")
        return req

    return build()


def deadline_for(req: Request) -> tuple[float, bool]:
    """(client deadline in s, whether the call may legitimately still be waiting then)."""
    m = METHODS[req.method]
    if m.name == "Events":
        return 0.1, True
    if m.name == "Infer":
        return 1.0, True
    if not may_block(m):
        return 10.0, False
    timeout = req.timeout_ms()
    if timeout is not None and 0 <= timeout <= 100:
        return 10.0, False  # the server must time the call out itself
    return 0.1, True


# -- the wire ---------------------------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return _varint((number << 3) | wire_type)


@dataclass
class WireRequest(Shown):
    method: str
    payloads: list[bytes]  # one, or a client stream's messages
    label: str

    def __repr__(self) -> str:
        return f"{self.method}<{self.label}>"


def _mutations(m: descriptor.MethodDescriptor) -> list[tuple[str, Any]]:
    """(label, function(valid bytes, draw) -> bytes) for one method's request type."""
    desc = m.input_type
    out: list[tuple[str, Any]] = [
        ("unknown field", lambda b, d: b + _key(536870911, 0) + _varint(7)),
        ("random bytes", lambda b, d: d(st.binary(min_size=1, max_size=64))),
        ("truncated", lambda b, d: b[: _position(b, d)]),
        ("byte flipped", lambda b, d: _flip(b, d)),
        ("huge length", lambda b, d: b + _key(1, 2) + _varint(2**62)),
        ("group wire type", lambda b, d: b + _key(1, 3)),
    ]
    for fd in desc.fields:
        n = fd.number
        if fd.type == F.TYPE_STRING:
            out.append((f"{fd.name}: invalid UTF-8", lambda b, d, n=n: b + _key(n, 2) + _varint(3) + b"\xff\xfe\xed"))
            out.append((f"{fd.name}: surrogate", lambda b, d, n=n: b + _key(n, 2) + _varint(3) + b"\xed\xa0\x80"))
        if fd.type in (F.TYPE_UINT64, F.TYPE_INT64, F.TYPE_UINT32, F.TYPE_INT32, F.TYPE_ENUM, F.TYPE_BOOL):
            out.append((f"{fd.name}: as fixed32", lambda b, d, n=n: b + _key(n, 5) + struct.pack("<I", 7)))
            out.append((f"{fd.name}: 2^64-1", lambda b, d, n=n: b + _key(n, 0) + _varint(2**64 - 1)))
            out.append((f"{fd.name}: 11-byte varint", lambda b, d, n=n: b + _key(n, 0) + b"\xff" * 10 + b"\x01"))
        if fd.type == F.TYPE_MESSAGE and fd.message_type.full_name == "google.protobuf.Value":
            deep = nested_value(150).SerializeToString()
            out.append((f"{fd.name}: nested 150 deep",
                        lambda b, d, n=n, deep=deep: b + _key(n, 2) + _varint(len(deep)) + deep))
        if fd.type == F.TYPE_ENUM:
            out.append((f"{fd.name}: -1", lambda b, d, n=n: b + _key(n, 0) + _varint(-1)))
    return out


def _position(b: bytes, draw: Any) -> int:
    """A position in `b`, drawn as a fraction: the bytes' length differs from one run of
    an example to the next (its pids do), and Hypothesis needs the same draws each time."""
    return draw(st.integers(0, 9999)) * len(b) // 10_000


def _flip(b: bytes, draw: Any) -> bytes:
    if not b:
        return b"\x80"
    i = _position(b, draw)
    return b[:i] + bytes([b[i] ^ draw(st.integers(1, 255))]) + b[i + 1:]


def wire_request(method: str, pool: Pool) -> st.SearchStrategy[WireRequest]:
    m = METHODS[method]
    mutations = _mutations(m)

    @st.composite
    def build(draw: Any) -> WireRequest:
        req = draw(request(method, pool))
        messages = req.messages if req.messages else [message_factory.GetMessageClass(m.input_type)()]
        payloads = [x.SerializeToString() for x in messages]
        label, mutate = draw(st.sampled_from(mutations))
        payloads[0] = mutate(payloads[0], draw)
        return WireRequest(method, payloads, f"{label} of {req!r}"[:400])

    return build()
