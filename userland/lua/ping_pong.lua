-- ping_pong.lua: two processes bounce a counter back and forth.
--
-- The main process spawns a "ponger" that answers every "ping" with a "pong"
-- carrying the same counter, then sends N pings one at a time, checking each
-- pong, and finally tells the ponger to stop and waits for it to end.
--
-- args: {n = <number of round trips, default 100>}
-- Returns {rounds = <round trips completed>, ponger = <the ponger's exit reason>}.

local n = (type(args) == "table" and args.n) or 100

local PONGER = [[
  local served = 0
  while true do
    local msg = sys.recv{}
    if msg.tag == "stop" then return served end
    sys.send(msg.from, msg.body, {tag = "pong"})
    served = served + 1
  end
]]

-- monitor = true: we get an EXIT message (tag "EXIT") when the ponger ends.
local ponger = sys.spawn{lua = PONGER, monitor = true}
local rounds = 0
for i = 1, n do
  sys.send(ponger, i, {tag = "ping"})
  -- Selective receive: only a pong from our ponger.
  local reply = sys.recv{from = ponger, tag = "pong", timeout_ms = 10000}
  assert(reply, "no pong within 10 s")
  assert(reply.body == i, "pong carried " .. tostring(reply.body) .. ", expected " .. i)
  rounds = rounds + 1
end

sys.send(ponger, nil, {tag = "stop"})
local exit = sys.recv{tag = "EXIT", from = ponger, timeout_ms = 10000}
assert(exit, "the ponger did not stop")
assert(exit.body.result == n, "the ponger should have served every ping")
return {rounds = rounds, ponger = exit.body.reason}
