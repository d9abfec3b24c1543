-- supervisor.lua: a supervisor of flaky workers, with the userland library's supervisor
-- (require "supervisor"; docs/userland-library.md has its API).
--
-- Each child is restarted after it crashes (restart "transient" by default); a child that ends
-- normally is done. More than `intensity` restarts within `period_ms` and the supervisor gives
-- up: it kills its children and crashes with "supervisor: gave up ...".
--
-- args (all optional):
--   strategy      one_for_one (default), one_for_all or rest_for_one
--   intensity     restarts allowed within period_ms (default 3); period_ms (default 5000)
--   children      list of {id = "name", lua = source | path = "lua/x.lua", args = {...},
--                 restart = "transient", fail_times = n}; each child gets its args plus
--                 `attempt` (1 for the first start) and `fail_times`. Default: one built-in
--                 worker that crashes on its first `fail_times` attempts (default 2), then
--                 returns 42.
-- Returns the supervisor's report: {restarts, strategy, children = {[id] = {status,
-- restarts, result, exits = {{pid, reason, error}...}}}}.
local supervisor = require "supervisor"

local opts = type(args) == "table" and args or {}

-- The default worker: crashes on purpose until its attempt passes fail_times.
local FLAKY = [[
  if args.attempt <= (args.fail_times or 2) then
    error("flaky worker failing on attempt " .. args.attempt)
  end
  return 42
]]

local children = {}
for i, spec in ipairs(opts.children or {{id = "worker", fail_times = opts.fail_times}}) do
  children[i] = {
    id = spec.id, restart = spec.restart or "transient", path = spec.path,
    lua = spec.path == nil and (spec.lua or FLAKY) or nil,
    args = function(attempt)
      local child_args = {}
      for k, v in pairs(spec.args or {}) do child_args[k] = v end
      child_args.attempt, child_args.fail_times = attempt, spec.fail_times
      return child_args
    end,
  }
end

return supervisor.run{strategy = opts.strategy, intensity = opts.intensity, period_ms = opts.period_ms,
                      children = children}
