"""The argument rules every userland's syscalls share: gRPC clients, Lua
programs and Python agents reach the kernel with values of any type and size,
and each rule is written here once.

- Durations (ms): a number; NaN and negatives are refused; anything above
  MAX_DURATION_MS (ten years, +inf included) means "for ever" and is clamped to
  it, so that no timer ever sees an unrepresentable time.
- Priorities: integers in [MIN_PRIORITY, MAX_PRIORITY]. Weights: 1..MAX_WEIGHT.
- pids: positive integers; one that cannot exist (above MAX_PID) is simply not
  found, like any unknown pid.
- Names (of processes, ports and locks): 1..MAX_NAME_LEN printable characters
  (no control, format, bidi-override or separator characters but the space).
- Short texts (tags, correlation ids, reasons): at most MAX_TEXT_BYTES bytes.
- Values (message bodies, arguments, results): JSON within the message size
  limit, as _kernel.value_size checks (see messaging.h).

A syscall's arguments are checked by `arguments`, from its entry in the syscall
table (api/table.py): each argument's kind names its checker here (KINDS), so
gRPC handlers, the Lua bridge and (through the agent socket's RPCs) Python
agents refuse a bad value with the same status and words. Lua strings reach
the checkers as bytes: text checkers take UTF-8 bytes as the text they hold.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

from .errors import InvalidArgument, KernelError, NotFound, ResourceExhausted
from .table import BY_NAME, DATA, FLAG, INTEGER, NAME, OPTIONS, PID, RECEIVER, STRING, TEXT, VALUE, Arg
from . import table as T
from ..native import _kernel
from ..kernel.process import DEFAULT_WEIGHT, Limits
from llmos.values import MAX_DURATION_MS, MAX_EXACT_INTEGER

MIN_PRIORITY, MAX_PRIORITY = -20, 20
MAX_WEIGHT = 10_000  # as cgroup v2's cpu.weight
MAX_PID = MAX_EXACT_INTEGER  # pids are exact JSON numbers
MAX_NAME_LEN = 256
MAX_TEXT_BYTES = 1024


def integer(value: Any, what: str) -> int:
    """An integer (an integral float too, as Lua numbers may be), else InvalidArgument."""
    if type(value) is float and value.is_integer():
        return int(value)
    if type(value) is not int:
        raise InvalidArgument(f"{what} must be an integer")
    return value


def duration_ms(value: Any, what: str) -> float:
    if type(value) not in (int, float) or math.isnan(value) or value < 0:
        raise InvalidArgument(f"{what} must be a non-negative number of milliseconds")
    return min(value, MAX_DURATION_MS)


def timeout_s(value: Any, what: str) -> float | None:
    """A timeout given in ms as seconds; None (no timeout) stays None."""
    return None if value is None else duration_ms(value, what) / 1000


def priority(value: Any, what: str = "priority") -> int:
    value = integer(value, what)
    if not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise InvalidArgument(f"{what} must be between {MIN_PRIORITY} and {MAX_PRIORITY}, not {value}")
    return value


def weight(value: Any, what: str = "weight") -> int:
    value = integer(value, what)
    if not 1 <= value <= MAX_WEIGHT:
        raise InvalidArgument(f"{what} must be between 1 and {MAX_WEIGHT} (the default is {DEFAULT_WEIGHT})")
    return value


def _set_id(value: Any, what: str) -> int:
    """An id's integer; 0 means unset in a request field (refused)."""
    value = integer(value, what)
    if value == 0:
        raise InvalidArgument(f"{what} is required")
    return value


def pid(value: Any, what: str = "pid") -> int:
    """A pid given by a caller: an integer; 0 means unset (refused); one that cannot exist is NotFound."""
    value = _set_id(value, what)
    if not 0 < value <= MAX_PID:
        raise NotFound(f"no process with pid {value}")
    return value


def message_id(value: Any, what: str = "message_id") -> int:
    """A message id given by a caller (Ack, Nack): an integer in 1..2^53; 0 means unset (refused)."""
    value = _set_id(value, what)
    if not 0 < value <= MAX_PID:
        raise InvalidArgument(f"{what} must be between 1 and 2^53, not {value}")
    return value


def name(value: Any, what: str = "name") -> str:
    value = string(value, what)
    if not 0 < len(value) <= MAX_NAME_LEN or not value.isprintable():
        raise InvalidArgument(f"{what}: names are 1 to {MAX_NAME_LEN} printable characters "
                              "(no control, format or separator characters but the space)")
    return value


MAX_PATH_BYTES = 4096


def program_path(value: Any) -> str:
    """A program's path under the userland root: printable Unicode text (so no NUL) of at most
    MAX_PATH_BYTES in UTF-8. Staying inside the root is the loader's check."""
    if not isinstance(value, str) or not value or not value.isprintable():
        raise InvalidArgument("path: a program's path is non-empty printable text (no NUL or control characters)")
    size = _utf8_size(value, "path")
    if size > MAX_PATH_BYTES:
        raise InvalidArgument(f"path: at most {MAX_PATH_BYTES} bytes; this one has {size}")
    return value


def _utf8_size(value: str, what: str) -> int:
    """`value`'s length in UTF-8; InvalidArgument for text that has none (a lone surrogate)."""
    try:
        return len(value.encode())
    except UnicodeEncodeError:
        raise InvalidArgument(f"{what} must be valid Unicode text") from None


def known_options(given: Any, known: tuple[str, ...], what: str) -> None:
    """InvalidArgument naming any option not in `known` (a misspelt option must not pass silently)."""
    unknown = sorted(set(given) - set(known), key=str)
    if unknown:
        raise InvalidArgument(f"{what}: unknown option(s) {', '.join(map(str, unknown))} "
                              f"(known: {', '.join(known)})")


def _decoded(value: Any, what: str) -> Any:
    """A Lua string (bytes) as the text it holds; other values as they are."""
    if type(value) is bytes:
        try:
            return value.decode()
        except UnicodeDecodeError:  # two different byte strings must never name one file or lock
            raise InvalidArgument(f"{what} must be UTF-8 text") from None
    return value


def string(value: Any, what: str) -> str:
    """UTF-8 text of any length (whoever stores it counts its size)."""
    if type(value) is str and value.isascii():  # valid UTF-8 as it is: the common case, checked at once
        return value
    value = _decoded(value, what)
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string")
    _utf8_size(value, what)
    return value


def data(value: Any, what: str) -> bytes:
    """Raw bytes (a Lua string as it is)."""
    if type(value) is not bytes:
        raise InvalidArgument(f"{what} must be a string of bytes")
    return value


def flag(value: Any, what: str) -> bool:
    if type(value) is not bool:
        raise InvalidArgument(f"{what} must be a boolean")
    return value


def sender(value: Any, what: str) -> int:
    """A receive's sender filter: a pid, or 0 for messages from external clients."""
    return 0 if integer(value, what) == 0 else pid(value, what)


def receiver(value: Any, what: str) -> int | str:
    """A message's receiver: a pid, or a registered name."""
    if type(value) is bytes or isinstance(value, str):
        return string(value, what)
    if value is None or type(value) is bool:
        raise InvalidArgument(f"{what} must be a pid or a registered name")
    return pid(value, what)


def text(value: Any, what: str) -> str:
    """A short text (tag, correlation id, reason): str of at most MAX_TEXT_BYTES UTF-8 bytes."""
    if type(value) is str and value.isascii() and len(value) <= MAX_TEXT_BYTES:  # a byte per character
        return value
    value = string(value, what)
    size = _utf8_size(value, what)
    if size > MAX_TEXT_BYTES:
        raise InvalidArgument(f"{what} is at most {MAX_TEXT_BYTES} bytes; this one has {size}")
    return value


def value(obj: Any, what: str, limit: int) -> Any:
    """`obj` if it is a JSON value of at most `limit` encoded bytes (see _kernel.value_size)."""
    try:
        _kernel.value_size(obj, limit)
    except _kernel.TooLarge:
        raise ResourceExhausted(f"{what}: larger than the limit of {limit} bytes") from None
    except _kernel.BadValue as e:
        raise InvalidArgument(f"{what}: {e.args[0]}") from None
    return obj


MAX_AMOUNT = 2**53  # a byte or count limit above this is taken as this ("unlimited" in practice)
_DURATION_LIMITS = ("cpu_ms", "wall_ms")


def limits(given: Any, what: str = "limits") -> Limits:
    """Limits from a mapping of names to numbers (a Lua table, a gRPC Limits'
    fields): durations as duration_ms; byte and count limits non-negative
    integers, clamped to MAX_AMOUNT. An empty Lua table may arrive as a list."""
    if given == []:
        given = {}
    if not isinstance(given, dict):
        raise InvalidArgument(f"{what} must be a table of {', '.join(Limits.__slots__)}")
    out = {}
    for key, amount in given.items():
        if key not in Limits.__slots__:
            raise InvalidArgument(f"{what}: unknown limit {key!r} (known: {', '.join(Limits.__slots__)})")
        if key in _DURATION_LIMITS:
            out[key] = math.ceil(duration_ms(amount, f"{what}.{key}"))
        else:
            amount = integer(amount, f"{what}.{key}")
            if amount < 0:
                raise InvalidArgument(f"{what}.{key} must not be negative")
            out[key] = min(amount, MAX_AMOUNT)
    return Limits(**out)


# -- inference ----------------------------------------------------------------------------------
CHAT_ROLES = ("system", "user", "assistant", "tool")
CHAT_FIELDS = ("role", "content", "name")
INFER_OPTIONS = T.option_keys(BY_NAME["infer"])  # the syscall table's
CONTEXT_OPTIONS = T.option_keys(BY_NAME["context.create"])
# Every token of an output is searched for every stop string, and a stop string's length, less one,
# is held back from a stream while it may be one's start: both are bounded (OpenAI's API takes 4).
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024


def stop_strings(value: Any) -> list[str]:
    """An infer request's stop strings (none: an empty list)."""
    stop = value or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise InvalidArgument("stop must be a list of non-empty strings")
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"stop: {len(stop)} stop strings; at most {MAX_STOP_STRINGS}")
    longest = max(map(len, stop), default=0)
    if longest > MAX_STOP_CHARS:
        raise InvalidArgument(f"stop: a stop string of {longest} characters; at most {MAX_STOP_CHARS}")
    return stop


def chat(messages: Any, what: str = "messages", allow_empty: bool = False) -> list[dict[str, str]]:
    """A chat: a list of {role, content} (and `name` for a tool's result), roles in CHAT_ROLES.
    An empty Lua table arrives as {}: it is the empty chat where one is allowed."""
    if allow_empty and messages in ({}, []):
        return []
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument(f"{what} must be a non-empty list of {{role, content}}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidArgument(f"{what}[{i}] must be a table/object with role and content")
        known_options(m, CHAT_FIELDS, f"{what}[{i}]")
        role, content, tool = m.get("role"), m.get("content"), m.get("name")
        if role not in CHAT_ROLES:
            raise InvalidArgument(f"{what}[{i}]: role must be one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise InvalidArgument(f"{what}[{i}]: content must be text")
        entry = {"role": role, "content": content}
        if tool not in (None, ""):
            if role != "tool":
                raise InvalidArgument(f"{what}[{i}]: only a message of role tool has a name")
            entry["name"] = text(tool, f"{what}[{i}].name")
        out.append(entry)
    return out


def context_handle(value: Any, what: str = "context") -> int:
    """A conversation context's handle: a positive integer; one that cannot exist is NotFound."""
    value = integer(value, what)
    if value <= 0:
        raise InvalidArgument(f"{what} must be a context handle (a positive integer)")
    if value > MAX_EXACT_INTEGER:
        raise NotFound(f"no context {value}")
    return value


def tool_choice(value: Any, what: str = "tool_choice") -> str | dict[str, str] | None:
    """None, "auto", "none", "required", or a tool's name (as {"name": NAME}); the engine checks
    the name against the tools."""
    if value is None or value == "":
        return None
    if isinstance(value, dict):
        known_options(value, ("name",), what)
        value = value.get("name")
    if not isinstance(value, str):
        raise InvalidArgument(f'{what} must be "auto", "none", "required" or a tool\'s name')
    return value if value in ("auto", "none", "required") else {"name": value}


# -- a syscall's arguments, from its table entry ---------------------------------------------------
KINDS = {
    PID: pid, T.DURATION_MS: duration_ms, T.PRIORITY: priority, T.WEIGHT: weight, NAME: name, TEXT: text,
    STRING: string, DATA: data, FLAG: flag, INTEGER: integer, T.MESSAGE_ID: message_id,
    T.CONTEXT: context_handle, T.LIMITS: limits, RECEIVER: receiver, T.SENDER: sender,
    VALUE: lambda v, what: v,  # checked against the message size limit where it is stored (Kernel)
}


def _checker(arg: Arg, prefix: str) -> Callable[[Any], Any]:
    """`arg`'s check, given the value: by its kind, named `prefix` + its name. (A partial, not a
    lambda: no Python frame of its own, on every argument of every syscall.)"""
    if arg.kind == OPTIONS:
        return _options_checker(arg, prefix.rstrip(": ") or "options", prefix)
    return functools.partial(KINDS[arg.kind], what=prefix + arg.name)


def _options_checker(arg: Arg, what: str, prefix: str) -> Callable[[Any], dict[str, Any]]:
    """A table of options (None: none): only `arg`'s keys, each checked by its kind. `what` names
    the syscall (a misspelt option is refused naming it); each option is named after its key."""
    known = tuple(o.name for o in arg.options)
    keys = frozenset(known)
    checks = tuple((o.name, _checker(o, prefix)) for o in arg.options)
    check_of = dict(checks)

    def check(given: Any) -> dict[str, Any]:
        if given is None:
            return {}
        if not isinstance(given, dict):
            raise InvalidArgument(f"{what}: expected a table of options")
        if not given.keys() <= keys:
            known_options(given, known, what)
        checked = {}
        try:  # those given (a few of the entry's options, typically), as they come
            for key, value in given.items():
                if value is not None:
                    checked[key] = check_of[key](value)
        except KernelError:  # the refusal names the first bad one in the entry's order, whatever the table's
            for key, option_check in checks:
                if (value := given.get(key)) is not None:
                    option_check(value)
            raise
        return checked

    return check


# A syscall's checks by the prefix its refusals start with, made from its entry once: gRPC's "",
# each Lua syscall's "sys.x: ", and a batch's "messages[i]: " for its first bad or distinct items
# (bounded: a batch of 1,000 must not keep a thousand). Each is (name, check, whether None is let
# through: an optional argument's; options check None themselves).
@functools.lru_cache(maxsize=512)
def _checks(syscall: str, prefix: str) -> tuple[tuple[str, Callable[[Any], Any], bool], ...]:
    return tuple((a.name, _checker(a, prefix), a.optional and a.kind != OPTIONS) for a in BY_NAME[syscall].args)


def arguments(syscall: str, given: dict[str, Any], prefix: str = "") -> tuple[Any, ...]:
    """The syscall's arguments (by name; left out: None) checked by its table entry, in the
    entry's order. `prefix` names the syscall as the caller knows it ("sys.kill: " from a
    program, "" from gRPC, whose fields are the arguments' names)."""
    checked = []
    for name, check, optional in _checks(syscall, prefix):  # a loop: no comprehension's frame
        value = given.get(name)
        checked.append(None if value is None and optional else check(value))
    return tuple(checked)
