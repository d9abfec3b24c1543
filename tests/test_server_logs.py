"""The server's own log as JSON lines (llmosd --log-format json); process logs: their times, tail and
since, following by streaming (FollowLog, also as Server-Sent Events), kept across a restart."""
from __future__ import annotations

import datetime
import json
import pathlib
import subprocess
import sys
import time
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
    server = LlmosdServer(tmp_path / "data", "--model", "none", "--cpus", "2", "--log-retention", "2")
    server.start()
    try:
        with llmos.Client(server.target) as k:
            pids = []
            for n in range(4):
                pids.append(k.spawn(lua=f'print("run {n}") return {n}'))
                assert k.wait(pids[-1], timeout=STREAM_TIMEOUT_S).ok
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
            assert k.read_log(pids[0])[0] == []  # beyond --log-retention: the newest 2 pids' logs are kept
            page = k.read_log_page(pids[3])
            assert page.ended and len(page.times_ms) == 1 and page.times_ms[0] > 0
    finally:
        server.stop()
