"""The server's own log as JSON lines (llmosd --log-format json); process logs: their times, tail and
since, following by streaming (FollowLog, also as Server-Sent Events), kept across a restart."""
from __future__ import annotations

import datetime
import json
import pathlib
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

import llmos

from llmos.v1 import kernel_pb2 as pb
from llmos.v1 import kernel_pb2_grpc

from llmosd_process import LlmosdServer


def test_json_log_lines(tmp_path: pathlib.Path) -> None:
    userland = tmp_path / "userland"
    userland.mkdir()
    (userland / "hello.lua").write_text('print("hello, \\"log\\"")\n')
    server = LlmosdServer(tmp_path / "data", "--model", "none", "--log-format", "json", "--spawn", "hello.lua",
                          "--cpus", "2", userland_root=userland)
    server.start()
    try:
        with server.channel() as channel:
            kernel_pb2_grpc.KernelStub(channel).Wait(pb.WaitRequest(pid=1, timeout_ms=20_000))
    finally:
        server.stop()
    lines = [json.loads(line) for line in server.log_path.read_text().splitlines() if line.strip()]
    assert lines, "the server logged nothing"
    for entry in lines:
        assert {"time", "level", "logger", "message"} <= set(entry)
        assert datetime.datetime.fromisoformat(entry["time"]).tzinfo is not None
    said = [e for e in lines if e.get("pid") == 1 and e["message"] == 'pid 1: hello, "log"']
    assert said and said[0]["level"] == "INFO"
    assert any(e["message"] == "shutting down" for e in lines)


BOOT_AGENT = r'''
import sys
from llmos.userland import sys as llmos_sys
print("before")
print("to stderr", file=sys.stderr)
llmos_sys.recv(tag="go")
print("after")
print("no newline", end="")
'''


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_a_python_boot_agents_lines_reach_the_server_log_as_written(tmp_path: pathlib.Path, log_format: str) -> None:
    """A Python program started with --spawn has its lines in the server's log as a Lua boot
    program's: while it runs, each once, with its pid and the time the line was written (ReadLog's);
    an agent spawned otherwise has none there, even at DEBUG."""
    userland = tmp_path / "userland"
    userland.mkdir()
    (userland / "boot.py").write_text(BOOT_AGENT)
    server = LlmosdServer(tmp_path / "data", "--model", "none", "--log-format", log_format, "--log-level", "DEBUG",
                          "--spawn", "boot.py", "--cpus", "2", userland_root=userland)
    server.start()

    def said() -> list[tuple[datetime.datetime, str]]:
        """(time, message) of the server log's lines about pid 1's own output."""
        out = []
        for line in server.log_path.read_text().splitlines():
            if log_format == "json":
                entry = json.loads(line)
                if entry.get("pid") == 1 and entry["message"].startswith("pid 1: "):
                    assert entry["level"] == "INFO"
                    out.append((datetime.datetime.fromisoformat(entry["time"]), entry["message"]))
            elif " INFO pid 1: " in line:  # "%(asctime)s %(name)s %(levelname)s %(message)s", local time
                when, _, message = line.partition(" llmosd.kernel.kernel INFO ")
                out.append((datetime.datetime.strptime(when, "%Y-%m-%d %H:%M:%S,%f").astimezone(), message))
        return out

    try:
        with llmos.Client(server.target) as k:
            deadline = time.monotonic() + STREAM_TIMEOUT_S
            while len(said()) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert [m for _, m in said()] == ["pid 1: before", "pid 1: to stderr"]
            assert k.get(1).state == "BLOCKED"  # still running, waiting for "go"
            other = k.spawn(python='print("not a boot agent")')
            assert k.wait(other, timeout=STREAM_TIMEOUT_S).ok
            k.send(1, None, tag="go")
            assert k.wait(1, timeout=STREAM_TIMEOUT_S).ok
            page = k.read_log_page(1)
    finally:
        server.stop()
    lines = said()
    assert [m for _, m in lines] == ["pid 1: before", "pid 1: to stderr", "pid 1: after", "pid 1: no newline"]
    assert page.lines == ["before", "to stderr", "after", "no newline"]
    assert [int(when.timestamp() * 1000) for when, _ in lines] == page.times_ms
    log = server.log_path.read_text()
    assert "not a boot agent" not in log
    assert log.index("pid 1: no newline") < log.index("pid 1 ended: EXITED (normal)")


FLOOD_AGENT = r'''
import os
from llmos.userland import sys as llmos_sys
print("é" * 20_000)
llmos_sys.recv(tag="go")
os.write(1, "".join(f"{n:07d} {'x' * 91}\n" for n in range(40_000)).encode())  # 4 MB at once
print("end")
'''


def test_a_python_boot_agents_lines_in_the_server_log_are_bounded(tmp_path: pathlib.Path) -> None:
    """A boot agent's long line is cut as its own log cuts it; output it writes faster than the
    server's log copies it is left out (a warning says how much), whole lines only, down to its
    last lines."""
    userland = tmp_path / "userland"
    userland.mkdir()
    (userland / "flood.py").write_text(FLOOD_AGENT)
    server = LlmosdServer(tmp_path / "data", "--model", "none", "--log-format", "json", "--spawn", "flood.py",
                          "--cpus", "2", userland_root=userland)
    server.start()
    try:
        with llmos.Client(server.target) as k:
            deadline = time.monotonic() + STREAM_TIMEOUT_S
            while "pid 1: é" not in server.log_path.read_text() and time.monotonic() < deadline:
                time.sleep(0.02)
            k.send(1, None, tag="go")
            assert k.wait(1, timeout=STREAM_TIMEOUT_S).ok
            page = k.read_log_page(1)
    finally:
        server.stop()
    entries = [json.loads(line) for line in server.log_path.read_text().splitlines()]
    said = [e["message"].removeprefix("pid 1: ") for e in entries
            if e.get("pid") == 1 and e["message"].startswith("pid 1: ")]
    assert said[0] == "é" * (16 << 10) + " ... [3616 characters cut]"  # as Lua's and ReadLog's lines are cut
    assert said[-1] == page.lines[-1] == "end"
    numbered = said[1:-1]
    assert 0 < len(numbered) < 40_000 and all(len(line) == 99 and line[:7].isdigit() for line in numbered)
    assert numbered[-1].startswith("0039999 ")
    left_out = [e for e in entries if e["message"].startswith("pid 1's output: ")]
    assert left_out and left_out[0]["level"] == "WARNING" and left_out[0]["pid"] == 1
    assert left_out[0]["message"].endswith(" bytes left out of the server's log (written faster than copied)")


# -- process logs: times, tail/since, streaming, kept across a restart ---------------------------
STREAM_TIMEOUT_S = 30.0


def _cli(target: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmos.cli", "--server", target, *args], capture_output=True,
                          text=True, timeout=STREAM_TIMEOUT_S)


def test_log_lines_carry_their_times_and_read_by_tail_and_since(tmp_path: pathlib.Path) -> None:
    server = LlmosdServer(tmp_path / "data", "--model", "none", "--cpus", "2")
    server.start()
    try:
        with llmos.Client(server.target) as k:
            before = int(time.time() * 1000)
            pid = k.spawn(lua='print("a") print("b") print("c")')
            assert k.wait(pid, timeout=STREAM_TIMEOUT_S).ok
            after = int(time.time() * 1000)
            page = k.read_log_page(pid)
            assert page.lines == ["a", "b", "c"] and page.ended and page.next_offset == 3
            assert all(before <= at <= after for at in page.times_ms) and page.times_ms == sorted(page.times_ms)
            assert k.read_log_page(pid, tail=2).lines == ["b", "c"]
            assert k.read_log_page(pid, 1, tail=5).lines == ["b", "c"]
            assert k.read_log_page(pid, since_ms=after + 60_000).lines == []
            assert k.read_log_page(pid, since_ms=before).lines == ["a", "b", "c"]
            stamped = _cli(server.target, "logs", "-t", str(pid))
            assert stamped.returncode == 0, stamped.stderr
            for line, text in zip(stamped.stdout.splitlines(), "abc"):
                when, said = line.split(" ")
                assert said == text and before <= datetime.datetime.fromisoformat(when).timestamp() * 1000 <= after + 1
            assert _cli(server.target, "logs", "--since", "1h", str(pid)).stdout == "a\nb\nc\n"
            assert _cli(server.target, "logs", "--since", "2999-01-01T00:00:00", str(pid)).stdout == ""
            bad = _cli(server.target, "logs", "--since", "yesterday", str(pid))
            assert bad.returncode == 2 and "Traceback" not in bad.stderr
    finally:
        server.stop()


def test_follow_log_streams_each_line_as_it_is_written(tmp_path: pathlib.Path) -> None:
    """FollowLog (gRPC, then HTTP as Server-Sent Events) sends a line when the process writes it,
    and ends once the process has ended."""
    server = LlmosdServer(tmp_path / "data", "--model", "none", "--cpus", "2", "--http", "127.0.0.1:0")
    server.start()
    program = 'print("one") local m = sys.recv{} print(m.body) sys.recv{} print("last") return 0'
    try:
        with llmos.Client(server.target) as k:
            pid = k.spawn(lua=program)
            pages = k.follow_log(pid, timeout=STREAM_TIMEOUT_S)
            lines = []
            while lines != ["one"]:  # the first page may come before the program ran
                lines += next(pages).lines
            http_events = urllib.request.urlopen(urllib.request.Request(
                f"{server.http}/v1/kernel/FollowLog", data=json.dumps({"pid": str(pid)}).encode()),
                timeout=STREAM_TIMEOUT_S)
            k.send(pid, "two")  # the process is blocked: this line exists only once the stream is open
            page = next(pages)
            assert page.lines == ["two"] and not page.ended and page.next_offset == 2
            k.send(pid, None)
            rest = list(pages)
            assert [line for p in rest for line in p.lines] == ["last"] and rest[-1].ended
            sse = http_events.read().decode()
            data = [json.loads(line[len("data: "):]) for line in sse.splitlines() if line.startswith("data: ")]
            assert [line for d in data for line in d.get("lines", [])] == ["one", "two", "last"]
            assert data[-2]["ended"] and sse.rstrip().endswith("event: end\ndata: {}")
            with pytest.raises(llmos.NotFound):
                list(k.follow_log(1 << 40))
    finally:
        server.stop()


def test_logs_and_records_survive_a_restart_within_retention(tmp_path: pathlib.Path) -> None:
    """Logs are kept across a restart for the last --log-retention processes; an older one's is
    NOT_FOUND saying so (gRPC, HTTP, `llmos logs` exiting 1), unlike an empty log or no process."""
    server = LlmosdServer(tmp_path / "data", "--model", "none", "--cpus", "2", "--log-retention", "2",
                          "--http", "127.0.0.1:0")
    server.start()
    try:
        with llmos.Client(server.target) as k:
            pids = []
            for n in range(4):
                pids.append(k.spawn(lua=f'print("run {n}") return {n}'))
                assert k.wait(pids[-1], timeout=STREAM_TIMEOUT_S).ok
            silent = k.spawn(lua="return 0")  # its log is empty: nothing stored, nothing lost
            assert k.wait(silent, timeout=STREAM_TIMEOUT_S).ok
            blocked = k.spawn(lua='print("before the restart") sys.recv{}')
            while k.read_log(blocked)[0] != ["before the restart"]:
                time.sleep(0.01)
    finally:
        server.stop()  # the blocked one ends with the server ("shutdown"): its log is kept too
    server.start()
    try:
        with llmos.Client(server.target) as k:
            assert [k.get(pid).result for pid in pids] == [0, 1, 2, 3]  # every record is kept
            shown = _cli(server.target, "logs", str(pids[3]))
            assert shown.returncode == 0 and shown.stdout == "run 3\n", shown.stderr
            assert k.read_log(blocked)[0] == ["before the restart"]
            assert k.get(blocked).exit_reason == "shutdown"
            page = k.read_log_page(pids[3])
            assert page.ended and len(page.times_ms) == 1 and page.times_ms[0] > 0
            assert k.read_log_page(silent).lines == [] and _cli(server.target, "logs", str(silent)).returncode == 0
            gone = "pid {}'s log is no longer kept (--log-retention 2)"  # the newest 2 pids' logs are kept
            for pid in pids[:2]:
                with pytest.raises(llmos.NotFound) as err:
                    k.read_log_page(pid)
                assert err.value.message == gone.format(pid)
                with pytest.raises(llmos.NotFound):
                    list(k.follow_log(pid, timeout=STREAM_TIMEOUT_S))
                for args in ((), ("-f",), ("--tail", "0")):
                    shown = _cli(server.target, "logs", *args, str(pid))
                    assert shown.returncode == 1 and shown.stdout == "" and gone.format(pid) in shown.stderr, shown
            answer = _post(server.http, "ReadLog", {"pid": str(pids[0])})
            assert answer["error"]["code"] == 404 and answer["error"]["status"] == "NOT_FOUND"
            assert answer["error"]["message"] == gone.format(pids[0])
            never = _cli(server.target, "logs", str(1 << 40))
            assert never.returncode == 1 and "no process with pid" in never.stderr
    finally:
        server.stop()


def _post(http: str, rpc: str, body: dict) -> dict:
    """An HTTP gateway call's JSON answer, an error's included."""
    request = urllib.request.Request(f"{http}/v1/kernel/{rpc}", data=json.dumps(body).encode())
    try:
        with urllib.request.urlopen(request, timeout=STREAM_TIMEOUT_S) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


# -- a Python agent's lines: the times its stdio stamps them with --------------------------------
AGENT = r'''
import os, sys, time
from llmos.userland import sys as llmos_sys
print("first")
llmos_sys.recv(tag="go")
time.sleep(0.3)
print("second", file=sys.stderr)
print("two\nlines", end="")
print()
os.write(1, b"\x1e99999999999999 forged into the future\n")
os.write(1, b"\x1e1 forged into the past\n")
os.write(2, b"raw\n")
print("\x1e1 text that looks like a stamp")
raise ValueError("boom")
'''


def test_python_agent_log_lines_carry_the_times_they_were_written(tmp_path: pathlib.Path) -> None:
    """Each line of a Python agent's log (stdout, stderr, its traceback) has the time it was
    written, live and once ended, over gRPC and by `llmos logs -t`; a stamp the program forges
    on a raw fd is believed only between the line above it and the reading."""
    server = LlmosdServer(tmp_path / "data", "--model", "none", "--cpus", "2")
    server.start()
    try:
        with llmos.Client(server.target) as k:
            before = int(time.time() * 1000)
            pid = k.spawn(python=AGENT)
            page = k.follow_log(pid, timeout=STREAM_TIMEOUT_S)
            first = next(page)
            while not first.lines:  # the first page may come before the agent printed
                first = next(page)
            assert first.lines == ["first"] and before <= first.times_ms[0] <= int(time.time() * 1000)
            go_at = int(time.time() * 1000)
            k.send(pid, None, tag="go")
            rest = list(page)
            assert rest[-1].ended
            after = int(time.time() * 1000)
            lines = [line for p in rest for line in p.lines]
            times = [at for p in rest for at in p.times_ms]
            ended = k.read_log_page(pid)
    finally:
        server.stop()
    assert lines[:7] == ["second", "two", "lines", "forged into the future", "forged into the past", "raw",
                         "\x1e1 text that looks like a stamp"]
    assert lines[7] == "Traceback (most recent call last):" and lines[-1] == "ValueError: boom"
    assert times == sorted(times) and go_at + 299 <= times[0] and times[-1] <= after
    assert ended.lines == ["first"] + lines and ended.times_ms == [first.times_ms[0]] + times


def test_cli_prints_a_python_agents_line_times(tmp_path: pathlib.Path) -> None:
    server = LlmosdServer(tmp_path / "data", "--model", "none", "--cpus", "2")
    server.start()
    try:
        with llmos.Client(server.target) as k:
            before = int(time.time() * 1000)
            pid = k.spawn(python='import sys\nprint("out")\nprint("err", file=sys.stderr)')
            assert k.wait(pid, timeout=STREAM_TIMEOUT_S).ok
            after = int(time.time() * 1000)
        stamped = _cli(server.target, "logs", "-t", str(pid))
        assert stamped.returncode == 0, stamped.stderr
        said = [line.split(" ") for line in stamped.stdout.splitlines()]
        assert [text for _, text in said] == ["out", "err"]
        assert all(before <= datetime.datetime.fromisoformat(when).timestamp() * 1000 <= after + 1 for when, _ in said)
    finally:
        server.stop()
