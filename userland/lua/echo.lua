-- echo.lua: an echo server.
--
-- Replies to every message with the same body, tag, data and correlation_id,
-- sent back to the message's sender, until it gets a message tagged "stop".
--
-- args (all optional):
--   name        register under this name so clients can send to "echo" etc.
--   timeout_ms  stop by itself after this long without a message
--
-- Returns {echoed = <number of messages echoed>, stopped_by = <pid or nil>}.
--
-- Try it:  llmos run userland/lua/echo.lua --args '{"name": "echo"}'
-- and from another shell send it messages (see the grpcurl walkthrough, docs/grpcurl.md).

local opts = type(args) == "table" and args or {}

if opts.name then
  sys.register(opts.name)  -- raises if the name is taken; the process then crashes
end

local echoed = 0
while true do
  local msg = sys.recv{timeout_ms = opts.timeout_ms}
  if msg == nil then
    sys.log("echo: no message for " .. tostring(opts.timeout_ms) .. " ms, stopping")
    return {echoed = echoed, stopped_by = nil, timed_out = true}
  end
  if msg.tag == "stop" then
    -- Acknowledge the stop so the sender knows we are done.
    sys.send(msg.from, {echoed = echoed}, {tag = "stopped", correlation_id = msg.correlation_id})
    return {echoed = echoed, stopped_by = msg.from}
  end
  -- A message from the kernel (an EXIT notice has from = the ended pid) is
  -- answered like any other; replies to a pid that has ended fail, so pcall.
  local ok, err = pcall(sys.send, msg.from, msg.body,
                        {tag = msg.tag, data = msg.data, correlation_id = msg.correlation_id})
  if ok then
    echoed = echoed + 1
  else
    sys.log("echo: could not reply to " .. tostring(msg.from) .. ": " .. tostring(err))
  end
end
