"""Lua programs that call every `sys` function with hostile arguments.

A program is a list of steps, each in its own pcall and reported to a
collector port as soon as it is done (so a program killed half-way still says
what it did):
- a syscall with hostile arguments (values from values.py, pids of other
  processes and of none, durations, option tables with unknown keys), made in
  a hostile context (inside a coroutine, a gsub callback, a sort comparator, a
  metamethod, a to-be-closed variable, an xpcall handler);
- a round trip of a value: to a port, to itself and back, as a child's args, as
  a child's return value or sys.exit value. What comes out is compared with
  what the value model says (values.LuaValue).

What a step must do, checked once the program is over:
- a call whose arguments the decisions refuse (an unknown option among them)
  fails, with a plain string, never with a Python exception's text;
- a call given no duration that lets it wait long returns (it is not stuck);
- a value the model accepts comes back equal wherever it went, exactly once; one
  it refuses is refused where it enters (and a process returning it CRASHES).
(test_hostile.py checks that the error names the unknown option.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from llmos.values import MAX_DURATION_MS

from .values import LUA_SCALARS, LUA_SHAPES, Fate, LuaValue, Shown, lua_values, name_is_valid

# Contexts a syscall is made in. Errors keep their text in all but xpcall's handler.
CONTEXTS = {
    "direct": "function(f) return f() end",
    "coroutine": "function(f) return coroutine.wrap(f)() end",
    "nested coroutine": "function(f) return coroutine.wrap(function() return coroutine.wrap(f)() end)() end",
    "gsub": "function(f) local r string.gsub('x', 'x', function() r = table.pack(f()) return '' end) "
            "return table.unpack(r, 1, r.n) end",
    "sort": "function(f) local r table.sort({2, 1}, function(a, b) r = r or table.pack(f()) return a < b end) "
            "return table.unpack(r, 1, r.n) end",
    "__index": "function(f) local t = setmetatable({}, {__index = function() return table.pack(f()) end}) "
               "local r = t.x return table.unpack(r, 1, r.n) end",
    "__close": "function(f) local r do local c <close> = setmetatable({}, {__close = function() r = table.pack(f()) "
               "end}) end return table.unpack(r, 1, r.n) end",
    "xpcall handler": "function(f) local r xpcall(error, function() r = table.pack(f()) end) "
                      "return table.unpack(r, 1, r.n) end",
}
FAITHFUL_ERRORS = {"direct", "coroutine", "nested coroutine", "gsub", "sort", "__index", "__close"}
# Contexts a blocking syscall can yield from (the others are C calls: "attempt to yield across a C-call boundary").
CAN_BLOCK = {"direct", "coroutine", "nested coroutine", "__index", "__close"}
UNKNOWN_KEYS = ["timeout", "tga", "Timeout_ms", "bogus", "1"]

PRELUDE = r"""
local C, P, N = args.collector, args.pids, args.names
local function clean(v)
  local s = tostring(v)
  if #s > 1500 then s = s:sub(1, 1500) end
  return (s:gsub('[^ -~]', function(c) return string.format('\\x%02x', c:byte()) end))
end
local function report(i, ok, x)
  local r = {i = i, ok = ok}
  if not ok then r.err = clean(x) r.errtype = type(x)
  elseif math.type(x) == 'integer' then r.ret = x end
  pcall(sys.send, C, r, {tag = 'call'})
end
local ctx = {}
"""


@dataclass
class Arg(Shown):
    src: str
    label: str
    refused: str = ""       # why a call with it must fail ("" if it need not)
    blocks: bool = False    # as a duration: may wait without bound (or long)

    def __repr__(self) -> str:
        return self.label


@dataclass
class Step(Shown):
    """One pcall'd statement of the program."""

    kind: str               # "call", or a round trip: "port", "self", "args", "return", "exit"
    fname: str = ""         # the sys function (calls)
    args: list[Arg] = field(default_factory=list)
    context: str = "direct"
    value: LuaValue | None = None  # round trips
    refusals: list[str] = field(default_factory=list)
    blocks: bool = False    # may wait without bound: the program's last step

    def body(self, i: int) -> str:
        if self.kind == "call":
            return f"return {self.fname}({', '.join(a.src for a in self.args)})"
        v = self.value.src if self.value else "nil"
        if self.kind == "port":
            return f"return sys.send(C, {v}, {{tag = 'rt', correlation_id = 'rt{i}'}})"
        if self.kind == "self":
            return (f"sys.send(sys.self(), {v}, {{correlation_id = 'rs{i}'}}) "
                    f"local m = sys.recv{{correlation_id = 'rs{i}', timeout_ms = 0}} "
                    f"if m == nil then error('LOST: sent to itself, not received', 0) end "
                    f"return sys.send(C, m.body, {{tag = 'rs', correlation_id = 'rs{i}'}})")
        if self.kind == "args":
            return f"return sys.spawn{{lua = 'return args', args = {v}}}"
        child = f"return {v}" if self.kind == "return" else f"sys.exit({v})"
        return f"return sys.spawn{{lua = {_long_string(child)}}}"

    def __repr__(self) -> str:
        if self.kind == "call":
            return f"{self.fname}({', '.join(map(repr, self.args))}) in {self.context}"
        return f"{self.kind} round trip of {self.value!r}"


def _long_string(text: str) -> str:
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    eq = "=" * level
    return f"[{eq}[{text}]{eq}]"


@dataclass
class Program(Shown):
    steps: list[Step]

    def source(self) -> str:
        lines = [PRELUDE]
        for name, fn in CONTEXTS.items():
            lines.append(f"ctx[{name!r}] = {fn}")
        for i, s in enumerate(self.steps, 1):
            lines.append(f"do local r = table.pack(pcall(ctx[{s.context!r}], function() {s.body(i)} end)) "
                         f"report({i}, r[1], r[2]) end")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return "Program[" + "; ".join(f"{i}: {s!r}" for i, s in enumerate(self.steps, 1)) + "]"


# -- arguments ----------------------------------------------------------------------------
def _value_arg(v: LuaValue) -> Arg:
    refused = f"the value model refuses {v!r}" if v.fate in (Fate.INVALID, Fate.TOO_BIG) else ""
    return Arg(v.src, repr(v), refused)


def targets(npids: int, nnames: int, string_ok: bool = False) -> st.SearchStrategy[Arg]:
    """Pids of the example's processes, itself, names, and pids that cannot be."""
    fine = [Arg("sys.self()", "self")] + [Arg(f"P[{k}]", f"P[{k}]") for k in range(1, npids + 1)]
    names = [Arg(f"N[{k}]", f"N[{k}]", "" if string_ok else "a name where a pid is wanted")
             for k in range(1, nnames + 1)]
    bad = [Arg("0", "0", "pid 0 is unset"), Arg("-1", "-1", "a negative pid"),
           Arg("9007199254740993", "2^53+1", "a pid beyond 2^53"),
           Arg("math.maxinteger", "maxinteger", "a pid beyond 2^53"),
           Arg("2^64", "2^64", "a pid beyond 2^53"), Arg("0/0", "NaN", "NaN is no pid"),
           Arg("math.huge", "inf", "inf is no pid"), Arg("1.5", "1.5", "1.5 is no pid"),
           Arg("{}", "{}", "a table is no pid"),
           Arg("print", "print", "a function is no pid"),
           Arg("'nobody'", "'nobody'", "" if string_ok else "a string where a pid is wanted"),
           Arg('"\\xff"', "'\\xff'", "not UTF-8" if string_ok else "a string where a pid is wanted")]
    return st.one_of(st.sampled_from(fine + names), st.sampled_from(bad))


SHORT_DURATIONS = [
    Arg("0", "0"), Arg("1", "1"), Arg("5", "5"), Arg("20", "20"), Arg("2.5", "2.5"), Arg("-0.0", "-0.0"),
    Arg("-1", "-1", "a negative duration"), Arg("0/0", "NaN", "a NaN duration"),
    Arg("-math.huge", "-inf", "a negative duration"), Arg("{}", "{}", "a table as a duration"),
]
LONG_DURATIONS = [
    Arg("math.huge", "inf", blocks=True), Arg("1e300", "1e300", blocks=True), Arg("2^63", "2^63", blocks=True),
    Arg("math.maxinteger", "maxinteger", blocks=True), Arg(str(MAX_DURATION_MS + 1), "10 years + 1 ms", blocks=True),
]


def durations(quick: bool, nil_blocks: bool = False) -> st.SearchStrategy[Arg]:
    """Durations in ms; `quick`: none that may wait long (nor nil, where nil waits for ever)."""
    if quick:
        return st.sampled_from(SHORT_DURATIONS)
    return st.sampled_from(SHORT_DURATIONS + LONG_DURATIONS + [Arg("nil", "nil", blocks=nil_blocks)])


def texts() -> st.SearchStrategy[Arg]:
    return st.sampled_from([
        Arg("'fz'", "'fz'"), Arg("''", "''"), Arg('"\\u{202E}x"', "U+202E"), Arg('"a\\u{85}b"', "U+0085"),
        Arg('"\\xff"', "'\\xff'"), Arg('"a\\0b"', "'a\\0b'"), Arg("string.rep('n', 256)", "'n'*256"),
        Arg("string.rep('n', 257)", "'n'*257"), Arg("string.rep('\\u{65E5}', 256)", "'日'*256"),
        Arg("string.rep('z', 2^20)", "'z'*2^20"), Arg("42", "42"), Arg("{}", "{}"), Arg("nil", "nil"),
        Arg("'a/b'", "'a/b'"), Arg("'..'", "'..'"), Arg("' '", "' '"), Arg("'\\t'", "TAB"),
    ])


def text_field(raw_ok: bool = False) -> st.SearchStrategy[Arg]:
    """Texts for an option that must be text (or, with raw_ok, bytes): a table is
    refused, and so is a string that is not UTF-8 where it will be returned as text."""
    def judge(a: Arg) -> Arg:
        if a.src == "{}":
            return Arg(a.src, a.label, "a table where a string is wanted")
        if a.src == '"\\xff"' and not raw_ok:
            return Arg(a.src, a.label, "text that is not UTF-8")
        return a
    return texts().map(judge)


def _name_refusal(arg: Arg) -> str:
    """Names (DECISIONS.md): 1..256 printable characters."""
    fixed = {"'fz'": "fz", "''": "", '"\\u{202E}x"': "\u202ex", '"a\\u{85}b"': "a\x85b", '"a\\0b"': "a\x00b",
             "string.rep('n', 256)": "n" * 256, "string.rep('n', 257)": "n" * 257,
             "string.rep('\\u{65E5}', 256)": "日" * 256, "string.rep('z', 2^20)": "z" * (1 << 20), "'a/b'": "a/b",
             "'..'": "..", "' '": " ", "'\\t'": "\t"}
    if arg.src in fixed:
        return "" if name_is_valid(fixed[arg.src]) else f"the name {arg.label} is not 1..256 printable characters"
    return f"{arg.label} is no name"


def _option_table(draw: Any, keys: dict[str, st.SearchStrategy[Arg]], fname: str,
                  required: tuple[str, ...] = ()) -> tuple[Arg, list[str], list[Arg]]:
    """(the table, unknown keys in it, the values given per known key)."""
    chosen = list(required) + draw(st.lists(st.sampled_from(sorted(set(keys) - set(required))), unique=True,
                                            max_size=len(keys)))
    unknown = draw(st.lists(st.sampled_from(UNKNOWN_KEYS), unique=True, max_size=1))
    parts, labels, given = [], [], []
    for key in chosen:
        a = draw(keys[key])
        given.append(Arg(a.src, f"{key}={a.label}", a.refused and f"{fname} {key}: {a.refused}", a.blocks))
        parts.append(f"[{key!r}] = {a.src}")
        labels.append(f"{key}={a.label}")
    for key in unknown:
        parts.append(f"[{key!r}] = 10")
        labels.append(f"{key}=10")
    return Arg("{" + ", ".join(parts) + "}", "{" + ", ".join(labels) + "}"), unknown, given


# -- steps ------------------------------------------------------------------------------------
MAY_WAIT = {"sys.recv", "sys.wait", "sys.sleep", "sys.infer", "sys.lock.acquire", "sys.exit", "sys.context.create"}
SMALL_PROGRAMS = ["return 1", "sys.recv{}", "error('child')", "return math.maxinteger", "while true do end",
                  "return args", "sys.sleep(1e300)"]


@st.composite
def call_step(draw: Any, fname: str, npids: int, nnames: int, quick: bool = False) -> Step:
    """A call of `fname` with arguments chosen for what it takes; `quick`: with none that
    lets it wait long (it is not the program's last step)."""
    ctx = draw(st.sampled_from(sorted(CONTEXTS)))
    step = Step("call", fname, context=ctx)
    value = st.one_of(lua_values(), st.sampled_from(LUA_SCALARS))

    def add(arg: Arg) -> Arg:
        step.args.append(arg)
        if arg.refused:
            step.refusals.append(arg.refused)
        return arg

    def options(keys: dict[str, st.SearchStrategy[Arg]], required: tuple[str, ...] = ()) -> None:
        table, unknown, given = _option_table(draw, keys, fname, required if quick else ())
        step.args.append(table)
        step.refusals.extend(f"unknown option {k}" for k in unknown)
        step.refusals.extend(g.refused for g in given if g.refused)
        step.blocks |= any(g.blocks for g in given)

    if fname in ("sys.self", "sys.now"):
        for v in draw(st.lists(value, max_size=2)):
            step.args.append(_value_arg(v))  # extra arguments are ignored
    elif fname == "sys.send":
        add(draw(targets(npids, nnames, string_ok=True)))
        add(_value_arg(draw(value)))
        options({"tag": text_field(), "data": text_field(raw_ok=True), "correlation_id": text_field()})
    elif fname == "sys.recv":
        to = targets(npids, nnames)
        options({"from": to, "tag": texts(), "correlation_id": texts(), "timeout_ms": durations(quick, True),
                 "ack": st.sampled_from([Arg("true", "true"), Arg("false", "false"),
                                         Arg("1", "1", "ack must be a boolean")]),
                 "lease_ms": durations(quick)},
                required=("timeout_ms",))
        src = step.args[0].src
        if "['lease_ms']" in src and "['ack'] = true" not in src:
            step.refusals.append("lease_ms without ack = true")
        if "timeout_ms" not in src:
            step.blocks = True  # no timeout: waits for a message
    elif fname == "sys.wait":
        add(draw(targets(npids, nnames)))
        d = add(draw(durations(quick, nil_blocks=True)))
        step.blocks = d.blocks or d.src == "nil"
        if step.args[0].src == "sys.self()":
            step.refusals.append("a process cannot wait for itself")
    elif fname == "sys.sleep":
        d = add(draw(durations(quick)))
        step.blocks = d.blocks
        if d.src == "nil":
            step.refusals.append("sys.sleep needs a duration")
    elif fname == "sys.kill":
        add(draw(targets(npids, nnames).filter(lambda a: a.src != "sys.self()")))
        add(draw(texts()))
    elif fname in ("sys.register", "sys.whereis"):
        name = add(draw(texts()))
        reason = _name_refusal(name)
        if fname == "sys.register" and reason:
            step.refusals.append(reason)
    elif fname == "sys.monitor":
        add(draw(targets(npids, nnames)))
    elif fname == "sys.set_priority":
        add(draw(st.one_of(st.just(Arg("nil", "nil")), st.just(Arg("sys.self()", "self")), targets(npids, nnames))))
        prio = draw(st.sampled_from([("0", ""), ("-20", ""), ("-5", ""), ("21", "above 20"), ("-21", "below -20"),
                                     ("1e15", "above 20"), ("-1e15", "below -20"), ("0/0", "NaN"),
                                     ("2.5", "not an integer"), ("math.maxinteger", "above 20"), ("nil", "")]))
        add(Arg(prio[0], prio[0], prio[1] and f"priority {prio[0]}: {prio[1]}"))
        weight = draw(st.sampled_from([("nil", ""), ("0", ""), ("1", ""), ("10000", ""), ("10001", "above 10000"),
                                       ("-1", "negative"), ("1e15", "above 10000"), ("0/0", "NaN")]))
        add(Arg(weight[0], weight[0], weight[1] and f"weight {weight[0]}: {weight[1]}"))
        if prio[0] == "nil" and weight[0] in ("nil", "0"):
            step.refusals.append("neither a priority nor a weight")
    elif fname == "sys.info":
        add(draw(st.one_of(st.just(Arg("nil", "nil")), targets(npids, nnames))))
    elif fname == "sys.log":
        for v in draw(st.lists(st.one_of(value, st.sampled_from(LUA_SHAPES)), max_size=3)):
            step.args.append(Arg(v.src, repr(v)))  # sys.log takes anything, as print does
    elif fname == "sys.exit":
        assert not quick, "sys.exit ends the program: only as its last step"
        v = draw(value)
        step.args.append(Arg(v.src, repr(v)))
        step.value = v
        step.blocks = True  # the program ends here
    elif fname == "sys.spawn":
        prio = st.sampled_from([Arg("0", "0"), Arg("-3", "-3"), Arg("21", "21", "priority above 20"),
                                Arg("1000", "1000", "priority above 20"), Arg("1e15", "1e15", "priority above 20"),
                                Arg("0/0", "NaN", "a NaN priority")])
        limits = st.sampled_from([
            Arg("{}", "{}"), Arg("{cpu_ms = 50}", "{cpu_ms=50}"), Arg("{wall_ms = 2^64}", "{wall_ms=2^64}"),
            Arg("{memory_bytes = 4 * 2^30}", "{memory_bytes=4GiB}"), Arg("{mailbox = 0}", "{mailbox=0}"),
            Arg("{cpu_ms = -1}", "{cpu_ms=-1}", "a negative limit"),
            Arg("{cpu_ms = 0/0}", "{cpu_ms=NaN}", "a NaN limit"),
            Arg("{wall_ms = math.huge}", "{wall_ms=inf}"), Arg("{bogus = 1}", "{bogus=1}", "an unknown limit"),
        ])
        options({
            "lua": st.sampled_from([Arg(_long_string(p), repr(p)) for p in SMALL_PROGRAMS]),
            "args": value.map(_value_arg), "name": texts(), "priority": prio,
            "weight": st.sampled_from([Arg("0", "0"), Arg("100", "100"), Arg("10001", "10001", "weight above 10000")]),
            "limits": limits, "monitor": st.sampled_from([Arg("true", "true"), Arg("false", "false")]),
        }, required=("lua",))
        src = step.args[0].src
        if "['lua']" not in src:
            step.refusals.append("no program")
        step.blocks = False
    elif fname == "sys.infer":
        options({
            "prompt": texts(), "max_tokens": st.sampled_from([Arg("1", "1"), Arg("4", "4"), Arg("0", "0"),
                                                              Arg("-1", "-1", "negative max_tokens")]),
            "temperature": st.sampled_from([Arg("0", "0"), Arg("0/0", "NaN"), Arg("-1", "-1"), Arg("1e300", "1e300")]),
            "top_k": st.sampled_from([Arg("1", "1"), Arg("-1", "-1"), Arg("2^40", "2^40")]),
            "seed": st.sampled_from([Arg("1", "1"), Arg("math.maxinteger", "maxinteger"), Arg("-1", "-1")]),
            "stop": st.sampled_from([Arg("{'a'}", "{'a'}"), Arg("{''}", "{''}"), Arg("{{}}", "{{}}")]),
            "timeout_ms": durations(quick),
            "json_schema": st.sampled_from([Arg("{type = 'object'}", "{type=object}"),
                                            Arg("{type = 'bogus'}", "{type=bogus}", "a bad schema")]),
            "regex": st.sampled_from([Arg("'[0-9]+'", "'[0-9]+'"), Arg("'('", "'('", "a bad regex")]),
            "context": st.sampled_from([Arg("1", "1"), Arg("0", "0", "not a context handle"),
                                        Arg("2^60", "2^60", "no such context")]),
        }, required=("timeout_ms", "prompt"))
        step.blocks = not quick  # a long generation goes last
    elif fname == "sys.context.create":
        options({
            "messages": st.sampled_from([Arg("{{role = 'user', content = 'hi'}}", "one user message"),
                                         Arg("{}", "{}", "no messages"),
                                         Arg("{{role = 'robot', content = 'x'}}", "role robot", "an unknown role")]),
            "tools": st.sampled_from([Arg("{{name = 't'}}", "one tool"),
                                      Arg("{{name = 'a b'}}", "a tool named 'a b'", "a bad tool name")]),
        }, required=("messages",))
        step.blocks = not quick  # a prefill
    elif fname in ("sys.context.fork", "sys.context.drop"):
        add(draw(st.sampled_from([Arg("1", "1"), Arg("0", "0", "not a context handle"),
                                  Arg("-1", "-1", "not a context handle"), Arg("2^60", "2^60", "no such context"),
                                  Arg("'x'", "'x'", "not a context handle"), Arg("nil", "nil", "no handle")])))
    elif fname.startswith("sys.fs."):
        op = fname.rsplit(".", 1)[1]
        path = draw(_paths())
        step.args.append(path)
        if path.refused and (op in ("write", "mkdir") or path.src in ("{}", "nil")):
            step.refusals.append(path.refused)  # a name is checked where it is made; a non-string everywhere
        if op == "write":
            data = draw(texts())
            add(Arg(data.src, data.label, "data must be a string" if data.src in ("{}", "42", "nil") else ""))
            options({"append": st.sampled_from([Arg("true", "true"), Arg("false", "false")])})
        elif op == "read":
            options({"offset": st.sampled_from([Arg("0", "0"), Arg("-1", "-1", "a negative offset"),
                                                Arg("2^63", "2^63")]),
                     "length": st.sampled_from([Arg("1", "1"), Arg("-1", "-1", "a negative length"),
                                                Arg("math.maxinteger", "maxinteger")])})
        elif op == "rename":
            target = add(draw(_paths()))
            if target.refused:
                step.refusals.append(target.refused)
    elif fname.startswith("sys.lock."):
        op = fname.rsplit(".", 1)[1]
        name = add(draw(texts()))
        reason = _name_refusal(name)
        if reason and op != "release":
            step.refusals.append(reason)
        if op != "release":
            options({"semaphore": st.sampled_from([Arg("1", "1"), Arg("3", "3"), Arg("0", "0"),
                                                   Arg("-1", "-1", "a negative semaphore"),
                                                   Arg("2^40", "2^40")]),
                     "timeout_ms": durations(quick)}, required=("timeout_ms",))
            step.blocks |= op == "acquire" and not quick
    elif fname.startswith("sys.cond."):
        name = add(draw(texts()))
        reason = _name_refusal(name)
        if reason:
            step.refusals.append(reason)
        if fname == "sys.cond.wait":  # with a lock no other step takes, so never held: always refused
            add(draw(st.sampled_from([Arg("'fz-cond-lock'", "'fz-cond-lock'"), Arg("nil", "nil")])))
            add(draw(durations(quick)))
            step.refusals.append("the caller does not hold the lock")
    elif fname in ("sys.ack", "sys.nack"):  # nothing is ever leased with these ids: always refused
        add(draw(st.sampled_from([Arg("0", "0"), Arg("-1", "-1"), Arg("123456789", "123456789"), Arg("2^53", "2^53"),
                                  Arg("{id = 7}", "{id=7}"), Arg("{}", "{}"), Arg("nil", "nil"), Arg("'x'", "'x'")])))
        step.refusals.append("no lease on that message")
    else:
        raise KeyError(f"the fuzzer has no strategy for {fname}: add one to lua_programs.call_step")
    if draw(st.integers(0, 9)) == 0 and not (quick and fname in MAY_WAIT):  # now and then: anything at all
        step.args = [_value_arg(v) for v in draw(st.lists(value, max_size=4))]
        step.refusals = []
        step.blocks = fname in MAY_WAIT  # whatever it now waits for
    if ctx not in CAN_BLOCK and step.blocks:
        step.blocks = False  # it cannot block there: it fails at once
    return step


def _paths() -> st.SearchStrategy[Arg]:
    return st.sampled_from([
        Arg("'fz/lua.txt'", "'fz/lua.txt'"), Arg("'fz/\\u{202E}txt.exe'", "'fz/U+202E'", "a non-printable name"),
        Arg("'fz/a\\u{85}b'", "'fz/U+0085'", "a non-printable name"),
        Arg("'fz/a\\nb'", "'fz/a\\nb'", "a control character"),
        Arg("'../../etc/passwd'", "'../../etc/passwd'"), Arg("'/etc/passwd'", "'/etc/passwd'"), Arg("''", "''"),
        Arg("'fz/\\xff'", "'fz/\\xff'", "not UTF-8"), Arg("'a\\0b'", "'a\\0b'", "a NUL"),
        Arg("string.rep('d/', 40) .. 'f'", "40 levels"), Arg("string.rep('n', 300)", "'n'*300"),
        Arg("{}", "{}", "a path must be a string"), Arg("nil", "nil", "a path must be a string"),
    ])


@st.composite
def round_trip(draw: Any) -> Step:
    kind = draw(st.sampled_from(["port", "self", "args", "return", "exit"]))  # "exit": a child's sys.exit(value)
    return Step(kind, value=draw(lua_values()))


SYS_FUNCTIONS = [
    "sys.self", "sys.now", "sys.send", "sys.recv", "sys.wait", "sys.sleep", "sys.kill", "sys.register", "sys.whereis",
    "sys.monitor", "sys.set_priority", "sys.info", "sys.log", "sys.exit", "sys.spawn", "sys.infer",
    "sys.fs.write", "sys.fs.read", "sys.fs.stat", "sys.fs.list", "sys.fs.delete", "sys.fs.rename", "sys.fs.mkdir",
    "sys.lock.acquire", "sys.lock.try_acquire", "sys.lock.release",
    "sys.cond.wait", "sys.cond.signal", "sys.cond.broadcast", "sys.ack", "sys.nack",
    "sys.context.create", "sys.context.fork", "sys.context.drop",
]
# Lists every function reachable from `sys`, for the check that each has a strategy.
LIST_SYS = """
local out = {}
local function walk(t, prefix)
  for k, v in pairs(t) do
    if type(v) == 'function' then out[#out + 1] = prefix .. k
    elseif type(v) == 'table' then walk(v, prefix .. k .. '.') end
  end
end
walk(sys, 'sys.')
return out
"""


@st.composite
def programs(draw: Any, npids: int, nnames: int) -> Program:
    """Every sys function once (sys.exit is the round trips' children's), in a random
    order, with arguments that cannot make it wait long; value round trips; and now and
    then a last call of anything that may wait for ever (or end the program)."""
    order = draw(st.permutations([f for f in SYS_FUNCTIONS if f != "sys.exit"]))
    steps = [draw(call_step(f, npids, nnames, quick=True)) for f in order]
    for _ in range(draw(st.integers(1, 4))):
        steps.insert(draw(st.integers(0, len(steps))), draw(round_trip()))
    if draw(st.booleans()):
        steps.append(draw(call_step(draw(st.sampled_from(SYS_FUNCTIONS)), npids, nnames)))
    return Program(steps)
