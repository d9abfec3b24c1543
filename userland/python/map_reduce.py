"""map_reduce.py: a parallel map-reduce over worker processes (the twin of lua/map_reduce.lua).

Splits args["items"] into args["workers"] chunks, spawns one worker per chunk
with monitor=True (so we get an EXIT message when each worker ends), sends
each worker its chunk, and gathers the partial results. A worker that
crashes is noticed through its EXIT message; its chunk is then computed
again by a fresh worker (at most once per chunk), so the sum stays right.

Workers are Python agents (lang="python", the default) or Lua processes
(lang="lua"): both speak the same protocol, so the coordinator does not care.

args (all optional):
  items        numbers to square and sum (default 1..10)
  workers      number of chunks, one worker each (default 4)
  lang         "python" or "lua": what the workers are written in
  crash_chunk  the first worker for this chunk (0-based) crashes on purpose

Result: {"sum": <sum of squares>, "chunks": n, "crashed": <crashes seen>,
         "retried": <retries>, "lang": lang}
"""
from llmos.userland import sys

opts = sys.args if isinstance(sys.args, dict) else {}
items = opts.get("items") or list(range(1, 11))
nworkers = max(1, min(opts.get("workers") or 4, len(items)))
lang = opts.get("lang") or "python"
if lang not in ("python", "lua"):
    raise ValueError(f"map_reduce: lang must be 'python' or 'lua', not {lang!r}")

# The worker: receives a chunk, squares and sums it, replies, and exits.
PY_WORKER = """
from llmos.userland import sys
job = sys.recv(tag="job", timeout_ms=10000)
assert job is not None, "no job came"
if sys.args.get("crash"):
    raise RuntimeError("worker crashing on purpose")
total = sum(x * x for x in job.body["items"])
sys.send(job.sender, {"chunk": job.body["chunk"], "sum": total}, tag="result")
sys.exit(total)
"""
LUA_WORKER = """
local job = sys.recv{tag = "job", timeout_ms = 10000}
assert(job, "no job came")
if args.crash then error("worker crashing on purpose") end
local sum = 0
for _, x in ipairs(job.body.items) do sum = sum + x * x end
sys.send(job.from, {chunk = job.body.chunk, sum = sum}, {tag = "result"})
return sum
"""

# Split the items into chunks of nearly equal size (item i goes to chunk i mod n).
chunks = [items[c::nworkers] for c in range(nworkers)]

by_pid = {}  # live worker pid -> chunk index


def start(chunk, crash):
    program = {"lua": LUA_WORKER} if lang == "lua" else {"python": PY_WORKER}
    pid = sys.spawn(**program, args={"crash": crash}, monitor=True)
    by_pid[pid] = chunk
    sys.send(pid, {"chunk": chunk, "items": chunks[chunk]}, tag="job")
    return pid


for c in range(len(chunks)):
    start(c, c == opts.get("crash_chunk"))

partial = {}  # chunk index -> sum
crashed = retried = 0
retries = set()
while len(partial) < len(chunks):
    msg = sys.recv(timeout_ms=20000)
    assert msg is not None, "workers went silent"
    if msg.tag == "result":
        partial[msg.body["chunk"]] = msg.body["sum"]
    elif msg.tag == "EXIT":
        # body = {pid, state, reason, result, error}
        chunk = by_pid.pop(msg.body["pid"], None)
        if msg.body["reason"] != "normal" and chunk is not None and chunk not in partial:
            crashed += 1
            sys.log(f"map_reduce: worker {msg.body['pid']} for chunk {chunk} ended "
                    f"({msg.body['reason']}): {msg.body.get('error')}")
            assert chunk not in retries, f"chunk {chunk} failed twice"
            retries.add(chunk)
            retried += 1
            start(chunk, False)

sys.exit({"sum": sum(partial.values()), "chunks": len(chunks), "crashed": crashed, "retried": retried,
          "lang": lang})
