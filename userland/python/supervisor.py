"""supervisor.py: a supervisor of flaky workers, with the userland library's supervisor
(llmos.std.supervisor, the twin of lua/supervisor.lua; docs/userland-library.md has its API).

Each child is restarted after it crashes (restart "transient" by default); a child that ends
normally is done. More than `intensity` restarts within `period_ms` and the supervisor gives
up: it kills its children and crashes with "GaveUp: supervisor: gave up ...".

args (all optional):
  strategy      one_for_one (default), one_for_all or rest_for_one
  intensity     restarts allowed within period_ms (default 3); period_ms (default 5000)
  children      list of {"id": "name", "python": source | "lua": source |
                "path": "python/x.py" or "lua/x.lua", "args": {...}, "restart": "transient",
                "fail_times": n}; each child gets its args plus "attempt" (1 for the first
                start) and "fail_times". Default: one built-in Python worker that crashes on its
                first fail_times attempts (default 2) and then returns 42.

Result: the supervisor's report, {"restarts", "strategy", "children": {id: {"status",
"restarts", "result", "exits": [{pid, reason, error}...]}}}.
"""
from typing import Any, Callable

from llmos.std import supervisor
from llmos.userland import sys

opts = sys.args if isinstance(sys.args, dict) else {}

# The default worker: crashes on purpose until its attempt passes fail_times.
FLAKY = """
from llmos.userland import sys
fail_times = sys.args.get("fail_times")
if sys.args["attempt"] <= (2 if fail_times is None else fail_times):
    raise RuntimeError(f"flaky worker failing on attempt {sys.args['attempt']}")
sys.exit(42)
"""


def child_args(spec: dict) -> Callable[[int], dict]:
    return lambda attempt: {**(spec.get("args") or {}), "attempt": attempt, "fail_times": spec.get("fail_times")}


children: list[dict[str, Any]] = []
for spec in opts.get("children") or [{"id": "worker", "fail_times": opts.get("fail_times")}]:
    program = {k: spec[k] for k in ("python", "lua", "path") if spec.get(k) is not None} or {"python": FLAKY}
    children.append({**program, "id": spec.get("id"), "restart": spec.get("restart", "transient"),
                     "args": child_args(spec)})

sys.exit(supervisor.run(children, strategy=opts.get("strategy", "one_for_one"), intensity=opts.get("intensity", 3),
                        period_ms=opts.get("period_ms", 5000)))
