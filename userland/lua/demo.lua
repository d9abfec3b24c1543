-- demo.lua: a small tour of llmos, run by the README's first command.
--
-- 1. spawns a registered "greeter" that answers greetings,
-- 2. spawns three agents in a ring that pass a token around, each logging
--    what it does, and a crash-prone one watched through a monitor,
-- 3. asks the shared model "What is the capital of France?" with sys.infer,
--    greedy, when the server runs an inference engine (skipped with a log
--    line otherwise): the real model (llmosd --model smollm2, what
--    tools/demo.sh starts) answers Paris; the built-in tiny one, gibberish,
-- and returns a summary. It ends by itself within a few seconds.

local me = sys.self()
sys.log("demo: I am pid " .. me)

-- 1. A greeter, found by name rather than by pid.
local greeter = sys.spawn{name = "greeter", monitor = true, lua = [[
  while true do
    local m = sys.recv{timeout_ms = 5000}
    if m == nil or m.tag == "stop" then return "greeter done" end
    sys.log("greeter: hello, pid " .. m.from)
    sys.send(m.from, "hello, " .. tostring(m.body), {tag = "greeting", correlation_id = m.correlation_id})
  end
]]}
sys.send("greeter", "demo", {tag = "hi", correlation_id = "c1"})
local greeting = sys.recv{tag = "greeting", correlation_id = "c1", timeout_ms = 5000}
sys.log("demo: greeter said: " .. tostring(greeting and greeting.body))

-- 2. A ring of agents passing a token: each adds its pid and passes it on.
local AGENT = [[
  local setup = sys.recv{tag = "next", timeout_ms = 5000}
  local token = sys.recv{tag = "token", timeout_ms = 5000}
  if not (setup and token) then return "no token" end
  local seen = token.body
  table.insert(seen, sys.self())
  sys.log("agent " .. sys.self() .. ": got the token, passing it to " .. setup.body)
  sys.send(setup.body, seen, {tag = "token"})
  return #seen
]]
local ring = {}
for i = 1, 3 do ring[i] = sys.spawn{lua = AGENT} end
for i = 1, 3 do sys.send(ring[i], i < 3 and ring[i + 1] or me, {tag = "next"}) end
sys.send(ring[1], {me}, {tag = "token"})
local back = sys.recv{tag = "token", timeout_ms = 5000}
local path = back and table.concat(back.body, " -> ") or "(lost)"
sys.log("demo: the token went " .. path)

-- A process that fails: its monitor notice tells us why.
local doomed = sys.spawn{lua = [[error("this agent fails on purpose")]], monitor = true}
local exit = sys.recv{tag = "EXIT", from = doomed, timeout_ms = 5000}
sys.log("demo: pid " .. doomed .. " ended: " .. tostring(exit and exit.body.reason) ..
        " (" .. tostring(exit and exit.body.error) .. ")")

-- 3. The shared model, if this server runs one.
local answer
local ok, res = pcall(sys.infer, {
  messages = {{role = "user", content = "What is the capital of France?"}},
  temperature = 0, max_tokens = 32,
})
if ok then
  answer = type(res) == "table" and res.text or res
  sys.log("demo: the model says: " .. tostring(answer))
else
  sys.log("demo: no inference here (" .. tostring(res) .. "), skipping the model")
end

pcall(sys.send, greeter, nil, {tag = "stop"})  -- it ends by itself after 5 s idle: maybe already
sys.recv{tag = "EXIT", from = greeter, timeout_ms = 5000}
return {greeting = greeting and greeting.body, ring = back and back.body, failed = exit and exit.body.reason,
        answer = answer}
