"""The README's examples, run as written against a real server."""
from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess
import sys
from typing import Any

import pytest

from llmos.v1 import kernel_pb2 as pb
from llmos.values import from_value, to_value

ROOT = pathlib.Path(__file__).resolve().parent.parent


README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def test_python_agent_example_runs(stub: Any) -> None:
    [source] = blocks("python agent")
    port = stub.OpenPort(pb.OpenPortRequest()).pid
    pid = stub.Spawn(pb.SpawnRequest(python=source)).pid
    stub.Send(pb.SendRequest(**{"from": port}, to=pid, tag="job", body=to_value(21)))
    info = stub.Wait(pb.WaitRequest(pid=pid, timeout_ms=60_000)).process
    assert info.state == pb.EXITED, info.error
    assert from_value(info.result) == {"answer": 42}
    assert "doubled 21" in stub.ReadLog(pb.ReadLogRequest(pid=pid)).lines


def test_readme_has_examples() -> None:
    assert blocks("lua") and blocks("python") and blocks("sh")


@pytest.mark.parametrize("source", blocks("lua"))
def test_lua_examples_run(stub: Any, source: str) -> None:
    pid = stub.Spawn(pb.SpawnRequest(lua=source)).pid
    info = stub.Wait(pb.WaitRequest(pid=pid, timeout_ms=30_000)).process
    assert info.state == pb.EXITED, info.error
    assert from_value(info.result) == {"answer": 42, "worker_ended": "normal"}


@pytest.mark.parametrize("source", blocks("python"))
def test_python_examples_run(llmosd: Any, source: str) -> None:
    env = dict(os.environ, LLMOS_SERVER=llmosd.target)
    done = subprocess.run([sys.executable, "-c", source], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


def commands() -> list[str]:
    """The shell lines that talk to a running server (not the set-up scripts)."""
    return [line.split("#")[0].strip() for block in blocks("sh") for line in block.splitlines()
            if line.startswith(("llmos ", "grpcurl "))]


@pytest.mark.parametrize("command", commands())
def test_shell_examples_run(llmosd: Any, command: str) -> None:
    args = [a.replace("127.0.0.1:50051", llmosd.target) for a in shlex.split(command)]
    if args[0] == "llmos":
        args = [sys.executable, "-m", "llmos.cli", *args[1:]]
    env = dict(os.environ, LLMOS_SERVER=llmosd.target)
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
