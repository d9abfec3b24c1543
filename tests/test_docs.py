"""docs/: the examples of docs/any-language.md and docs/python-agents.md, run as written against a real
server with the HTTP gateway (docs/grpcurl.md's walkthrough runs in test_grpcurl.py)."""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from typing import Iterator

import pytest

from llmosd_process import LlmosdServer

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
USERLAND = ROOT / "userland"


def block(doc: str, info: str) -> str:
    [text] = re.findall(rf"```{info}\n(.*?)```", (DOCS / doc).read_text(), re.S)
    return text


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlmosdServer]:
    srv = LlmosdServer(tmp_path_factory.mktemp("docs") / "data", "--http", "127.0.0.1:0", "--cpus", "2",
                       userland_root=USERLAND)
    srv.start()
    yield srv
    srv.stop()


@pytest.mark.skipif(shutil.which("jq") is None or shutil.which("curl") is None, reason="the example uses curl and jq")
def test_the_curl_example_runs_as_written(server: LlmosdServer) -> None:
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block("any-language.md", "sh http")],
                          env={**os.environ, "LLMOS_HTTP": server.http}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert '{"hello":"from curl"}' in lines and '{"state":"EXITED","exitReason":"normal"}' in lines
    error = json.loads(next(line for line in lines if line.startswith('{"error"')))
    assert error["error"]["status"] == "NOT_FOUND" and error["error"]["code"] == 404
    assert any(line.startswith('data: {"text"') for line in lines)


@pytest.mark.skipif(shutil.which("go") is None, reason="no Go toolchain on PATH")
def test_the_go_example_runs(server: LlmosdServer) -> None:
    done = subprocess.run(["go", "run", ".", server.http], cwd=DOCS / "examples" / "go", capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "map[hello:from go n:3]" in done.stdout and "echo EXITED (normal)" in done.stdout


def test_the_python_agent_runs_with_llmos_run(server: LlmosdServer, tmp_path: pathlib.Path) -> None:
    agent = tmp_path / "hello.py"
    agent.write_text(block("python-agents.md", "python agent"))
    done = subprocess.run([sys.executable, "-m", "llmos.cli", "--server", server.target, "run", str(agent),
                           "--args", '{"name": "agent"}'], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    log, result = done.stdout.splitlines()
    assert log == "hello, agent"
    assert json.loads(result) == {"greeting": "hello, AGENT", "child": "normal"}
