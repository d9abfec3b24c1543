"""Durable processes (spawn with durable): their mailboxes are stored, their syscalls journaled, and a
restarted server (kill -9 included) brings them back with the same pid and replays them to where they
were, with nothing done twice. Real servers over real gRPC, killed and restarted on their data dir."""
from __future__ import annotations

import pathlib
import signal
import sqlite3
import textwrap
import time
from typing import Any

import grpc
import pytest

import llmos
from llmosd.kernel.config import KernelConfig, SpawnSpec
from llmosd.kernel.journal import ProcessJournal
from llmosd.kernel.kernel import Kernel
from llmosd.kernel.mailbox import ANY
from llmosd.kernel.store import ProcessRecord
from llmosd.kernel.waiting import Waiter
from llmosd.lua.slices import LuaRuntime
from llmosd_process import LlmosdServer
from statuses import status_of

WAIT_S = 60.0  # generous bound for anything here to happen


def restart(server: LlmosdServer) -> llmos.Client:
    server.stop(signal.SIGKILL)
    server.start()
    return llmos.Client(server.target)


def bodies(k: llmos.Client, port: int, n: int) -> list[Any]:
    out = []
    for _ in range(n):
        msg = k.recv(port, timeout=WAIT_S)
        assert msg is not None, f"only {out} came"
        out.append(msg.body)
    return out


def taken(k: llmos.Client, port: int) -> Any:
    """The next message of `port`, taken when already there: a Recv that waits is handed a message
    before the server deletes its stored copy, which a kill -9 at that moment would keep."""
    for _ in range(int(WAIT_S / 0.01)):
        msg = k.recv(port, timeout=0)
        if msg is not None:
            return msg.body
        time.sleep(0.01)
    raise AssertionError("nothing came")


def nothing_more(k: llmos.Client, port: int) -> None:
    assert k.recv(port, timeout=0) is None


# Reports what only a journal can give back the same (time, random numbers, a child's pid, the
# order of pairs), appends to a file, and waits for "go" after each round.
REPORTER = textwrap.dedent("""
    local port = args.port
    local t = {}
    for i = 1, 20 do t["key" .. i] = i end
    local order = {}
    for k in pairs(t) do order[#order + 1] = k end
    local child = sys.spawn{lua = "return sys.recv().body", durable = true}
    for round = 1, 2 do
        sys.fs.write("log.txt", "round " .. round .. "\\n", {append = true})
        sys.send(port, {round = round, now = sys.now(), random = math.random(1, 1000000),
                        child = child, order = table.concat(order, ","), time = os.time()})
        local go = sys.recv{tag = "go"}
    end
    sys.send(child, "bye")
    return sys.wait(child).result
""")


def test_a_durable_process_comes_back_after_kill_9_and_does_nothing_twice(fresh_llmosd: LlmosdServer) -> None:
    with llmos.Client(fresh_llmosd.target) as k:
        port = k.open_port()
        pid = k.spawn(lua=REPORTER, args={"port": port}, durable=True)
        first = bodies(k, port, 1)[0]
    with restart(fresh_llmosd) as k:
        assert k.get(pid).state in ("BLOCKED", "RUNNABLE", "RUNNING")
        k.send(pid, "now", tag="go")
        second = bodies(k, port, 1)[0]
        assert second["round"] == 2 and second["child"] == first["child"]
        nothing_more(k, port)  # round 1 was not sent again
    with restart(fresh_llmosd) as k:  # and once more, mid-round 2
        k.send(pid, "again", tag="go")
        info = k.wait(pid, timeout=WAIT_S)
        assert (info.state, info.result) == ("EXITED", "bye")
        nothing_more(k, port)
        assert k.read_file("log.txt") == b"round 1\nround 2\n"


def test_a_replay_gives_the_program_the_journaled_time_random_numbers_and_pairs_order(
        fresh_llmosd: LlmosdServer) -> None:
    program = textwrap.dedent("""
        local t = {}
        for i = 1, 30 do t["k" .. i] = true end
        local order = {}
        for k in pairs(t) do order[#order + 1] = k end
        local seen = {now = sys.now(), random = math.random(), order = table.concat(order, ",")}
        sys.send(args.port, seen)
        sys.recv{tag = "go"}
        sys.send(args.port, seen)  -- what the replay computed, sent live
    """)
    with llmos.Client(fresh_llmosd.target) as k:
        port = k.open_port()
        pid = k.spawn(lua=program, args={"port": port}, durable=True)
        before = bodies(k, port, 1)[0]
    with restart(fresh_llmosd) as k:
        k.send(pid, None, tag="go")
        assert bodies(k, port, 1)[0] == before
        assert k.wait(pid, timeout=WAIT_S).state == "EXITED"


def test_messages_waiting_in_a_durable_mailbox_survive_a_restart_in_order(fresh_llmosd: LlmosdServer) -> None:
    program = textwrap.dedent("""
        sys.log("started", {})  -- a table's address differs from run to run: logs are not journaled
        sys.recv{tag = "start"}
        local got = {}
        for i = 1, 5 do got[i] = sys.recv{tag = "item"}.body end
        return got
    """)
    with llmos.Client(fresh_llmosd.target) as k:
        pid = k.spawn(lua=program, durable=True)
        plain = k.spawn(lua=program)
        for i in range(5):
            k.send(pid, i, tag="item")
    with restart(fresh_llmosd) as k:
        info = k.get(plain)
        assert (info.state, info.exit_reason) == ("KILLED", "server_restart")  # not durable: not brought back
        k.send(pid, None, tag="start")
        info = k.wait(pid, timeout=WAIT_S)
        assert (info.state, info.result) == ("EXITED", [0, 1, 2, 3, 4])


class Killed(Exception):
    """Stands for a kill -9 at the point it is raised."""


class Handed(Waiter):
    """A receiver waiting in the kernel: keeps what it is handed."""

    def __init__(self) -> None:
        super().__init__()
        self.got: list[Any] = []

    def _wake(self, value: Any) -> None:
        self.got.append(value)


@pytest.mark.parametrize("receiver", ["none", "without_ack", "with_ack"])
def test_a_durable_send_to_a_port_is_stored_in_the_transaction_of_its_journal_entry(
        tmp_path: pathlib.Path, receiver: str) -> None:
    """The crash window of an output commit, made certain: the server dies right after the commit
    that journals a durable process's send to a port. The port's copy must be in that commit, or
    the replay answers the send from the journal and the port never gets the message. A receive
    without ack waiting for it consumes it as it is handed over (at most once): never stored."""
    kernel = Kernel(KernelConfig(data_dir=str(tmp_path)))
    try:
        port, _ = kernel.open_port()
        waiter = Handed()
        if receiver == "without_ack":
            assert kernel.recv(port, ANY, waiter, None) is None
        elif receiver == "with_ack":
            with kernel.lock:
                assert kernel.acks.recv_locked(kernel.procs[port], ANY, waiter, None, 60.0) is None
        journal = ProcessJournal(4242, kernel.store, seed=1)
        flush = kernel.store.flush

        def flush_then_die() -> None:
            flush()
            raise Killed

        def stored() -> list[str]:  # what a restart would find
            with sqlite3.connect(kernel.store.path) as db:
                return [body for body, in db.execute("SELECT body FROM port_messages WHERE port=? ORDER BY id",
                                                     (port,))]

        kernel.store.flush = flush_then_die  # type: ignore[method-assign]
        with pytest.raises(Killed):
            kernel.send(0, port, "item", "b", b"", "", on_sent=lambda msg: journal.entry_ops("send", 0, msg.id))
        kernel.store.flush = flush  # type: ignore[method-assign]
        with sqlite3.connect(kernel.store.path) as db:
            assert db.execute("SELECT COUNT(*) FROM journal WHERE pid=4242 AND call='send'").fetchone()[0] == 1
        assert stored() == ([] if receiver == "without_ack" else ['"b"']) and waiter.got == []
        # Uncrashed: the waiting receiver (still there: "b" never reached it) is handed "c".
        kernel.send(0, port, "item", "c", b"", "", on_sent=lambda msg: journal.entry_ops("send", 1, msg.id))
        assert stored() == ([] if receiver == "without_ack" else ['"b"', '"c"'])
        got = [getattr(value, "msg", value).body for value in waiter.got]  # a lease holds its message
        assert got == ([] if receiver == "none" else ["c"])
    finally:
        kernel.shutdown()


def lua_kernel(data_dir: pathlib.Path) -> Kernel:
    """An in-process server on `data_dir`: a kernel with its Lua userland, durable processes brought back."""
    kernel = Kernel(KernelConfig(data_dir=str(data_dir)))
    kernel.add_runtime(LuaRuntime(kernel))
    kernel.start_recovered()
    return kernel


def left_by_a_crash(kernel: Kernel, to: pathlib.Path) -> None:
    """Copy what a kill -9 of `kernel` now would leave on disk (what is committed) to the data dir `to`."""
    to.mkdir()
    with sqlite3.connect(kernel.store.path) as db, sqlite3.connect(to / "kernel.db") as copy:
        db.backup(copy)


def ended(kernel: Kernel, pid: int) -> ProcessRecord:
    for _ in range(int(WAIT_S / 0.01)):
        rec, _ = kernel.get(pid)
        if rec.ended_at_ms is not None:
            return rec
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} did not end: {rec}")


# A durable parent that reports the EXIT notice of a durable child (args.child, a Lua program).
WATCHER = textwrap.dedent("""
    local child = sys.spawn{lua = args.child, durable = true, monitor = true}
    local exit = sys.recv{tag = "EXIT"}.body
    return {child = exit.pid == child, state = exit.state, reason = exit.reason, result = exit.result}
""")


def watcher_after_the_crash(data_dir: pathlib.Path, watcher: int, expected: dict) -> None:
    """A server started on what the crash left: the WATCHER ends with the EXIT notice `expected`."""
    kernel = lua_kernel(data_dir)
    try:
        rec = ended(kernel, watcher)
        assert (rec.state, rec.result) == ("EXITED", expected)
    finally:
        kernel.shutdown()


def test_a_kill_answered_before_a_crash_is_carried_out_after_it(tmp_path: pathlib.Path) -> None:
    """The crash window of a deferred kill, made certain: a durable process kills itself (running:
    its userland ends it at its next check) and the server dies right after the commit of the kill's
    journal entry, before the process has ended. A replay answers the kill from the journal and
    kills nothing: the restart must end it with the kill's reason, and its watcher get the notice."""
    child = 'sys.kill(sys.self(), "stopped")\nsys.recv{tag = "never"}'
    expected = {"child": True, "state": "KILLED", "reason": "stopped"}
    kernel = lua_kernel(tmp_path / "run")
    enqueue, crashed = kernel.store.enqueue, []

    def enqueue_then_die_if_killed(ops: list) -> None:
        enqueue(ops)
        if not crashed and any(params[2:3] == ("kill",) for _, params in ops if type(params) is tuple):
            kernel.store.flush()  # the kill's entry is committed, then the server dies
            left_by_a_crash(kernel, tmp_path / "crashed")
            crashed.append(True)

    kernel.store.enqueue = enqueue_then_die_if_killed  # type: ignore[method-assign]
    try:
        watcher = kernel.spawn(SpawnSpec(lua=WATCHER, args={"child": child}, durable=True))
        assert ended(kernel, watcher).result == expected  # uncrashed
    finally:
        kernel.shutdown()
    assert crashed
    watcher_after_the_crash(tmp_path / "crashed", watcher, expected)


def test_a_durable_processs_exit_and_its_exit_notices_are_one_commit(tmp_path: pathlib.Path) -> None:
    """The crash window of an EXIT notice, made certain: the server dies right after the first commit
    that records the end of a durable child. A restart finds it ended and does not bring it back,
    so its notice to its durable watcher must be in that commit, or the watcher waits for ever."""
    expected = {"child": True, "state": "EXITED", "reason": "normal", "result": "done"}
    kernel = lua_kernel(tmp_path / "run")
    crashed = []

    def die_once_the_child_has_ended(statement: str) -> None:
        # Called as each statement starts: what the commits before it made is what a crash now leaves.
        if not crashed:
            with sqlite3.connect(kernel.store.path) as db:
                if db.execute("SELECT 1 FROM processes WHERE parent!=0 AND ended_at_ms IS NOT NULL").fetchone():
                    left_by_a_crash(kernel, tmp_path / "crashed")
                    crashed.append(True)

    kernel.store._db.set_trace_callback(die_once_the_child_has_ended)
    try:
        watcher = kernel.spawn(SpawnSpec(lua=WATCHER, args={"child": "return 'done'"}, durable=True))
        assert ended(kernel, watcher).result == expected  # uncrashed
        kernel.store.query("SELECT 1")  # a statement after the last commit
    finally:
        kernel.store._db.set_trace_callback(None)
        kernel.shutdown()
    assert crashed
    watcher_after_the_crash(tmp_path / "crashed", watcher, expected)


class JournaledAcquire(Waiter):
    """A durable Python agent's acquire (python/durable.py's _acquire), whose entry is journaled off
    the kernel lock once it holds the lock: here at the earliest, as it is handed the lock."""

    def __init__(self, journal: ProcessJournal, name: str) -> None:
        super().__init__()
        self.journal, self.name = journal, name

    def _wake(self, value: Any) -> None:
        self.journal.record("lock_acquire", (self.name,), {"reply": b""}, lock=(self.name, "mutex", 1))


def test_a_lock_handed_over_by_a_durable_holders_end_is_journaled_after_that_end(tmp_path: pathlib.Path) -> None:
    """A durable holder that ends hands its lock to a durable waiter. Were the waiter's entry (which a
    Python agent journals off the kernel lock) committed before the holder's end, a crash between
    would bring the holder back holding the lock the waiter's journal says it holds: held twice."""
    kernel = lua_kernel(tmp_path)
    seen: list[bool] = []  # at the first commit of the waiter's entry: whether the holder's end is in

    def check(statement: str) -> None:
        if not seen:
            with sqlite3.connect(kernel.store.path) as db:
                if db.execute("SELECT 1 FROM journal WHERE pid=? AND call='lock_acquire'", (waiting,)).fetchone():
                    seen.append(db.execute("SELECT ended_at_ms IS NOT NULL FROM processes WHERE pid=?",
                                           (holder,)).fetchone() == (1,))

    try:
        holder = kernel.spawn(SpawnSpec(lua='sys.lock.acquire("handed")\nreturn sys.recv{tag = "go"}.body',
                                        durable=True))
        waiting = kernel.spawn(SpawnSpec(lua='sys.recv{tag = "never"}', durable=True))
        for _ in range(int(WAIT_S / 0.01)):
            if kernel.get(holder)[0].state == "BLOCKED":  # holding the lock, waiting for "go"
                break
            time.sleep(0.01)
        kernel.store._db.set_trace_callback(check)
        with kernel.lock:
            assert kernel.sync.acquire("default", "handed", waiting, 0,
                                       JournaledAcquire(kernel.journals[waiting], "handed"), None) is None
        kernel.send(0, holder, "go", "bye", b"", "")
        assert ended(kernel, holder).result == "bye"
        kernel.store.query("SELECT 1")  # a statement after the last commit
        assert seen == [True]
    finally:
        kernel.store._db.set_trace_callback(None)
        kernel.shutdown()


def test_only_a_durable_process_takes_gives_back_or_waits_on_its_locks(llmosd: LlmosdServer) -> None:
    """A client's Acquire, Release or CondWait naming a durable process would not be in its journal
    (a replay would not hold the lock, or hold it twice): refused, even to an owner, who may make
    them for a process that is not durable. A signal names its signaller only for its namespace."""
    holder = 'sys.lock.acquire(args.lock)\nsys.recv{tag = "go"}\nsys.lock.release(args.lock)\nreturn "released"'
    with llmos.Client(llmosd.target) as k:
        durable = k.spawn(lua=holder, args={"lock": "durable-self-held"}, durable=True)
        plain = k.spawn(lua=holder, args={"lock": "durable-self-plain"})
        for _ in range(int(WAIT_S / 0.01)):  # each holds its lock, waiting for "go"
            if k.get(durable).state == "BLOCKED" and k.get(plain).state == "BLOCKED":
                break
            time.sleep(0.01)
        for call in (lambda: k.acquire(durable, "durable-self-other", timeout=0),
                     lambda: k.release(durable, "durable-self-held"),
                     lambda: k.cond_wait(durable, "durable-self-cond", "durable-self-held", timeout=0)):
            code, details = status_of(call)
            assert code == grpc.StatusCode.PERMISSION_DENIED and "durable" in details, details
        assert k.cond_signal("durable-self-cond", pid=durable) == 0
        assert k.acquire(plain, "durable-self-other", timeout=0) == {"acquired": True}
        k.release(plain, "durable-self-other")
        for pid in (durable, plain):
            k.send(pid, None, tag="go")
            info = k.wait(pid, timeout=WAIT_S)
            assert (info.state, info.result) == ("EXITED", "released")  # the lock it held was its own


def test_a_message_received_before_the_crash_is_not_received_again(fresh_llmosd: LlmosdServer) -> None:
    program = textwrap.dedent("""
        local got = {}
        for i = 1, 3 do
            got[i] = sys.recv{tag = "item"}.body
            sys.send(args.port, got[i])
        end
        return got
    """)
    with llmos.Client(fresh_llmosd.target) as k:
        port = k.open_port()
        pid = k.spawn(lua=program, args={"port": port}, durable=True)
        k.send(pid, "a", tag="item")
        assert bodies(k, port, 1) == ["a"]
        k.send(pid, "b", tag="item")  # waiting, or taken: either way received once
    with restart(fresh_llmosd) as k:
        k.send(pid, "c", tag="item")
        info = k.wait(pid, timeout=WAIT_S)
        assert (info.state, info.result) == ("EXITED", ["a", "b", "c"])
        assert bodies(k, port, 2) == ["b", "c"]
        nothing_more(k, port)


# Two durable processes exchanging messages (the C fast path journals both sides once they are live).
PING_PONG = textwrap.dedent("""
    local peer = sys.spawn{lua = [==[
        local sum = 0
        for i = 1, args do local m = sys.recv{} ; sum = sum + m.body ; sys.send(m.from, m.body) end
        return sum
    ]==], args = args.n, durable = true}
    sys.recv{tag = "go"}
    for i = 1, args.n do
        sys.send(peer, i)
        local m = sys.recv{}
        if m.body ~= i then error("round " .. i .. " got " .. tostring(m.body)) end
    end
    return {mine = args.n, peer = sys.wait(peer).result}
""")


def test_durable_ping_pong_killed_mid_run_ends_as_if_never_killed(fresh_llmosd: LlmosdServer) -> None:
    n = 20_000
    k = llmos.Client(fresh_llmosd.target)
    pid = k.spawn(lua=PING_PONG, args={"n": n}, durable=True)
    while k.get(pid).blocked_on != "recv":
        time.sleep(0.01)
    k.send(pid, None, tag="go")
    for _ in range(3):  # a kill leaves a message in flight about every other time
        deadline = time.monotonic() + WAIT_S
        while (info := k.get(pid)).usage["messages_sent"] < 1000:  # killed mid-run, with both live
            assert time.monotonic() < deadline, "the pair stopped exchanging messages"
            time.sleep(0.002)
        assert info.state != "EXITED", "the run ended before the server could be killed"
        k.close()
        k = restart(fresh_llmosd)
    with k:
        info = k.wait(pid, timeout=WAIT_S)
        assert (info.state, info.error, info.result) == ("EXITED", "", {"mine": n, "peer": n * (n + 1) // 2})


def test_durable_children_come_back_with_their_monitors(fresh_llmosd: LlmosdServer) -> None:
    program = textwrap.dedent("""
        local child = sys.spawn{lua = "return sys.recv{tag = 'go'}.body * 2", durable = true, monitor = true}
        sys.send(args.port, child)
        local exit = sys.recv{tag = "EXIT"}
        return {child = child, result = exit.body.result}
    """)
    with llmos.Client(fresh_llmosd.target) as k:
        port = k.open_port()
        parent = k.spawn(lua=program, args={"port": port}, durable=True)
        child = bodies(k, port, 1)[0]
    with restart(fresh_llmosd) as k:
        assert k.get(child).parent == parent
        k.send(child, 21, tag="go")
        info = k.wait(parent, timeout=WAIT_S)
        assert (info.state, info.result) == ("EXITED", {"child": child, "result": 42})
        nothing_more(k, port)


def test_a_replay_that_makes_a_different_call_crashes_with_replay_divergence(fresh_llmosd: LlmosdServer) -> None:
    # A table's address differs from run to run: a program that sends it diverges in its replay.
    program = textwrap.dedent("""
        sys.send(args.port, tostring({}))
        sys.recv{tag = "go"}
    """)
    with llmos.Client(fresh_llmosd.target) as k:
        port = k.open_port()
        pid = k.spawn(lua=program, args={"port": port}, durable=True)
        bodies(k, port, 1)
    with restart(fresh_llmosd) as k:
        info = k.wait(pid, timeout=WAIT_S)
        assert (info.state, info.exit_reason) == ("CRASHED", "replay_divergence")
        assert "syscall #1" in info.error and "send" in info.error
        nothing_more(k, port)


def test_a_durable_program_whose_file_changed_is_not_replayed(tmp_path: Any) -> None:
    root = tmp_path / "userland"
    root.mkdir()
    (root / "agent.lua").write_text("sys.send(args.port, 'started')\nsys.recv{tag = 'go'}\nreturn 1\n")
    server = LlmosdServer(tmp_path / "data", "--model", "none", "--cpus", "2", userland_root=root)
    server.start()
    try:
        with llmos.Client(server.target) as k:
            port = k.open_port()
            pid = k.spawn(path="agent.lua", args={"port": port}, durable=True)
            bodies(k, port, 1)
        (root / "agent.lua").write_text("sys.send(args.port, 'version 2')\nreturn 2\n")
        with restart(server) as k:
            info = k.wait(pid, timeout=WAIT_S)
            assert (info.state, info.exit_reason) == ("CRASHED", "program_changed")
            nothing_more(k, port)
    finally:
        server.stop(signal.SIGKILL)


def test_an_ended_durable_process_stays_ended_and_sigterm_keeps_live_ones(fresh_llmosd: LlmosdServer) -> None:
    with llmos.Client(fresh_llmosd.target) as k:
        done = k.spawn(lua="return 7", durable=True)
        assert k.wait(done, timeout=WAIT_S).result == 7
        waiting = k.spawn(lua="return sys.recv().body", durable=True)
        plain = k.spawn(lua="return sys.recv().body")
    fresh_llmosd.stop(signal.SIGTERM)
    fresh_llmosd.start()
    with llmos.Client(fresh_llmosd.target) as k:
        assert k.wait(done, timeout=WAIT_S).result == 7
        info = k.wait(plain, timeout=WAIT_S)
        assert (info.state, info.exit_reason) == ("KILLED", "shutdown")  # not durable: not brought back
        k.send(waiting, "still here")
        info = k.wait(waiting, timeout=WAIT_S)
        assert (info.state, info.result) == ("EXITED", "still here")


def test_sys_spawn_durable_must_be_a_boolean(stub: Any) -> None:
    from llmos.v1 import kernel_pb2 as pb
    pid = stub.Spawn(pb.SpawnRequest(lua="local ok, err = pcall(sys.spawn, {lua = 'return 1', durable = 1})\n"
                                         "return err")).pid
    reply = stub.Wait(pb.WaitRequest(pid=pid, timeout_ms=60_000))
    assert "durable must be a boolean" in reply.process.result.string_value


def test_a_replayed_process_holds_the_locks_it_held_and_appends_once(fresh_llmosd: LlmosdServer) -> None:
    program = textwrap.dedent("""
        sys.lock.acquire("shared")
        sys.fs.write("out.txt", "a", {append = true})
        sys.send(args.port, "holding")
        sys.recv{tag = "go"}
        sys.fs.write("out.txt", "b", {append = true})
        sys.lock.release("shared")
        return "done"
    """)
    contender = "local got = sys.lock.try_acquire('shared') return got ~= nil"
    with llmos.Client(fresh_llmosd.target) as k:
        port = k.open_port()
        pid = k.spawn(lua=program, args={"port": port}, durable=True)
        bodies(k, port, 1)
    with restart(fresh_llmosd) as k:
        k.send(pid, None, tag="ping")  # not what it waits for: it stays blocked, replayed, live
        assert k.run(contender, timeout=WAIT_S).result is False  # the lock is its again
        k.send(pid, None, tag="go")
        assert k.wait(pid, timeout=WAIT_S).result == "done"
        assert k.run(contender, timeout=WAIT_S).result is True
        assert k.read_file("out.txt") == b"ab"


# Waits on the condition "c" with the mutex "m", after telling the port; then reports what it got and
# whether it holds "m" again (a try_acquire of a mutex one holds is refused).
COND_WAITER = textwrap.dedent("""
    sys.lock.acquire("m")
    sys.send(args.port, "waiting")
    local r = sys.cond.wait("c", "m", args.timeout_ms)
    local again, err = pcall(sys.lock.try_acquire, "m")
    sys.lock.release("m")
    return {signalled = r.signalled, timed_out = r.timed_out, held = not again}
""")


def test_a_durable_cond_wait_cut_by_a_restart_waits_again_holding_nothing(fresh_llmosd: LlmosdServer) -> None:
    with llmos.Client(fresh_llmosd.target) as k:
        port = k.open_port()
        pid = k.spawn(lua=COND_WAITER, args={"port": port, "timeout_ms": 600_000}, durable=True)
        assert taken(k, port) == "waiting"
    with restart(fresh_llmosd) as k:
        # The mutex is free (the wait had given it back), and the replayed process waits on "c" again.
        # The wait holds its place on "c" from the restart (kernel/journal.py, rule 5): the first signal,
        # made whatever its replay has reached, wakes it.
        assert k.cond_signal("c") == 1
        info = k.wait(pid, timeout=WAIT_S)
        assert (info.state, info.result) == ("EXITED", {"signalled": True, "timed_out": False, "held": True})
        nothing_more(k, port)  # "waiting" was not sent again


def test_a_signal_journaled_before_a_restart_is_not_lost(fresh_llmosd: LlmosdServer) -> None:
    # The signaller holds "m" across the crash, so the woken waiter had not taken it back yet: after the
    # restart the signaller holds it again, and the waiter, woken in its journal, waits for the mutex only.
    signaller = textwrap.dedent("""
        sys.lock.acquire("m")
        sys.send(args.port, sys.cond.signal("c"))
        sys.recv{tag = "go"}
        sys.lock.release("m")
        return "released"
    """)
    with llmos.Client(fresh_llmosd.target) as k:
        port = k.open_port()
        waiter = k.spawn(lua=COND_WAITER, args={"port": port, "timeout_ms": 600_000}, durable=True)
        assert taken(k, port) == "waiting"
        sender = k.spawn(lua=signaller, args={"port": port}, durable=True)
        assert taken(k, port) == 1
    with restart(fresh_llmosd) as k:
        assert k.get(waiter).state == "BLOCKED"
        k.send(sender, None, tag="go")
        assert k.wait(sender, timeout=WAIT_S).result == "released"
        info = k.wait(waiter, timeout=WAIT_S)
        assert (info.state, info.result) == ("EXITED", {"signalled": True, "timed_out": False, "held": True})
        nothing_more(k, port)


def test_a_wait_cut_by_a_restart_holds_its_place_until_its_replay_reaches_it(tmp_path: pathlib.Path) -> None:
    """A durable process waiting on a condition when the server dies (its mutex given back, not woken)
    waits there again from the restart, before anything runs: a signal made before its replay reaches
    the wait (in a real restart, by a recovered signaller whose replay was shorter) wakes it instead
    of finding nobody waiting. Once the replay has reached it, the wait is the live one: one waiter."""
    waiter_program = textwrap.dedent("""
        sys.lock.acquire("m")
        local r = sys.cond.wait("c", "m")
        local again = pcall(sys.lock.try_acquire, "m")
        sys.lock.release("m")
        return {signalled = r.signalled, timed_out = r.timed_out, held = not again}
    """)
    expected = {"signalled": True, "timed_out": False, "held": True}

    def blocked_in_wait(kernel: Kernel, pid: int) -> None:
        for _ in range(int(WAIT_S / 0.01)):
            if kernel.get(pid)[0].state == "BLOCKED":
                return
            time.sleep(0.01)
        raise AssertionError(f"pid {pid} did not block")

    kernel = lua_kernel(tmp_path / "run")
    try:
        pid = kernel.spawn(SpawnSpec(lua=waiter_program, durable=True))
        blocked_in_wait(kernel, pid)
        kernel.store.flush()
        left_by_a_crash(kernel, tmp_path / "signalled_early")
        left_by_a_crash(kernel, tmp_path / "signalled_late")
    finally:
        kernel.shutdown()

    kernel = Kernel(KernelConfig(data_dir=str(tmp_path / "signalled_early")))
    try:
        kernel.add_runtime(LuaRuntime(kernel))
        with kernel.lock:  # before the waiter has run at all
            assert kernel.sync.cond_signal("default", "c") == 1
        kernel.start_recovered()
        assert (ended(kernel, pid).state, ended(kernel, pid).result) == ("EXITED", expected)
    finally:
        kernel.shutdown()

    kernel = lua_kernel(tmp_path / "signalled_late")
    try:
        blocked_in_wait(kernel, pid)
        with kernel.lock:
            assert kernel.sync.cond_signal("default", "c") == 1
            assert kernel.sync.cond_signal("default", "c") == 0  # its held place went with its replay
        assert (ended(kernel, pid).state, ended(kernel, pid).result) == ("EXITED", expected)
    finally:
        kernel.shutdown()


def test_a_durable_cond_wait_that_timed_out_replays_its_outcome(fresh_llmosd: LlmosdServer) -> None:
    program = textwrap.dedent("""
        sys.lock.acquire("m")
        local r = sys.cond.wait("c", "m", 10)
        sys.send(args.port, r.timed_out)
        sys.recv{tag = "go"}
        local again = pcall(sys.lock.try_acquire, "m")
        return {timed_out = r.timed_out, held = not again}
    """)
    contender = "return sys.lock.try_acquire('m') ~= nil"
    with llmos.Client(fresh_llmosd.target) as k:
        port = k.open_port()
        pid = k.spawn(lua=program, args={"port": port}, durable=True)
        assert taken(k, port) is True
    with restart(fresh_llmosd) as k:
        k.send(pid, None, tag="ping")  # not what it waits for: it stays blocked, replayed, live
        assert k.run(contender, timeout=WAIT_S).result is False  # it holds "m" again, from its journal
        k.send(pid, None, tag="go")
        info = k.wait(pid, timeout=WAIT_S)
        assert (info.state, info.result) == ("EXITED", {"timed_out": True, "held": True})
        nothing_more(k, port)


def test_a_durable_senders_wish_for_an_undelivered_notice_survives_a_restart(fresh_llmosd: LlmosdServer) -> None:
    receiver = 'sys.recv{tag = "never"}'  # the message stays waiting in its durable mailbox
    sender = textwrap.dedent("""
        local id = sys.send(args.to, "hello", {tag = "greeting", notify_undelivered = true})
        sys.send(args.port, id)
        return sys.recv{tag = "UNDELIVERED"}.body
    """)
    with llmos.Client(fresh_llmosd.target) as k:
        port = k.open_port()
        to = k.spawn(lua=receiver, durable=True)
        pid = k.spawn(lua=sender, args={"to": to, "port": port}, durable=True)
        message_id = taken(k, port)
    with restart(fresh_llmosd) as k:
        k.kill(to)
        info = k.wait(pid, timeout=WAIT_S)
        assert (info.state, info.result) == ("EXITED", {
            "message_id": message_id, "reason": "receiver_ended", "receiver": to, "attempts": 0, "tag": "greeting"})
        assert k.dead_letters() == []  # told to its sender, not queued


def test_a_durable_process_receives_with_ack_once_across_a_restart(fresh_llmosd: LlmosdServer) -> None:
    program = textwrap.dedent("""
        local m = sys.recv{ack = true, tag = "job"}
        sys.send(args.port, m.body)
        sys.recv{tag = "go"}
        return sys.ack(m)
    """)
    with llmos.Client(fresh_llmosd.target) as k:
        port = k.open_port()
        pid = k.spawn(lua=program, args={"port": port}, durable=True)
        k.send(pid, "job 1", tag="job")
        assert bodies(k, port, 1) == ["job 1"]
    with restart(fresh_llmosd) as k:  # its lease is gone with the server; its receive is journaled
        k.send(pid, None, tag="go")
        info = k.wait(pid, timeout=WAIT_S)
        assert (info.state, info.result) == ("EXITED", True)
        nothing_more(k, port)


def test_a_replayed_monitor_links_both_sides_again(fresh_llmosd: LlmosdServer) -> None:
    program = textwrap.dedent("""
        local target = sys.spawn{lua = "return sys.recv().body", durable = true}
        sys.monitor(target)
        sys.send(args.port, target)
        return sys.recv{tag = "EXIT"}.body.result
    """)
    with llmos.Client(fresh_llmosd.target) as k:
        port = k.open_port()
        pid = k.spawn(lua=program, args={"port": port}, durable=True)
        target = bodies(k, port, 1)[0]
    with restart(fresh_llmosd) as k:
        deadline = time.monotonic() + WAIT_S
        while k.get(pid).blocked_on != "recv" and time.monotonic() < deadline:  # replayed up to its wait
            time.sleep(0.01)
        assert k.get(pid).monitors == (target,) and k.get(target).monitored_by == (pid,)
        k.send(target, "bye")
        info = k.wait(pid, timeout=WAIT_S)
        assert (info.state, info.result) == ("EXITED", "bye")


def test_a_durable_process_requires_library_modules_across_a_restart(fresh_llmosd: LlmosdServer) -> None:
    program = textwrap.dedent("""
        local supervisor = require "supervisor"
        sys.send(args.port, type(supervisor.run))
        sys.recv{tag = "go"}
        return type(require("server").call)
    """)
    with llmos.Client(fresh_llmosd.target) as k:
        port = k.open_port()
        pid = k.spawn(lua=program, args={"port": port}, durable=True)
        assert bodies(k, port, 1) == ["function"]
    with restart(fresh_llmosd) as k:
        k.send(pid, None, tag="go")
        info = k.wait(pid, timeout=WAIT_S)
        assert (info.state, info.result, info.error) == ("EXITED", "function", "")
        nothing_more(k, port)


def test_bad_arguments_in_a_durable_process_are_refused_as_in_any(stub: Any) -> None:
    from llmos.v1 import kernel_pb2 as pb
    program = textwrap.dedent("""
        local _, bad_ack = pcall(sys.ack, -5)
        local _, bad_write = pcall(sys.fs.write, "a.txt", "x", {bogus = 1})
        local _, bad_path = pcall(sys.fs.write, "../a.txt", "x", {append = true})
        return {bad_ack, bad_write, bad_path}
    """)
    pid = stub.Spawn(pb.SpawnRequest(lua=program, durable=True)).pid
    result = stub.Wait(pb.WaitRequest(pid=pid, timeout_ms=60_000)).process.result
    bad_ack, bad_write, bad_path = (v.string_value for v in result.list_value.values)
    assert "message_id" in bad_ack
    assert "bogus" in bad_write
    assert "a.txt" in bad_path
