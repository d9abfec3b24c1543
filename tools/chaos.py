"""Chaos: a pipeline of durable agents under a durable supervisor, the server kill -9'd at seeded
random moments and restarted, against the same pipeline run without crashes.

    python tools/chaos.py                       # 22 durable Lua stages, 60 items, 10 kills (a few minutes)
    python tools/chaos.py --items 20 --kills 3 --seed 7

A durable coordinator spawns a durable supervisor (the standard library's `require "supervisor"`,
one_for_one), whose children are the stages: durable agents, each registered by name, chained in
a list. The coordinator sends each item to the first stage; each stage takes it, passes it on
(times 3, plus its index, modulo a prime) to the next by name, and the last one sends it back.
What the stages do on the way (the steps):
- relay: a receive (every other one with ack, acknowledged after it passed the item on), the
  clock and a random number (journaled, never part of the result), an append to its own file
  under the mutex "files", a send;
- infer: the same, plus sys.infer with the item as seed (the server's `--model tiny`), whose
  text and token count go into its file and its token count into the value;
- producer and consumer: a bounded buffer between two stages, a file of at most BUFFER_SLOTS
  lines under the mutex "buf", with the conditions "notfull" and "notempty" (sys.cond.wait and
  sys.cond.signal): the producer appends the item, the consumer takes the first line and passes
  it on;
- python (PYTHON_STAGES of them): a relay written as a Python agent.
The coordinator writes every result to result.txt, asks the supervisor to stop (it kills the
stages and returns its report), and sends its result to a port. Then:
- the final result and the whole file tree are identical to those of the uncrashed run (so no
  append, message, infer or spawn happened twice, and none was lost; every item, received with
  ack or not, came back);
- the port got the coordinator's result exactly once;
- the engine's counters (/metrics' llmos_engine_generated_tokens, per server run) show that
  every infer journaled before the last restart was answered from the journal by that restart's
  replay (the last run's engine generated exactly the tokens of the infers journaled during it:
  a restart replays every journal from its start, so this covers every infer journaled before
  it). The counters of a run ended by kill -9 are read just before the kill, a lower bound (the
  engine may generate more before it dies): printed, not checked.
tests/test_chaos.py runs a bounded version of it.
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import random
import re
import signal
import socket
import sqlite3
import sys
import tempfile
import time
import urllib.request
from typing import Any

import llmos
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))  # the tests' server launcher
from llmosd_process import LlmosdServer  # noqa: E402
from llmosd.kernel.journal import decode_result  # noqa: E402

# The pipeline's durable Python stages (tests/test_chaos.py and this tool's default run both follow it).
PYTHON_STAGES = 2
BUFFER_SLOTS = 3  # the bounded buffer's size: small, so that the producer waits on "notfull" too

# Each stage gets args {index, next (a name, or the coordinator's pid), ack}.
RELAY_LUA = """
local index, next_stage = args.index, args.next
while true do
    local m = sys.recv(args.ack and {tag = "item", ack = true} or {tag = "item"})
    local noise = {now = sys.now(), r = math.random()}  -- journaled, and never part of the result
    local value = (m.body * 3 + index) % 1000003
    sys.lock.acquire("files")
    sys.fs.write(string.format("stage%02d.txt", index), string.format("%d %d\\n", m.body, value), {append = true})
    sys.lock.release("files")
    sys.send(next_stage, value, {tag = "item"})
    if args.ack then sys.ack(m) end
end
"""

INFER_LUA = """
local index, next_stage = args.index, args.next
local function hex(s) return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end)) end
while true do
    local m = sys.recv{tag = "item"}
    local r = sys.infer{prompt = "item " .. m.body, max_tokens = 6, seed = m.body, temperature = 1.0}
    local tokens = r.usage.completion_tokens
    local value = (m.body * 3 + index + tokens) % 1000003
    sys.lock.acquire("files")
    sys.fs.write(string.format("stage%02d.txt", index),
                 string.format("%d %d infer %d %s\\n", m.body, value, tokens, hex(r.text)), {append = true})
    sys.lock.release("files")
    sys.send(next_stage, value, {tag = "item"})
end
"""

# The bounded buffer: buffer.txt holds the items between the producer and the consumer, one a line.
BUFFER_LUA = """
local function items()
    local ok, data = pcall(sys.fs.read, "buffer.txt")  -- no file yet: empty
    local out = {}
    for line in (ok and data or ""):gmatch("[^\\n]+") do out[#out + 1] = line end
    return out
end
"""

PRODUCER_LUA = BUFFER_LUA + """
local index = args.index
while true do
    local m = sys.recv{tag = "item"}
    local value = (m.body * 3 + index) % 1000003
    sys.lock.acquire("buf")
    while #items() >= args.slots do sys.cond.wait("notfull", "buf") end
    sys.fs.write("buffer.txt", value .. "\\n", {append = true})
    sys.cond.signal("notempty")
    sys.lock.release("buf")
end
"""

CONSUMER_LUA = BUFFER_LUA + """
local index, next_stage = args.index, args.next
while true do
    sys.lock.acquire("buf")
    local waiting = items()
    while #waiting == 0 do
        sys.cond.wait("notempty", "buf")
        waiting = items()
    end
    local first = tonumber(table.remove(waiting, 1))
    sys.fs.write("buffer.txt", #waiting > 0 and table.concat(waiting, "\\n") .. "\\n" or "")
    sys.cond.signal("notfull")
    sys.lock.release("buf")
    local value = (first * 3 + index) % 1000003
    sys.fs.write(string.format("stage%02d.txt", index), string.format("%d %d\\n", first, value), {append = true})
    sys.send(next_stage, value, {tag = "item"})
end
"""

RELAY_PY = """
from llmos.userland import sys

index, next_stage = sys.args["index"], sys.args["next"]
while True:
    m = sys.recv(tag="item")
    value = (m.body * 3 + index) % 1000003
    sys.lock.acquire("files")
    sys.fs.write("stage%02d.txt" % index, "%d %d\\n" % (m.body, value), append=True)
    sys.lock.release("files")
    sys.send(next_stage, value, tag="item")
"""

SUPERVISOR_LUA = """
local supervisor = require "supervisor"
return supervisor.run{strategy = "one_for_one", intensity = 3, period_ms = 5000, children = args.children}
"""

COORDINATOR_LUA = """
local server = require "server"
local children = {}
for i, stage in ipairs(args.stages) do
    local spec = {id = stage.name, name = stage.name, durable = true, restart = "permanent",
                  args = {index = i, next = args.stages[i + 1] and args.stages[i + 1].name or sys.self(),
                          ack = stage.ack, slots = args.slots}}
    spec[stage.kind] = stage.program
    children[i] = spec
end
local sup = sys.spawn{lua = args.supervisor, args = {children = children}, durable = true}
local started = server.call(sup, "which_children", 120000)  -- answered once every stage is started
local results = {}
for i = 1, args.items do
    sys.send(args.stages[1].name, i, {tag = "item"})
    if i % args.window == 0 or i == args.items then
        while #results < i do results[#results + 1] = sys.recv{tag = "item"}.body end
        sys.sleep(args.pause_ms)
    end
end
local lines = {}
for i, v in ipairs(results) do lines[i] = tostring(v) end
sys.fs.write("result.txt", table.concat(lines, "\\n"))
server.call(sup, "stop", 120000)
local report = sys.wait(sup).result
local total = 0
for _, v in ipairs(results) do total = total + v end
local result = {count = #results, total = total, stages = #started, stopped = 0}
for _, child in pairs(report.children) do
    if child.status == "stopped" then result.stopped = result.stopped + 1 end
end
sys.send(args.port, result, {tag = "result"})
return result
"""


def stages(python_stages: int = PYTHON_STAGES) -> list[dict[str, Any]]:
    """The pipeline, in order: each stage a program and its kind (the spawn key: lua or python)."""
    lua = [("relay", RELAY_LUA)] * 4 + [("infer", INFER_LUA)] + [("relay", RELAY_LUA)] * 5 + [
        ("producer", PRODUCER_LUA), ("consumer", CONSUMER_LUA)] + [("relay", RELAY_LUA)] * 4 + [
        ("infer", INFER_LUA)] + [("relay", RELAY_LUA)] * 5
    out = []
    for i, (role, program) in enumerate(lua):
        out.append({"role": role, "kind": "lua", "program": program, "ack": role == "relay" and i % 2 == 1})
        if python_stages and i in (2, 14)[:python_stages]:
            out.append({"role": "python", "kind": "python", "program": RELAY_PY, "ack": False})
    for i, stage in enumerate(out):
        stage["name"] = f"s{i + 1:02d}"
    return out


@dataclasses.dataclass
class Outcome:
    result: Any
    files: dict[str, bytes]
    port_messages: list[Any]
    kills: int
    seconds: float
    stages: list[dict[str, Any]]
    engine_tokens: list[int]  # per server run: its engine's generated tokens, read at its end or just before its kill
    journaled_tokens: list[int]  # per server run: completion tokens of the infers journaled when it started

    @property
    def infer_tokens(self) -> int:
        """Completion tokens of every infer the pipeline made (from the stages' files)."""
        return sum(int(m.group(1)) for data in self.files.values() for m in re.finditer(rb" infer (\d+) ", data))

    @property
    def infer_calls(self) -> int:
        return sum(data.count(b" infer ") for data in self.files.values())


def tree(k: llmos.Client, path: str = "") -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for info in k.list_files(path):
        if info.is_dir:
            out.update(tree(k, info.path))
        else:
            out[info.path] = k.read_file(info.path)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_tokens(http: str) -> int:
    """The engine's tokens generated since this server started (/metrics; none while the model loads)."""
    with urllib.request.urlopen(f"http://{http}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    match = re.search(r"^llmos_engine_generated_tokens(?:_total)?(?:\{[^}]*\})? (\S+)$", text, re.M)
    if match is None:
        if "llmos_engine_" in text:
            raise AssertionError("/metrics has engine metrics but no llmos_engine_generated_tokens")
        return 0  # the engine is not loaded yet: it has run nothing
    return int(float(match.group(1)))


def journaled_infer_tokens(data_dir: pathlib.Path) -> int:
    """Completion tokens of the infers in the journals (read while the server is down)."""
    db = sqlite3.connect(f"file:{data_dir / 'kernel.db'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT result FROM journal WHERE call='infer'").fetchall()
    finally:
        db.close()
    total = 0
    for (blob,) in rows:
        answer = decode_result(blob)
        if type(answer) is tuple and answer and type(answer[0]) is dict:
            total += answer[0]["usage"]["completion_tokens"]
    return total


def run_pipeline(data_dir: pathlib.Path, items: int, kills: int, seed: int, python_stages: int = PYTHON_STAGES,
                 window: int = 5, pause_ms: int = 20, cpus: int = 2, timeout: float = 600.0,
                 spacing_s: float = 0.55) -> Outcome:
    """Run the pipeline on a fresh server in `data_dir`, kill -9'ing it `kills` times at moments drawn
    from `seed` (each 0.5 to 1.5 times `spacing_s` of the server's running time after the last), and
    return what it left."""
    rng = random.Random(seed)
    http = f"127.0.0.1:{free_port()}"
    server = LlmosdServer(data_dir, "--model", "tiny", "--cpus", str(cpus), "--http", http)
    pipeline = stages(python_stages)
    engine, journaled = [], [0]
    server.start()
    start = time.perf_counter()
    try:
        with llmos.Client(server.target) as k:
            port = k.open_port()
            pid = k.spawn(lua=COORDINATOR_LUA, durable=True, args={
                "supervisor": SUPERVISOR_LUA, "items": items, "window": window, "pause_ms": pause_ms,
                "port": port, "slots": BUFFER_SLOTS,
                "stages": [{key: s[key] for key in ("name", "kind", "program", "ack")} for s in pipeline]})
        done = 0
        while done < kills:
            time.sleep(rng.uniform(0.5, 1.5) * spacing_s)
            with llmos.Client(server.target) as k:
                if k.get(pid).state not in ("RUNNABLE", "RUNNING", "BLOCKED"):
                    break  # finished before this kill: no more moments to kill it at
            engine.append(engine_tokens(http))  # a lower bound: the engine may run more before the kill
            server.stop(signal.SIGKILL)
            journaled.append(journaled_infer_tokens(data_dir))
            server.start()
            done += 1
        with llmos.Client(server.target) as k:
            info = k.wait(pid, timeout=timeout)
            if info is None or info.state != "EXITED":
                every = [f"pid {p.pid} {p.kind} {p.name or ''} {p.state.value} {p.blocked_on or ''} {p.exit_reason} "
                         f"{p.error}".rstrip() for p in k.ps(include_ended=True)]
                raise AssertionError(f"the coordinator (pid {pid}) did not finish: {info}; every process (pid "
                                     f"{port} is the result's port):\n" + "\n".join(every))
            messages = []
            while (msg := k.recv(port, timeout=0)) is not None:
                messages.append(msg.body)
            engine.append(engine_tokens(http))
            return Outcome(info.result, tree(k), messages, done, time.perf_counter() - start, pipeline, engine,
                           journaled)
    finally:
        server.stop(signal.SIGKILL)


def compare(reference: Outcome, chaos: Outcome) -> list[str]:
    """What differs, or breaks a promise (empty: nothing)."""
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
    for outcome in (reference, chaos):
        # The last run's replay answered every infer journaled before it from the journal: its engine
        # generated the tokens of the infers made after it started, no more, no fewer.
        new = outcome.infer_tokens - outcome.journaled_tokens[-1]
        if outcome.engine_tokens[-1] != new:
            problems.append(f"the last server run's engine generated {outcome.engine_tokens[-1]} tokens, but the "
                            f"infers journaled during it have {new}")
    return problems


def kill_spacing(reference: Outcome, kills: int) -> float:
    """The mean running time between kills that spreads `kills` over the uncrashed run's length: a run
    with crashes needs at least that much running time (its replays come on top), so all of them land."""
    return reference.seconds / (kills + 1)


def report(reference: Outcome, chaos: Outcome, items: int, seed: int, kills: int) -> tuple[list[str], list[str]]:
    """The figures, and what went wrong (tools/chaos.py prints them; tests/test_chaos.py asserts none went wrong)."""
    roles: dict[str, int] = {}
    for stage in chaos.stages:
        roles[stage["role"]] = roles.get(stage["role"], 0) + 1
    lua = sum(1 for s in chaos.stages if s["kind"] == "lua")
    problems = compare(reference, chaos)
    if chaos.kills < kills:
        problems.append(f"only {chaos.kills} of {kills} kills landed before the pipeline ended")
    lines = [
        f"pipeline: {lua} durable Lua stages and {len(chaos.stages) - lua} durable Python stages under a durable "
        f"supervisor, a durable coordinator; roles {roles}",
        f"{items} items, {items * len(chaos.stages):,} stage steps (receives, {sum(s['ack'] for s in chaos.stages)} "
        f"stages with ack, sends, appends under a lock, {chaos.infer_calls} seeded infers, a bounded buffer of "
        f"{BUFFER_SLOTS} with two condition variables)",
        f"uncrashed run: {reference.seconds:.1f} s; with {chaos.kills} kill -9s (seed {seed}): {chaos.seconds:.1f} s",
        f"result: {chaos.result}; files: {len(chaos.files)}, {sum(map(len, chaos.files.values())):,} bytes",
        f"infers: {chaos.infer_calls} calls, {chaos.infer_tokens} tokens; journaled when each server run started: "
        f"{chaos.journaled_tokens} tokens; engine tokens per run (read at the kill, a lower bound, and at the end): "
        f"{chaos.engine_tokens} = {sum(chaos.engine_tokens)}; the last run's replay ran none of the "
        f"{chaos.journaled_tokens[-1]} journaled again ({chaos.engine_tokens[-1]} generated = "
        f"{chaos.infer_tokens} - {chaos.journaled_tokens[-1]})",
        f"tokens run again after a crash (infers whose answer was not journaled yet): at least "
        f"{max(0, sum(chaos.engine_tokens) - chaos.infer_tokens)}",
    ]
    lines.append("identical to the uncrashed run, nothing done twice, no journaled infer run again"
                 if not problems else "\n".join(problems))
    return lines, problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=60)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        reference = run_pipeline(root / "reference", args.items, 0, args.seed, cpus=args.cpus)
        chaos = run_pipeline(root / "chaos", args.items, args.kills, args.seed, cpus=args.cpus,
                             spacing_s=kill_spacing(reference, args.kills))
    lines, problems = report(reference, chaos, args.items, args.seed, args.kills)
    print("\n".join(lines))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
