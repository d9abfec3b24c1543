-- supervisor: Erlang/OTP-style supervision of child processes (docs/userland-library.md; the
-- Python twin is llmos/std/supervisor.py).
--
--   local supervisor = require "supervisor"
--   local report = supervisor.run{
--     strategy = "one_for_one",          -- or "one_for_all", "rest_for_one"
--     intensity = 3, period_ms = 5000,   -- at most 3 restarts in any 5 s, else give up
--     children = {
--       {id = "db", path = "lua/db.lua", restart = "permanent"},
--       {id = "job", lua = source, args = function(start) return {start = start} end,
--        restart = "transient"},
--     },
--   }
--
-- Each child is spawned with a monitor (sys.spawn's options: lua, python or path, args, name,
-- priority, weight, limits, ...; args may be a function of the start count, 1 the first time).
-- When one ends, its restart decides: permanent children are always restarted, transient
-- ones only after an abnormal end, temporary ones never. The strategy decides who restarts
-- with it: only the child (one_for_one), every running child (one_for_all), or the child and
-- the running children after it in the list (rest_for_one); the others are killed (reason
-- "shutdown") and their EXIT notices awaited before any is started again, in list order.
-- Restarting more than `intensity` times within `period_ms` gives up: every child is killed
-- and run raises "supervisor: gave up ...", which ends the supervisor (its own supervisor
-- sees it crash). run returns once no child is running and none is to be restarted:
--   {restarts = n, children = {[id] = {status = "running"|"done"|"failed"|"stopped",
--    restarts = n, pid = last pid, result = last result, exits = {{pid, reason, error}...}}}}
-- While it runs, the supervisor answers server.call(pid, "which_children") with
-- {{id, pid, status, restarts}...} in list order, and server.call(pid, "stop") by stopping
-- every child and returning its report.
local server = require "server"

local M = {}

local RESTARTS = {permanent = true, transient = true, temporary = true}
local STRATEGIES = {one_for_one = true, one_for_all = true, rest_for_one = true}
local SPAWN_KEYS = {lua = true, python = true, path = true, args = true, name = true, priority = true,
                    weight = true, limits = true, source_name = true, dead_letter = true, max_attempts = true,
                    durable = true}
local OPTIONS = {children = true, strategy = true, intensity = true, period_ms = true, shutdown_ms = true}

local function check(opts)
  if type(opts) ~= "table" then error("supervisor.run takes a table of options", 3) end
  for k in pairs(opts) do
    if not OPTIONS[k] then error("supervisor.run: unknown option " .. tostring(k), 3) end
  end
  local strategy = opts.strategy or "one_for_one"
  if not STRATEGIES[strategy] then error("supervisor.run: unknown strategy " .. tostring(strategy), 3) end
  if type(opts.children) ~= "table" or #opts.children == 0 then
    error("supervisor.run: children must be a non-empty list of child specs", 3)
  end
  local children, ids = {}, {}
  for i, spec in ipairs(opts.children) do
    local id = spec.id or ("child" .. i)
    if ids[id] then error("supervisor.run: two children have the id " .. tostring(id), 3) end
    ids[id] = true
    for k in pairs(spec) do
      if k ~= "id" and k ~= "restart" and not SPAWN_KEYS[k] then
        error("supervisor.run: child " .. tostring(id) .. ": unknown option " .. tostring(k), 3)
      end
    end
    local restart = spec.restart or "permanent"
    if not RESTARTS[restart] then
      error("supervisor.run: child " .. tostring(id) .. ": unknown restart " .. tostring(restart), 3)
    end
    children[i] = {id = id, spec = spec, restart = restart, starts = 0, restarts = 0, exits = {}, status = "new"}
  end
  return strategy, children
end

function M.run(opts)
  local strategy, children = check(opts)
  local intensity, period = opts.intensity or 3, opts.period_ms or 5000
  local by_pid, backlog, times, total = {}, {}, {}, 0

  local function start(c)
    c.starts = c.starts + 1
    local spawn = {monitor = true}
    for k, v in pairs(c.spec) do if SPAWN_KEYS[k] then spawn[k] = v end end
    if type(c.spec.args) == "function" then spawn.args = c.spec.args(c.starts) end
    c.pid, c.status = sys.spawn(spawn), "running"
    by_pid[c.pid] = c
  end

  local function ended(c, exit)
    by_pid[exit.pid] = nil
    c.exits[#c.exits + 1] = {pid = exit.pid, reason = exit.reason, error = exit.error}
    c.result = exit.result
  end

  -- Kill `list`'s running children (last first) and wait for their EXIT notices; notices of
  -- other children that come meanwhile are handled after.
  local function stop(list)
    local waiting, n = {}, 0
    for i = #list, 1, -1 do
      local c = list[i]
      if by_pid[c.pid] == c then
        sys.kill(c.pid, "shutdown")
        waiting[c.pid], n = c, n + 1
      end
    end
    while n > 0 do
      local m = sys.recv{tag = "EXIT", timeout_ms = opts.shutdown_ms or 10000}
      if m == nil then error("supervisor: killed children did not end in time") end
      local c = waiting[m.body.pid]
      if c then
        waiting[m.body.pid], n = nil, n - 1
        ended(c, m.body)
        c.status = "stopped"
      else
        backlog[#backlog + 1] = m
      end
    end
  end

  local function report()
    local out = {restarts = total, strategy = strategy, children = {}}
    for _, c in ipairs(children) do
      out.children[c.id] = {status = c.status, restarts = c.restarts, pid = c.pid, result = c.result,
                            exits = c.exits}
    end
    return out
  end

  local function restart(c, exit)
    local now = sys.now()
    local kept = {}
    for _, t in ipairs(times) do if now - t < period then kept[#kept + 1] = t end end
    times = kept
    if #times >= intensity then
      stop(children)
      local text = string.format("supervisor: gave up: %d restarts within %d ms is the most allowed (intensity); "
                                 .. "child %s (pid %d) ended with %s: %s", intensity, period, c.id, exit.pid,
                                 tostring(exit.reason), tostring(exit.error))
      sys.log(text)
      error(text, 0)
    end
    times[#times + 1] = now
    total, c.restarts = total + 1, c.restarts + 1
    local again = {c}
    if strategy ~= "one_for_one" then
      local others, after = {}, false
      for _, o in ipairs(children) do
        if o == c then after = true
        elseif by_pid[o.pid] == o and (strategy == "one_for_all" or after) then others[#others + 1] = o end
      end
      stop(others)
      again = {}
      for _, o in ipairs(children) do
        if o == c or (o.status == "stopped" and o.restart ~= "temporary") then
          if o ~= c then o.restarts = o.restarts + 1 end
          again[#again + 1] = o
        end
      end
    end
    sys.log(string.format("supervisor: %s (pid %d) ended with %s; %s restarts %d child(ren)", c.id, exit.pid,
                          tostring(exit.reason), strategy, #again))
    for _, o in ipairs(again) do start(o) end
  end

  local function running()
    for _ in pairs(by_pid) do return true end
    return false
  end

  for _, c in ipairs(children) do start(c) end
  while running() do
    local m = table.remove(backlog, 1) or sys.recv{}
    local c = m.tag == "EXIT" and by_pid[m.body.pid]
    if c then
      local exit = m.body
      ended(c, exit)
      local normal = exit.reason == "normal"
      if c.restart == "permanent" or (c.restart == "transient" and not normal) then
        restart(c, exit)
      else
        c.status = normal and "done" or "failed"
      end
    elseif m.tag == "call" and m.body == "which_children" then
      local list = {}
      for i, o in ipairs(children) do list[i] = {id = o.id, pid = o.pid, status = o.status, restarts = o.restarts} end
      server.reply(m, list)
    elseif m.tag == "call" and m.body == "stop" then
      stop(children)
      server.reply(m, true)
      return report()
    end
  end
  return report()
end

return M
