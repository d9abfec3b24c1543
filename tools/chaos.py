"""Chaos: a pipeline of durable Lua agents, the server kill -9'd at seeded random moments and
restarted, against the same pipeline run without crashes.

    python tools/chaos.py                       # 20 stages, 300 items, 10 kills (a few minutes)
    python tools/chaos.py --stages 5 --items 40 --kills 3 --seed 7

A durable coordinator spawns `stages` durable stages (each monitored) in a chain. It sends each
item down the chain; every stage takes the item, reads the clock and a random number (journaled,
never part of the result), appends a line to its own file under a named lock, and passes the item
on (times 3, plus its stage number, modulo a prime); the last stage sends it back. The coordinator
writes every result to result.txt, stops the stages and waits for their EXITs, and sends its
result to a port. Then:
- the final result and the whole file tree are identical to those of the uncrashed run (so no
  append, message or spawn happened twice, and none was lost);
- the port got the coordinator's result exactly once.
tests/test_chaos.py runs a bounded version of it.
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import random
import signal
import sys
import tempfile
import time
from typing import Any

import llmos
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))  # the tests' server launcher
from llmosd_process import LlmosdServer  # noqa: E402

STAGE_LUA = """
local index, next_pid = args.index, args.next
while true do
    local m = sys.recv()
    if m.tag == "stop" then return index end
    local noise = {now = sys.now(), r = math.random()}  -- journaled, and never part of the result
    local value = (m.body * 3 + index) % 1000003
    sys.lock.acquire("files")
    sys.fs.write(string.format("stage%02d.txt", index), string.format("%d %d\\n", m.body, value), {append = true})
    sys.lock.release("files")
    sys.send(next_pid, value, {tag = m.tag})
end
"""

COORDINATOR_LUA = """
local stages = {}
local next_pid = sys.self()
for index = args.stages, 1, -1 do
    next_pid = sys.spawn{lua = args.stage, args = {index = index, next = next_pid}, durable = true, monitor = true}
    stages[index] = next_pid
end
local results = {}
for i = 1, args.items do
    sys.send(stages[1], i, {tag = "item"})
    if i % args.window == 0 or i == args.items then
        while #results < i do results[#results + 1] = sys.recv{tag = "item"}.body end
        sys.sleep(args.pause_ms)
    end
end
local lines = {}
for i, v in ipairs(results) do lines[i] = tostring(v) end
sys.fs.write("result.txt", table.concat(lines, "\\n"))
for index = 1, args.stages do sys.send(stages[index], nil, {tag = "stop"}) end
for index = 1, args.stages do sys.recv{tag = "EXIT"} end
local total = 0
for _, v in ipairs(results) do total = total + v end
sys.send(args.port, {count = #results, total = total}, {tag = "result"})
return {count = #results, total = total}
"""


@dataclasses.dataclass
class Outcome:
    result: Any
    files: dict[str, bytes]
    port_messages: list[Any]
    kills: int
    seconds: float


def tree(k: llmos.Client, path: str = "") -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for info in k.list_files(path):
        if info.is_dir:
            out.update(tree(k, info.path))
        else:
            out[info.path] = k.read_file(info.path)
    return out


def run_pipeline(data_dir: pathlib.Path, stages: int, items: int, kills: int, seed: int,
                 window: int = 5, pause_ms: int = 20, cpus: int = 2, timeout: float = 600.0) -> Outcome:
    """Run the pipeline on a fresh server in `data_dir`, kill -9'ing it `kills` times at moments drawn
    from `seed`, and return what it left."""
    rng = random.Random(seed)
    server = LlmosdServer(data_dir, "--model", "none", "--cpus", str(cpus))
    server.start()
    start = time.perf_counter()
    try:
        with llmos.Client(server.target) as k:
            port = k.open_port()
            pid = k.spawn(lua=COORDINATOR_LUA, durable=True, args={
                "stage": STAGE_LUA, "stages": stages, "items": items, "window": window, "pause_ms": pause_ms,
                "port": port})
        done = 0
        while done < kills:
            time.sleep(rng.uniform(0.05, 0.5))
            with llmos.Client(server.target) as k:
                if k.get(pid).state not in ("RUNNABLE", "RUNNING", "BLOCKED"):
                    break  # finished before this kill: no more moments to kill it at
            server.stop(signal.SIGKILL)
            server.start()
            done += 1
        with llmos.Client(server.target) as k:
            info = k.wait(pid, timeout=timeout)
            if info is None or info.state != "EXITED":
                raise AssertionError(f"the coordinator did not finish: {info}")
            messages = []
            while (msg := k.recv(port, timeout=0)) is not None:
                messages.append(msg.body)
            return Outcome(info.result, tree(k), messages, done, time.perf_counter() - start)
    finally:
        server.stop(signal.SIGKILL)


def compare(reference: Outcome, chaos: Outcome) -> list[str]:
    """What differs (empty: nothing)."""
    problems = []
    if chaos.result != reference.result:
        problems.append(f"result {chaos.result} != {reference.result}")
    if sorted(chaos.files) != sorted(reference.files):
        problems.append(f"files {sorted(chaos.files)} != {sorted(reference.files)}")
    for path in sorted(set(chaos.files) & set(reference.files)):
        if chaos.files[path] != reference.files[path]:
            problems.append(f"{path} differs ({len(chaos.files[path])} bytes, {len(reference.files[path])} expected)")
    if chaos.port_messages != [reference.result]:
        problems.append(f"the port got {chaos.port_messages}, not the result once")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=20)
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        reference = run_pipeline(root / "reference", args.stages, args.items, 0, args.seed, cpus=args.cpus)
        chaos = run_pipeline(root / "chaos", args.stages, args.items, args.kills, args.seed, cpus=args.cpus)
    steps = args.items * args.stages
    print(f"pipeline: {args.stages} durable stages + a durable coordinator, {args.items} items, {steps:,} stage steps "
          f"(each: a receive, a lock, an append, a send)")
    print(f"uncrashed run: {reference.seconds:.1f} s; with {chaos.kills} kill -9s (seed {args.seed}): "
          f"{chaos.seconds:.1f} s")
    print(f"result: {chaos.result}; files: {len(chaos.files)}, {sum(map(len, chaos.files.values())):,} bytes")
    problems = compare(reference, chaos)
    print("identical to the uncrashed run, nothing done twice" if not problems else "\n".join(problems))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
