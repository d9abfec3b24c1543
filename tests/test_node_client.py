"""A second language: tests/node/client.js uses the JavaScript SDK (sdk/js, the npm package
llmos-client) against a real server: plain JS values as bodies, pids as bigint or string, an event
stream, a streamed inference and errors with their gRPC status codes."""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
from typing import Any

import pytest

NODE_DIR = pathlib.Path(__file__).resolve().parent / "node"
SDK_DIR = pathlib.Path(__file__).resolve().parent.parent / "sdk" / "js"
NODE = shutil.which("node")
NPM = shutil.which("npm")


def npm_ci(directory: pathlib.Path) -> None:
    """Install `directory`'s locked dependencies unless those of its package-lock.json are there
    (npm's copy of the lock in node_modules is as new); skip when the registry is unreachable."""
    installed = directory / "node_modules" / ".package-lock.json"
    if installed.is_file() and installed.stat().st_mtime >= (directory / "package-lock.json").stat().st_mtime:
        return
    try:
        out = subprocess.run([NPM, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=directory,
                             capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.skip("npm ci took over 240 s: is the npm registry reachable?")
    if out.returncode != 0:
        text = out.stderr + out.stdout
        if any(s in text for s in ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ETIMEDOUT", "network")):
            pytest.skip(f"the npm registry is unreachable: {text.strip().splitlines()[-1]}")
        pytest.fail(f"npm ci failed in {directory}:\n{text}")


@pytest.fixture(scope="module")
def node_modules() -> pathlib.Path:
    if NODE is None or NPM is None:
        pytest.skip("node and npm are needed for the Node.js client test")
    npm_ci(SDK_DIR)  # the package's own dependencies (@grpc/grpc-js, @grpc/proto-loader)
    npm_ci(NODE_DIR)  # the test program's: the package itself, linked from sdk/js
    return NODE_DIR / "node_modules"


def test_node_client_talks_to_lua_echo(llmosd: Any, node_modules: pathlib.Path) -> None:
    out = subprocess.run([NODE, "client.js", llmosd.target], cwd=NODE_DIR, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    echo, port = summary["echo"], summary["port"]  # bigints, written as "123n"
    assert summary["pid_types"] == ["bigint", "bigint"] and echo.endswith("n") and port.endswith("n")
    echo_pid = int(echo[:-1])
    assert summary["string_pid"] == port[:-1] and summary["subscribed"] == "subscribed"
    assert summary["replies"] == [
        {"correlation_id": "node-2", "tag": "node", "from": echo, "body": "plain text", "data": [2, 255]},
        {"correlation_id": "node-1", "tag": "node", "from": echo, "body": ["a", 2, None, True], "data": [1, 255]},
        {"correlation_id": "node-0", "tag": "node", "from": echo, "body": {"hello": "from node", "n": 1},
         "data": [0, 255]},
    ]
    assert summary["stop_ack"] == {"tag": "stopped", "body": {"echoed": 3}}
    assert (summary["state"], summary["exit_reason"]) == ("EXITED", "normal")
    assert summary["result"] == {"echoed": 3, "stopped_by": int(port[:-1])} and echo_pid > 0
    assert summary["not_found"]["status"] == "NOT_FOUND" and summary["not_found"]["code"] == 5
    assert "no process" in summary["not_found"]["details"]
    invalid = summary["invalid_argument_code"]
    assert summary["nan_body"]["code"] == invalid and "finite" in summary["nan_body"]["details"]
    assert summary["big_int"]["code"] == invalid and "2^53" in summary["big_int"]["details"]
    infer = summary["infer"]
    assert infer["streamed"] == infer["whole"] and infer["tokens"] == 4 and infer["finish"] == "length"
    assert summary["followed"] == ["first", "second"] and summary["log_times"] is True


def test_the_docs_node_example_runs(llmosd: Any, node_modules: pathlib.Path) -> None:
    """docs/any-language.md's Node example, as written (run where llmos-client resolves: tests/node)."""
    doc = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "any-language.md").read_text()
    [source] = re.findall(r"```js\n(.*?)```", doc, re.S)
    out = subprocess.run([NODE, "-e", source], cwd=NODE_DIR, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "LLMOS_SERVER": llmosd.target})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "bigint [ 'from node', 1, null, 2.5, { ok: true } ]"
    assert lines[1] == "EXITED" and lines[2].startswith('"') and lines[3] == "NOT_FOUND 5"
