-- Builds one process's sandbox inside its own Lua 5.4 state and returns the
-- function the kernel calls to run it. Runs before any program code, with
-- the full standard library; the program only ever sees `env`.
--
-- Called as: step, main_state = chunk(bridge, self_pid, source, chunk_name, args, hook_count, async_preempt)
-- With async_preempt, the program's main coroutine runs without a hook until
-- the kernel installs one from a signal handler (see _preempt.c); coroutines
-- the program creates itself always carry a count hook.
local bridge, self_pid, source, chunk_name, args, hook_count, async_preempt = ...

-- Everything the sandbox machinery uses is captured here, so that nothing a
-- program does to its own environment can change how the kernel code behaves.
local co_create, co_resume, co_yield, co_status = coroutine.create, coroutine.resume, coroutine.yield, coroutine.status
local co_running, co_close, co_isyieldable = coroutine.running, coroutine.close, coroutine.isyieldable
local sethook = debug.sethook
local error, pcall, xpcall, select, type, tostring = error, pcall, xpcall, select, type, tostring
local load, setmetatable, getmetatable, next, rawget = load, setmetatable, getmetatable, next, rawget
local string_rep, string_format, string_find, string_match = string.rep, string.format, string.find, string.match
local string_gmatch, string_gsub = string.gmatch, string.gsub
local math_type = math.type
local table_concat, collectgarbage = table.concat, collectgarbage

local check = bridge.check
local SYSCALL = {}   -- first value of a yield that is a syscall, not a program's own yield
local dying = nil    -- set once the kernel ends the process: pcall may not swallow that
local MEMORY_ERROR = "not enough memory"

local main_co  -- the coroutine running the program

-- The hook: checks the quantum, limits and kills. Once the process is dying
-- it fires on every instruction.
local function hook()
  local reason = check()
  if reason then
    dying = reason
    sethook(hook, "", 1)
    error(reason, 0)
  end
  if async_preempt and co_running() == main_co then
    sethook(main_co, hook, "", 0)  -- off until the kernel asks again
  end
end

local function die_if_dying(ok, err, ...)
  if not ok and err == MEMORY_ERROR and not dying then
    dying = "memory_limit"
  end
  if dying then error(dying, 0) end
  return ok, err, ...
end

local function new_coroutine(f)
  local co = co_create(f)
  sethook(co, hook, "", hook_count)
  return co
end

-- Syscalls made inside the program's own coroutines are passed up, through
-- every level of resume, to the kernel, and the answer passed back down.
local function forward(co, ok, first, ...)
  if ok and first == SYSCALL and co_status(co) == "suspended" then
    return forward(co, co_resume(co, co_yield(SYSCALL, ...)))
  end
  return die_if_dying(ok, first, ...)
end

local function resume(co, ...)
  return forward(co, co_resume(co, ...))
end

local function yield(...)
  if co_running() == main_co then
    error("attempt to yield from outside a coroutine", 2)
  end
  return co_yield(...)
end

local function wrap(f)
  local co = new_coroutine(f)
  return function(...)
    local function unwrap(ok, ...)
      if not ok then error((...), 0) end
      return ...
    end
    return unwrap(resume(co, ...))
  end
end

local function syscall(name, ...)
  return co_yield(SYSCALL, name, ...)
end

-- Pattern functions run in C, where the count hook cannot interrupt them, and
-- backtracking makes their worst case polynomial in the subject's length with
-- the number of repetition items as exponent. Refuse calls whose worst case
-- could keep a CPU for long, so a process can always be preempted and killed.
local PATTERN_BUDGET = 1e9  -- about a second of C at worst
local function check_pattern(fname, s, pattern, plain)
  if plain or type(s) ~= "string" or type(pattern) ~= "string" then return end
  local items = 0
  for _ in string_gmatch(pattern, "[%*%+%-%?]") do items = items + 1 end
  if items == 0 then return end
  local n = #s + 1
  local cost = n ^ (items + (string_find(pattern, "^%^") and 0 or 1))
  if cost > PATTERN_BUDGET then
    error(string_format(
      "%s: pattern with %d repetition items on a %d-byte subject is too costly to run preemptibly; " ..
      "split the subject or simplify the pattern", fname, items, #s), 3)
  end
end

-- The library tables themselves go to the program (this state is its alone;
-- the kernel code above holds its own references), minus what is unsafe.
local safe_string = string
safe_string.dump = nil
local function guarded(fname, f)
  local has_plain = f == string_find  -- find's 4th argument turns patterns off
  return function(s, p, a, b)
    check_pattern(fname, s, p, has_plain and b)
    return f(s, p, a, b)
  end
end
safe_string.find = guarded("string.find", string_find)
safe_string.match = guarded("string.match", string_match)
safe_string.gmatch = guarded("string.gmatch", string_gmatch)
safe_string.gsub = guarded("string.gsub", string_gsub)

-- Programs may not reach or change the string metatable that the kernel's
-- own code relies on; method calls on strings use the safe functions.
local string_mt = getmetatable("")
string_mt.__index = safe_string
string_mt.__metatable = false

local env = {
  assert = assert, error = error, ipairs = ipairs, next = next, pairs = pairs,
  rawequal = rawequal, rawget = rawget, rawlen = rawlen, rawset = rawset, select = select,
  tonumber = tonumber, tostring = tostring, type = type,
  getmetatable = getmetatable, _VERSION = _VERSION,
  math = math, string = safe_string, table = table, utf8 = utf8,
  os = { clock = os.clock, time = os.time, date = os.date, difftime = os.difftime },
  coroutine = {
    create = new_coroutine, resume = resume, wrap = wrap, yield = yield,
    status = co_status, running = co_running, close = co_close, isyieldable = co_isyieldable,
  },
}
env._G = env
env.pcall = function(f, ...) return die_if_dying(pcall(f, ...)) end
-- A message handler runs before the stack unwinds, which for an error raised
-- by the kernel's hook means with hooks still off: never run the program's
-- handler for a dying process.
env.xpcall = function(f, handler, ...)
  return die_if_dying(xpcall(f, function(e) if dying then return e end return handler(e) end, ...))
end
-- Finalizers run with hooks off (in the program's GC or when its state is
-- closed), so a __gc that loops could never be stopped: none are allowed.
env.setmetatable = function(t, mt)
  if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
    error("setmetatable: __gc finalizers are not allowed in the sandbox", 2)
  end
  return setmetatable(t, mt)
end
env.load = function(chunk, name, mode, chunk_env)
  -- Text only: binary chunks can break the VM's memory safety.
  if mode ~= nil and mode ~= "t" then
    return nil, "load: only text chunks are allowed (mode 't')"
  end
  if chunk_env == nil then chunk_env = env end
  return load(chunk, name, "t", chunk_env)
end
local function log(...)
  local parts = {}
  for i = 1, select("#", ...) do parts[i] = tostring((select(i, ...))) end
  bridge.call("log", table_concat(parts, "\t"))
end
env.print = log
env.collectgarbage = function(opt)
  if opt == nil or opt == "collect" or opt == "count" or opt == "step" then return collectgarbage(opt) end
  error("collectgarbage: only 'collect', 'count' and 'step' are allowed", 2)
end

-- sys: the syscall interface. Bridge functions return (value) or (nil, error
-- text) and never raise, so a program only ever sees plain Lua values. Every
-- state carries this code, so it is kept small: thousands of processes may
-- sit idle at once, and each function's prototype costs every one of them.
-- Always tail-called, so level 2 is the program's line that made the call.
local function check_result(value, err, ...)
  if err ~= nil then error(err, 2) end
  return value, ...
end

-- Whether a message may be waiting, as of the last send or receive: when
-- none can be, sys.recv goes straight to the kernel (which takes a message
-- that arrived meanwhile) instead of first trying to take one.
local maybe_mail = true

local function as_message(id, from, to, tag, body, data, correlation_id, sent_at_ms, waiting)
  if id == nil then
    if from ~= nil then error(from, 2) end  -- (nil, error text)
    return nil
  end
  maybe_mail = waiting > 0
  return { id = id, from = from, to = to, tag = tag, body = body, data = data,
           correlation_id = correlation_id, sent_at_ms = sent_at_ms }
end

local function opts_table(opts, fname)
  if opts == nil then return {} end
  if type(opts) ~= "table" then error(fname .. ": expected a table of options", 3) end
  return opts
end

-- Syscalls that never block are one trip through the bridge's dispatcher,
-- which checks the arguments (option tables included).
local call = bridge.call
local function direct(op, sub)
  if sub then return function(...) return check_result(call(op, sub, ...)) end end
  return function(...) return check_result(call(op, ...)) end
end

local sys = {
  self = function() return self_pid end,
  now = direct("now"),  -- wall-clock ms since the epoch, with microseconds
  spawn = direct("spawn"), kill = direct("kill"), register = direct("register"),
  monitor = direct("monitor"), whereis = direct("whereis"), set_priority = direct("set_priority"),
  info = direct("info"), log = log,
}
sys.send = function(to, body, opts)
  opts = opts_table(opts, "sys.send")
  local id, waiting = bridge.send(to, body, opts.tag, opts.data, opts.correlation_id)
  if id == nil then error(waiting, 2) end
  maybe_mail = waiting > 0
  return id
end
sys.recv = function(opts)
  opts = opts_table(opts, "sys.recv")
  local from, tag, cid, timeout = opts.from, opts.tag, opts.correlation_id, opts.timeout_ms
  -- The common case, a message already waiting, costs no trip through the scheduler.
  if maybe_mail or timeout == 0 then
    local id, a, b, c, d, e, f, g, h = bridge.try_recv(from, tag, cid, timeout)
    if id == false then error(a, 2) end
    if id ~= nil or timeout == 0 then return as_message(id, a, b, c, d, e, f, g, h) end
  end
  return as_message(syscall("recv", from, tag, cid, timeout))
end
local function blocking(name)
  return function(...) return check_result(syscall(name, ...)) end
end
sys.wait, sys.sleep, sys.infer = blocking("wait"), blocking("sleep"), blocking("infer")
sys.exit = function(value) syscall("exit", value) end
sys.lock = {
  acquire = function(name, opts)
    -- A free lock costs no trip through the scheduler.
    local got, err = call("lock_try", name, opts)
    if err ~= nil then error(err, 2) end
    if got ~= nil or (opts and opts.timeout_ms == 0) then return got end
    return check_result(syscall("lock_acquire", name, opts))
  end,
  try_acquire = direct("lock_try"),
  release = direct("lock_release"),
}
sys.fs = {
  write = direct("fs", "write"), read = direct("fs", "read"), stat = direct("fs", "stat"),
  list = direct("fs", "list"), delete = direct("fs", "delete"), rename = direct("fs", "rename"),
  mkdir = direct("fs", "mkdir"),
}
env.sys = sys
env.args = args

local program, err = load(source, chunk_name, "t", env)
if program == nil then error(err, 0) end

-- Drop the libraries the program never sees (io, os, package, debug, lupa's
-- python table). They are freed when the program first blocks (see outcome).
local G = _G
for name in next, G.package.loaded do G.package.loaded[name] = nil end
for name in next, G do G[name] = nil end

main_co = co_create(program)
if async_preempt then
  sethook(main_co, hook, "", 0)  -- registers the hook function; the mask stays empty
else
  sethook(main_co, hook, "", hook_count)
end

-- The kernel's side: resume the program with a syscall's answer. Returns
--   "sys", name, ...   the program made a blocking syscall
--   "done", value      the program returned (or called sys.exit)
--   "error", message, reason   the program failed (reason: nil) or was ended (reason: why)
local collected = false
local function outcome(ok, first, ...)
  if not ok then return "error", first, dying end
  if co_status(main_co) == "dead" then return "done", first end
  if first == SYSCALL then
    if not collected then
      -- The first time the program blocks, free what building the sandbox
      -- left behind, this chunk's own code included: a blocked process should
      -- cost only its live data, as thousands may sit in recv. A program that
      -- ends without blocking never pays for it: its state is closed at once.
      -- Entering generational mode is itself a full collection.
      collected = true
      collectgarbage("generational")
    end
    return "sys", ...
  end
  return "error", "attempt to yield from outside a coroutine"
end

return function(...)
  return outcome(co_resume(main_co, ...))
end, tostring(main_co)
