-- bounded_buffer.lua: the classic bounded buffer, with a mutex and two condition variables.
--
-- Producers and consumers are separate processes; the buffer they share is a file (one item a
-- line) guarded by the mutex `<dir>/mutex`. A producer waits on `<dir>/not_full` while the buffer
-- holds `capacity` items, a consumer on `<dir>/not_empty` while it is empty. sys.cond.wait
-- releases the mutex while waiting and holds it again when it returns, so every look at the
-- buffer happens under the mutex; the `while` loops re-check the buffer after a wake-up because
-- another process may have taken the mutex first (wake-ups themselves are never spurious).
--
-- args: {producers = 3, consumers = 3, items = 20 (per producer), capacity = 4, dir = "bounded_buffer"}
-- Returns {produced = n, consumed = {item, ...} (every item each consumer took, in order)}.

local opts = type(args) == "table" and args or {}

-- One program for both roles: args.role says which.
local WORKER = [[
  local dir = args.dir
  local mutex, not_full, not_empty = dir .. "/mutex", dir .. "/not_full", dir .. "/not_empty"
  local buffer, taken_file = dir .. "/buffer", dir .. "/taken"

  local function items()  -- the buffer's items, oldest first (call with the mutex held)
    local out = {}
    for line in sys.fs.read(buffer):gmatch("[^\n]+") do out[#out + 1] = line end
    return out
  end

  local function store(list)
    sys.fs.write(buffer, #list > 0 and table.concat(list, "\n") .. "\n" or "")
  end

  if args.role == "producer" then
    for i = 1, args.items do
      local item = "p" .. args.index .. "-" .. i
      sys.lock.acquire(mutex)
      local list = items()
      while #list >= args.capacity do
        sys.cond.wait(not_full, mutex)
        list = items()
      end
      list[#list + 1] = item
      store(list)
      sys.cond.signal(not_empty)
      sys.lock.release(mutex)
    end
    return args.items
  end

  local got = {}
  while true do
    sys.lock.acquire(mutex)
    local list = items()
    local taken = tonumber(sys.fs.read(taken_file))
    while #list == 0 and taken < args.total do
      sys.cond.wait(not_empty, mutex)
      list = items()
      taken = tonumber(sys.fs.read(taken_file))
    end
    if taken >= args.total then  -- all taken: wake the other consumers so they see it too
      sys.cond.broadcast(not_empty)
      sys.lock.release(mutex)
      return got
    end
    got[#got + 1] = table.remove(list, 1)
    store(list)
    sys.fs.write(taken_file, tostring(taken + 1))
    sys.cond.signal(not_full)
    sys.lock.release(mutex)
  end
]]

local producers = opts.producers or 3
local consumers = opts.consumers or 3
local per_producer = opts.items or 20
local capacity = opts.capacity or 4
local dir = opts.dir or "bounded_buffer"
local total = producers * per_producer

sys.fs.write(dir .. "/buffer", "")
sys.fs.write(dir .. "/taken", "0")

local pids = {}
for i = 1, consumers do
  pids[#pids + 1] = sys.spawn{lua = WORKER, args = {role = "consumer", dir = dir, total = total}}
end
for i = 1, producers do
  pids[#pids + 1] = sys.spawn{lua = WORKER, args = {role = "producer", index = i, items = per_producer,
                                                   capacity = capacity, dir = dir}}
end

local consumed = {}
for i, pid in ipairs(pids) do
  local info = sys.wait(pid)
  assert(info.state == "EXITED", "worker " .. pid .. " ended " .. tostring(info.state) .. ": " .. tostring(info.error))
  if i <= consumers then
    for _, item in ipairs(info.result) do consumed[#consumed + 1] = item end
  end
end
return {produced = total, consumed = consumed}
