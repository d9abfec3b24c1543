-- planner.lua: splits a task over the files of a directory of the namespace's file store into
-- one sub-task per file, spawns a worker agent for each (userland/lua/planner_worker.lua) under a
-- monitor, gathers their structured results from the monitors' EXIT notices, and writes a report.
--
--   llmos run userland/lua/planner.lua --args '{"dir": "notes", "task": "Summarize the file."}'
--
-- args: dir (default "notes"), task, report (default "reports/DIR.json"), worker_tokens (each
-- worker's limits.tokens). Returns {report, workers, all_normal}.
local agent = require "agent"
args = args or {}
local dir = args.dir or "notes"
local task = args.task or "Summarize the file in one sentence and list its main topics."
local report_path = args.report or ("reports/" .. dir:gsub("/", "_") .. ".json")

local workers, count = {}, 0
for _, entry in ipairs(sys.fs.list(dir)) do
  if not entry.is_dir then
    local pid = sys.spawn{path = "lua/planner_worker.lua", monitor = true,
                          args = {task = task, file = entry.path},
                          limits = {tokens = args.worker_tokens or 4000, wall_ms = 600000}}
    workers[pid] = entry.path
    count = count + 1
    sys.log("planner: pid " .. pid .. " works on " .. entry.path)
  end
end

local results, all_normal = {}, true
for _ = 1, count do
  local notice = sys.recv{tag = "EXIT", timeout_ms = 600000}
  if notice == nil then error("planner: a worker did not end in time") end
  local e = notice.body
  all_normal = all_normal and e.reason == "normal"
  results[#results + 1] = {file = workers[e.pid], pid = e.pid, reason = e.reason, error = e.error,
                           result = e.result}
end
table.sort(results, function(a, b) return a.file < b.file end)

sys.fs.write(report_path, agent.json.encode{task = task, dir = dir, all_normal = all_normal,
                                            workers = setmetatable(results, agent.json.array_mt)})
sys.log("planner: wrote " .. report_path)
return {report = report_path, workers = count, all_normal = all_normal}
