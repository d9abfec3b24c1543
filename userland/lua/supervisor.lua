-- supervisor.lua: an Erlang-style one_for_one supervisor.
--
-- Starts each child with monitor = true. When a child ends abnormally (it
-- crashed, or was killed), only that child is restarted (one_for_one), up to
-- max_restarts times per child; past that the supervisor gives up on it. A
-- child that ends normally is done and is not restarted.
--
-- args (all optional):
--   max_restarts  restarts allowed per child (default 3)
--   children      list of {id = "name", lua = source, path = "lua/x.lua",
--                 args = {...}, fail_times = n}; each child gets its args
--                 plus `attempt` (1 for the first start) in its args table.
--                 Default: one built-in worker that crashes on its first
--                 `fail_times` attempts (default 2) and then returns 42.
--
-- Returns a report:
--   {children = {[id] = {status = "done"|"gave_up", restarts = n,
--                        result = <last result>, exits = {{pid, reason, error}...}}},
--    restarts = <total restarts>}

local opts = type(args) == "table" and args or {}
local max_restarts = opts.max_restarts or 3

-- The default worker: crashes on purpose until its attempt passes fail_times.
local FLAKY = [[
  if args.attempt <= (args.fail_times or 2) then
    error("flaky worker failing on attempt " .. args.attempt)
  end
  return 42
]]

local specs = opts.children or {{id = "worker", fail_times = opts.fail_times}}
local children = {}  -- id -> state
local by_pid = {}    -- live child pid -> id
local live = 0

local function start(id)
  local spec, child = children[id].spec, children[id]
  child.attempt = child.attempt + 1
  local child_args = {}
  if type(spec.args) == "table" then
    for k, v in pairs(spec.args) do child_args[k] = v end
  end
  child_args.attempt = child.attempt
  child_args.fail_times = spec.fail_times
  local program = {args = child_args, monitor = true}
  if spec.path then program.path = spec.path else program.lua = spec.lua or FLAKY end
  local pid = sys.spawn(program)
  by_pid[pid] = id
  live = live + 1
  sys.log(string.format("supervisor: started %s as pid %d (attempt %d)", id, pid, child.attempt))
end

for i, spec in ipairs(specs) do
  local id = spec.id or ("child" .. i)
  children[id] = {spec = spec, attempt = 0, restarts = 0, exits = {}, status = "running"}
  start(id)
end

local total = 0
while live > 0 do
  local msg = sys.recv{tag = "EXIT", timeout_ms = opts.timeout_ms or 30000}
  assert(msg, "children went silent")
  local exit = msg.body  -- {pid, state, reason, result, error}
  local id = by_pid[exit.pid]
  if id then
    by_pid[exit.pid] = nil
    live = live - 1
    local child = children[id]
    table.insert(child.exits, {pid = exit.pid, reason = exit.reason, error = exit.error})
    if exit.reason == "normal" then
      child.status, child.result = "done", exit.result
    elseif child.restarts < max_restarts then
      child.restarts = child.restarts + 1
      total = total + 1
      sys.log(string.format("supervisor: %s (pid %d) ended with %s: %s; restarting",
                            id, exit.pid, exit.reason, tostring(exit.error)))
      start(id)
    else
      child.status = "gave_up"
      sys.log(string.format("supervisor: %s failed %d times; giving up", id, child.restarts + 1))
    end
  end
end

local report = {children = {}, restarts = total}
for id, child in pairs(children) do
  report.children[id] = {status = child.status, restarts = child.restarts,
                         result = child.result, exits = child.exits}
end
return report
