"""supervisor.py: an Erlang-style one_for_one supervisor (the twin of lua/supervisor.lua).

Starts each child with monitor=True. When a child ends abnormally (it
crashed, or was killed), only that child is restarted (one_for_one), up to
max_restarts times per child; past that the supervisor gives up on it. A
child that ends normally is done and is not restarted.

args (all optional):
  max_restarts  restarts allowed per child (default 3)
  timeout_ms    give up waiting for EXIT notices after this long (default 30000)
  fail_times    for the default child: how many first attempts crash (default 2)
  children      list of {"id": "name", "python": source | "lua": source |
                "path": "python/x.py" or "lua/x.lua", "args": {...},
                "fail_times": n}; each child gets its args plus "attempt"
                (1 for the first start) and "fail_times" in its args.
                Default: one built-in Python worker that crashes on its first
                fail_times attempts and then returns 42.

Result, a report:
  {"children": {id: {"status": "done" | "gave_up", "restarts": n,
                     "result": <last result>, "exits": [{pid, reason, error}...]}},
   "restarts": <total restarts>}
"""
from llmos.userland import sys

opts = sys.args if isinstance(sys.args, dict) else {}
max_restarts = opts.get("max_restarts", 3)

# The default worker: crashes on purpose until its attempt passes fail_times.
FLAKY = """
from llmos.userland import sys
fail_times = sys.args.get("fail_times")
if sys.args["attempt"] <= (2 if fail_times is None else fail_times):
    raise RuntimeError(f"flaky worker failing on attempt {sys.args['attempt']}")
sys.exit(42)
"""

specs = opts.get("children") or [{"id": "worker", "fail_times": opts.get("fail_times")}]
children = {}  # id -> state
by_pid = {}    # live child pid -> id


def start(child_id):
    child = children[child_id]
    spec = child["spec"]
    child["attempt"] += 1
    child_args = dict(spec.get("args") or {})
    child_args["attempt"] = child["attempt"]
    child_args["fail_times"] = spec.get("fail_times")
    program = {k: spec[k] for k in ("python", "lua", "path") if spec.get(k) is not None} or {"python": FLAKY}
    pid = sys.spawn(**program, args=child_args, monitor=True)
    by_pid[pid] = child_id
    sys.log(f"supervisor: started {child_id} as pid {pid} (attempt {child['attempt']})")


for i, spec in enumerate(specs, 1):
    child_id = spec.get("id") or f"child{i}"
    children[child_id] = {"spec": spec, "attempt": 0, "restarts": 0, "exits": [], "status": "running",
                          "result": None}
    start(child_id)

total = 0
while by_pid:
    msg = sys.recv(tag="EXIT", timeout_ms=opts.get("timeout_ms", 30000))
    assert msg is not None, "children went silent"
    exit = msg.body  # {pid, state, reason, result, error}
    child_id = by_pid.pop(exit["pid"], None)
    if child_id is None:
        continue
    child = children[child_id]
    child["exits"].append({"pid": exit["pid"], "reason": exit["reason"], "error": exit.get("error")})
    if exit["reason"] == "normal":
        child["status"], child["result"] = "done", exit.get("result")
    elif child["restarts"] < max_restarts:
        child["restarts"] += 1
        total += 1
        sys.log(f"supervisor: {child_id} (pid {exit['pid']}) ended with {exit['reason']}: "
                f"{exit.get('error')}; restarting")
        start(child_id)
    else:
        child["status"] = "gave_up"
        sys.log(f"supervisor: {child_id} failed {child['restarts'] + 1} times; giving up")

sys.exit({
    "children": {cid: {"status": c["status"], "restarts": c["restarts"], "result": c["result"], "exits": c["exits"]}
                 for cid, c in children.items()},
    "restarts": total,
})
