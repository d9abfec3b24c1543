"""Escape and abuse attempts against the Lua sandbox, each run as a real Lua
process over gRPC. Every attempt must fail inside the sandbox (the process
crashes, is killed with the right reason, or simply finds nothing), while the
server and a concurrently running well-behaved process carry on."""
from __future__ import annotations

import time
from typing import Any, Iterator

import grpc
import pytest

from llmos.v1 import kernel_pb2 as pb
from llmos.v1 import kernel_pb2_grpc
from llmos.values import from_value, to_value

MiB = 1 << 20
SMALL_MEMORY = 16 * MiB
WAIT_MS = 20_000


# -- helpers ----------------------------------------------------------------------------------
def spawn(stub: Any, lua: str, args: Any = None, **kw: Any) -> int:
    req = pb.SpawnRequest(lua=lua, **kw)
    if args is not None:
        req.args.CopyFrom(to_value(args))
    return stub.Spawn(req).pid


def wait(stub: Any, pid: int, timeout_ms: int = WAIT_MS) -> pb.ProcessInfo:
    resp = stub.Wait(pb.WaitRequest(pid=pid, timeout_ms=timeout_ms))
    if resp.timed_out:
        stub.Kill(pb.KillRequest(pid=pid, reason="test timeout"))
    assert not resp.timed_out, f"pid {pid} did not end within {timeout_ms} ms"
    return resp.process


def describe(info: pb.ProcessInfo) -> str:
    return f"{pb.ProcessState.Name(info.state)} reason={info.exit_reason!r} error={info.error!r}"


def exited(info: pb.ProcessInfo) -> Any:
    assert info.state == pb.EXITED and info.exit_reason == "normal", describe(info)
    return from_value(info.result)


def crashed(info: pb.ProcessInfo, *fragments: str) -> str:
    assert info.state == pb.CRASHED and info.exit_reason == "error", describe(info)
    for fragment in fragments:
        assert fragment in info.error, describe(info)
    return info.error


def killed(info: pb.ProcessInfo, reason: str) -> None:
    assert info.state == pb.KILLED and info.exit_reason == reason, describe(info)


class Bystander:
    """A well-behaved process started before an attack and checked after it:
    it blocks until told to go, then does some work and answers."""

    SOURCE = """
        local go = sys.recv{tag = 'go', timeout_ms = 60000}
        if not go then return 'never told' end
        local t = {}
        for i = 1, 2000 do t[i] = ('%d'):format(i * i) end
        local up = ('still fine'):upper()
        return {n = #table.concat(t, ','), up = up, sum = go.body + 1}
    """

    def __init__(self, stub: Any) -> None:
        self.stub = stub
        self.pid = spawn(stub, self.SOURCE)
        self.port = stub.OpenPort(pb.OpenPortRequest()).pid

    def check(self) -> None:
        stub = self.stub
        req = pb.SendRequest(to=self.pid, tag="go", body=to_value(41), **{"from": self.port})
        stub.Send(req)
        out = exited(wait(stub, self.pid))
        assert out == {"n": 14_542, "up": "STILL FINE", "sum": 42}
        # And the server still answers and runs new programs.
        assert exited(wait(stub, spawn(stub, "return 'alive'"))) == "alive"
        stub.Kill(pb.KillRequest(pid=self.port))


@pytest.fixture
def bystander(stub: Any) -> Iterator[Bystander]:
    b = Bystander(stub)
    yield b
    b.check()


def run(stub: Any, lua: str, args: Any = None, timeout_ms: int = WAIT_MS, **limits: int) -> pb.ProcessInfo:
    kw = {"limits": pb.Limits(**limits)} if limits else {}
    return wait(stub, spawn(stub, lua, args, **kw), timeout_ms)


# A Lua helper, prepended to programs: walks any value (through keys, values and
# metatables) and reports the types found and the paths of userdata (what a
# leaked Python object looks like in lupa), threads and metatables.
WALK = """
local function walk(root, label)
  local seen, types, odd = {}, {}, {}
  local function visit(v, path, depth)
    local t = type(v)
    types[t] = true
    if t == 'userdata' or t == 'thread' then
      odd[#odd + 1] = path .. ':' .. t
    end
    if t == 'table' and not seen[v] and depth < 20 then
      seen[v] = true
      local mt = getmetatable(v)
      if mt ~= nil then odd[#odd + 1] = path .. ':metatable' visit(mt, path .. '<mt>', depth + 1) end
      for k, x in pairs(v) do
        visit(k, path .. '<key>', depth + 1)
        visit(x, path .. '.' .. tostring(k), depth + 1)
      end
    end
  end
  visit(root, label, 0)
  local names = {}
  for t in pairs(types) do names[#names + 1] = t end
  table.sort(names)
  return names, odd
end
"""


# -- the catalogue ----------------------------------------------------------------------------
def test_python_is_unreachable(stub: Any, bystander: Bystander) -> None:
    out = exited(run(stub, """
        local found = {}
        for _, name in ipairs{'python', 'lupa', 'eval', 'builtins', 'import', 'package'} do
          if _G[name] ~= nil or _ENV[name] ~= nil or rawget(_G, name) ~= nil then found[#found + 1] = name end
        end
        return {found = found, n = #found}
    """))
    assert out == {"found": {}, "n": 0}


def test_globals_walk_finds_only_the_whitelist(stub: Any, bystander: Bystander) -> None:
    out = exited(run(stub, WALK + """
        local globals = {}
        for k in pairs(_G) do globals[#globals + 1] = k end
        table.sort(globals)
        local types, odd = walk(_G, '_G')
        local os_names = {}
        for k in pairs(os) do os_names[#os_names + 1] = k end
        table.sort(os_names)
        return {globals = globals, types = types, odd = odd, env_is_g = _ENV == _G, os = os_names}
    """))
    assert set(out["globals"]) <= {
        "_G", "_VERSION", "args", "assert", "collectgarbage", "coroutine", "error", "getmetatable", "ipairs",
        "load", "math", "next", "os", "pairs", "pcall", "print", "rawequal", "rawget", "rawlen", "rawset",
        "require", "select", "setmetatable", "string", "sys", "table", "tonumber", "tostring", "type", "utf8", "xpcall",
    }
    for absent in ("io", "debug", "package", "dofile", "loadfile", "loadstring", "python"):
        assert absent not in out["globals"]
    assert out["os"] == ["clock", "date", "difftime", "time"]
    assert out["odd"] == {} and "userdata" not in out["types"] and "thread" not in out["types"]
    assert out["env_is_g"] is True


@pytest.mark.parametrize("lua, fragment", [
    ("return io.open('/etc/passwd')", "attempt to index a nil value (global 'io')"),
    ("return os.execute('id')", "attempt to call a nil value (field 'execute')"),
    ("return os.exit(1)", "attempt to call a nil value (field 'exit')"),
    ("return os.getenv('HOME')", "attempt to call a nil value (field 'getenv')"),
    ("return os.remove('/tmp/x')", "attempt to call a nil value (field 'remove')"),
    ("return debug.getregistry()", "attempt to index a nil value (global 'debug')"),
    ("return require('os')", "require: module 'os' not found in the userland library"),  # only the library's modules
    ("return package.loadlib('libc.so.6', 'system')", "attempt to index a nil value (global 'package')"),
    ("return dofile('/etc/passwd')", "attempt to call a nil value (global 'dofile')"),
    ("return loadfile('/etc/passwd')", "attempt to call a nil value (global 'loadfile')"),
    ("return string.dump(function() end)", "attempt to call a nil value (field 'dump')"),
    ("return (''):dump()", "attempt to call a nil value (method 'dump')"),
], ids=["io", "os.execute", "os.exit", "os.getenv", "os.remove", "debug", "require", "package",
        "dofile", "loadfile", "string.dump", "method dump"])
def test_dangerous_library_functions_are_absent(stub: Any, bystander: Bystander, lua: str, fragment: str) -> None:
    crashed(run(stub, lua), fragment)


def test_syscall_results_are_plain_lua_values(stub: Any, bystander: Bystander) -> None:
    out = exited(run(stub, WALK + """
        local me = sys.self()
        sys.send(me, {a = {1, 2, {b = 'c'}}, n = 1.5, t = true}, {tag = 't', data = '\\0\\255', correlation_id = 'x'})
        local msg = sys.recv{timeout_ms = 5000}
        local child = sys.spawn{lua = 'return {1, 2}'}
        sys.sleep(1)
        local ended = nil
        for i = 1, 200 do ended = sys.info(child) if ended.state ~= 'RUNNABLE' and ended.state ~= 'RUNNING' then break end sys.sleep(5) end
        local values = {
          self = me, msg = msg, info = sys.info(), spawn = child, ended = ended,
          whereis = sys.whereis('no such name'), register = sys.register('sandbox-walk-' .. me),
          monitor = sys.monitor(child), kill = sys.kill(child), prio = sys.set_priority(me, 0),
          sleep = sys.sleep(0), timeout = sys.recv{tag = 'never', timeout_ms = 0},
        }
        local types, odd = walk(values, 'values')
        -- Attribute walks that reach Python objects in lupa: all must find nothing.
        local probes = {}
        for _, attr in ipairs{'__class__', '__dict__', '__globals__', '__init__', '__getattribute__'} do
          for _, v in ipairs{msg, msg.body, values.info, values.info.usage} do
            local ok, r = pcall(function() return v[attr] end)
            if not ok or r ~= nil then probes[#probes + 1] = attr .. '=' .. tostring(r) end
          end
        end
        return {types = types, odd = odd, probes = probes, kinds = {type(me), type(msg), type(msg.data), type(child),
                type(values.register), type(values.kill), type(values.sleep), type(values.whereis)}}
    """))
    assert out["odd"] == {} and out["probes"] == {}
    assert set(out["types"]) <= {"boolean", "number", "string", "table", "nil"}
    assert out["kinds"] == ["number", "table", "string", "number", "boolean", "boolean", "boolean", "nil"]


def test_errors_from_failing_syscalls_are_plain_strings(stub: Any, bystander: Bystander) -> None:
    out = exited(run(stub, """
        local calls = {
          function() return sys.send(nil, 1) end,
          function() return sys.send({}, 1) end,
          function() return sys.send(10^12, 1) end,
          function() return sys.send(sys.self(), print) end,
          function() return sys.spawn{lua = 1} end,
          function() return sys.spawn{lua = 'return = 1'} end,
          function() return sys.spawn{nonsense = true} end,
          function() return sys.spawn(5) end,
          function() return sys.recv{timeout_ms = -1} end,
          function() return sys.recv{from = 'x'} end,
          function() return sys.recv(7) end,
          function() return sys.wait('x') end,
          function() return sys.wait(sys.self()) end,
          function() return sys.kill({}) end,
          function() return sys.kill(10^12) end,
          function() return sys.info('x') end,
          function() return sys.monitor(nil) end,
          function() return sys.register('') end,
          function() return sys.set_priority(nil, 'high') end,
          function() return sys.sleep(-1) end,
          function() return sys.infer{prompt = ''} end,
          function() return sys.infer() end,
          function() return sys.infer(42) end,
          function() return sys.lock.acquire('l', 5) end,
          function() return sys.lock.try_acquire('l', {semaphore = 'two'}) end,
          function() return sys.lock.acquire('l', {timeout_ms = -5}) end,
          function() return sys.fs.read('f', 'not options') end,
          function() return sys.fs.write('f', 'data', {1, 2}) end,
          function() return sys.fs.read({}) end,
          function() return sys.kill('x', 'y', 'extra', 'arguments') end,
          -- with an empty mailbox, recv goes straight to the kernel, which checks the same
          function() sys.send(sys.self(), 1) sys.recv{} return sys.recv{timeout_ms = -1} end,
          function() sys.send(sys.self(), 1) sys.recv{} return sys.recv{from = 'x'} end,
        }
        local out = {}
        for i, f in ipairs(calls) do
          local ok, err = pcall(f)
          out[i] = {ok = ok, kind = type(err), err = err,
                    -- a Python exception object would have these; a string has none
                    tb = type(err) == 'string' and (err.__traceback__ == nil and err.with_traceback == nil)}
        end
        return out
    """))
    assert len(out) == 32
    for i, item in enumerate(out):
        assert item["ok"] is False and item["kind"] == "string" and item["tb"] is True, (i, item)
        assert item["err"], (i, item)


def test_binary_chunks_are_refused(stub: Any, bystander: Bystander) -> None:
    out = exited(run(stub, """
        local hand_made = '\\27LuaT\\0\\25\\147\\r\\n\\26\\n\\4\\8\\8xV\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0(w@'
        local results = {}
        local function try(name, ...)
          local f, err = load(...)
          results[name] = {loaded = f ~= nil, err = tostring(err)}
        end
        try('mode b', hand_made, 'x', 'b')
        try('mode bt', hand_made, 'x', 'bt')
        try('default mode', hand_made)
        try('mode t', hand_made, 'x', 't')
        local parts, i = {'\\27Lu', 'aT\\0'}, 0
        try('reader', function() i = i + 1 return parts[i] end)
        return {results = results, dump = string.dump == nil}
    """))
    assert out["dump"] is True
    for name, r in out["results"].items():
        assert r["loaded"] is False, name
        assert "binary" in r["err"] or "only text chunks" in r["err"], (name, r)


def test_collectgarbage_control_is_refused(stub: Any, bystander: Bystander) -> None:
    out = exited(run(stub, """
        local out = {}
        for _, opt in ipairs{'stop', 'restart', 'incremental', 'generational', 'setpause', 'setstepmul', 'isrunning'} do
          local ok, err = pcall(collectgarbage, opt)
          out[#out + 1] = ok and 'allowed' or err
        end
        out[#out + 1] = type(collectgarbage('count'))
        return out
    """))
    assert out[:-1] == ["collectgarbage: only 'collect', 'count' and 'step' are allowed"] * 7
    assert out[-1] == "number"


def test_string_metatable_is_locked(stub: Any, bystander: Bystander) -> None:
    out = exited(run(stub, """
        local mt = getmetatable('')
        local ok1, e1 = pcall(setmetatable, '', {})
        local ok2, e2 = pcall(function() getmetatable('').__index = {upper = function() return 'pwned' end} end)
        return {mt = mt, ok1 = ok1, e1 = e1, ok2 = ok2, e2 = e2, upper = ('x'):upper()}
    """))
    assert out["mt"] is False
    assert out["ok1"] is False and "table expected, got string" in out["e1"]
    assert out["ok2"] is False and "attempt to index a boolean value" in out["e2"]
    assert out["upper"] == "X"


def test_library_tampering_does_not_leak_across_processes(stub: Any, bystander: Bystander) -> None:
    port = stub.OpenPort(pb.OpenPortRequest()).pid
    tamperer = spawn(stub, """
        string.upper = function() return 'pwned' end
        string.find = function() return 'pwned' end
        rawset(string, 'rep', function() return 'pwned' end)
        table.concat = function() return 'pwned' end
        math.floor = function() return 'pwned' end
        setmetatable(_G, {__index = function() return 'pwned' end})
        sys.send(args.port, ('abc'):upper(), {tag = 'tampered'})
        sys.recv{tag = 'done', timeout_ms = 10000}
        return ('abc'):upper()
    """, {"port": port})
    msg = stub.Recv(pb.RecvRequest(pid=port, tag="tampered", timeout_ms=10_000))
    assert from_value(msg.message.body) == "pwned"  # the tamperer did change its own state
    # While the tamperer is still alive, another process sees the real libraries.
    out = exited(run(stub, """
        return {('abc'):upper(), string.upper('abc'), ('abc'):find('b'), ('ab'):rep(2),
                table.concat({1, 2}, ','), math.floor(2.5), type(nonexistent_global)}
    """))
    assert out == ["ABC", "ABC", 2, "abab", "1,2", 2, "nil"]
    stub.Send(pb.SendRequest(to=tamperer, tag="done", **{"from": port}))
    assert exited(wait(stub, tamperer)) == "pwned"


MEMORY_BOMBS = {
    "string.rep": "return #string.rep('x', 1e9)",
    "table growth": "local t = {} for i = 1, 1e8 do t[i] = i end",
    "nested tables": "local t = {} while true do t = {t, {}, {}} end",
    "concatenation": "local s = 'x' while true do s = s .. s end",
    "many strings": "local t = {} local i = 0 while true do i = i + 1 t[i] = ('x'):rep(100) .. i end",
    "string.rep in pcall": "local ok, e = pcall(string.rep, 'x', 1e9) return {ok, e}",
    "table growth in a coroutine in pcall": """
        local f = coroutine.wrap(function() local t = {} while true do t[#t + 1] = ('x'):rep(1000) end end)
        return pcall(f)
    """,
    "deep recursion": "local function f(n) return 1 + f(n + 1) end return f(1)",
}


@pytest.mark.parametrize("lua", list(MEMORY_BOMBS.values()), ids=list(MEMORY_BOMBS))
def test_memory_bombs_are_killed_for_memory(stub: Any, bystander: Bystander, lua: str) -> None:
    info = run(stub, lua, memory_bytes=SMALL_MEMORY, cpu_ms=10_000)
    killed(info, "memory_limit")


def test_c_stack_recursion_crashes_cleanly(stub: Any, bystander: Bystander) -> None:
    crashed(run(stub, "local function f() coroutine.wrap(f)() end f()"), "stack overflow")
    crashed(run(stub, "local t = setmetatable({}, {}) getmetatable(t).__index = function(s, k) return s[k] end "
                      "return t.x"), "stack overflow")


PATHOLOGICAL_PATTERNS = {
    "find": "return string.find(subject, '.-.-.-.-b')",
    "method": "return subject:find('.-.-.-.-b')",
    "match": "return subject:match('(.-)(.-)(.-)b')",
    "gmatch": "for x in subject:gmatch('.-.-.-.-b') do end",
    "gsub": "return subject:gsub('a*a*a*a*b', '')",
    "in pcall": "return pcall(string.gsub, subject, 'a*a*a*a*b', '')",
}


@pytest.mark.parametrize("lua", list(PATHOLOGICAL_PATTERNS.values()), ids=list(PATHOLOGICAL_PATTERNS))
def test_pathological_patterns_run_metered_until_the_cpu_limit(stub: Any, bystander: Bystander, lua: str) -> None:
    """Backtracking that would take ages runs in C, metered: the CPU limit ends it."""
    killed(run(stub, "local subject = ('a'):rep(1e5) " + lua, cpu_ms=300), "cpu_limit")


def test_ordinary_patterns_work_on_long_subjects(stub: Any, bystander: Bystander) -> None:
    out = exited(run(stub, """
        local subject = ('a'):rep(1e5)
        local out = {}
        local text = ('word%d '):rep(2000):format(table.unpack((function() local t = {} for i = 1, 2000 do t[i] = i end return t end)()))
        local replaced, n = text:gsub('(%w+)', '<%1>')
        out.gsub_ok = n
        out.plain_find = (subject .. 'b'):find('ab', 1, true)
        out.words = select(2, text:gsub('%S+', ''))
        out.long_words = 0
        for _ in ('word '):rep(20000):gmatch('%S+') do out.long_words = out.long_words + 1 end
        out.anchored = #subject:match('^a*')
        return out
    """))
    assert out == {"gsub_ok": 2000, "words": 2000, "plain_find": 100_000, "long_words": 20_000, "anchored": 100_000}


INFINITE_LOOPS = {
    "plain": "while true do end",
    "in pcall": "pcall(function() while true do end end) while true do end",
    "pcall in a loop": "while true do pcall(function() while true do end end) end",
    "in a coroutine": "local co = coroutine.create(function() while true do end end) return coroutine.resume(co)",
    "in coroutine.wrap in pcall": "while true do pcall(coroutine.wrap(function() while true do end end)) end",
    "error rethrown by handler": "while true do xpcall(function() while true do end end, function(e) return e end) end",
    "to-be-closed variable": "local x <close> = setmetatable({}, {__close = function() while true do end end}) while true do end",
}


@pytest.mark.parametrize("lua", list(INFINITE_LOOPS.values()), ids=list(INFINITE_LOOPS))
def test_infinite_loops_hit_the_cpu_limit(stub: Any, bystander: Bystander, lua: str) -> None:
    killed(run(stub, lua, cpu_ms=200), "cpu_limit")


@pytest.mark.parametrize("lua", list(INFINITE_LOOPS.values()), ids=list(INFINITE_LOOPS))
def test_kill_from_outside_cannot_be_caught(stub: Any, bystander: Bystander, lua: str) -> None:
    pid = spawn(stub, lua)
    deadline = time.monotonic() + 10
    while stub.GetProcess(pb.GetProcessRequest(pid=pid)).state != pb.RUNNING:
        assert time.monotonic() < deadline, "the loop never ran"
        time.sleep(0.01)
    time.sleep(0.05)  # let it get deep into its loop
    stub.Kill(pb.KillRequest(pid=pid, reason="stop looping"))
    killed(wait(stub, pid, 5000), "stop looping")


def test_wall_limit_ends_a_sleeper(stub: Any, bystander: Bystander) -> None:
    killed(run(stub, "sys.sleep(60000)", wall_ms=100), "wall_limit")


def test_busy_loops_do_not_stall_other_processes(stub: Any, bystander: Bystander) -> None:
    loops = [spawn(stub, "while true do end", limits=pb.Limits(cpu_ms=60_000)) for _ in range(4)]
    try:
        info = wait(stub, stub.Spawn(pb.SpawnRequest(path="lua/ping_pong.lua", args=to_value({"n": 50}))).pid)
        assert exited(info) == {"rounds": 50, "ponger": "normal"}
        for pid in loops:  # still spinning: not starved out either
            assert stub.GetProcess(pb.GetProcessRequest(pid=pid)).state in (pb.RUNNING, pb.RUNNABLE)
    finally:
        for pid in loops:
            stub.Kill(pb.KillRequest(pid=pid))
    for pid in loops:
        killed(wait(stub, pid, 5000), "killed")


def test_yield_from_the_main_chunk_is_an_error(stub: Any, bystander: Bystander) -> None:
    crashed(run(stub, "coroutine.yield('recv')"), "attempt to yield from outside a coroutine")
    out = exited(run(stub, "local ok, e = pcall(coroutine.yield, 'exit', 5) return {ok, e}"))
    assert out == [False, "attempt to yield from outside a coroutine"]


def test_coroutine_yields_are_not_syscalls(stub: Any, bystander: Bystander) -> None:
    out = exited(run(stub, """
        local co = coroutine.wrap(function()
          coroutine.yield('exit', 'not the result')
          coroutine.yield('sleep', 1e9)
          coroutine.yield('recv', nil, nil, nil, 1e9)
          local got = sys.recv{timeout_ms = 0}  -- a real syscall from inside a coroutine
          coroutine.yield('wait', got == nil)
          return 'finished'
        end)
        local seen = {}
        for i = 1, 5 do local a, b = co() seen[i] = tostring(a) .. '/' .. tostring(b) end
        return seen
    """))
    assert out == ["exit/not the result", "sleep/1000000000.0", "recv/nil", "wait/true", "finished/nil"]


def test_blocking_syscalls_travel_through_coroutines_and_pcall(stub: Any, bystander: Bystander) -> None:
    out = exited(run(stub, """
        local helper = sys.spawn{lua = "local m = sys.recv{} sys.sleep(20) sys.send(m.from, 'late', {tag = 'reply'})"}
        local outer = coroutine.wrap(function()
          local inner = coroutine.create(function()
            return pcall(function()
              sys.send(helper, 'go')
              local m = sys.recv{tag = 'reply', timeout_ms = 5000}  -- blocks, two coroutines down
              sys.sleep(1)
              return m.body, sys.recv{tag = 'never', timeout_ms = 10}
            end)
          end)
          return coroutine.resume(inner)
        end)
        local resumed, protected, body, none = outer()
        local wait_ok, wait_err = pcall(sys.wait, 'x')
        local handled = select(2, xpcall(function() error('boom', 0) end, function(e) return 'handled ' .. e end))
        local wrapped = select(2, pcall(coroutine.wrap(function() error({code = 7}) end)))
        return {resumed, protected, body, none == nil, wait_ok, wait_err, handled, wrapped.code}
    """))
    assert out == [True, True, "late", True, False, "sys.wait: pid must be an integer", "handled boom", 7]


def test_a_memory_limit_too_small_to_start_is_a_clear_error(stub: Any, bystander: Bystander) -> None:
    info = wait(stub, spawn(stub, "return 1", limits=pb.Limits(memory_bytes=1000)))
    crashed(info, "not enough memory to start (raise limits.memory_bytes)")
    assert exited(wait(stub, spawn(stub, "return 1", limits=pb.Limits(memory_bytes=64 << 10)))) == 1


def test_unsendable_values_give_clear_errors(stub: Any, bystander: Bystander) -> None:
    out = exited(run(stub, """
        local me = sys.self()
        local out = {}
        for name, v in pairs{fn = print, co = coroutine.create(print), nested = {{{f = print}}},
                             nan = 0/0, inf = math.huge, bad_utf8 = '\\255\\254'} do
          local ok, err = pcall(sys.send, me, v)
          out[name] = ok and 'sent' or err
        end
        local cyc = {} cyc[1] = cyc
        out.cycle = select(2, pcall(sys.send, me, cyc))
        out.bad_key = select(2, pcall(sys.send, me, {[true] = 1}))
        -- non-UTF-8 bytes are fine as data
        local ok = pcall(sys.send, me, 'ok', {data = '\\255\\254\\0'})
        local m = sys.recv{timeout_ms = 1000}
        out.data = ok and m.data == '\\255\\254\\0' and m.body == 'ok'
        return out
    """))
    assert "function cannot be sent" in out["fn"]
    assert "cannot be sent" in out["co"] and "cannot be sent" in out["nested"]
    assert "NaN and infinity" in out["nan"] and "NaN and infinity" in out["inf"]
    assert "UTF-8" in out["bad_utf8"] and "data" in out["bad_utf8"]
    assert "nest deeper" in out["cycle"]
    assert "keys must be strings or numbers" in out["bad_key"]
    assert out["data"] is True
    crashed(run(stub, "return print"), "cannot return the result")
    crashed(run(stub, "return '\\255'"), "UTF-8")


def test_error_objects_with_metamethods_do_not_hang_the_kernel(stub: Any, bystander: Bystander) -> None:
    loop = "function() while true do end end"
    crashed(run(stub, f"error(setmetatable({{}}, {{__tostring = {loop}, __index = {loop}, __pairs = {loop}}}))",
                cpu_ms=2000))
    out = exited(run(stub, f"return setmetatable({{1, 2}}, {{__index = {loop}, __len = {loop}, __pairs = {loop}}})",
                     cpu_ms=2000))
    assert out == [1, 2]


def test_main_coroutine_cannot_be_resumed_or_closed(stub: Any, bystander: Bystander) -> None:
    out = exited(run(stub, """
        local main = coroutine.running()
        local a, b = pcall(coroutine.close, main)
        local c, d = coroutine.resume(main)
        return {a, b, c, d}
    """))
    assert out == [False, "cannot close a running coroutine", False, "cannot resume non-suspended coroutine"]


# -- holes: these take a server of their own, since a failure leaves it damaged ---------------
def _fresh_stub(server: Any) -> Any:
    return kernel_pb2_grpc.KernelStub(server.channel())


def test_xpcall_handler_cannot_outlive_a_kill(fresh_llmosd: Any) -> None:
    """A message handler runs when the kernel's own error ends the loop; it must be stopped too."""
    stub = _fresh_stub(fresh_llmosd)
    info = run(stub, "xpcall(function() while true do end end, function(e) while true do end end)",
               timeout_ms=5000, cpu_ms=200)
    killed(info, "cpu_limit")


def test_gc_finalizers_are_refused(fresh_llmosd: Any) -> None:
    """Finalizers run with hooks off (in the program's GC or when its state is closed on
    the server's threads), so a looping __gc could never be stopped: the sandbox refuses them."""
    stub = _fresh_stub(fresh_llmosd)
    crashed(run(stub, "setmetatable({}, {__gc = function() while true do end end}) return 1"), "__gc")
    # A metatable that gains __gc after setmetatable does not mark the table for finalization.
    assert exited(run(stub, """
        local mt = {} local t = setmetatable({}, mt) mt.__gc = function() while true do end end
        t = nil collectgarbage() return 1""")) == 1
    # Enough further work for the server's own garbage collection to reach the dead states.
    for i in range(600):
        try:
            pid = stub.Spawn(pb.SpawnRequest(lua="return {('x'):rep(1000)}"), timeout=5).pid
            resp = stub.Wait(pb.WaitRequest(pid=pid, timeout_ms=3000), timeout=5)
        except grpc.RpcError as e:
            pytest.fail(f"the server stopped answering after {i} programs: {e.code()}")
        assert not resp.timed_out, f"program {i} never ended"
