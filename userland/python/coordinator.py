"""coordinator.py: a Python coordinator driving Lua workers.

Two ways to hand work to Lua, both ending in one reduced value, the sum of
the squares of args["items"]:

* mode "pool" (the default): spawns args["workers"] long-lived Lua workers
  (with monitor=True), scatters the items to them as jobs of args["job_size"]
  items, round robin, each job a message with its own correlation_id; gathers
  the replies by correlation_id; then tells each worker to stop and collects
  its EXIT notice (a worker's result is the number of jobs it did).
* mode "programs": runs the ready-made Lua program args["worker_path"]
  (default "lua/map_reduce.lua") once per chunk, with the chunk as its args,
  and reads each one's result with sys.wait. Each of those fans out further
  into Lua workers of its own.

args (all optional):
  items        numbers (default 1..20)
  workers      number of Lua workers / chunks (default 3)
  job_size     items per job in pool mode (default 2)
  mode         "pool" or "programs"
  worker_path  the Lua program for mode "programs"

Result: {"sum": <sum of squares>, "mode": mode, "jobs": <jobs scattered>,
         "by_worker": {"<pid>": <jobs that worker did (pool), or the chunks
                                 its map_reduce.lua used (programs)>}}
"""
from llmos.userland import sys

opts = sys.args if isinstance(sys.args, dict) else {}
items = opts.get("items") or list(range(1, 21))
nworkers = max(1, min(opts.get("workers") or 3, len(items)))
mode = opts.get("mode") or "pool"

# A Lua worker: answers "job" messages until told to "stop"; returns its job count.
LUA_WORKER = """
local done = 0
while true do
  local m = sys.recv{timeout_ms = 20000}
  assert(m, "the coordinator went silent")
  if m.tag == "stop" then return done end
  if m.tag == "job" then
    local sum = 0
    for _, x in ipairs(m.body) do sum = sum + x * x end
    done = done + 1
    sys.send(m.from, {sum = sum, worker = sys.self()}, {tag = "result", correlation_id = m.correlation_id})
  end
end
"""


def pool():
    workers = [sys.spawn(lua=LUA_WORKER, monitor=True) for _ in range(nworkers)]
    size = max(1, opts.get("job_size") or 2)
    jobs = [items[i:i + size] for i in range(0, len(items), size)]
    # Scatter: job k goes to worker k mod n.
    for k, job in enumerate(jobs):
        sys.send(workers[k % nworkers], job, tag="job", correlation_id=f"job-{k}")
    # Gather: one reply per job, matched by its correlation id (selective receive).
    total = 0
    for k in range(len(jobs)):
        reply = sys.recv(tag="result", correlation_id=f"job-{k}", timeout_ms=20000)
        assert reply is not None, f"no result for job {k}"
        assert reply.sender == workers[k % nworkers], f"job {k} answered by the wrong worker"
        total += reply.body["sum"]
    # Stop the workers; each EXIT notice carries the worker's job count.
    by_worker = {}
    for pid in workers:
        sys.send(pid, None, tag="stop")
    for pid in workers:
        exit = sys.recv(tag="EXIT", sender=pid, timeout_ms=20000)
        assert exit is not None and exit.body["reason"] == "normal", f"worker {pid} did not stop cleanly: {exit}"
        by_worker[str(pid)] = exit.body["result"]
    return {"sum": total, "mode": "pool", "jobs": len(jobs), "by_worker": by_worker}


def programs():
    path = opts.get("worker_path") or "lua/map_reduce.lua"
    chunks = [items[c::nworkers] for c in range(nworkers)]
    pids = [sys.spawn(path=path, args={"items": chunk, "workers": 2}) for chunk in chunks]
    total, by_worker = 0, {}
    for pid in pids:
        info = sys.wait(pid, timeout_ms=20000)
        assert info is not None and info.state == "EXITED", f"{path} as pid {pid} failed: {info}"
        total += info.result["sum"]
        by_worker[str(pid)] = info.result["chunks"]
    return {"sum": total, "mode": "programs", "jobs": len(chunks), "by_worker": by_worker}


if mode not in ("pool", "programs"):
    raise ValueError(f"coordinator: mode must be 'pool' or 'programs', not {mode!r}")
result = pool() if mode == "pool" else programs()
sys.log(f"coordinator: {result['jobs']} jobs over {nworkers} Lua workers ({mode}): sum {result['sum']}")
sys.exit(result)
