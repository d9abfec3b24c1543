"""The Python SDK (llmos.Client, llmos.aio.Client) and the `llmos` CLI against a real llmosd over real gRPC.

One server per module, listening on a Unix socket in a temporary directory; every test
makes its own processes and ports, so the tests do not depend on each other.
"""
from __future__ import annotations

import asyncio
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Iterator

import grpc
import pytest

import llmos
from llmos import aio
from llmos.errors import error_for

ECHO = "local m = sys.recv{} ; sys.send(m.from, m.body, {tag = m.tag, correlation_id = m.correlation_id})"
SPIN = "while true do end"
START_TIMEOUT_S = 30.0
CLI_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start `python -m llmosd` on a Unix socket; yield its target once it answers a ListProcesses call."""
    tmp = tmp_path_factory.mktemp("sdk")
    userland = tmp / "userland"
    userland.mkdir()
    (userland / "double.lua").write_text("return args * 2\n")
    target = f"unix:{tmp}/k.sock"
    log = open(tmp / "llmosd.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmosd", "--listen", target, "--data-dir", str(tmp / "data"),
         "--userland-root", str(userland), "--cpus", "2"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        with llmos.Client(target, rpc_timeout=2.0) as probe:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"llmosd exited with {proc.returncode}: {(tmp / 'llmosd.log').read_text()}")
                try:
                    probe.ps()
                    break
                except llmos.Unavailable:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"llmosd did not answer within {START_TIMEOUT_S} s") from None
                    time.sleep(0.05)
        yield target
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def k(server: str) -> Iterator[llmos.Client]:
    with llmos.connect(server, rpc_timeout=10.0) as client:
        yield client


# -- SDK round trips --------------------------------------------------------------------------
def test_echo_round_trip_through_a_port(k: llmos.Client) -> None:
    echo = k.spawn(lua=ECHO)
    port = k.open_port()
    body = {"text": "héllo", "n": 3, "xs": [1, 2.5, None, True], "nested": {"ok": False}}
    message_id = k.send(echo, body, sender=port, tag="greet", correlation_id="c-1")
    assert isinstance(message_id, int) and message_id > 0

    reply = k.recv(port, timeout=10)
    assert isinstance(reply, llmos.Message)
    assert (reply.sender, reply.to, reply.tag, reply.correlation_id) == (echo, port, "greet", "c-1")
    assert reply.body == body
    assert reply.sent_at_ms > 0

    info = k.wait(echo, timeout=10)
    assert info is not None and info.ok and info.ended
    assert (info.pid, info.kind, info.state, info.exit_reason) == (echo, "LUA", "EXITED", "normal")
    assert info.usage["messages_received"] == 1 and info.usage["messages_sent"] == 1
    assert k.get(echo) == info


def test_send_carries_bytes_and_reaches_registered_names(k: llmos.Client) -> None:
    port = k.open_port(name="sdk-inbox")
    k.send("sdk-inbox", None, tag="raw", data=b"\x00\xffbytes")
    msg = k.recv(port, timeout=5)
    assert msg is not None
    assert (msg.body, msg.data, msg.sender, msg.tag) == (None, b"\x00\xffbytes", 0, "raw")
    assert msg.to_json()["data"] == "AP9ieXRlcw=="

    other = k.open_port()
    k.register(other, "sdk-renamed")
    assert [p.pid for p in k.ps(name="sdk-renamed")] == [other]
    k.send("sdk-renamed", [1, 2], sender=port)
    assert k.recv(other, sender=port, timeout=5).body == [1, 2]


def test_recv_matches_filters_and_keeps_the_rest_in_order(k: llmos.Client) -> None:
    port = k.open_port()
    for i, tag in enumerate(["a", "b", "a", "b"]):
        k.send(port, i, sender=port, tag=tag, correlation_id=f"c{i}")
    assert k.recv(port, tag="b", timeout=5).body == 1
    assert k.recv(port, correlation_id="c2", timeout=5).body == 2
    assert k.recv(port, sender=port, timeout=5).body == 0
    assert k.recv(port, tag="a", timeout=0) is None
    assert k.recv(port, timeout=0).body == 3


def test_recv_and_wait_time_out_with_none(k: llmos.Client) -> None:
    port = k.open_port()
    started = time.monotonic()
    assert k.recv(port, timeout=0.2) is None
    assert 0.15 <= time.monotonic() - started < 5
    spinner = k.spawn(lua="sys.recv{}")
    started = time.monotonic()
    assert k.wait(spinner, timeout=0.2) is None
    assert 0.15 <= time.monotonic() - started < 5
    assert k.get(spinner).state == "BLOCKED"
    assert k.kill(spinner)


def test_kill_wait_and_get(k: llmos.Client) -> None:
    pid = k.spawn(lua=SPIN, name="sdk-spinner", priority=3, limits={"memory_bytes": 32 << 20})
    info = k.get(pid)
    assert (info.name, info.priority, info.limits["memory_bytes"]) == ("sdk-spinner", 3, 32 << 20)
    assert info.state in ("RUNNABLE", "RUNNING")
    k.set_priority(pid, 7)
    assert k.get(pid).priority == 7
    assert k.kill(pid, reason="test over") is True
    ended = k.wait(pid, timeout=10)
    assert ended is not None
    assert (ended.state, ended.exit_reason, ended.ok) == ("KILLED", "test over", False)
    assert k.kill(pid) is False
    assert k.ps(name="sdk-spinner") == []


def test_spawn_args_path_parent_and_monitor(k: llmos.Client) -> None:
    assert k.wait(k.spawn(path="double.lua", args=21), timeout=10).result == 42
    port = k.open_port()
    child = k.spawn(lua="return {got = args}", args={"k": [1]}, parent=port, monitor=True)
    notice = k.recv(port, tag="EXIT", timeout=10)
    assert notice is not None and notice.sender == child
    assert notice.body["pid"] == child and notice.body["reason"] == "normal"
    assert notice.body["result"] == {"got": {"k": [1]}}
    assert k.get(child).parent == port


def test_monitor_an_existing_process(k: llmos.Client) -> None:
    port = k.open_port()
    target = k.spawn(lua="sys.recv{} error('asked to crash')")
    k.monitor(port, target)
    k.send(target, "go")
    notice = k.recv(port, tag="EXIT", timeout=10)
    assert notice is not None and notice.body["state"] == "CRASHED"
    assert "asked to crash" in notice.body["error"]


def test_ps_filters(k: llmos.Client) -> None:
    blocked = k.spawn(lua="sys.recv{}")
    done = k.spawn(lua="return 1")
    k.wait(done, timeout=10)
    deadline = time.monotonic() + 10
    while k.get(blocked).state != "BLOCKED" and time.monotonic() < deadline:
        time.sleep(0.01)
    live = {p.pid: p for p in k.ps()}
    assert blocked in live and done not in live
    assert live[blocked].blocked_on == "recv"
    assert blocked in {p.pid for p in k.ps(states=["BLOCKED"])}
    assert blocked not in {p.pid for p in k.ps(states="exited", include_ended=True)}
    assert done in {p.pid for p in k.ps(include_ended=True)}
    with pytest.raises(llmos.InvalidArgument, match="unknown state"):
        k.ps(states=["SLEEPING"])
    k.kill(blocked)


def test_run_returns_the_final_info(k: llmos.Client, tmp_path: pathlib.Path) -> None:
    info = k.run("return {sum = args.a + args.b}", args={"a": 2, "b": 3}, timeout=10)
    assert info.ok and info.result == {"sum": 5}
    program = tmp_path / "prog.lua"
    program.write_text("return 'from a file'")
    assert k.run(program).result == "from a file"
    assert k.run(str(program)).result == "from a file"
    crashed = k.run("error('boom')", timeout=10)
    assert crashed.state == "CRASHED" and "boom" in crashed.error and not crashed.ok


def test_run_kills_a_program_past_its_timeout(k: llmos.Client) -> None:
    started = time.monotonic()
    info = k.run(SPIN, timeout=0.3)
    assert (info.state, info.exit_reason) == ("KILLED", "timeout")
    assert time.monotonic() - started < 10


def test_events_stream_spawned_and_ended(k: llmos.Client) -> None:
    events = k.events()
    assert next(events).kind == "subscribed"  # from here on, no event is missed
    # A stream waits for events without limit; closing the client cancels it if the server never sends.
    watchdog = threading.Timer(10.0, k.close)
    watchdog.start()
    try:
        pid = k.spawn(lua="return 'done'")
        seen = []
        for event in events:
            if event.process.pid == pid:
                seen.append(event.kind)
                if event.kind == "ended":
                    assert event.process.result == "done" and event.at_ms > 0
                    break
        assert seen == ["spawned", "ended"]
    finally:
        watchdog.cancel()
        events.close()


def test_infer_answers_text(k: llmos.Client) -> None:
    # The server runs its default model, the built-in tiny one: greedy decoding gives the same text each time.
    result = k.infer("Hello", max_tokens=4, temperature=0, seed=1, timeout=60)
    assert isinstance(result, llmos.InferResult)
    completion = result.usage["completion_tokens"]
    assert 0 < completion <= 4 and len(result.token_ids) == completion
    assert result.finish_reason == ("length" if completion == 4 else "stop")  # fewer only at an end-of-sequence
    assert result.usage["prompt_tokens"] > 0
    chunks = list(k.infer("Hello", max_tokens=4, temperature=0, seed=1, stream=True, timeout=60))
    assert all(isinstance(c, llmos.client.InferChunk) for c in chunks)
    assert "".join(c.text for c in chunks) == result.text
    assert [t for c in chunks for t in c.token_ids] == result.token_ids
    assert chunks[-1].finish_reason == result.finish_reason and chunks[-1].usage == result.usage


# -- errors -------------------------------------------------------------------------------------
def test_server_errors_map_to_exception_classes(k: llmos.Client) -> None:
    missing = 10**12
    for call in (lambda: k.get(missing), lambda: k.wait(missing, timeout=1), lambda: k.kill(missing),
                 lambda: k.send(missing, 1), lambda: k.send("sdk-no-such-name", 1), lambda: k.recv(missing, timeout=0)):
        with pytest.raises(llmos.NotFound) as caught:
            call()
        assert caught.value.code == grpc.StatusCode.NOT_FOUND

    with pytest.raises(llmos.InvalidArgument, match="syntax") as caught:
        k.spawn(lua="local = 1")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT

    k.open_port(name="sdk-taken")
    with pytest.raises(llmos.AlreadyExists):
        k.open_port(name="sdk-taken")
    with pytest.raises(llmos.AlreadyExists):
        k.spawn(lua="return 1", name="sdk-taken")

    small = k.open_port(mailbox=1)
    k.send(small, 1)
    with pytest.raises(llmos.ResourceExhausted):
        k.send(small, 2)

    ended = k.spawn(lua="return 1")
    k.wait(ended, timeout=10)
    with pytest.raises(llmos.FailedPrecondition):
        k.send(small, 3, sender=ended)
    with pytest.raises(llmos.NotFound):
        k.spawn(path="no-such-program.lua")


def test_python_program_runs(k: llmos.Client) -> None:
    pid = k.spawn(python="print('hi')")
    info = k.wait(pid, timeout=30)
    assert info is not None and (info.kind, info.state, info.exit_reason) == ("PYTHON", "EXITED", "normal"), info
    assert info.result is None and k.read_log(pid) == (["hi"], 1)  # print goes to the process's log


def test_arguments_checked_before_any_rpc(k: llmos.Client) -> None:
    with pytest.raises(llmos.InvalidArgument, match="exactly one program"):
        k.spawn(lua="return 1", path="x.lua")
    with pytest.raises(llmos.InvalidArgument, match="exactly one program"):
        k.spawn()
    with pytest.raises(llmos.InvalidArgument, match="JSON"):
        k.send(1, {"not json": object()})
    with pytest.raises(llmos.InvalidArgument, match="timeout"):
        k.recv(1, timeout=-1)
    with pytest.raises(llmos.InvalidArgument, match="limits"):
        k.spawn(lua="return 1", limits={"cpu_seconds": 1})
    with pytest.raises(ValueError):  # InvalidArgument is a ValueError too
        k.send(1.5, 1)  # type: ignore[arg-type]


def test_unreachable_server_is_unavailable(tmp_path: pathlib.Path) -> None:
    with llmos.Client(f"unix:{tmp_path}/nobody.sock", rpc_timeout=5) as client:
        with pytest.raises(llmos.Unavailable) as caught:
            client.ps()
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(llmos.Unavailable, match="within 0.2 s"):
            client.wait_ready(0.2)


def test_target_defaults_to_llmos_server_env(monkeypatch: pytest.MonkeyPatch, server: str) -> None:
    monkeypatch.setenv("LLMOS_SERVER", server)
    with llmos.Client() as client:
        assert client.target == server
        assert isinstance(client.ps(), list)
    monkeypatch.delenv("LLMOS_SERVER")
    assert llmos.default_target() == "127.0.0.1:50051"


def test_every_status_code_has_its_class() -> None:
    for code in grpc.StatusCode:
        if code == grpc.StatusCode.OK:
            continue
        err = error_for(code, "why")
        assert isinstance(err, llmos.LlmosError) and type(err) is not llmos.LlmosError
        assert err.code == code and err.message == "why"
        assert type(err).__name__.upper() == code.name.replace("_", "")


# -- files and locks ----------------------------------------------------------------------------
class GaveUp(BaseException):
    """Not an Exception (like SystemExit or KeyboardInterrupt): gRPC does not cancel a call whose request
    iterator raises one, so the SDK must, or the call would wait for ever."""


def raised_by(call: Any, timeout_s: float = 10.0) -> BaseException | None:
    """What `call` raised (None if it returned), run in a thread so that a call that hangs fails the
    test at once instead of holding it up."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert outcome, f"the call neither returned nor raised within {timeout_s} s"
    return outcome[0]


def test_file_calls(k: llmos.Client) -> None:
    d = f"sdk-{os.getpid()}-{time.monotonic_ns()}"
    info = k.write_file(f"{d}/a.txt", "héllo")
    assert isinstance(info, llmos.client.FileInfo)
    assert (info.path, info.size, info.is_dir) == (f"{d}/a.txt", len("héllo".encode()), False)
    assert k.write_file(f"{d}/a.txt", b" world", append=True).size == 12
    assert k.read_file(f"{d}/a.txt") == "héllo world".encode()
    assert k.read_file(f"{d}/a.txt", offset=7, length=5) == b"world"
    # an iterable is streamed; pieces larger than chunk_size are split
    data = os.urandom(2 * 1024 * 1024 + 5)
    pieces = (data[i:i + 1_500_000] for i in range(0, len(data), 1_500_000))
    assert k.write_file(f"{d}/big.bin", pieces, chunk_size=512 * 1024).size == len(data)
    stream = k.open_file_stream(f"{d}/big.bin")
    chunks = list(stream)
    assert b"".join(chunks) == data and len(chunks) == 3 and max(map(len, chunks)) <= 1024 * 1024
    assert k.read_file(f"{d}/big.bin", offset=len(data) - 3) == data[-3:]
    assert k.write_file(f"{d}/empty", b"").size == 0 and k.read_file(f"{d}/empty") == b""
    assert k.stat(d).is_dir and k.stat(f"{d}/big.bin").size == len(data)
    assert [f.path for f in k.list_files(d)] == [f"{d}/a.txt", f"{d}/big.bin", f"{d}/empty"]
    assert k.rename_file(f"{d}/a.txt", f"{d}/sub/b.txt").path == f"{d}/sub/b.txt"
    assert k.stat(f"{d}/sub").to_json()["is_dir"] is True
    assert k.make_dir(f"{d}/made/deep").is_dir and k.make_dir(f"{d}/made/deep").is_dir  # again: fine
    with pytest.raises(llmos.FailedPrecondition):
        k.make_dir(f"{d}/empty/under_a_file")
    k.delete_file(f"{d}/sub/b.txt")
    with pytest.raises(llmos.NotFound):
        k.read_file(f"{d}/sub/b.txt")
    with pytest.raises(llmos.FailedPrecondition):
        k.delete_file(d)
    with pytest.raises(llmos.InvalidArgument):
        k.stat("../outside")
    with pytest.raises(llmos.NotFound):
        list(k.open_file_stream(f"{d}/missing"))

    for bad in (dict(chunk_size=0), dict(chunk_size=8 << 20)):
        with pytest.raises(llmos.InvalidArgument, match="chunk_size"):
            k.write_file(f"{d}/x", b"x", **bad)  # type: ignore[arg-type]
    with pytest.raises(llmos.InvalidArgument, match="offset"):
        k.read_file(f"{d}/empty", offset=-1)
    with pytest.raises(llmos.InvalidArgument):
        k.write_file(f"{d}/x", 42)  # type: ignore[arg-type]


class Broken(Exception):
    pass


def half_then(error: BaseException) -> Iterator[bytes]:
    yield b"half a file"
    raise error


@pytest.mark.parametrize("source, raised", [
    (lambda: half_then(Broken("the source failed")), Broken),
    (lambda: [b"ok", "text piece"], llmos.InvalidArgument),  # the SDK's own check of each piece
    (lambda: half_then(GaveUp("the source gave up")), GaveUp),
], ids=["Exception", "not bytes", "BaseException"])
def test_a_write_whose_source_fails_raises_its_error(k: llmos.Client, source: Any, raised: type) -> None:
    """The caller gets its own error, not a bare CANCELLED, at once; and (the docstring's promise) the file
    is not written."""
    path = f"sdk-failed-{time.monotonic_ns()}/half"
    assert type(raised_by(lambda: k.write_file(path, source()))) is raised
    try:
        info = k.stat(path)
    except llmos.NotFound:
        return
    raise AssertionError(f"the failed write left {info.size} bytes: {k.read_file(path)!r}")


def test_lock_calls(k: llmos.Client) -> None:
    name = f"sdk-lock-{time.monotonic_ns()}"
    a, b = k.open_port(), k.open_port()
    assert k.acquire(a, name) == {"acquired": True}
    assert k.acquire(b, name, timeout=0) is None
    assert k.acquire(b, name, timeout=0.05) is None
    with pytest.raises(llmos.FailedPrecondition):
        k.release(b, name)
    with pytest.raises(llmos.FailedPrecondition):
        k.acquire(a, name)
    with pytest.raises(llmos.InvalidArgument, match="timeout"):
        k.acquire(a, name, timeout=-1)
    result: list[Any] = []
    waiter = threading.Thread(target=lambda: result.append(k.acquire(b, name, timeout=10, priority=3)))
    waiter.start()
    time.sleep(0.2)
    k.kill(a)  # the holder ends: the waiter is told
    waiter.join(15)
    assert result == [{"acquired": True, "previous_holder_died": a}]
    k.release(b, name)
    sem = f"{name}-sem"
    assert [k.acquire(b, sem, semaphore=2, timeout=0) for _ in range(3)] == [{"acquired": True}] * 2 + [None]
    k.release(b, sem)
    assert k.acquire(b, sem, semaphore=2, timeout=0) == {"acquired": True}


# -- asyncio ------------------------------------------------------------------------------------
def test_aio_client_has_the_same_api(server: str) -> None:
    async def scenario() -> None:
        async with aio.connect(server, rpc_timeout=10) as ak:
            await ak.wait_ready(5)
            echo = await ak.spawn(lua=ECHO)
            port = await ak.open_port()
            await ak.send(echo, {"x": 1}, sender=port, tag="t")
            reply = await ak.recv(port, timeout=10)
            assert reply is not None and (reply.body, reply.tag, reply.sender) == ({"x": 1}, "t", echo)
            assert (await ak.wait(echo, timeout=10)).ok
            assert await ak.recv(port, timeout=0.1) is None
            assert (await ak.run("return args + 1", args=1)).result == 2
            with pytest.raises(llmos.NotFound):
                await ak.get(10**12)

            events = ak.events()
            assert (await events.__anext__()).kind == "subscribed"
            pid = await ak.spawn(lua="return 0")

            async def ended() -> llmos.Event:
                async for event in events:
                    if event.process.pid == pid and event.kind == "ended":
                        return event
                raise AssertionError("event stream ended")

            assert (await asyncio.wait_for(ended(), 10)).process.state == "EXITED"
            await events.aclose()

            waits = [ak.wait(await ak.spawn(lua=f"return {i}"), timeout=10) for i in range(5)]
            assert [info.result for info in await asyncio.gather(*waits)] == list(range(5))

            d = f"aio-{time.monotonic_ns()}"
            data = os.urandom(1024 * 1024 + 10)
            assert (await ak.write_file(f"{d}/f", iter([data[:10], data[10:]]))).size == len(data)
            assert await ak.read_file(f"{d}/f", offset=5, length=10) == data[5:15]
            assert b"".join([c async for c in ak.open_file_stream(f"{d}/f")]) == data
            assert [f.path for f in await ak.list_files(d)] == [f"{d}/f"]
            assert (await ak.rename_file(f"{d}/f", f"{d}/g")).size == len(data)
            assert (await ak.stat(f"{d}/g")).size == len(data)
            await ak.delete_file(f"{d}/g")
            with pytest.raises(llmos.NotFound):
                await ak.read_file(f"{d}/g")

            def broken() -> Iterator[bytes]:
                yield b"x"
                raise KeyError("source")

            def gives_up() -> Iterator[bytes]:
                yield b"x"
                raise GaveUp("the source gave up")

            with pytest.raises(KeyError):
                await ak.write_file(f"{d}/h", broken())
            with pytest.raises(GaveUp):
                await asyncio.wait_for(ak.write_file(f"{d}/h", gives_up()), 10)
            with pytest.raises(llmos.NotFound):
                await ak.stat(f"{d}/h")
            holder = await ak.open_port()
            assert await ak.acquire(holder, d) == {"acquired": True}
            assert await ak.acquire(port, d, timeout=0) is None
            await ak.release(holder, d)
            assert await ak.acquire(port, d, timeout=0) == {"acquired": True}

    asyncio.run(scenario())


# -- the CLI --------------------------------------------------------------------------------------
def llmos_cli(server: str, *args: str, env_server: bool = False, text: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("LLMOS_SERVER", None)
    if env_server:
        env["LLMOS_SERVER"] = server
        argv = list(args)
    else:
        argv = ["--server", server, *args]
    return subprocess.run([sys.executable, "-m", "llmos.cli", *argv], capture_output=True, text=text, env=env,
                          timeout=CLI_TIMEOUT_S)


def test_cli_run_prints_the_result(server: str, tmp_path: pathlib.Path) -> None:
    program = tmp_path / "add.lua"
    program.write_text("return {sum = args.a + args.b, who = 'lua'}")
    done = llmos_cli(server, "run", str(program), "--args", '{"a": 1, "b": 2}', "--timeout", "10")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"sum": 3, "who": "lua"}


def test_cli_run_of_a_crashing_program_fails(server: str, tmp_path: pathlib.Path) -> None:
    program = tmp_path / "crash.lua"
    program.write_text("error('kaboom')")
    done = llmos_cli(server, "run", str(program))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("llmos: CRASHED: ") and "kaboom" in done.stderr

    program.write_text("while true do end")
    done = llmos_cli(server, "run", str(program), "--timeout", "0.2")
    assert done.returncode == 1 and "llmos: KILLED:" in done.stderr and "timeout" in done.stderr


def test_cli_spawn_send_recv_wait_kill_ps(server: str, tmp_path: pathlib.Path) -> None:
    port = llmos_cli(server, "port", "--name", "cli-inbox", env_server=True)
    assert port.returncode == 0, port.stderr
    port_pid = int(port.stdout)
    spawned = llmos_cli(server, "spawn", "--lua", ECHO, "--name", "cli-echo", "--priority", "2")
    assert spawned.returncode == 0, spawned.stderr
    echo = int(spawned.stdout)

    table = llmos_cli(server, "ps")
    assert table.returncode == 0
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["PID", "NAME", "KIND", "STATE", "PRIO", "CPU_MS", "MEM_KB", "TOKENS", "MSGS", "MAILBOX"]
    by_pid = {row.split()[0]: row.split() for row in rows}
    assert by_pid[str(echo)][1:3] == ["cli-echo", "LUA"] and by_pid[str(echo)][4] == "2"
    assert by_pid[str(port_pid)][1:3] == ["cli-inbox", "PORT"]

    sent = llmos_cli(server, "send", "cli-echo", '{"q": [1, 2]}', "--from", str(port_pid), "--tag", "ask",
                     "--correlation-id", "c9")
    assert sent.returncode == 0 and int(sent.stdout) > 0
    got = llmos_cli(server, "recv", str(port_pid), "--tag", "ask", "--timeout", "10")
    assert got.returncode == 0, got.stderr
    msg = json.loads(got.stdout)
    assert (msg["from"], msg["body"], msg["correlation_id"]) == (echo, {"q": [1, 2]}, "c9")

    waited = llmos_cli(server, "wait", str(echo), "--timeout", "10")
    assert waited.returncode == 0 and json.loads(waited.stdout)["state"] == "EXITED"
    assert str(echo) not in {row.split()[0] for row in llmos_cli(server, "ps").stdout.splitlines()[1:]}
    assert str(echo) in {row.split()[0] for row in llmos_cli(server, "ps", "--all").stdout.splitlines()[1:]}

    program = tmp_path / "wait.lua"
    program.write_text("sys.recv{}")
    blocked = int(llmos_cli(server, "spawn", str(program)).stdout)
    timed_out = llmos_cli(server, "recv", str(port_pid), "--timeout", "0.1")
    assert timed_out.returncode == 1 and timed_out.stderr.startswith("llmos: DEADLINE_EXCEEDED:")
    assert llmos_cli(server, "kill", str(blocked), "--reason", "cli").stdout.strip() == "killed"
    assert llmos_cli(server, "kill", str(blocked)).stdout.strip() == "already ended"
    killed = llmos_cli(server, "wait", str(blocked))
    assert killed.returncode == 1 and json.loads(killed.stdout)["exit_reason"] == "cli"


def test_cli_reports_errors_clearly(server: str, tmp_path: pathlib.Path) -> None:
    unknown = llmos_cli(server, "wait", "999999999")
    assert unknown.returncode == 1 and unknown.stderr.startswith("llmos: NOT_FOUND: ")

    bad_json = llmos_cli(server, "send", "1", "{oops")
    assert bad_json.returncode == 2 and bad_json.stderr.startswith("llmos: INVALID_ARGUMENT: ")
    assert "not valid JSON" in bad_json.stderr

    missing = llmos_cli(server, "run", str(tmp_path / "absent.lua"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr

    syntax = llmos_cli(server, "spawn", "--lua", "x =")
    assert syntax.returncode == 1 and syntax.stderr.startswith("llmos: INVALID_ARGUMENT: ")

    bad_pid = llmos_cli(server, "kill", "abc")
    assert bad_pid.returncode == 2 and "positive integer" in bad_pid.stderr

    nobody = llmos_cli(f"unix:{tmp_path}/nobody.sock", "ps")
    assert nobody.returncode == 1 and nobody.stderr.startswith("llmos: UNAVAILABLE: ")
    assert "is llmosd running" in nobody.stderr


def test_cli_infer_streams_the_text(server: str, k: llmos.Client) -> None:
    expected = k.infer("Hello", max_tokens=4, temperature=0, seed=1, timeout=60).text
    done = llmos_cli(server, "infer", "Hello", "--max-tokens", "4", "--temperature", "0", "--seed", "1", text=False)
    assert done.returncode == 0 and done.stderr == b""
    assert done.stdout == (expected + "\n").encode()  # bytes: the gibberish may hold a "\r"


def test_cli_fs_put_cat_ls_mv_rm(server: str, tmp_path: pathlib.Path) -> None:
    d = f"cli-{time.monotonic_ns()}"
    local = tmp_path / "notes.md"
    local.write_text("line one\nline two\n")
    put = llmos_cli(server, "fs", "put", str(local), f"{d}/notes.md")
    assert put.returncode == 0, put.stderr
    assert json.loads(put.stdout)["size"] == local.stat().st_size
    assert llmos_cli(server, "fs", "put", str(local), f"{d}/notes.md", "--append").returncode == 0
    cat = llmos_cli(server, "fs", "cat", f"{d}/notes.md")
    assert cat.returncode == 0 and cat.stdout == "line one\nline two\n" * 2
    assert llmos_cli(server, "fs", "cat", f"{d}/notes.md", "--offset", "5", "--length", "3").stdout == "one"
    assert llmos_cli(server, "fs", "ls", d).stdout.split() == ["-", str(2 * local.stat().st_size), f"{d}/notes.md"]
    assert f"d            0 {d}/" in llmos_cli(server, "fs", "ls").stdout
    mv = llmos_cli(server, "fs", "mv", f"{d}/notes.md", f"{d}/kept.md")
    assert mv.returncode == 0 and json.loads(mv.stdout)["path"] == f"{d}/kept.md"
    assert llmos_cli(server, "fs", "rm", f"{d}/kept.md").returncode == 0
    made = llmos_cli(server, "fs", "mkdir", f"{d}/a/b")
    assert made.returncode == 0 and json.loads(made.stdout)["is_dir"] is True
    missing = llmos_cli(server, "fs", "cat", f"{d}/kept.md")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
    escape = llmos_cli(server, "fs", "cat", "../etc/passwd")
    assert escape.returncode == 1 and "INVALID_ARGUMENT" in escape.stderr
    nolocal = llmos_cli(server, "fs", "put", str(tmp_path / "absent"), f"{d}/x")
    assert nolocal.returncode == 2 and "cannot read" in nolocal.stderr


def test_cli_logs_and_top(server: str, k: llmos.Client) -> None:
    client = k
    spinner = client.spawn(lua='print("first") sys.log("second", 2) while true do end')
    idle = client.spawn(lua="sys.recv{}")
    try:
        for _ in range(100):  # bounded: until both lines are logged
            if len(client.read_log(spinner)[0]) == 2:
                break
        logs = llmos_cli(server, "logs", str(spinner))
        assert logs.returncode == 0 and logs.stdout.splitlines() == ["first", "second\t2"]
        top = llmos_cli(server, "top", "-n", "2", "--interval", "0.3")
        assert top.returncode == 0, top.stderr
        last = top.stdout.split("llmos top")[-1].splitlines()
        header = last[1].split()
        rows = {int(line.split()[0]): line.split() for line in last[2:]}
        cpu = header.index("CPU%")
        assert float(rows[spinner][cpu]) > 20.0  # the busy one, measured over the interval
        assert float(rows[idle][cpu]) == 0.0 and "BLOCKED:recv" in rows[idle]
    finally:
        client.kill(spinner)
        client.kill(idle)


def cli_popen(server: str, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "LLMOS_SERVER"}
    return subprocess.Popen([sys.executable, "-m", "llmos.cli", "--server", server, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env)


def pid_named(k: llmos.Client, name: str) -> int:
    """The pid registered as `name`, once there is one (bounded)."""
    for _ in range(300):
        found = k.ps(name=name)
        if found:
            return found[0].pid
        time.sleep(0.02)
    raise AssertionError(f"no process named {name}")


def test_cli_run_streams_the_log_while_the_program_runs(server: str, k: llmos.Client, tmp_path: pathlib.Path) -> None:
    program = tmp_path / "talk.lua"
    program.write_text('print("ready") local m = sys.recv{} print("got " .. m.body) return {echo = m.body}')
    name = f"talk-{time.monotonic_ns()}"
    run = cli_popen(server, "run", str(program), "--name", name, "--priority", "3", "--weight", "50",
                    "--limits", "cpu_ms=5000,mailbox=7")
    try:
        assert run.stdout.readline() == "ready\n"  # printed while the program waits for a message
        pid = pid_named(k, name)
        info = k.get(pid)
        assert (info.state, info.priority, info.weight, info.limits["cpu_ms"], info.limits["mailbox"]) == (
            "BLOCKED", 3, 50, 5000, 7)
        k.send(pid, "hi")
        out, err = run.communicate(timeout=CLI_TIMEOUT_S)
    finally:
        run.kill()
    assert run.returncode == 0, err
    assert out.splitlines() == ["got hi", '{"echo": "hi"}']


def test_cli_run_runs_python_and_detaches(server: str, k: llmos.Client, tmp_path: pathlib.Path) -> None:
    agent = tmp_path / "agent.py"
    agent.write_text("from llmos.userland import sys\nprint('args', sys.args)\nsys.exit({'twice': sys.args * 2})\n")
    done = llmos_cli(server, "run", str(agent), "--args", "21")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["args 21", '{"twice": 42}']

    port = k.open_port()
    detached = llmos_cli(server, "run", "-d", str(agent), "--args", "2", "--monitor", str(port))
    assert detached.returncode == 0, detached.stderr
    pid = int(detached.stdout)
    notice = k.recv(port, tag="EXIT", timeout=CLI_TIMEOUT_S)
    assert notice is not None and notice.body["pid"] == pid and notice.body["result"] == {"twice": 4}
    assert llmos_cli(server, "logs", str(pid)).stdout == "args 2\n"


def test_cli_run_is_killed_by_ctrl_c(server: str, k: llmos.Client, tmp_path: pathlib.Path) -> None:
    program = tmp_path / "spin.lua"
    program.write_text('print("spinning") while true do end')
    name = f"spin-{time.monotonic_ns()}"
    run = cli_popen(server, "run", str(program), "--name", name)
    try:
        assert run.stdout.readline() == "spinning\n"
        pid = pid_named(k, name)
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=CLI_TIMEOUT_S)
    finally:
        run.kill()
    assert run.returncode == 130 and "Traceback" not in err
    ended = k.wait(pid, timeout=10)
    assert ended is not None and (ended.state, ended.exit_reason) == ("KILLED", "interrupted")


def test_cli_ps_outputs_and_filters(server: str, k: llmos.Client) -> None:
    name = f"ps-{time.monotonic_ns()}"
    blocked = k.spawn(lua="sys.recv{}", name=name)
    port = k.open_port()
    ended = k.spawn(lua="return 1")
    k.wait(ended, timeout=10)
    try:
        quiet = llmos_cli(server, "ps", "-q", "--state", "blocked")
        assert quiet.returncode == 0 and str(blocked) in quiet.stdout.split() and str(port) not in quiet.stdout.split()
        ports = llmos_cli(server, "ps", "-q", "--kind", "port").stdout.split()
        assert str(port) in ports and str(blocked) not in ports
        listed = json.loads(llmos_cli(server, "ps", "-a", "-o", "json").stdout)
        by_pid = {p["pid"]: p for p in listed}
        assert by_pid[blocked]["name"] == name and by_pid[blocked]["state"] == "BLOCKED"
        assert by_pid[blocked]["usage"]["memory_bytes"] > 0 and by_pid[ended]["state"] == "EXITED"
        assert ended not in {p["pid"] for p in json.loads(llmos_cli(server, "ps", "-o", "json").stdout)}
        header, row = llmos_cli(server, "ps", "-o", "wide", "--name", name).stdout.splitlines()
        cells = dict(zip(header.split(), row.split()))
        assert cells["STATE"] == "BLOCKED:recv" and cells["WEIGHT"] == "100" and cells["NAMESPACE"] == "default"
        assert int(cells["MEM_KB"]) > 0 and cells["TOKENS"] == "0"

        inspected = llmos_cli(server, "inspect", str(blocked), "999999999", str(ended))
        assert inspected.returncode == 1 and inspected.stderr.startswith("llmos: NOT_FOUND: ")
        assert [p["pid"] for p in json.loads(inspected.stdout)] == [blocked, ended]

        killed = llmos_cli(server, "kill", str(blocked), str(port), str(ended))
        assert killed.returncode == 0
        assert killed.stdout.splitlines() == [f"{blocked} killed", f"{port} killed", f"{ended} already ended"]
    finally:
        k.kill(blocked)
        k.kill(port)


def test_cli_events_and_logs_follow(server: str, k: llmos.Client) -> None:
    import queue

    port = k.open_port()
    watcher = cli_popen(server, "events", "-o", "json")
    events: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [events.put(json.loads(line)) for line in watcher.stdout], daemon=True).start()
    try:
        probes: set[int] = set()
        deadline = time.monotonic() + CLI_TIMEOUT_S
        while time.monotonic() < deadline:  # until a probe is reported: from then on the watcher misses nothing
            probes.add(k.spawn(lua="return 0"))
            try:
                if events.get(timeout=0.2)["process"]["pid"] in probes:
                    break
            except queue.Empty:
                pass
        pid = k.spawn(lua='print("one") print("two") sys.recv{} print("three") return 3')
        seen = []
        while len(seen) < 2:
            event = events.get(timeout=CLI_TIMEOUT_S)
            if event["process"]["pid"] != pid:
                continue
            seen.append(event["kind"])
            if event["kind"] == "spawned":
                for _ in range(300):  # both lines written
                    if len(k.read_log(pid)[0]) == 2:
                        break
                    time.sleep(0.01)
                assert llmos_cli(server, "logs", "--tail", "1", str(pid)).stdout == "two\n"
                follow = cli_popen(server, "logs", "-f", "--tail", "1", str(pid))
                assert follow.stdout.readline() == "two\n"  # then it waits for more, until the process ends
                k.send(pid, None, sender=port)
                out, err = follow.communicate(timeout=CLI_TIMEOUT_S)
                assert follow.returncode == 0 and out == "three\n", err
        assert seen == ["spawned", "ended"]
    finally:
        watcher.kill()
        watcher.wait()
        k.kill(port)


def test_cli_send_body_from_stdin_and_file(server: str, k: llmos.Client, tmp_path: pathlib.Path) -> None:
    port = k.open_port()
    body = {"text": "x" * (1 << 20)}  # bigger than a command line may be on some systems
    sent = subprocess.run([sys.executable, "-m", "llmos.cli", "--server", server, "send", str(port), "-"],
                          input=json.dumps(body), capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert sent.returncode == 0, sent.stderr
    (tmp_path / "body.json").write_text('{"from": "file"}')
    assert llmos_cli(server, "send", str(port), f"@{tmp_path / 'body.json'}", "--tag", "f").returncode == 0
    assert k.recv(port, timeout=5).body == body
    assert k.recv(port, timeout=5).body == {"from": "file"}
    k.kill(port)


@pytest.mark.parametrize("argv, says", [
    (["logs", "--", "-5"], "a pid is a positive integer"),
    (["inspect", str(1 << 64)], "a pid is a positive integer below 2^64"),
    (["top", "--interval", "-1"], "an interval is a number of seconds"),
    (["run", "x.lua", "--limits", "bogus=1"], "unknown limit(s) bogus"),
    (["run", "x.lua", "--limits", "cpu_ms=-3"], "limits are KEY=N"),
    (["run", "x.lua", "--priority", "30"], "priority is an integer from -20 to 20"),
    (["spawn", "--lua", "return 1", "--weight", "0"], "weight is an integer from 1 to 10000"),
    (["ps", "--state", "SLEEPY"], "invalid choice"),
    (["ps", "-o", "yaml"], "invalid choice"),
    (["send", "1", "@/nonexistent/body.json"], "cannot read"),
    (["run", "/nonexistent/x.py"], "cannot read"),
    (["fs", "cat", "a", "--offset", "-1"], "a count is an integer"),
    (["frobnicate"], "invalid choice"),
])
def test_cli_usage_errors_exit_2_without_a_traceback(server: str, argv: list[str], says: str) -> None:
    done = llmos_cli(server, *argv)
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stdout == ""
    assert "llmos: INVALID_ARGUMENT: " in done.stderr and says in done.stderr, done.stderr


def test_cli_version_and_completion(server: str, tmp_path: pathlib.Path) -> None:
    version = llmos_cli(server, "--version")
    assert version.returncode == 0 and version.stdout == f"llmos {llmos.__version__}\n"
    script = llmos_cli(server, "completion", "bash")
    assert script.returncode == 0 and "complete" in script.stdout and "llmos" in script.stdout
    # what bash asks at a TAB: argcomplete answers from the parser itself
    answer_file = tmp_path / "completions"
    env = {**os.environ, "_ARGCOMPLETE": "1", "COMP_LINE": "llmos ps --ou", "COMP_POINT": "13",
           "_ARGCOMPLETE_IFS": "\n", "_ARGCOMPLETE_STDOUT_FILENAME": str(answer_file)}
    answer = subprocess.run([sys.executable, "-m", "llmos.cli"], env=env, capture_output=True, text=True,
                            timeout=CLI_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert answer.returncode == 0, answer.stderr
    assert answer_file.read_text().split() == ["--output"]

# -- the server's start -------------------------------------------------------------------------
def test_llmosd_refuses_a_bound_port_and_a_held_data_dir(fresh_llmosd: Any, tmp_path: pathlib.Path) -> None:
    def second_llmosd(listen: str, data_dir: pathlib.Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "llmosd", "--listen", listen, "--data-dir", str(data_dir),
                               "--model", "none"], capture_output=True, text=True, timeout=CLI_TIMEOUT_S)

    taken = second_llmosd(fresh_llmosd.target, tmp_path / "other")
    assert taken.returncode != 0 and taken.stdout == ""
    assert taken.stderr.splitlines() == [f"llmosd: cannot listen on {fresh_llmosd.target}: Address already in use"]
    held = second_llmosd("127.0.0.1:0", fresh_llmosd.data_dir)
    assert held.returncode != 0 and len(held.stderr.splitlines()) == 1
    assert held.stderr.startswith(f"llmosd: data directory {fresh_llmosd.data_dir} is in use by another llmosd")
    with llmos.connect(fresh_llmosd.target) as k:  # the first server is untouched
        assert k.run("return 1").result == 1


def test_llmosd_exits_with_one_line_on_a_bad_model(tmp_path: pathlib.Path) -> None:
    """A model that is not there, and one that is there but does not load (found only while loading, in
    the background), both stop the server with status 1 and one line saying why: no server that
    answers every Infer UNAVAILABLE."""
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"architectures": ["NoSuchForCausalLM"]}')
    for model, why in ((str(tmp_path / "missing.gguf"), "is neither 'tiny'"),
                       (str(tmp_path / "broken"), "failed to load: unsupported model architecture")):
        ran = subprocess.run([sys.executable, "-m", "llmosd", "--listen", "127.0.0.1:0", "--model", model,
                              "--data-dir", str(tmp_path / "data"), "--log-level", "WARNING"],
                             capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
        assert ran.returncode == 1 and "Traceback" not in ran.stderr
        assert ran.stderr.splitlines()[-1].startswith("llmosd: ") and why in ran.stderr.splitlines()[-1]
        assert len([line for line in ran.stderr.splitlines() if why in line]) == 1


def test_values_protobuf_cannot_hold_are_invalid_argument_before_sending(k: llmos.Client) -> None:
    for call in (lambda: k.get(1 << 64), lambda: k.wait(-1, timeout=0), lambda: k.kill("7"),
                 lambda: k.set_priority(1, 1 << 40)):
        with pytest.raises(llmos.InvalidArgument, match="bad argument"):
            call()


# -- the client-only distribution ---------------------------------------------------------------
def test_the_sdk_distribution_needs_only_grpcio_and_protobuf(tmp_path: pathlib.Path, server: str) -> None:
    """sdk/ builds a wheel of its own (llmos-client) that declares grpcio and protobuf alone, ships py.typed,
    and works with the server's packages (torch, lupa, numpy, llmosd) unimportable."""
    import zipfile

    root = pathlib.Path(__file__).resolve().parent.parent
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(root / "sdk")], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    [wheel] = tmp_path.glob("llmos_client-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(next(n for n in names if n.endswith("/METADATA"))).decode()
        z.extractall(tmp_path / "site")
    requires = sorted(line.split()[1].split(">")[0].split("<")[0] for line in metadata.splitlines()
                      if line.startswith("Requires-Dist:") and "extra ==" not in line)
    assert requires == ["grpcio", "protobuf"]
    assert "llmos/py.typed" in names and "llmos/v1/kernel_pb2.py" in names
    assert not any(n.startswith("llmosd/") for n in names)
    blocker = ("import sys\n"
               "class Block:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] in ('torch', 'lupa', 'numpy', 'llmosd'):\n"
               "            raise ImportError(f'{name} is not installed')\n"
               "sys.meta_path.insert(0, Block())\n")
    (tmp_path / "site" / "sitecustomize.py").write_text(blocker)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    blocked = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True,
                             timeout=CLI_TIMEOUT_S)
    assert blocked.returncode != 0 and "torch is not installed" in blocked.stderr  # the blocker is in force
    done = subprocess.run([sys.executable, "-c", "import llmos, llmos.cli, llmos.aio; print(llmos.__file__)"],
                          env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert done.returncode == 0 and done.stdout.startswith(str(tmp_path / "site")), done.stderr
    ps = subprocess.run([sys.executable, "-m", "llmos.cli", "--server", server, "ps", "-o", "json"], env=env,
                        capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert ps.returncode == 0 and isinstance(json.loads(ps.stdout), list), ps.stderr
