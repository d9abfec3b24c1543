"""The server's own log as JSON lines (llmosd --log-format json)."""
from __future__ import annotations

import datetime
import json
import pathlib

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
