"""The llmos Python client: one method per syscall, plain Python values in and out.

    import llmos
    with llmos.Client("127.0.0.1:50051") as k:
        info = k.run("return args.x * 2", args={"x": 21})
        print(info.state, info.result)          # EXITED 42

Each syscall is written once, as a *plan*: a generator that builds request
messages, yields them as :class:`Unary` or :class:`Streaming` calls, receives
the replies and returns the plain result. The synchronous :class:`Client`
here and the asyncio client in :mod:`llmos.aio` differ only in how they carry
out a call, so both speak exactly the same API.
"""
from __future__ import annotations

import base64
import functools
import math
import os
import random
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import (TYPE_CHECKING, Any, Callable, Generator, Iterable, Iterator, Literal, Mapping, ParamSpec,
                    Sequence, TypeVar, Union, overload)

import grpc

from .errors import InvalidArgument, Unavailable, from_rpc_error
from .v1 import kernel_pb2 as pb
from .v1 import kernel_pb2_grpc
from .values import JSON, fill_value, from_value, to_value

DEFAULT_TARGET = "127.0.0.1:50051"
# WriteFile sends data in pieces of at most this many bytes (the server's largest message is 4 MiB).
FILE_CHUNK_BYTES = 1 << 20
MAX_FILE_CHUNK_BYTES = 4 << 20
# The server enforces its own message limits; the client should not refuse what the server sends.
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
# Blocking calls (Recv, Wait, Infer) pass their timeout to the server; the RPC deadline gets this much more,
# so that the server's "timed out" answer arrives before gRPC gives up on the call.
DEADLINE_MARGIN_S = 5.0


class _NameEnum(str, Enum):
    """An enum whose members are their names as str: ``state == "EXITED"``, f"{state}" and json.dumps
    all give the plain name."""

    __str__ = str.__str__
    __format__ = str.__format__


class ProcessState(_NameEnum):
    """A process's state (the proto's ProcessState without UNSPECIFIED)."""

    RUNNABLE = "RUNNABLE"
    RUNNING = "RUNNING"
    BLOCKED = "BLOCKED"  # in recv, wait, sleep or infer: see ProcessInfo.blocked_on
    EXITED = "EXITED"    # returned or called sys.exit
    KILLED = "KILLED"    # by kill, or by the kernel for a limit: see ProcessInfo.exit_reason
    CRASHED = "CRASHED"  # a runtime error: see ProcessInfo.error


class ProcessKind(_NameEnum):
    """What runs in a process: a Lua program, a Python agent, or nothing (a port: a client's mailbox)."""

    LUA = "LUA"
    PYTHON = "PYTHON"
    PORT = "PORT"


ENDED_STATES = (ProcessState.EXITED, ProcessState.KILLED, ProcessState.CRASHED)


def default_token() -> str | None:
    """The client's token from $LLMOS_TOKEN (None: no token, as in a single-user server)."""
    return os.environ.get("LLMOS_TOKEN") or None


def channel_credentials(ca: str | None = None, cert: str | None = None,
                        key: str | None = None) -> grpc.ChannelCredentials | None:
    """TLS from PEM files: the server's CA, and for mutual TLS this client's certificate and key
    (defaults: $LLMOS_TLS_CA, $LLMOS_TLS_CERT, $LLMOS_TLS_KEY). None: plaintext."""
    ca, cert, key = (ca or os.environ.get("LLMOS_TLS_CA"), cert or os.environ.get("LLMOS_TLS_CERT"),
                     key or os.environ.get("LLMOS_TLS_KEY"))
    if not (ca or cert):
        return None

    def pem(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    return grpc.ssl_channel_credentials(pem(ca), pem(key), pem(cert))
# What a send with an idempotency key is retried on: the server may or may not have stored it.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass(frozen=True)
class Retry:
    """How a client retries a send that failed with UNAVAILABLE or DEADLINE_EXCEEDED (the connection dropped,
    the server restarted, no answer in time): up to ``attempts`` tries in all, waiting a random time of up to
    ``first_backoff`` seconds before the second, twice as long before each next one, at most ``max_backoff``
    (exponential backoff with full jitter; the defaults wait about 10 s in all at most). Every try carries
    the same idempotency key, so the server stores the message once however many arrive."""

    attempts: int = 10
    first_backoff: float = 0.05
    max_backoff: float = 2.0

    def delays(self) -> Iterator[float]:
        """The waits between tries: ``attempts`` - 1 of them."""
        ceiling = self.first_backoff
        for _ in range(self.attempts - 1):
            yield random.uniform(0, ceiling)
            ceiling = min(ceiling * 2, self.max_backoff)




def default_target() -> str:
    """The server address from $LLMOS_SERVER, or 127.0.0.1:50051."""
    return os.environ.get("LLMOS_SERVER") or DEFAULT_TARGET


# -- plain results ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Message:
    """A message taken from a mailbox. ``sender`` is the proto's ``from`` pid."""

    id: int
    sender: int
    to: int
    tag: str
    body: JSON
    data: bytes
    correlation_id: str
    sent_at_ms: int
    attempt: int = 0  # received with ack: times handed out, 1 the first time (0: received without ack)
    redelivered: bool = False  # received with ack: handed out before (its lease ran out, or nacked)

    def to_json(self) -> dict[str, JSON]:
        """A JSON-ready dict as in the proto's JSON mapping: ``from`` for the sender, ``data`` (when present) base64."""
        out: dict[str, JSON] = {"id": self.id, "from": self.sender, "to": self.to, "tag": self.tag,
                                "body": self.body, "correlation_id": self.correlation_id,
                                "sent_at_ms": self.sent_at_ms}
        if self.data:
            out["data"] = base64.b64encode(self.data).decode("ascii")
        return out


@dataclass(frozen=True)
class Outgoing:
    """A message of :meth:`Client.send_batch` with a Send's options; a plain body is one with none.
    ``idempotency_key``: None makes one up when the client retries sends, "" sends none."""

    body: JSON = None
    tag: str = ""
    data: bytes = b""
    correlation_id: str = ""
    notify_undelivered: bool = False
    idempotency_key: str | None = None


@dataclass(frozen=True)
class ProcessInfo:
    """A process as the kernel reports it; ``state`` and ``kind`` are :class:`ProcessState` and
    :class:`ProcessKind` members, which are also their names as str ("EXITED", "LUA")."""

    pid: int
    name: str
    parent: int
    kind: ProcessKind
    state: ProcessState
    priority: int
    limits: dict[str, int]
    usage: dict[str, int]
    exit_reason: str
    result: JSON
    error: str
    started_at_ms: int
    ended_at_ms: int
    blocked_on: str
    namespace: str
    weight: int
    result_left_out: bool = False  # in lists and events, a result over 1 KiB (get() returns it)
    monitors: tuple[int, ...] = ()  # get() only: live processes this one monitors
    monitored_by: tuple[int, ...] = ()  # get() only: live processes that monitor this one

    @property
    def ended(self) -> bool:
        """True once the process has exited, been killed or crashed."""
        return self.state in ENDED_STATES

    @property
    def ok(self) -> bool:
        """True if the process ended by returning (or calling sys.exit), not by a kill or a crash."""
        return self.state == "EXITED"

    def to_json(self) -> dict[str, JSON]:
        """All fields as a JSON-ready dict."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class LogPage:
    """Lines of a process's log: ``times_ms[i]`` is when ``lines[i]`` was written (ms since the epoch;
    0: unknown, a Python agent's); read on from ``next_offset``; ``ended``: no line will follow."""

    lines: list[str]
    times_ms: list[int]
    next_offset: int
    dropped: int
    ended: bool


def log_page_from_pb(reply: pb.ReadLogResponse) -> LogPage:
    return LogPage(list(reply.lines), list(reply.times_ms), reply.next_offset, reply.dropped, reply.ended)


@dataclass(frozen=True)
class DeadLetter:
    """A message in the namespace's dead-letter queue, with its history: ``reason`` is "max_attempts" or
    "receiver_ended", ``attempts`` how many times it was handed out with ack, ``receiver`` the mailbox it
    was in, ``detail`` why it is here rather than with a dead_letter target or its sender."""

    id: int
    message: Message
    reason: str
    attempts: int
    receiver: int
    dead_at_ms: int
    detail: str
    namespace: str

    def to_json(self) -> dict[str, JSON]:
        """A JSON-ready dict; the message as :meth:`Message.to_json` makes it."""
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["message"] = self.message.to_json()
        return out


@dataclass(frozen=True)
class Event:
    """A process lifecycle event: ``kind`` is "subscribed" (``process`` None), "spawned" or "ended"."""

    kind: str
    process: ProcessInfo | None
    at_ms: int


@dataclass(frozen=True)
class InferChunk:
    """A piece of a streamed generation; the last one has ``finish_reason`` and ``usage`` set."""

    text: str
    token_ids: list[int]
    finish_reason: str
    usage: dict[str, int] | None
    tool_calls: list[dict[str, JSON]] = field(default_factory=list)


@dataclass(frozen=True)
class InferResult:
    """A whole generation: the text, its token ids, why it stopped and the token usage; with
    tools, the calls the model made ({"id", "name", "arguments"}, arguments valid for the tool)."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    usage: dict[str, int] = field(default_factory=dict)
    tool_calls: list[dict[str, JSON]] = field(default_factory=list)


@dataclass(frozen=True)
class ContextInfo:
    """A conversation context: its handle, its length in tokens and the KV cache bytes they take."""

    context_id: int
    tokens: int
    kv_bytes: int


@dataclass(frozen=True)
class FileInfo:
    """A file or directory in the namespace's file tree; ``path`` is virtual ("" is the root)."""

    path: str
    size: int
    is_dir: bool
    modified_ms: int

    def to_json(self) -> dict[str, JSON]:
        """All fields as a JSON-ready dict."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def _fields(msg: Any) -> dict[str, int]:
    return {f.name: getattr(msg, f.name) for f in msg.DESCRIPTOR.fields}


def _namespace(info: pb.NamespaceInfo) -> dict[str, Any]:
    """GetNamespace/SetNamespace's answer as a dict; quotas, use and reserved as dicts of their own."""
    return {f.name: _fields(getattr(info, f.name)) if f.message_type is not None else getattr(info, f.name)
            for f in info.DESCRIPTOR.fields}


def message_from_pb(msg: pb.Message) -> Message:
    """Convert a protobuf Message into a :class:`Message`."""
    # Filled in directly: a frozen dataclass's __init__ sets each field through object.__setattr__,
    # which costs more than the rest of the conversion, and a batch receive converts hundreds.
    out = object.__new__(Message)
    out.__dict__.update(id=msg.id, sender=getattr(msg, "from"), to=msg.to, tag=msg.tag,
                        body=from_value(msg.body) if msg.HasField("body") else None, data=msg.data,
                        correlation_id=msg.correlation_id, sent_at_ms=msg.sent_at_ms, attempt=msg.attempt,
                        redelivered=msg.redelivered)
    return out


def process_from_pb(info: pb.ProcessInfo) -> ProcessInfo:
    """Convert a protobuf ProcessInfo into a :class:`ProcessInfo`."""
    return ProcessInfo(
        pid=info.pid, name=info.name, parent=info.parent, kind=ProcessKind(pb.ProcessKind.Name(info.kind)),
        state=ProcessState(pb.ProcessState.Name(info.state)), priority=info.priority, limits=_fields(info.limits),
        usage=_fields(info.usage), exit_reason=info.exit_reason,
        result=from_value(info.result) if info.HasField("result") else None, error=info.error,
        started_at_ms=info.started_at_ms, ended_at_ms=info.ended_at_ms, blocked_on=info.blocked_on,
        namespace=info.namespace, weight=info.weight, result_left_out=info.result_left_out,
        monitors=tuple(info.monitors), monitored_by=tuple(info.monitored_by),
    )


def dead_letter_from_pb(dead: pb.DeadLetter) -> DeadLetter:
    return DeadLetter(id=dead.id, message=message_from_pb(dead.message), reason=dead.reason,
                      attempts=dead.attempts, receiver=dead.receiver, dead_at_ms=dead.dead_at_ms,
                      detail=dead.detail, namespace=dead.namespace)


def event_from_pb(event: pb.Event) -> Event:
    process = process_from_pb(event.process) if event.HasField("process") else None
    return Event(kind=event.kind, process=process, at_ms=event.at_ms)


def file_from_pb(info: pb.FileInfo) -> FileInfo:
    """Convert a protobuf FileInfo into a :class:`FileInfo`."""
    return FileInfo(path=info.path, size=info.size, is_dir=info.is_dir, modified_ms=info.modified_ms)


def _chunk_data(chunk: pb.FileChunk) -> bytes:
    return chunk.data


def chunk_from_pb(chunk: pb.InferChunk) -> InferChunk:
    return InferChunk(text=chunk.text, token_ids=list(chunk.token_ids), finish_reason=chunk.finish_reason,
                      usage=_fields(chunk.usage) if chunk.HasField("usage") else None,
                      tool_calls=[{"id": c.id, "name": c.name, "arguments": from_value(c.arguments)}
                                  for c in chunk.tool_calls])


def join_chunks(chunks: Sequence[InferChunk]) -> InferResult:
    """Assemble a whole generation from its chunks."""
    usage = next((c.usage for c in reversed(chunks) if c.usage is not None), {})
    finish = next((c.finish_reason for c in reversed(chunks) if c.finish_reason), "")
    return InferResult(text="".join(c.text for c in chunks), token_ids=[t for c in chunks for t in c.token_ids],
                       finish_reason=finish, usage=usage, tool_calls=[t for c in chunks for t in c.tool_calls])


# -- calls and plans --------------------------------------------------------------------------
@dataclass(frozen=True)
class Unary:
    """One unary RPC to make; the plan receives the response protobuf."""

    method: str
    request: Any
    timeout: float | None
    retry: Retry | None = None  # safe to send again (it carries an idempotency key): how


@dataclass(frozen=True)
class Streaming:
    """One server-streaming RPC; the plan receives its items converted, as a list if ``collect``
    is set, otherwise as an iterator (an async iterator in the asyncio client) that it must return."""

    method: str
    request: Any
    timeout: float | None
    convert: Callable[[Any], Any]
    collect: bool


class RequestSourceFailed(Exception):
    """What gRPC is handed when producing a request failed: the caller's own exception is kept apart."""


class RequestStream:
    """The requests of a client-streaming RPC, read lazily as gRPC sends them.

    An exception raised while producing a request (say, by the caller's data iterable) is kept in
    ``error``, and the client raises it rather than a bare CANCELLED. gRPC gets a RequestSourceFailed
    instead, an Exception, whatever the caller raised: gRPC cancels the call on an Exception, but
    anything else (SystemExit, KeyboardInterrupt, GeneratorExit) would end the synchronous client's
    request thread without cancelling the call, which would then wait for ever.
    """

    def __init__(self, requests: Iterator[Any]) -> None:
        self._requests = requests
        self.error: BaseException | None = None

    def __iter__(self) -> "RequestStream":
        return self

    def __next__(self) -> Any:
        try:
            return next(self._requests)
        except StopIteration:
            raise
        except BaseException as e:
            self.error = e
            raise RequestSourceFailed(f"producing a request raised {type(e).__name__}: {e}") from e


@dataclass(frozen=True)
class ClientStreaming:
    """One client-streaming RPC: ``requests`` are sent as they are produced; the plan receives
    the single response protobuf."""

    method: str
    requests: RequestStream
    timeout: float | None


Call = Union[Unary, Streaming, ClientStreaming]
T = TypeVar("T")
P = ParamSpec("P")
Plan = Generator[Call, Any, T]


def syscall(plan: Callable[P, Plan[T]]) -> Callable[P, T]:
    """Make a client method of a plan: the client's ``_drive`` carries it out."""

    @functools.wraps(plan)
    def method(*args: P.args, **kwargs: P.kwargs) -> T:
        self = args[0]
        return self._drive(plan(*args, **kwargs))  # type: ignore[attr-defined]

    return method


def _invalid(message: str) -> InvalidArgument:
    """An InvalidArgument for an argument the SDK refuses before sending anything."""
    return InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, message)


def first_call(plan: Plan[T]) -> Call:
    """The plan's first call. Building it is where arguments become request fields: a value protobuf
    refuses there (a pid of 2^64, a str for an int) is InvalidArgument, before anything is sent."""
    try:
        return next(plan)
    except InvalidArgument:
        raise
    except (ValueError, TypeError) as e:
        raise _invalid(f"bad argument: {e}") from None


def _timeout_ms(timeout: float | None) -> int | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0 \
            or math.isinf(timeout):
        raise _invalid(f"timeout must be a finite number of seconds >= 0, or None to wait without limit; "
                       f"got {timeout!r}")
    return round(timeout * 1000)


def _deadline(timeout_ms: int | None) -> float | None:
    return None if timeout_ms is None else timeout_ms / 1000 + DEADLINE_MARGIN_S


def _value(obj: JSON, what: str) -> Any:
    try:
        return to_value(obj)
    except (TypeError, ValueError) as e:
        raise _invalid(f"{what} is not JSON-shaped: {e}") from None


def _message(cls: type, what: str, fields: Mapping[str, Any]) -> Any:
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        raise _invalid(f"bad {what}: {e}") from None


def _chat(messages: Sequence[Mapping[str, str]] | None) -> list[pb.ChatMessage]:
    return [_message(pb.ChatMessage, "chat message", m) for m in messages or []]


def _tools(tools: Sequence[Mapping[str, JSON]] | None) -> list[pb.Tool]:
    """Tools in the proto's shape; OpenAI's {"type": "function", "function": {...}} is unwrapped."""
    out = []
    for tool in tools or []:
        if isinstance(tool, Mapping) and tool.get("type") == "function" and isinstance(tool.get("function"), Mapping):
            tool = tool["function"]
        if not isinstance(tool, Mapping):
            raise _invalid(f"a tool must be a dict of name, description and parameters, not {type(tool).__name__}")
        fields = dict(tool)
        if "parameters" in fields:
            fields["parameters"] = to_value(fields["parameters"])
        out.append(_message(pb.Tool, "tool", fields))
    return out


def _byte_pieces(data: bytes | bytearray | memoryview | str | Iterable[bytes]) -> Iterator[bytes]:
    """The caller's data as bytes objects: a str is UTF-8, a bytes-like object is one piece, any
    other iterable gives bytes-like pieces."""
    if isinstance(data, str):
        yield data.encode("utf-8")
    elif isinstance(data, (bytes, bytearray, memoryview)):
        yield bytes(data)
    else:
        for piece in data:
            if not isinstance(piece, (bytes, bytearray, memoryview)):
                raise _invalid(f"write_file: the data iterable gave {type(piece).__name__}, not bytes")
            yield bytes(piece)


def _write_requests(path: str, append: bool, pid: int, data: bytes | str | Iterable[bytes],
                    chunk_size: int) -> Iterator[pb.WriteFileRequest]:
    """WriteFile's request stream: path, append and pid in the first message (sent even for no data,
    so that an empty file is written), then the data in pieces of at most ``chunk_size`` bytes."""
    first = True
    for piece in _byte_pieces(data):
        for start in range(0, len(piece), chunk_size):
            part = piece[start:start + chunk_size]
            if first:
                yield pb.WriteFileRequest(path=path, append=append, pid=pid, data=part)
                first = False
            else:
                yield pb.WriteFileRequest(data=part)
    if first:
        yield pb.WriteFileRequest(path=path, append=append, pid=pid)


def program_source(program: str | os.PathLike) -> tuple[str, str, str | None]:
    """(language, source text, the file's name or None) for spawn: a path-like or a str naming an
    existing file is read (a ".py" file is a Python agent, any other Lua); any other str is Lua source."""
    if isinstance(program, os.PathLike) or (isinstance(program, str) and "\n" not in program
                                             and os.path.isfile(program)):
        with open(program, encoding="utf-8") as f:
            language = "python" if os.fspath(program).endswith(".py") else "lua"
            return language, f.read(), os.path.basename(program)
    return "lua", program, None


def _set_target(request: Any, to: int | str) -> None:
    """A Send's (or SendBatch's) receiver: a pid or a registered name."""
    if isinstance(to, str):
        request.to_name = to
    elif isinstance(to, int) and not isinstance(to, bool):
        request.to = to
    else:
        raise _invalid(f"to must be a pid (int) or a registered name (str), not {type(to).__name__}")


def _recv_request(pid: int, sender: int | None, tag: str | None, correlation_id: str | None,
                  timeout: float | None, ack: bool, lease: float | None,
                  max_messages: int = 0) -> tuple[pb.RecvRequest, int | None]:
    """A Recv's request (one message, or up to `max_messages`), and its timeout in ms."""
    timeout_ms = _timeout_ms(timeout)
    if lease is not None and not ack:
        raise _invalid("lease is for a recv with ack=True")
    request = _message(pb.RecvRequest, "recv request",
                       {"pid": pid, "from": sender, "tag": tag, "correlation_id": correlation_id,
                        "timeout_ms": timeout_ms, "ack": ack, "max_messages": max_messages,
                        "lease_ms": None if lease is None else _timeout_ms(lease)})
    return request, timeout_ms


def _settle_request(pid: int, messages: Sequence[int | Message], what: str) -> pb.AckRequest:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise _invalid(f"{what}_many takes a list of message ids (or Messages)")
    ids = [m.id if isinstance(m, Message) else m for m in messages]
    return _message(pb.AckRequest, f"{what} request", {"pid": pid, "message_ids": ids})


class Syscalls:
    """The syscall methods shared by :class:`Client` and :class:`llmos.aio.Client`.

    ``rpc_timeout`` bounds the calls that never block in the kernel (Spawn, Send, Kill, ...);
    blocking calls get their own ``timeout`` plus a small margin, or no deadline when unbounded.
    ``send_retry`` is how :meth:`send` retries (None: it does not, and makes no idempotency keys).
    """

    def __init__(self, target: str | None, rpc_timeout: float | None, token: str | None = None,
                 send_retry: Retry | None = Retry()) -> None:
        self.target = target or default_target()
        self.rpc_timeout = rpc_timeout
        token = token or default_token()
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        if send_retry is not None and (type(send_retry.attempts) is not int or send_retry.attempts < 1):
            raise _invalid(f"send_retry.attempts must be an int >= 1, not {send_retry.attempts!r}")
        self.send_retry = send_retry

    def _drive(self, plan: Plan[T]) -> T:
        raise NotImplementedError

    def _unary(self, method: str, request: Any) -> Unary:
        return Unary(method, request, self.rpc_timeout)

    def _spawn_call(self, lua: str | None, python: str | None, path: str | None, args: JSON, name: str | None,
                    priority: int, limits: Mapping[str, int] | None, parent: int, monitor: bool,
                    source_name: str | None = None, weight: int = 0, dead_letter: int = 0,
                    max_attempts: int = 0, durable: bool = False) -> Unary:
        programs = {k: v for k, v in (("lua", lua), ("python", python), ("path", path)) if v is not None}
        if len(programs) != 1:
            raise _invalid("give exactly one program: lua (source), python (source) or path")
        request = _message(pb.SpawnRequest, "spawn request", dict(
            programs, name=name or "", priority=priority, weight=weight, parent=parent, monitor=monitor,
            limits=_message(pb.Limits, "limits", limits or {}), source_name=source_name or "",
            dead_letter=dead_letter, max_attempts=max_attempts, durable=durable))
        if args is not None:
            request.args.CopyFrom(_value(args, "args"))
        return self._unary("Spawn", request)

    def _wait_call(self, pid: int, timeout: float | None) -> Unary:
        timeout_ms = _timeout_ms(timeout)
        request = pb.WaitRequest(pid=pid, timeout_ms=timeout_ms)
        return Unary("Wait", request, _deadline(timeout_ms))

    @syscall
    def spawn(self, lua: str | None = None, python: str | None = None, path: str | None = None, args: JSON = None,
              name: str | None = None, priority: int = 0, limits: Mapping[str, int] | None = None, parent: int = 0,
              monitor: bool = False, source_name: str | None = None, weight: int = 0, dead_letter: int = 0,
              max_attempts: int = 0, durable: bool = False) -> Plan[int]:
        """Start a process and return its pid at once.

        Give exactly one program: ``lua`` or ``python`` source text, or ``path`` (a program under the server's
        userland root). ``args`` is any JSON-shaped value, seen by the program as ``args``. ``limits`` takes
        cpu_ms, wall_ms, memory_bytes, tokens, mailbox, mailbox_bytes and processes (0: the server's default;
        at most the parent's). With ``monitor`` the ``parent`` gets an EXIT message when the child ends.
        ``source_name`` is what errors call the source (say, the file it came from). ``weight`` (1..10000;
        0: the default, 100) is the process's share of CPU among processes of its priority. ``dead_letter``
        (a live pid; 0: none) gets, tagged DEAD_LETTER, the messages left waiting or leased when the process
        ends, and those received with ack ``max_attempts`` times (0: no limit) without an ack; without one they go to
        the namespace's dead-letter queue (:meth:`dead_letters`). A ``durable`` process (Lua or Python) has its mailbox
        stored and its syscalls journaled: a restarted server brings it back (docs/durable-agents.md).
        """
        reply = yield self._spawn_call(lua, python, path, args, name, priority, limits, parent, monitor,
                                       source_name, weight, dead_letter, max_attempts, durable)
        return reply.pid

    @syscall
    def send(self, to: int | str, body: JSON = None, *, sender: int = 0, tag: str = "", data: bytes = b"",
             correlation_id: str = "", notify_undelivered: bool = False,
             idempotency_key: str | None = None) -> Plan[int]:
        """Store a message in the mailbox of ``to`` (a pid or a registered name); return the message id.

        ``sender`` is the pid replies should go to (a port from :meth:`open_port`; 0 for none).
        Never waits for the receiver; a full mailbox raises ResourceExhausted.

        A send that fails with UNAVAILABLE or DEADLINE_EXCEEDED is retried as the client's ``send_retry``
        says, with an ``idempotency_key`` (one is made up if none is given; "" sends none and does not
        retry): the server answers a repeated key from the same sender with the first message id and stores
        nothing new, so a retry never duplicates a message. With ``notify_undelivered``, if the message is
        never delivered (its receiver ends first, or it runs out of attempts) ``sender`` gets a message
        tagged UNDELIVERED instead of the message going to a dead-letter target or queue.
        """
        if idempotency_key is None:
            idempotency_key = uuid.uuid4().hex if self.send_retry is not None else ""
        request = _message(pb.SendRequest, "send request",
                           {"from": sender, "tag": tag, "data": data, "correlation_id": correlation_id,
                            "notify_undelivered": notify_undelivered, "idempotency_key": idempotency_key})
        _set_target(request, to)
        if body is not None:
            request.body.CopyFrom(_value(body, "body"))
        reply = yield Unary("Send", request, self.rpc_timeout, self.send_retry if idempotency_key else None)
        return reply.message_id

    @syscall
    def recv(self, pid: int, *, sender: int | None = None, tag: str | None = None,
             correlation_id: str | None = None, timeout: float | None = None, ack: bool = False,
             lease: float | None = None) -> Plan[Message | None]:
        """Take the oldest message in ``pid``'s mailbox that matches every filter given.

        Waits up to ``timeout`` seconds (None: without limit; 0: not at all) and returns None if
        nothing matched in time. Messages that do not match stay in the mailbox, in order.

        With ``ack`` the message is leased for ``lease`` seconds (None: 30) instead of taken: it stays
        stored, hidden from other receives, until :meth:`ack`; if the lease runs out, or on :meth:`nack`,
        it is delivered again in its place, with ``attempt`` one higher and ``redelivered`` set.
        """
        request, timeout_ms = _recv_request(pid, sender, tag, correlation_id, timeout, ack, lease)
        reply = yield Unary("Recv", request, _deadline(timeout_ms))
        return None if reply.timed_out else message_from_pb(reply.message)

    @syscall
    def ack(self, pid: int, message_id: int) -> Plan[None]:
        """The message ``message_id`` that ``pid`` received with ack is done with: it is forgotten.
        FailedPrecondition if ``pid`` holds no lease on it (acknowledged already, or its lease ran out)."""
        yield self._unary("Ack", _message(pb.AckRequest, "ack request", {"pid": pid, "message_id": message_id}))

    @syscall
    def nack(self, pid: int, message_id: int) -> Plan[None]:
        """Give back the message ``message_id`` that ``pid`` received with ack: it is delivered again now."""
        yield self._unary("Nack", _message(pb.AckRequest, "nack request", {"pid": pid, "message_id": message_id}))

    @syscall
    def send_batch(self, to: int | str, messages: Sequence[Outgoing | JSON], *, sender: int = 0) -> Plan[list[int]]:
        """Send many messages to ``to`` in one call; return their ids, in order. Each item is an
        :class:`Outgoing` or a plain body. All are stored (a port's in one transaction, before the call
        answers) or, if any is refused (too big, no room for all in the mailbox: ResourceExhausted), none.
        At most 1000 messages a call. Retried as :meth:`send` is: each message gets an idempotency key
        (unless its ``idempotency_key`` is ""), so a retry stores nothing twice."""
        request = _message(pb.SendBatchRequest, "send batch request", {"from": sender})
        _set_target(request, to)
        retried = self.send_retry is not None
        prefix = uuid.uuid4().hex if retried else ""  # made-up keys: "<prefix>.<index>", unique per message
        keyed = retried
        add = request.messages.add
        for i, item in enumerate(messages):
            out = item if isinstance(item, Outgoing) else None
            key = out.idempotency_key if out is not None else None
            if key is None:
                key = f"{prefix}.{i}" if retried else ""
            keyed = keyed and bool(key)
            try:
                if out is None:
                    m = add(idempotency_key=key)
                    body = item
                else:
                    m = add(tag=out.tag, data=out.data, correlation_id=out.correlation_id,
                            notify_undelivered=out.notify_undelivered, idempotency_key=key)
                    body = out.body
                if body is not None:
                    fill_value(m.body, body)
            except (TypeError, ValueError) as e:
                raise _invalid(f"bad messages[{i}]: {e}") from None
        reply = yield Unary("SendBatch", request, self.rpc_timeout, self.send_retry if keyed else None)
        return list(reply.message_ids)

    @syscall
    def recv_many(self, pid: int, max_messages: int, *, sender: int | None = None, tag: str | None = None,
                  correlation_id: str | None = None, timeout: float | None = None, ack: bool = False,
                  lease: float | None = None) -> Plan[list[Message]]:
        """Take up to ``max_messages`` (1..1000) matching messages from ``pid``'s mailbox in one call, oldest
        first, as :meth:`recv` takes one: it waits up to ``timeout`` for the first (an empty list when none
        came), then takes those already waiting, up to ``max_messages`` or about 4 MiB. With ``ack`` each is
        leased for ``lease`` seconds: settle them with :meth:`ack_many` (or :meth:`ack`, :meth:`nack_many`)."""
        request, timeout_ms = _recv_request(pid, sender, tag, correlation_id, timeout, ack, lease, max_messages)
        if not request.max_messages:
            raise _invalid("max_messages must be 1 to 1000")
        reply = yield Unary("Recv", request, _deadline(timeout_ms))
        return [message_from_pb(m) for m in reply.messages]

    @syscall
    def ack_many(self, pid: int, messages: Sequence[int | Message]) -> Plan[list[int]]:
        """Acknowledge many messages ``pid`` received with ack (ids or :class:`Message`s; 1..1000) in one
        call; return the ids it held no lease on (settled already, lease ran out, named twice), for which
        nothing was done: every other one is acknowledged."""
        reply = yield self._unary("Ack", _settle_request(pid, messages, "ack"))
        return list(reply.not_leased)

    @syscall
    def nack_many(self, pid: int, messages: Sequence[int | Message]) -> Plan[list[int]]:
        """Give back many leased messages at once, as :meth:`ack_many` acknowledges them: they are delivered
        again. Returns the ids ``pid`` held no lease on."""
        reply = yield self._unary("Nack", _settle_request(pid, messages, "nack"))
        return list(reply.not_leased)

    @syscall
    def wait(self, pid: int, timeout: float | None = None) -> Plan[ProcessInfo | None]:
        """Wait until process ``pid`` has ended and return its final info, or None after ``timeout`` seconds.

        Works for processes that ended long ago too (also across server restarts).
        """
        reply = yield self._wait_call(pid, timeout)
        return None if reply.timed_out else process_from_pb(reply.process)

    @syscall
    def kill(self, pid: int, reason: str = "killed") -> Plan[bool]:
        """End a process with ``reason``. True if it was alive, False if it had already ended."""
        reply = yield self._unary("Kill", pb.KillRequest(pid=pid, reason=reason))
        return not reply.already_ended

    @syscall
    def open_port(self, name: str | None = None, mailbox: int = 0, *, dead_letter: int = 0,
                  max_attempts: int = 0) -> Plan[int]:
        """Open a mailbox-only process (a port) for this client to receive replies on; return its pid.
        ``dead_letter`` and ``max_attempts`` as for :meth:`spawn` (a killed port's messages go there)."""
        reply = yield self._unary("OpenPort", _message(pb.OpenPortRequest, "open port request", {
            "name": name or "", "mailbox": mailbox, "dead_letter": dead_letter, "max_attempts": max_attempts}))
        return reply.pid

    @syscall
    def create_token(self, namespace: str, role: str, label: str = "") -> Plan[tuple[str, str]]:
        """(id, token) of a new token of ``role`` (admin, owner, reader) in ``namespace``; admin only.
        The token is shown only now: the server keeps its SHA-256."""
        reply = yield self._unary("CreateToken", pb.CreateTokenRequest(namespace=namespace, role=role, label=label))
        return reply.id, reply.token

    @syscall
    def list_tokens(self) -> Plan[list[dict]]:
        """Every token's id, namespace, role, label and created_at_ms (never the secret); admin only."""
        reply = yield self._unary("ListTokens", pb.ListTokensRequest())
        return [{"id": t.id, "namespace": t.namespace, "role": t.role, "label": t.label,
                 "created_at_ms": t.created_at_ms} for t in reply.tokens]

    @syscall
    def revoke_token(self, token_id: str) -> Plan[bool]:
        """Revoke a token by id: whether one had it; admin only."""
        reply = yield self._unary("RevokeToken", pb.RevokeTokenRequest(id=token_id))
        return reply.revoked

    @syscall
    def get_namespace(self, name: str = "") -> Plan[dict]:
        """A namespace's use and quotas (live processes, file bytes and files, tokens): the caller's, or
        (admin) ``name``'s."""
        reply = yield self._unary("GetNamespace", pb.GetNamespaceRequest(name=name))
        return _namespace(reply)

    @syscall
    def set_namespace(self, name: str, weight: int = 0, **quotas: int) -> Plan[dict]:
        """Change a namespace's settings (admin only): ``weight`` is its share of CPU against other
        namespaces' (1..10,000, default 100; 0 leaves it); each quota named (memory_bytes,
        mailbox_bytes, kv_bytes, tokens, tokens_per_minute) is set (0: none). Returns its use and quotas."""
        reply = yield self._unary("SetNamespace", pb.SetNamespaceRequest(
            name=name, weight=weight, quotas=pb.NamespaceQuotas(**quotas)))
        return _namespace(reply)

    @syscall
    def read_audit(self, limit: int = 100, before_id: int = 0) -> Plan[list[dict]]:
        """The audit log's newest entries (before ``before_id`` if set), newest first; admin only."""
        reply = yield self._unary("ReadAudit", pb.ReadAuditRequest(limit=limit, before_id=before_id))
        return [{f.name: getattr(e, f.name) for f in e.DESCRIPTOR.fields} for e in reply.entries]

    @syscall
    def register(self, pid: int, name: str) -> Plan[None]:
        """Give a live process a registered name (AlreadyExists if another process holds it)."""
        yield self._unary("Register", pb.RegisterRequest(pid=pid, name=name))

    @syscall
    def monitor(self, watcher: int, target: int) -> Plan[None]:
        """Have ``watcher`` get an EXIT message when ``target`` ends."""
        yield self._unary("Monitor", pb.MonitorRequest(watcher=watcher, target=target))

    @syscall
    def set_priority(self, pid: int, priority: int, weight: int = 0) -> Plan[None]:
        """Change a process's scheduling priority (higher runs first) and, unless 0, its
        weight (its share of CPU within its priority; the default is 100)."""
        yield self._unary("SetPriority", pb.SetPriorityRequest(pid=pid, priority=priority, weight=weight))

    @syscall
    def read_log(self, pid: int, offset: int = 0) -> Plan[tuple[list[str], int]]:
        """The process's log lines from line ``offset`` on, and the offset to read on from."""
        reply = yield self._unary("ReadLog", pb.ReadLogRequest(pid=pid, offset=offset))
        return list(reply.lines), reply.next_offset

    @syscall
    def read_log_page(self, pid: int, offset: int = 0, *, tail: int = 0, since_ms: int = 0) -> Plan[LogPage]:
        """The process's log from line ``offset`` on with each line's time: only the last ``tail``
        lines (if set), only lines written at or after ``since_ms`` (if set)."""
        reply = yield self._unary("ReadLog", pb.ReadLogRequest(pid=pid, offset=offset, tail=tail, since_ms=since_ms))
        return log_page_from_pb(reply)

    @syscall
    def follow_log(self, pid: int, offset: int = 0, *, tail: int = 0, since_ms: int = 0,
                   timeout: float | None = None) -> Plan[Iterator[LogPage]]:
        """:meth:`read_log_page`, then a page of new lines each time the process writes some, streamed by
        the server until the process has ended (the last page has ``ended`` set) or ``timeout`` seconds
        have passed (DeadlineExceeded)."""
        request = pb.ReadLogRequest(pid=pid, offset=offset, tail=tail, since_ms=since_ms)
        return (yield Streaming("FollowLog", request, timeout, log_page_from_pb, collect=False))

    @syscall
    def exit(self, pid: int, result: JSON = None) -> Plan[None]:
        """Close port ``pid`` with ``result`` (a Python agent sets its own result this way)."""
        yield self._unary("Exit", pb.ExitRequest(pid=pid, result=_value(result, "result")))

    @syscall
    def ps(self, states: Sequence[str] | str | None = None, name: str | None = None, parent: int = 0,
           include_ended: bool = False) -> Plan[list[ProcessInfo]]:
        """List processes, filtered by state names (e.g. ["BLOCKED"]), registered name and parent pid."""
        wanted = [states] if isinstance(states, str) else list(states or [])
        try:
            codes = [pb.ProcessState.Value(s.upper()) for s in wanted]
        except ValueError:
            known = ", ".join(n for n in pb.ProcessState.keys() if n != "PROCESS_STATE_UNSPECIFIED")
            raise _invalid(f"unknown state in {wanted!r}; states are {known}") from None
        found: list[ProcessInfo] = []
        after = 0
        while True:  # the server answers in pages
            request = pb.ListProcessesRequest(states=codes, name=name or "", parent=parent,
                                              include_ended=include_ended, after_pid=after)
            reply = yield self._unary("ListProcesses", request)
            found += [process_from_pb(p) for p in reply.processes]
            if not reply.next_after_pid:
                return found
            after = reply.next_after_pid

    # -- the namespace's dead-letter queue ----------------------------------------------------------
    @syscall
    def dead_letters(self, receiver: int = 0, *, after_id: int = 0,
                     limit: int | None = None) -> Plan[list[DeadLetter]]:
        """The dead letters of the namespace (those that were in ``receiver``'s mailbox; 0: all), oldest
        first, from after ``after_id``; at most ``limit`` of them (None: all, read page by page)."""
        if limit is not None and (type(limit) is not int or limit < 1):
            raise _invalid(f"limit must be an int >= 1 or None, not {limit!r}")
        found: list[DeadLetter] = []
        while limit is None or len(found) < limit:
            page = 0 if limit is None else min(limit - len(found), 10_000)
            reply = yield self._unary("ListDeadLetters", _message(pb.ListDeadLettersRequest, "dead letters request", {
                "after_id": after_id, "page_size": page, "receiver": receiver}))
            found += [dead_letter_from_pb(d) for d in reply.dead_letters]
            if not reply.next_after_id:
                break
            after_id = reply.next_after_id
        return found

    @syscall
    def dead_letter(self, dead_letter_id: int) -> Plan[DeadLetter]:
        """One dead letter of the namespace (NotFound if it is not in the queue)."""
        reply = yield self._unary("GetDeadLetter", _message(pb.GetDeadLetterRequest, "dead letter request",
                                                            {"id": dead_letter_id}))
        return dead_letter_from_pb(reply)

    @syscall
    def retry_dead_letter(self, dead_letter_id: int, to: int | str | None = None) -> Plan[int]:
        """Send a dead letter's message again, as its sender, to ``to`` (a pid or name; None: its receiver,
        FailedPrecondition if that has ended) and take it out of the queue; the new message's id. A full
        mailbox (ResourceExhausted) leaves it in the queue."""
        request = _message(pb.RetryDeadLetterRequest, "retry request", {"id": dead_letter_id})
        if isinstance(to, str):
            request.to_name = to
        elif isinstance(to, int) and not isinstance(to, bool):
            request.to = to
        elif to is not None:
            raise _invalid(f"to must be a pid (int), a registered name (str) or None, not {type(to).__name__}")
        reply = yield self._unary("RetryDeadLetter", request)
        return reply.message_id

    @syscall
    def purge_dead_letters(self, ids: Sequence[int] = (), *, all: bool = False, before_ms: int = 0) -> Plan[int]:
        """Take dead letters out of the queue for good: ``ids``, or ``all``, or those that came before
        ``before_ms`` (unix ms); exactly one of the three. How many were taken out."""
        reply = yield self._unary("PurgeDeadLetters", _message(pb.PurgeDeadLettersRequest, "purge request", {
            "ids": list(ids), "all": all, "before_ms": before_ms}))
        return reply.purged

    @syscall
    def get(self, pid: int) -> Plan[ProcessInfo]:
        """The current info of process ``pid`` (NotFound if there never was one)."""
        reply = yield self._unary("GetProcess", pb.GetProcessRequest(pid=pid))
        return process_from_pb(reply)

    @syscall
    def events(self, pid: int = 0) -> Plan[Iterator[Event]]:
        """Process lifecycle events as they happen, for ``pid`` or (0) all processes: first one of
        kind "subscribed" (every later event will arrive), then "spawned" and "ended".

        The stream runs until the caller stops iterating (or closes the iterator).
        """
        return (yield Streaming("Events", pb.EventsRequest(pid=pid), None, event_from_pb, collect=False))

    @syscall
    def infer(self, prompt: str | None = None, messages: Sequence[Mapping[str, str]] | None = None, pid: int = 0,
              max_tokens: int = 0, temperature: float | None = None, top_p: float | None = None,
              top_k: int | None = None, seed: int | None = None, stop: Sequence[str] | None = None,
              stream: bool = False, priority: int | None = None,
              timeout: float | None = None, json_schema: Mapping[str, JSON] | None = None,
              regex: str | None = None, grammar: str | None = None,
              tools: Sequence[Mapping[str, JSON]] | None = None, tool_choice: str | None = None,
              context: int = 0) -> Plan[InferResult | Iterator[InferChunk]]:
        """Generate text with the kernel's model, charged to process ``pid``.

        Give ``prompt`` text or chat ``messages`` ([{"role": "user", "content": "..."}]). ``max_tokens`` 0 is
        the server's default, ``temperature`` 0 is greedy. Returns an :class:`InferResult`, or with ``stream``
        an iterator of :class:`InferChunk` as tokens are generated. ``timeout`` (seconds) bounds the request.

        At most one constraint makes the output match it: ``json_schema`` (a dict), ``regex`` or ``grammar``
        (GBNF or Lark). ``tools`` ([{"name", "description", "parameters": JSON schema}], OpenAI's
        {"type": "function", "function": {...}} too) are offered to the model; ``tool_choice`` is "auto",
        "none", "required" or a tool's name; the calls come back in ``tool_calls``. ``context`` continues
        a conversation context of ``pid`` (:meth:`create_context`) with ``messages`` as the new turn.
        """
        timeout_ms = _timeout_ms(timeout)
        sampling = _message(pb.SamplingParams, "sampling settings", dict(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop or []))
        request = _message(pb.InferRequest, "infer request", dict(
            pid=pid, prompt=prompt or "", sampling=sampling, stream=stream, priority=priority,
            timeout_ms=timeout_ms, messages=_chat(messages),
            json_schema=None if json_schema is None else to_value(json_schema), regex=regex or "",
            grammar=grammar or "", tools=_tools(tools), tool_choice=tool_choice or "", context_id=context))
        if not stream:
            chunks = yield Streaming("Infer", request, _deadline(timeout_ms), chunk_from_pb, collect=True)
            return join_chunks(chunks)
        return (yield Streaming("Infer", request, _deadline(timeout_ms), chunk_from_pb, collect=False))

    @syscall
    def create_context(self, pid: int, messages: Sequence[Mapping[str, str]],
                       tools: Sequence[Mapping[str, JSON]] | None = None) -> Plan[ContextInfo]:
        """A conversation context owned by process (or port) ``pid``: the chat is prefilled once and its
        KV cache kept, so ``infer(pid=pid, context=c.context_id, messages=[new turn])`` prefills only the
        turn. Freed by :meth:`drop_context` or when ``pid`` ends; ``limits.kv_bytes`` caps them."""
        reply = yield self._unary("CreateContext", _message(pb.CreateContextRequest, "context request", dict(
            pid=pid, messages=_chat(messages), tools=_tools(tools))))
        return ContextInfo(reply.context_id, reply.tokens, reply.kv_bytes)

    @syscall
    def fork_context(self, pid: int, context: int) -> Plan[ContextInfo]:
        """A new context of ``pid`` with the same history, sharing its KV cache (copy on write)."""
        reply = yield self._unary("ForkContext", pb.ForkContextRequest(pid=pid, context_id=context))
        return ContextInfo(reply.context_id, reply.tokens, reply.kv_bytes)

    @syscall
    def drop_context(self, pid: int, context: int) -> Plan[None]:
        """Free a context of ``pid`` (NotFound if it has none by that handle)."""
        yield self._unary("DropContext", pb.DropContextRequest(pid=pid, context_id=context))

    # -- files: a durable tree per namespace; external clients use namespace "default" ----------------
    @syscall
    def write_file(self, path: str, data: bytes | bytearray | memoryview | str | Iterable[bytes], *,
                   append: bool = False, pid: int = 0, chunk_size: int = FILE_CHUNK_BYTES) -> Plan[FileInfo]:
        """Write a whole file (or, with ``append``, add to its end) atomically; return its new info.

        ``data`` is bytes, str (written as UTF-8) or an iterable of bytes pieces, which is streamed as it is
        read, so a large file need never be held in memory. Pieces travel in messages of at most
        ``chunk_size`` bytes (1 MiB; at most 4 MiB). Readers see the old file or the new one, never a mix;
        if the stream fails (or an error is raised by the iterable) nothing changes. ``pid`` is the process
        charged for the bytes against its quota (0: the namespace only). Missing parent directories are
        created. The stream has no deadline: its length is the data's.
        """
        if type(chunk_size) is not int or not 1 <= chunk_size <= MAX_FILE_CHUNK_BYTES:
            raise _invalid(f"chunk_size must be an int from 1 to {MAX_FILE_CHUNK_BYTES}; got {chunk_size!r}")
        if not isinstance(path, str):
            raise _invalid(f"path must be a str, not {type(path).__name__}")
        if not isinstance(data, (bytes, bytearray, memoryview, str, Iterable)):
            raise _invalid(f"data must be bytes, str or an iterable of bytes, not {type(data).__name__}")
        requests = RequestStream(_write_requests(path, bool(append), pid, data, chunk_size))
        reply = yield ClientStreaming("WriteFile", requests, None)
        return file_from_pb(reply)

    def _read_request(self, path: str, offset: int, length: int) -> pb.ReadFileRequest:
        if any(type(v) is not int or v < 0 for v in (offset, length)):
            raise _invalid(f"offset and length must be ints >= 0; got {offset!r}, {length!r}")
        return _message(pb.ReadFileRequest, "read request", {"path": path, "offset": offset, "length": length})

    @syscall
    def read_file(self, path: str, *, offset: int = 0, length: int = 0) -> Plan[bytes]:
        """The bytes of a file, or ``length`` of them (0: to the end) from ``offset``.

        They come from one version of the file even while others replace it. Reading past the end gives
        fewer bytes (or none). For a large file, :meth:`open_file_stream` avoids holding it all.
        """
        chunks = yield Streaming("ReadFile", self._read_request(path, offset, length), None, _chunk_data,
                                 collect=True)
        return b"".join(chunks)

    @syscall
    def open_file_stream(self, path: str, *, offset: int = 0, length: int = 0) -> Plan[Iterator[bytes]]:
        """Like :meth:`read_file`, but an iterator of the file's pieces (up to 1 MiB each) as they arrive
        (an async iterator in the asyncio client). Stop early by closing it."""
        request = self._read_request(path, offset, length)
        return (yield Streaming("ReadFile", request, None, _chunk_data, collect=False))

    @syscall
    def stat(self, path: str) -> Plan[FileInfo]:
        """The info of a file or directory ("" is the root); NotFound if there is none."""
        reply = yield self._unary("StatFile", _message(pb.FilePath, "path", {"path": path}))
        return file_from_pb(reply)

    @syscall
    def list_files(self, path: str = "") -> Plan[list[FileInfo]]:
        """The files and directories in a directory ("" is the root), sorted by path."""
        reply = yield self._unary("ListFiles", _message(pb.FilePath, "path", {"path": path}))
        return [file_from_pb(e) for e in reply.entries]

    @syscall
    def delete_file(self, path: str) -> Plan[None]:
        """Delete a file or an empty directory (NotFound if absent, FailedPrecondition if not empty)."""
        yield self._unary("DeleteFile", _message(pb.FilePath, "path", {"path": path}))

    @syscall
    def rename_file(self, src: str, dst: str) -> Plan[FileInfo]:
        """Rename ``src`` to ``dst`` atomically, replacing a file (never a directory) there; the new info."""
        reply = yield self._unary("RenameFile", _message(pb.RenameFileRequest, "rename request",
                                                         {"from_path": src, "to_path": dst}))
        return file_from_pb(reply)

    @syscall
    def make_dir(self, path: str) -> Plan[FileInfo]:
        """Make the directory ``path`` with its missing parents (an existing directory is fine); its info."""
        reply = yield self._unary("MakeDir", _message(pb.FilePath, "path", {"path": path}))
        return file_from_pb(reply)

    # -- locks: named mutexes and counting semaphores, held by a process or port ------------------
    @syscall
    def acquire(self, pid: int, name: str, *, semaphore: int = 0, timeout: float | None = None,
                priority: int | None = None) -> Plan[dict[str, Any] | None]:
        """Acquire the lock ``name`` for ``pid`` (a live process or a port); it is released when ``pid`` ends.

        ``semaphore`` 0 is a mutex, N a counting semaphore of N permits. Waits up to ``timeout`` seconds
        (None: without limit; 0: not at all) and returns None if not acquired in time, else
        ``{"acquired": True}``, with ``"previous_holder_died": pid`` added when the permit came from a
        holder that ended. Waiters are served by ``priority`` (default: the holder's), then in arrival order.
        """
        timeout_ms = _timeout_ms(timeout)
        request = _message(pb.AcquireRequest, "acquire request", {
            "pid": pid, "name": name, "semaphore": semaphore, "timeout_ms": timeout_ms, "priority": priority})
        reply = yield Unary("Acquire", request, _deadline(timeout_ms))
        if not reply.acquired:
            return None
        answer: dict[str, Any] = {"acquired": True}
        if reply.previous_holder_died:
            answer["previous_holder_died"] = reply.previous_holder_died
        return answer

    @syscall
    def release(self, pid: int, name: str) -> Plan[None]:
        """Give back one permit of ``name`` that ``pid`` holds (FailedPrecondition if it holds none)."""
        yield self._unary("Release", _message(pb.ReleaseRequest, "release request", {"pid": pid, "name": name}))

    @syscall
    def cond_wait(self, pid: int, name: str, lock: str, *, timeout: float | None = None,
                  priority: int | None = None) -> Plan[dict[str, Any]]:
        """Release the mutex ``lock`` that ``pid`` holds and wait on the condition ``name``, atomically.

        Returns once ``pid`` holds ``lock`` again: ``{"signalled": bool, "timed_out": bool}`` (with
        ``"previous_holder_died": pid`` when the mutex came back from a holder that ended). ``timeout``
        (seconds, None: without limit) bounds the wait for a signal, not the wait for the mutex after it.
        Waiters are woken by ``priority`` (default: the waiter's), then in arrival order; never spuriously.
        FailedPrecondition if ``pid`` does not hold the mutex ``lock``.
        """
        request = _message(pb.CondWaitRequest, "cond wait request", {
            "pid": pid, "name": name, "lock": lock, "timeout_ms": _timeout_ms(timeout), "priority": priority})
        reply = yield Unary("CondWait", request, None)  # the mutex may take any time to come back
        answer: dict[str, Any] = {"signalled": reply.signalled, "timed_out": reply.timed_out}
        if reply.previous_holder_died:
            answer["previous_holder_died"] = reply.previous_holder_died
        return answer

    @syscall
    def cond_signal(self, name: str, *, pid: int = 0) -> Plan[int]:
        """Wake the best waiter of the condition ``name`` (in ``pid``'s namespace; 0: the caller's own):
        how many were woken, 0 or 1. A signal with nobody waiting is not remembered."""
        reply = yield self._unary("CondSignal", _message(pb.CondSignalRequest, "cond signal request",
                                                         {"name": name, "pid": pid}))
        return reply.woken

    @syscall
    def cond_broadcast(self, name: str, *, pid: int = 0) -> Plan[int]:
        """Wake every waiter of the condition ``name``, best first: how many were woken."""
        reply = yield self._unary("CondBroadcast", _message(pb.CondSignalRequest, "cond broadcast request",
                                                            {"name": name, "pid": pid}))
        return reply.woken

    @syscall
    def run(self, program: str | os.PathLike, args: JSON = None, timeout: float | None = None,
            **spawn_options: Any) -> Plan[ProcessInfo]:
        """Spawn a program, wait for it to end and return its final info.

        ``program`` is Lua source, or a path (a path-like, or a str naming an existing local file) whose
        text is sent as the source: Python for a ".py" file, else Lua. If it has not ended after ``timeout`` seconds it is killed with the
        reason "timeout" and its final info (state KILLED) is returned. ``spawn_options`` go to :meth:`spawn`.
        """
        language, source, source_name = program_source(program)
        options = dict(name=None, priority=0, weight=0, limits=None, parent=0, monitor=False, source_name=source_name,
                       dead_letter=0, max_attempts=0)
        unknown = set(spawn_options) - set(options)
        if unknown:
            raise _invalid(f"unknown spawn option(s) {sorted(unknown)}")
        options.update(spawn_options)
        lua, python = (source, None) if language == "lua" else (None, source)
        spawned = yield self._spawn_call(lua, python, None, args, **options)
        reply = yield self._wait_call(spawned.pid, timeout)
        if reply.timed_out:
            yield self._unary("Kill", pb.KillRequest(pid=spawned.pid, reason="timeout"))
            # a killed process ends at once; the deadline only guards against a server that never answers
            reply = yield self._unary("Wait", pb.WaitRequest(pid=spawned.pid))
        return process_from_pb(reply.process)


# -- the synchronous client -------------------------------------------------------------------
def _stream_items(responses: Any, convert: Callable[[Any], T]) -> Iterator[T]:
    try:
        for item in responses:
            yield convert(item)
    except grpc.RpcError as e:
        raise from_rpc_error(e) from None
    finally:
        responses.cancel()


class Client(Syscalls):
    """A blocking llmos client over one gRPC channel. Use as a context manager, or call :meth:`close`.

    ``target`` is "HOST:PORT" or "unix:/path/to/socket" (default: $LLMOS_SERVER or 127.0.0.1:50051).
    Every method raises a :class:`llmos.LlmosError` subclass when the syscall fails.
    """

    def __init__(self, target: str | None = None, *, rpc_timeout: float | None = 30.0,
                 token: str | None = None, tls: grpc.ChannelCredentials | None = None,
                 send_retry: Retry | None = Retry()) -> None:
        super().__init__(target, rpc_timeout, token, send_retry)
        tls = tls or channel_credentials()
        self._channel = (grpc.secure_channel(self.target, tls, options=CHANNEL_OPTIONS) if tls
                         else grpc.insecure_channel(self.target, options=CHANNEL_OPTIONS))
        self._stub = kernel_pb2_grpc.KernelStub(self._channel)

    def _perform(self, call: Call) -> Any:
        rpc = getattr(self._stub, call.method)
        if isinstance(call, Streaming):
            items = _stream_items(rpc(call.request, timeout=call.timeout, metadata=self.metadata), call.convert)
            return list(items) if call.collect else items
        if isinstance(call, ClientStreaming):
            try:
                return rpc(call.requests, timeout=call.timeout, metadata=self.metadata)
            except grpc.RpcError as e:
                if call.requests.error is not None:
                    raise call.requests.error from None
                raise from_rpc_error(e) from None
        delays = call.retry.delays() if call.retry is not None else iter(())
        while True:
            try:
                return rpc(call.request, timeout=call.timeout, metadata=self.metadata)
            except grpc.RpcError as e:
                delay = next(delays, None) if e.code() in RETRYABLE else None
                if delay is None:
                    raise from_rpc_error(e) from None
            time.sleep(delay)

    def _drive(self, plan: Plan[T]) -> T:
        call = first_call(plan)
        while True:
            reply = self._perform(call)
            try:
                call = plan.send(reply)
            except StopIteration as done:
                return done.value

    if TYPE_CHECKING:  # what a type checker sees of infer: its result's type follows ``stream``
        @overload
        def infer(self, prompt: str | None = None, messages: Sequence[Mapping[str, str]] | None = None,
                  pid: int = 0, max_tokens: int = 0, temperature: float | None = None, top_p: float | None = None,
                  top_k: int | None = None, seed: int | None = None, stop: Sequence[str] | None = None,
                  stream: Literal[False] = False, priority: int | None = None,
                  timeout: float | None = None) -> InferResult: ...

        @overload
        def infer(self, prompt: str | None = None, messages: Sequence[Mapping[str, str]] | None = None,
                  pid: int = 0, max_tokens: int = 0, temperature: float | None = None, top_p: float | None = None,
                  top_k: int | None = None, seed: int | None = None, stop: Sequence[str] | None = None, *,
                  stream: Literal[True], priority: int | None = None,
                  timeout: float | None = None) -> Iterator[InferChunk]: ...

        def infer(self, *args: Any, **kwargs: Any) -> InferResult | Iterator[InferChunk]: ...

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the server's channel is connected; Unavailable after ``timeout`` seconds."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise Unavailable(grpc.StatusCode.UNAVAILABLE,
                              f"no llmos server answered at {self.target} within {timeout} s") from None

    def close(self) -> None:
        """Close the channel; calls in progress are cancelled."""
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(target: str | None = None, *, rpc_timeout: float | None = 30.0,
            send_retry: Retry | None = Retry()) -> Client:
    """A :class:`Client` for ``target`` (default: $LLMOS_SERVER or 127.0.0.1:50051)."""
    return Client(target, rpc_timeout=rpc_timeout, send_retry=send_retry)
