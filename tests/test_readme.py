"""The README's examples, run as written against a real server."""
from __future__ import annotations

import json
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


@pytest.fixture(scope="module")
def http_llmosd(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from llmosd_process import LlmosdServer

    server = LlmosdServer(tmp_path_factory.mktemp("readme-http") / "data", "--model", "tiny", "--cpus", "2",
                          "--http", "127.0.0.1:0")
    server.start()
    yield server
    server.stop()


def curl_commands() -> list[str]:
    return [line.split("   #")[0].strip() for block in blocks("sh") for line in block.splitlines()
            if line.startswith("curl ")]


@pytest.mark.parametrize("command", curl_commands())
def test_curl_examples_run(http_llmosd: Any, command: str) -> None:
    """The README's curl calls, against a server with --http (the built-in tiny model for smollm2)."""
    args = [a.replace("127.0.0.1:8080", http_llmosd.http.removeprefix("http://")).replace('"smollm2"', '"tiny"')
            for a in shlex.split(command)]
    done = subprocess.run([*args, "--fail-with-body"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    answer = json.loads(done.stdout)
    assert "error" not in answer and answer


def test_the_first_screen_has_its_steps() -> None:
    """Before the first section after it: starting a server, an agent, the browser view, a curl call,
    and the images it shows exist."""
    first = README.split("## Two commands")[0]
    assert "tools/demo.sh --http" in first and "llmos run" in first and "http://127.0.0.1:8080/" in first
    assert curl_commands() and all(c in first for c in curl_commands())
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", first):
        assert (ROOT / image).is_file(), image
