-- pool: a pool of worker processes with acknowledged jobs (docs/userland-library.md; the
-- Python twin is llmos/std/pool.py).
--
--   local pool = require "pool"
--   -- a worker program (spawned by the pool): handle each job, return its result
--   pool.work(function(job, info) return job * job end)     -- info: {id, attempt, args}
--   -- a batch in this process: results in order
--   local out = pool.map({size = 4, worker = {path = "lua/square.lua"}}, {1, 2, 3})
--   -- out.results[i] = {ok = true, result = 1, attempts = 1}; out.redelivered, out.failed, ...
--   -- or a pool process serving other processes until pool.stop(pid)
--   pool.run{size = 4, worker = {lua = source}, name = "squares"}
--   local r = pool.call("squares", 7, 5000)                  -- {ok, result | error, attempts}
--
-- The dispatcher (the process running map or run) receives every message with ack, so each
-- job is leased, not consumed, while a worker has it; the job is acknowledged when its result
-- comes. When a worker ends before answering (it crashed, or was killed), the job is nacked:
-- the kernel delivers it again, in its original place, with attempt + 1, and a new worker is
-- started. A job that has been handed out max_attempts times fails with its last worker's
-- error. Jobs outstanding at once are at most the dispatcher's mailbox limit.
local M = {}

local FOREVER_MS = 315360000000  -- a lease that only the dispatcher ends (MAX_DURATION_MS)
local OPTIONS = {size = true, worker = true, max_attempts = true, max_restarts = true, name = true}

-- The worker's side: take jobs from the pool that spawned this process, answer each with
-- handler(job, {id, attempt, args}). A handler that raises ends the worker (the job goes back).
function M.work(handler)
  local from = type(args) == "table" and args.pool
  if not from then error("pool.work: this process was not started by a pool (no args.pool)", 2) end
  while true do
    local m = sys.recv{from = from, tag = "pool.job"}
    local job = m.body
    local result = handler(job.job, {id = job.id, attempt = job.attempt, args = args.args})
    sys.send(from, {id = job.id, result = result}, {tag = "pool.done"})
  end
end

-- The dispatcher loop: until `finished()` says so, or a pool.stop message. finish(job message,
-- ok, value) is called once per job, with its result or last error.
local function dispatch(opts, finish, finished)
  if type(opts) ~= "table" or type(opts.worker) ~= "table" then
    error("pool: opts.worker must be the workers' spawn spec (lua=, python= or path=, ...)", 3)
  end
  for k in pairs(opts) do if not OPTIONS[k] then error("pool: unknown option " .. tostring(k), 3) end end
  local me, size = sys.self(), opts.size or 4
  local max_attempts, max_restarts = opts.max_attempts or 3, opts.max_restarts or 10 * size
  local workers, idle, busy, queue, last_error = {}, {}, {}, {}, {}
  local stats = {done = 0, failed = 0, redelivered = 0, workers_started = 0}

  local function start_worker()
    local spec = {monitor = true}
    for k, v in pairs(opts.worker) do spec[k] = v end
    spec.args = {pool = me, args = opts.worker.args}
    local pid = sys.spawn(spec)
    workers[pid] = true
    idle[#idle + 1] = pid
    stats.workers_started = stats.workers_started + 1
  end

  local function shutdown()
    for pid in pairs(workers) do sys.kill(pid, "shutdown") end
    for pid in pairs(workers) do sys.recv{from = pid, tag = "EXIT"} end  -- none left behind
  end

  for _ = 1, size do start_worker() end
  while not finished() do
    while #queue > 0 and #idle > 0 do
      local job, pid = table.remove(queue, 1), table.remove(idle)
      busy[pid] = job
      pcall(sys.send, pid, {id = job.id, attempt = job.attempt, job = job.body}, {tag = "pool.job"})
    end  -- (a worker that ended meanwhile gives its job back when its EXIT notice comes)
    local m = sys.recv{ack = true, lease_ms = FOREVER_MS}
    if m.tag == "pool.job" then
      if m.attempt > max_attempts then
        sys.ack(m)
        stats.failed = stats.failed + 1
        finish(m, false, last_error[m.id] or "failed")
        last_error[m.id] = nil
      else
        queue[#queue + 1] = m
      end
    else
      sys.ack(m)  -- not a job: taken for good
      local job = busy[m.from]
      if m.tag == "pool.done" and job and type(m.body) == "table" and m.body.id == job.id then
        busy[m.from] = nil
        idle[#idle + 1] = m.from
        sys.ack(job)
        stats.done = stats.done + 1
        last_error[job.id] = nil
        finish(job, true, m.body.result)
      elseif m.tag == "EXIT" and workers[m.from] then
        workers[m.from] = nil
        for i, pid in ipairs(idle) do if pid == m.from then table.remove(idle, i) break end end
        if job then
          busy[m.from] = nil
          last_error[job.id] = tostring(m.body.error or m.body.reason)
          stats.redelivered = stats.redelivered + 1
          sys.nack(job)
        end
        if stats.workers_started - size >= max_restarts then
          shutdown()
          error("pool: gave up after " .. max_restarts .. " worker restarts; the last ended with "
                .. tostring(m.body.reason) .. ": " .. tostring(m.body.error), 0)
        end
        start_worker()
      elseif m.tag == "pool.stop" then
        for _, waiting in pairs(busy) do sys.nack(waiting) end  -- back in the mailbox, not lost
        for _, waiting in ipairs(queue) do sys.nack(waiting) end
        break
      end
    end
  end
  shutdown()
  return stats
end

-- Run `jobs` (a list) on a pool of opts.size workers in this process; the results in order:
-- {results = {{ok, result | error, attempts}...}, done, failed, redelivered, workers_started}.
function M.map(opts, jobs)
  local me, results, left = sys.self(), {}, #jobs
  for i, job in ipairs(jobs) do sys.send(me, job, {tag = "pool.job", correlation_id = "pool.map:" .. i}) end
  local out = dispatch(opts, function(job, ok, value)
    local i = math.tointeger(tonumber(job.correlation_id:match("^pool%.map:(%d+)$")))
    results[i] = ok and {ok = true, result = value, attempts = job.attempt}
                    or {ok = false, error = value, attempts = job.attempt - 1}
    left = left - 1
  end, function() return left == 0 end)
  out.results = results
  return out
end

-- Serve jobs that other processes submit (pool.submit, pool.call) until pool.stop(pid);
-- returns {done, failed, redelivered, workers_started}.
function M.run(opts)
  if opts.name then sys.register(opts.name) end
  return dispatch(opts, function(job, ok, value)
    local body = ok and {ok = true, result = value, attempts = job.attempt}
                    or {ok = false, error = value, attempts = job.attempt - 1}
    pcall(sys.send, job.from, body, {tag = "pool.result", correlation_id = job.correlation_id})
  end, function() return false end)
end

local submitted = 0

-- Give `job` to the pool `to` (pid or name); its result comes tagged "pool.result" with the
-- correlation id returned here.
function M.submit(to, job)
  submitted = submitted + 1
  local id = "pool:" .. sys.self() .. ":" .. submitted
  sys.send(to, job, {tag = "pool.job", correlation_id = id})
  return id
end

-- Submit `job` and wait for its result: {ok, result | error, attempts}; raises after timeout_ms.
function M.call(to, job, timeout_ms)
  local id = M.submit(to, job)
  local m = sys.recv{tag = "pool.result", correlation_id = id, timeout_ms = timeout_ms}
  if m == nil then error("pool.call: no result in " .. tostring(timeout_ms) .. " ms (timeout)", 2) end
  return m.body
end

-- Ask the pool `to` to stop: it kills its workers and its run returns.
function M.stop(to)
  sys.send(to, nil, {tag = "pool.stop"})
end

return M
