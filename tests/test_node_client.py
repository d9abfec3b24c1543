"""A second language: a Node.js client (@grpc/grpc-js + @grpc/proto-loader,
loading protos/llmos/v1/kernel.proto at run time) drives the Lua echo program."""
from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
from typing import Any

import pytest

NODE_DIR = pathlib.Path(__file__).resolve().parent / "node"
NODE = shutil.which("node")
NPM = shutil.which("npm")


@pytest.fixture(scope="module")
def node_modules() -> pathlib.Path:
    if NODE is None or NPM is None:
        pytest.skip("node and npm are needed for the Node.js client test")
    modules = NODE_DIR / "node_modules"
    if not (modules / "@grpc" / "grpc-js").is_dir() or not (modules / "@grpc" / "proto-loader").is_dir():
        try:
            out = subprocess.run([NPM, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NODE_DIR,
                                 capture_output=True, text=True, timeout=240)
        except subprocess.TimeoutExpired:
            pytest.skip("npm ci took over 240 s: is the npm registry reachable?")
        if out.returncode != 0:
            text = out.stderr + out.stdout
            if any(s in text for s in ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ETIMEDOUT", "network")):
                pytest.skip(f"the npm registry is unreachable: {text.strip().splitlines()[-1]}")
            pytest.fail(f"npm ci failed:\n{text}")
    return modules


def test_node_client_talks_to_lua_echo(llmosd: Any, node_modules: pathlib.Path) -> None:
    out = subprocess.run([NODE, "client.js", llmosd.target], cwd=NODE_DIR, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    echo, port = summary["echo"], summary["port"]
    assert echo > 0 and port > echo
    assert summary["replies"] == [
        {"correlation_id": "node-2", "tag": "node", "from": echo, "body": "plain text", "data": [2, 255]},
        {"correlation_id": "node-1", "tag": "node", "from": echo, "body": ["a", 2, None, True], "data": [1, 255]},
        {"correlation_id": "node-0", "tag": "node", "from": echo, "body": {"hello": "from node", "n": 1},
         "data": [0, 255]},
    ]
    assert summary["stop_ack"] == {"tag": "stopped", "body": {"echoed": 3}}
    assert summary["timed_out"] is False
    assert (summary["state"], summary["exit_reason"]) == ("EXITED", "normal")
    assert summary["result"] == {"echoed": 3, "stopped_by": port}
    assert summary["not_found"]["code"] == "NOT_FOUND" and "no process" in summary["not_found"]["details"]
