-- server: a request/reply loop with correlation ids and timeouts, like Erlang's gen_server
-- (docs/userland-library.md; the Python twin is llmos/std/server.py).
--
--   local server = require "server"
--   -- the server: handlers get the request, the message and the state
--   server.serve({name = "counter",
--                 call = function(req, msg, n) return n + req, n + req end,   -- reply, new state
--                 cast = function(req, n) return n + req end},                -- new state
--                0)
--   -- a client
--   local total = server.call("counter", 5, 1000)   -- the reply, or an error after 1000 ms
--   server.cast("counter", 1)                        -- true, or false and why; never waits
--
-- On the wire: a call is a message tagged "call" with a fresh correlation id; the reply is
-- tagged "reply" (or "error" if the handler failed) with the same id, sent to the caller.
-- A cast is tagged "cast". Other messages go to handlers.info.
local M = {}

M.DEFAULT_TIMEOUT_MS = 5000
M.NOREPLY = setmetatable({}, {__name = "server.NOREPLY"})  -- a call handler's reply for "later, with server.reply"
local STOP = {__name = "server.stop"}

-- A handler's new state that ends serve, which returns `value`.
function M.stop(value)
  return setmetatable({value = value}, STOP)
end

local calls, stale = 0, {}

-- Send `request` to `to` (pid or registered name) and wait for the reply. Raises
-- "server.call: no reply ... (timeout)" after timeout_ms, or the server's failure.
function M.call(to, request, timeout_ms)
  -- A reply that came after its call timed out is dropped at the next call (once: a reply
  -- later still stays in the mailbox, tagged "reply").
  for i = #stale, 1, -1 do
    sys.recv{correlation_id = stale[i], timeout_ms = 0}
    stale[i] = nil
  end
  calls = calls + 1
  local id = "call:" .. sys.self() .. ":" .. calls
  timeout_ms = timeout_ms or M.DEFAULT_TIMEOUT_MS
  sys.send(to, request, {tag = "call", correlation_id = id})
  local m = sys.recv{correlation_id = id, timeout_ms = timeout_ms}
  if m == nil then
    stale[#stale + 1] = id
    error(string.format("server.call: no reply from %s in %s ms (timeout)", tostring(to), tostring(timeout_ms)), 2)
  end
  if m.tag == "error" then error("server.call: the server failed: " .. tostring(m.body), 2) end
  return m.body
end

-- Send `request` to `to` without waiting: true, or false and why it could not be sent.
function M.cast(to, request)
  local ok, err = pcall(sys.send, to, request, {tag = "cast"})
  if ok then return true end
  return false, err
end

-- Answer the call `msg` (for a handler that returned server.NOREPLY). A caller that has ended
-- is not the server's problem: false, and why.
function M.reply(msg, value)
  local ok, err = pcall(sys.send, msg.from, value, {tag = "reply", correlation_id = msg.correlation_id})
  if ok then return true end
  return false, err
end

local HANDLERS = {init = true, call = true, cast = true, info = true, timeout = true, name = true, timeout_ms = true}

-- Serve requests until a handler returns server.stop(value) as the new state; returns value.
-- handlers: call(request, msg, state) -> reply, state; cast(request, state) -> state;
-- info(msg, state) -> state (any other message; without it they are dropped);
-- init(state) -> state; name (register it); timeout_ms and timeout(state) -> state: called
-- when no message came for timeout_ms (without timeout, serve returns the state then).
-- A call handler that raises answers the caller "error" and the error ends the server.
function M.serve(handlers, state)
  for k in pairs(handlers) do
    if not HANDLERS[k] then error("server.serve: unknown handler or option " .. tostring(k), 2) end
  end
  if handlers.name then sys.register(handlers.name) end
  if handlers.init then state = handlers.init(state) end
  while true do
    local m = sys.recv{timeout_ms = handlers.timeout_ms}
    local new
    if m == nil then
      if not handlers.timeout then return state end
      new = handlers.timeout(state)
    elseif m.tag == "call" and handlers.call then
      local ok, reply, st = pcall(handlers.call, m.body, m, state)
      if not ok then
        pcall(sys.send, m.from, tostring(reply), {tag = "error", correlation_id = m.correlation_id})
        error(reply, 0)
      end
      if reply ~= M.NOREPLY then M.reply(m, reply) end
      new = st
    elseif m.tag == "cast" and handlers.cast then
      new = handlers.cast(m.body, state)
    elseif handlers.info then
      new = handlers.info(m, state)
    else
      new = state
    end
    if getmetatable(new) == STOP then return new.value end
    state = new
  end
end

return M
