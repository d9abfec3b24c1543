-- map_reduce.lua: a parallel map-reduce over worker processes.
--
-- Splits args.items into args.workers chunks, spawns one worker per chunk
-- with monitor = true (so we get an EXIT message when each worker ends), sends
-- each worker its chunk, and gathers the partial results. A worker that
-- crashes is noticed through its EXIT message; its chunk is then computed
-- again by a fresh worker (at most once per chunk), so the sum stays right.
--
-- args: {items = {numbers...}, workers = 4, crash_chunk = <index or nil>}
--   crash_chunk makes the first worker for that chunk crash on purpose.
-- Returns {sum = <sum of squares>, chunks = n, crashed = <crashes seen>, retried = <retries>}.

local opts = type(args) == "table" and args or {}
local items = opts.items or {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}
local nworkers = math.max(1, math.min(opts.workers or 4, #items))

-- The worker: receives a chunk, squares and sums it, replies, and exits.
local WORKER = [[
  local job = sys.recv{tag = "job", timeout_ms = 10000}
  assert(job, "no job came")
  if args.crash then error("worker crashing on purpose") end
  local sum = 0
  for _, x in ipairs(job.body.items) do sum = sum + x * x end
  sys.send(job.from, {chunk = job.body.chunk, sum = sum}, {tag = "result"})
  return sum
]]

-- Split the items into chunks of nearly equal size.
local chunks = {}
for i, x in ipairs(items) do
  local c = (i - 1) % nworkers + 1
  chunks[c] = chunks[c] or {}
  table.insert(chunks[c], x)
end

local by_pid = {}  -- worker pid -> chunk index
local function start(chunk, crash)
  local pid = sys.spawn{lua = WORKER, args = {crash = crash}, monitor = true}
  by_pid[pid] = chunk
  sys.send(pid, {chunk = chunk, items = chunks[chunk]}, {tag = "job"})
  return pid
end

for c = 1, #chunks do start(c, c == opts.crash_chunk) end

local partial, done, crashed, retried = {}, 0, 0, 0
local retries = {}
while done < #chunks do
  local msg = sys.recv{timeout_ms = 10000}
  assert(msg, "workers went silent")
  if msg.tag == "result" then
    partial[msg.body.chunk] = msg.body.sum
    done = done + 1
  elseif msg.tag == "EXIT" then
    -- body = {pid, state, reason, result, error}
    local chunk = by_pid[msg.body.pid]
    by_pid[msg.body.pid] = nil
    if msg.body.reason ~= "normal" and chunk and partial[chunk] == nil then
      crashed = crashed + 1
      sys.log("map_reduce: worker " .. msg.body.pid .. " for chunk " .. chunk ..
              " ended (" .. msg.body.reason .. "): " .. tostring(msg.body.error))
      assert(not retries[chunk], "chunk " .. chunk .. " failed twice")
      retries[chunk] = true
      retried = retried + 1
      start(chunk, false)
    end
  end
end

local sum = 0
for c = 1, #chunks do sum = sum + partial[c] end
return {sum = sum, chunks = #chunks, crashed = crashed, retried = retried}
