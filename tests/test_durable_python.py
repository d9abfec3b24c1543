"""Durable Python agents (spawn with durable): their syscalls are journaled kernel-side, and a restarted
server (kill -9) starts them again from the start with the same pid, answers their calls from the
journal until it runs out, and lets them go on live, with nothing done twice. Real servers over real
gRPC, killed and restarted on their data dir (tests/test_durable.py does the same for Lua)."""
from __future__ import annotations

import contextlib
import signal
import sqlite3
import textwrap
import time

import llmos
from llmosd.kernel.journal import Journal
from llmosd_process import LlmosdServer
from test_durable import WAIT_S, bodies, nothing_more, restart, taken

# Reports to a port what only a journal gives back the same (its children's pids, a lock's answer, a
# sleep), appends to a file, and waits for "go" (received with ack) after each round.
ROUNDS = textwrap.dedent("""
    from llmos.userland import sys

    port = sys.args["port"]
    child = sys.spawn(lua="return sys.recv().body", durable=True)
    helper = sys.spawn(python="from llmos.userland import sys\\nsys.exit(sys.recv().body * 2)", durable=True)
    held = sys.lock.acquire("the-lock", timeout_ms=5000)
    for rnd in (1, 2):
        sys.fs.write("log.txt", f"round {rnd}\\n", append=True)
        sys.sleep(1)
        sys.send(port, {"round": rnd, "children": [child, helper], "held": held is not None, "me": sys.self()})
        sys.ack(sys.recv(tag="go", ack=True))
    sys.send(child, "bye")
    sys.send(helper, 21)
    sys.exit([sys.wait(child, timeout_ms=60000).result, sys.wait(helper, timeout_ms=60000).result])
""")


def test_a_durable_python_agent_comes_back_after_kill_9_and_does_nothing_twice(fresh_llmosd: LlmosdServer) -> None:
    with llmos.Client(fresh_llmosd.target) as k:
        port = k.open_port()
        pid = k.spawn(python=ROUNDS, args={"port": port}, durable=True)
        first = bodies(k, port, 1)[0]
        assert first == {"round": 1, "children": first["children"], "held": True, "me": pid}
        assert [k.get(child).kind for child in first["children"]] == ["LUA", "PYTHON"]
    with restart(fresh_llmosd) as k:
        taker = k.spawn(lua='return sys.lock.try_acquire("the-lock") ~= nil')
        assert k.wait(taker, timeout=WAIT_S).result is False  # the agent holds it again
        k.send(pid, "now", tag="go")
        second = bodies(k, port, 1)[0]
        assert second == {"round": 2, "children": first["children"], "held": True, "me": pid}
        nothing_more(k, port)  # round 1 was not sent again
    fresh_llmosd.stop(signal.SIGTERM)  # and once more, in round 2: a stop keeps durable agents too
    fresh_llmosd.start()
    with llmos.Client(fresh_llmosd.target) as k:
        k.send(pid, "again", tag="go")
        info = k.wait(pid, timeout=WAIT_S)
        assert (info.state, info.result) == ("EXITED", ["bye", 42])
        nothing_more(k, port)
        assert k.read_file("log.txt") == b"round 1\nround 2\n"


def test_a_replay_gives_the_agent_the_same_time_random_numbers_and_hash_order(fresh_llmosd: LlmosdServer) -> None:
    program = textwrap.dedent("""
        import random, time
        from llmos.userland import sys

        seen = {"now": sys.now(), "time": time.time(), "random": random.random(),
                "randint": random.randint(1, 10**9), "order": list({f"k{i}" for i in range(40)}),
                "hash": hash("some text") % 10**12}
        sys.send(sys.args["port"], seen)
        sys.recv(tag="go")
        sys.send(sys.args["port"], seen)  # what the replay computed, sent live
    """)
    with llmos.Client(fresh_llmosd.target) as k:
        port = k.open_port()
        pid = k.spawn(python=program, args={"port": port}, durable=True)
        before = bodies(k, port, 1)[0]
    with restart(fresh_llmosd) as k:
        k.send(pid, None, tag="go")
        assert bodies(k, port, 1)[0] == before
        assert k.wait(pid, timeout=WAIT_S).state == "EXITED"


def test_an_agent_whose_replay_differs_ends_crashed_naming_the_first_differing_call(
        fresh_llmosd: LlmosdServer) -> None:
    program = textwrap.dedent("""
        import os
        from llmos.userland import sys

        sys.send(sys.args["port"], os.urandom(8).hex())  # not journaled: another value in each run
        sys.recv(tag="go")
    """)
    with llmos.Client(fresh_llmosd.target) as k:
        port = k.open_port()
        pid = k.spawn(python=program, args={"port": port}, durable=True)
        bodies(k, port, 1)
    with restart(fresh_llmosd) as k:
        info = k.wait(pid, timeout=WAIT_S)
        assert (info.state, info.exit_reason) == ("CRASHED", "replay_divergence")
        assert "syscall #1" in info.error and "send" in info.error and "other arguments" in info.error
        nothing_more(k, port)  # the replay's send was not made


def test_a_durable_python_child_of_a_durable_lua_parent(fresh_llmosd: LlmosdServer) -> None:
    child = textwrap.dedent("""
        from llmos.userland import sys

        sys.send(sys.args["port"], "child up")
        go = sys.recv(tag="go")
        sys.send(sys.args["port"], "child done")
        sys.exit({"got": go.body})
    """)
    parent = textwrap.dedent("""
        local child = sys.spawn{python = args.child, args = {port = args.port}, durable = true, monitor = true}
        sys.send(args.port, child)
        local notice = sys.recv{tag = "EXIT", from = child}
        return notice.body.result
    """)
    with llmos.Client(fresh_llmosd.target) as k:
        port = k.open_port()
        pid = k.spawn(lua=parent, args={"port": port, "child": child}, durable=True)
        got = bodies(k, port, 2)  # the parent's and the child's, in either order
        assert "child up" in got
        (child_pid,) = [body for body in got if body != "child up"]
    with restart(fresh_llmosd) as k:
        assert k.get(child_pid).kind == "PYTHON"
        k.send(child_pid, "from the test", tag="go")
        assert bodies(k, port, 1) == ["child done"]
        info = k.wait(pid, timeout=WAIT_S)
        assert (info.state, info.result) == ("EXITED", {"got": "from the test"})
        nothing_more(k, port)  # neither the child's pid nor "child up" again


def test_a_durable_lua_child_of_a_durable_python_parent_keeps_its_monitor(fresh_llmosd: LlmosdServer) -> None:
    """The child's runtime (Lua) brings it back before its parent's (Python): its monitor link is made
    when the parent comes back, and neither runs before, so its EXIT notice reaches the parent."""
    child = textwrap.dedent("""
        sys.send(args.port, "child up")
        return sys.recv{tag = "go"}.body
    """)
    parent = textwrap.dedent("""
        from llmos.userland import sys

        child = sys.spawn(lua=sys.args["child"], args={"port": sys.args["port"]}, durable=True, monitor=True)
        sys.send(sys.args["port"], child)
        notice = sys.recv(tag="EXIT", sender=child)
        sys.exit(notice.body["result"])
    """)
    with llmos.Client(fresh_llmosd.target) as k:
        port = k.open_port()
        pid = k.spawn(python=parent, args={"port": port, "child": child}, durable=True)
        got = bodies(k, port, 2)  # the parent's and the child's, in either order
        assert "child up" in got
        (child_pid,) = [body for body in got if body != "child up"]
    with restart(fresh_llmosd) as k:
        assert k.get(child_pid).kind == "LUA"
        k.send(child_pid, "from the test", tag="go")
        info = k.wait(pid, timeout=WAIT_S)
        assert (info.state, info.result) == ("EXITED", "from the test")
        nothing_more(k, port)


def test_an_append_a_crash_may_have_cut_is_cut_back_and_made_once(fresh_llmosd: LlmosdServer) -> None:
    program = textwrap.dedent("""
        from llmos.userland import sys

        sys.fs.write("notes.txt", "zero\\n")
        sys.fs.write("notes.txt", "first\\n", append=True)
        sys.send(sys.args["port"], "appended")
        sys.recv(tag="go")
        sys.exit(sys.fs.read("notes.txt").decode())
    """)
    with llmos.Client(fresh_llmosd.target) as k:
        port = k.open_port()
        pid = k.spawn(python=program, args={"port": port}, durable=True)
        assert bodies(k, port, 1) == ["appended"]
    fresh_llmosd.stop(signal.SIGKILL)
    # What a kill -9 after the append, before its entry was written, leaves: a journal that ends on
    # the append's intent (the file's size before it), with the file appended to.
    with sqlite3.connect(fresh_llmosd.data_dir / "kernel.db") as db:
        (appended,) = db.execute("SELECT MAX(seq) FROM journal WHERE pid=? AND call='fs.write'", (pid,)).fetchone()
        assert db.execute("SELECT call FROM journal WHERE pid=? AND seq=?", (pid, appended - 1)).fetchone() == (
            "fs.write.intent",)
        db.execute("DELETE FROM journal WHERE pid=? AND seq>=?", (pid, appended))
    fresh_llmosd.start()
    with llmos.Client(fresh_llmosd.target) as k:
        assert bodies(k, port, 1) == ["appended"]  # its entry was lost with the append's: made again, live
        k.send(pid, None, tag="go")
        info = k.wait(pid, timeout=WAIT_S)
        assert (info.state, info.result) == ("EXITED", "zero\nfirst\n")  # appended once


def test_a_durable_agent_killed_before_a_crash_is_ended_by_the_restart(fresh_llmosd: LlmosdServer) -> None:
    """A kill of a running durable agent is written (a kill intent) before Kill answers, and the agent
    ends a moment later: what a kill -9 in between leaves is the agent not ended, with the intent. The
    restart ends it with the kill's reason without starting it, and its durable watcher gets the EXIT."""
    watcher = textwrap.dedent("""
        local child = sys.spawn{python = args.child, args = {port = args.port}, durable = true, monitor = true}
        sys.send(args.port, child)
        local exit = sys.recv{tag = "EXIT"}.body
        return {exit.pid == child, exit.state, exit.reason}
    """)
    child = 'from llmos.userland import sys\nsys.send(sys.args["port"], "started")\nsys.recv(tag="never")'
    with llmos.Client(fresh_llmosd.target) as k:
        port = k.open_port()
        pid = k.spawn(lua=watcher, args={"port": port, "child": child}, durable=True)
        got = bodies(k, port, 2)  # the agent's pid from the watcher, and "started" from the agent
        (agent,) = [body for body in got if body != "started"]
    fresh_llmosd.stop(signal.SIGKILL)
    with sqlite3.connect(fresh_llmosd.data_dir / "kernel.db") as db:
        db.execute(*Journal.kill_intent_op(agent, "stopped"))
    fresh_llmosd.start()
    with llmos.Client(fresh_llmosd.target) as k:
        info = k.wait(pid, timeout=WAIT_S)
        assert (info.state, info.result) == ("EXITED", [True, "KILLED", "stopped"])
        assert (k.get(agent).state, k.get(agent).exit_reason) == ("KILLED", "stopped")
        nothing_more(k, port)  # the agent was not started again ("started" came once, before the crash)


def journaled(server: LlmosdServer, pid: int, call: str) -> None:
    """Waits until `pid`'s journal on disk has an entry `call`: a kill -9 from then on keeps it."""
    deadline = time.monotonic() + WAIT_S
    while True:
        with contextlib.closing(sqlite3.connect(server.data_dir / "kernel.db")) as db:
            if db.execute("SELECT 1 FROM journal WHERE pid=? AND call=?", (pid, call)).fetchone():
                return
        assert time.monotonic() < deadline, f"pid {pid} journaled no {call}"
        time.sleep(0.01)


# Waits on the condition "c" with the mutex "m", after telling the port; then ends with what it got
# and whether it holds "m" again (a try_acquire of a mutex one holds is refused).
COND_WAITER = textwrap.dedent("""
    import llmos
    from llmos.userland import sys

    sys.lock.acquire("m")
    sys.send(sys.args["port"], "waiting")
    r = sys.cond.wait("c", "m", timeout_ms=sys.args["timeout_ms"])
    try:
        sys.lock.try_acquire("m")
        held = False
    except llmos.FailedPrecondition:
        held = True
    sys.lock.release("m")
    sys.exit({"signalled": r["signalled"], "timed_out": r["timed_out"], "held": held})
""")


def test_a_durable_agents_cond_wait_cut_by_a_restart_waits_again_holding_nothing(
        fresh_llmosd: LlmosdServer) -> None:
    with llmos.Client(fresh_llmosd.target) as k:
        port = k.open_port()
        pid = k.spawn(python=COND_WAITER, args={"port": port, "timeout_ms": 600_000}, durable=True)
        assert taken(k, port) == "waiting"
        journaled(fresh_llmosd, pid, "cond_wait")  # the mutex given back, not woken yet
    with restart(fresh_llmosd) as k:
        # The mutex is free (the wait had given it back), and the replayed agent waits on "c" again.
        # The wait holds its place on "c" from the restart (kernel/journal.py, rule 5): the first signal,
        # made whatever its replay has reached, wakes it.
        assert k.cond_signal("c") == 1
        info = k.wait(pid, timeout=WAIT_S)
        assert (info.state, info.result) == ("EXITED", {"signalled": True, "timed_out": False, "held": True})
        nothing_more(k, port)  # "waiting" was not sent again


def test_a_signal_a_durable_agent_journaled_before_a_restart_is_not_lost(fresh_llmosd: LlmosdServer) -> None:
    # A durable agent signals holding "m" across the crash, so the woken waiter had not taken it back:
    # after the restart the signaller holds "m" again and its replay does not signal again, so the
    # waiter (whose timeout is ten minutes) returns only if its wake was kept; it waits for the mutex.
    signaller = textwrap.dedent("""
        from llmos.userland import sys

        sys.lock.acquire("m")
        sys.send(sys.args["port"], sys.cond.signal("c"))
        sys.recv(tag="go")
        sys.lock.release("m")
        sys.exit("released")
    """)
    with llmos.Client(fresh_llmosd.target) as k:
        port = k.open_port()
        waiter = k.spawn(python=COND_WAITER, args={"port": port, "timeout_ms": 600_000}, durable=True)
        assert taken(k, port) == "waiting"
        journaled(fresh_llmosd, waiter, "cond_wait")  # it waits: the signal will find it
        sender = k.spawn(python=signaller, args={"port": port}, durable=True)
        assert taken(k, port) == 1
        journaled(fresh_llmosd, waiter, "cond_wait.woken")
    with restart(fresh_llmosd) as k:
        k.send(sender, None, tag="go")
        assert k.wait(sender, timeout=WAIT_S).result == "released"
        info = k.wait(waiter, timeout=WAIT_S)
        assert (info.state, info.result) == ("EXITED", {"signalled": True, "timed_out": False, "held": True})
        nothing_more(k, port)  # neither "waiting" nor the signal's count again


def test_a_durable_agents_cond_wait_that_timed_out_replays_its_outcome(fresh_llmosd: LlmosdServer) -> None:
    program = textwrap.dedent("""
        import llmos
        from llmos.userland import sys

        sys.lock.acquire("m")
        r = sys.cond.wait("c", "m", timeout_ms=10)
        sys.send(sys.args["port"], r["timed_out"])
        sys.recv(tag="go")
        try:
            sys.lock.try_acquire("m")
            held = False
        except llmos.FailedPrecondition:
            held = True
        sys.exit({"timed_out": r["timed_out"], "held": held})
    """)
    contender = "return sys.lock.try_acquire('m') ~= nil"
    with llmos.Client(fresh_llmosd.target) as k:
        port = k.open_port()
        pid = k.spawn(python=program, args={"port": port}, durable=True)
        assert taken(k, port) is True
    with restart(fresh_llmosd) as k:
        assert k.run(contender, timeout=WAIT_S).result is False  # it holds "m" again, from its journal
        k.send(pid, None, tag="go")
        info = k.wait(pid, timeout=WAIT_S)
        assert (info.state, info.result) == ("EXITED", {"timed_out": True, "held": True})
        nothing_more(k, port)
