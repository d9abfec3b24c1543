"""The HTTP/JSON gateway (llmosd --http): every syscall as POST /v1/kernel/<Method>, over a real
server and a real HTTP client (httpx), beside its gRPC door."""
from __future__ import annotations

import base64
import json
import pathlib
import threading
import time
from typing import Any, Iterator

import grpc
import httpx
import pytest
from google.protobuf import json_format

from llmos.v1 import kernel_pb2 as pb
from llmos.v1 import kernel_pb2_grpc

from llmosd_process import LlmosdServer

USERLAND = pathlib.Path(__file__).resolve().parent.parent / "userland"

CONSOLE = pathlib.Path(__file__).resolve().parent.parent / "server" / "llmosd" / "api" / "console"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlmosdServer]:
    srv = LlmosdServer(tmp_path_factory.mktemp("http") / "data", "--model", "none", "--http", "127.0.0.1:0",
                       "--max-message-bytes", str(1 << 20), "--cpus", "2", userland_root=USERLAND)
    srv.start()
    assert srv.http.startswith("http://127.0.0.1:")
    yield srv
    srv.stop()


@pytest.fixture
def http(server: LlmosdServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http, timeout=30) as client:
        yield client


@pytest.fixture
def stub(server: LlmosdServer) -> Iterator[Any]:
    with server.channel() as channel:
        yield kernel_pb2_grpc.KernelStub(channel)


def call(http: httpx.Client, method: str, body: Any = None, **kw: Any) -> httpx.Response:
    return http.post(f"/v1/kernel/{method}", json=body if body is not None else {}, **kw)


def ok(http: httpx.Client, method: str, body: Any = None) -> dict[str, Any]:
    r = call(http, method, body)
    assert r.status_code == 200, r.text
    return r.json()


def error_of(r: httpx.Response) -> tuple[int, str]:
    err = r.json()["error"]
    assert err["code"] == r.status_code and err["message"]
    return r.status_code, err["status"]


def sse_events(r: httpx.Response) -> Iterator[tuple[str, Any]]:
    """(event name, data) of a Server-Sent Events response, as they arrive."""
    name, data = "message", []
    for line in r.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            data.append(line[len("data: "):])
        elif not line and data:
            yield name, json.loads("\n".join(data))
            name, data = "message", []


def test_big_bodies_are_read_off_the_event_loop_alike(http: httpx.Client) -> None:
    """A body of THREAD_BODY_BYTES or more is decoded in a thread (api/web.py): the same value, the
    same refusals."""
    port = int(ok(http, "OpenPort")["pid"])
    body = {"items": [{"n": i, "s": f"item {i}"} for i in range(8000)]}  # ~200 KB of JSON
    ok(http, "Send", {"from": str(port), "to": port, "body": body})
    assert ok(http, "Recv", {"pid": port, "timeout_ms": 1000})["message"]["body"] == body
    big_bad = b'{"to": ' + str(port).encode() + b', "body": "' + b"x" * (100 << 10) + b'", "bogus": 1}'
    r = http.post("/v1/kernel/Send", content=big_bad, headers={"Content-Type": "application/json"})
    assert error_of(r) == (400, "INVALID_ARGUMENT") and "bogus" in r.json()["error"]["message"]
    r = http.post("/v1/kernel/Send", content=b"[" * (100 << 10), headers={"Content-Type": "application/json"})
    assert error_of(r) == (400, "INVALID_ARGUMENT") and "not JSON" in r.json()["error"]["message"]


def test_send_recv_in_json(http: httpx.Client) -> None:
    port = int(ok(http, "OpenPort")["pid"])  # uint64 is a string in the JSON mapping
    sent = ok(http, "Send", {"from": str(port), "to": port, "tag": "t", "body": {"a": [1, "x", None, True]},
                             "data": "AAEC", "correlationId": "c1"})
    assert int(sent["messageId"]) > 0
    got = ok(http, "Recv", {"pid": port, "timeout_ms": 1000})  # proto field names are accepted too
    msg = got["message"]
    assert (msg["from"], msg["tag"], msg["body"], msg["data"], msg["correlationId"]) == (
        str(port), "t", {"a": [1, "x", None, True]}, "AAEC", "c1")
    assert got["timedOut"] is False
    assert ok(http, "Recv", {"pid": port, "timeoutMs": 0}) == {"timedOut": True, "messages": []}  # (batch receives fill messages)


def test_spawn_wait_and_log(http: httpx.Client) -> None:
    pid = ok(http, "Spawn", {"lua": 'print("hello from lua"); return {n = sys.self()}'})["pid"]
    info = ok(http, "Wait", {"pid": pid, "timeoutMs": 20000})["process"]
    assert (info["state"], info["exitReason"], info["result"]) == ("EXITED", "normal", {"n": int(pid)})
    assert ok(http, "ReadLog", {"pid": pid})["lines"] == ["hello from lua"]


@pytest.mark.parametrize("body, fragment", [
    (b'{"pid":', "not JSON"),
    (b'[1, 2]', "must be a JSON object"),
    (b'"text"', "must be a JSON object"),
    (b'{"lua": "x", "args": NaN}', "NaN is not JSON"),
    (b'{"lua": "\xff\xfe"}', "not UTF-8"),
    (b'{"lua": "\\ud800"}', "surrogate"),
    (b'{"lua": "x", "limits": "\\udc00"}', "surrogate"),  # a string for a message: protobuf's own failure
    (b'{"lua": "x", "args": {"\\ud83d": ["\\ud83d\\ude00"]}}', "surrogate"),
    (b'{"lua": "x", "nosuch": 1}', "nosuch"),
    (b'{"lua": 12}', "lua"),
    (b'{"lua": "x", "priority": "high"}', "priority"),
    (b'{"lua": "x", "parent": -1}', "parent"),
    (b'{"lua": "x", "parent": 1e30}', "parent"),
    (b'{"lua": "x", "limits": {"cpuMs": "soon"}}', "cpuMs"),
    (b'[' * 100_000 + b']' * 100_000, "not JSON"),
    (b'{"args": ' + b'[' * 5000 + b']' * 5000 + b', "lua": "x"}', ""),
])
def test_bad_requests_are_invalid_argument(http: httpx.Client, body: bytes, fragment: str) -> None:
    r = http.post("/v1/kernel/Spawn", content=body, headers={"Content-Type": "application/json"})
    assert error_of(r) == (400, "INVALID_ARGUMENT"), r.text
    assert fragment in r.json()["error"]["message"]
    assert int(ok(http, "Spawn", {"lua": "return 1"})["pid"]) > 0  # and the server serves on


def test_a_body_over_the_message_limit_is_refused(http: httpx.Client) -> None:
    huge = json.dumps({"lua": "x" * (2 << 20)}).encode()  # the fixture's limit is 1 MiB
    r = http.post("/v1/kernel/Spawn", content=huge)
    assert error_of(r) == (400, "INVALID_ARGUMENT") and "limit" in r.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is counted as it arrives
        for _ in range(40):
            yield b" " * (64 << 10)

    r = http.post("/v1/kernel/Spawn", content=chunks())
    assert error_of(r) == (400, "INVALID_ARGUMENT")
    assert int(ok(http, "Spawn", {"lua": "return 1"})["pid"]) > 0


def test_a_body_that_arrives_in_pieces(http: httpx.Client) -> None:
    body = json.dumps({"lua": "return #'" + "x" * 40_000 + "'"}).encode()

    def pieces() -> Iterator[bytes]:
        for i in range(0, len(body), 1000):
            if i % 10_000 == 0:
                time.sleep(0.01)  # let the server read what came so far
            yield body[i:i + 1000]

    r = http.post("/v1/kernel/Spawn", content=pieces())
    assert r.status_code == 200, r.text
    assert ok(http, "Wait", {"pid": r.json()["pid"], "timeoutMs": 20000})["process"]["result"] == 40_000


def test_routes_and_verbs(http: httpx.Client) -> None:
    assert error_of(call(http, "NoSuchCall")) == (404, "NOT_FOUND")
    assert error_of(http.get("/v1/kernel/Spawn")) == (501, "UNIMPLEMENTED")
    assert error_of(http.get("/no/such/page")) == (404, "NOT_FOUND")


# Requests the kernel refuses: over HTTP each has the status gRPC gives it, mapped as google.rpc does.
KERNEL_ERRORS = [
    ("Wait", {"pid": "999999"}, "NOT_FOUND", 404),
    ("Wait", {"pid": str(2**60)}, "NOT_FOUND", 404),
    ("Wait", {}, "INVALID_ARGUMENT", 400),
    ("Spawn", {}, "INVALID_ARGUMENT", 400),
    ("Spawn", {"lua": "return 1", "priority": 99}, "INVALID_ARGUMENT", 400),
    ("Spawn", {"path": "no/such/program.lua"}, "NOT_FOUND", 404),
    ("Recv", {"pid": 1, "timeoutMs": -5}, "INVALID_ARGUMENT", 400),
    ("StatFile", {"path": "no-such-file"}, "NOT_FOUND", 404),
    ("StatFile", {"path": "../escape"}, "INVALID_ARGUMENT", 400),
    ("Infer", {"prompt": "hi"}, "UNIMPLEMENTED", 501),  # this server runs no model
]


@pytest.mark.parametrize("method, body, status, http_status", KERNEL_ERRORS)
def test_kernel_errors_map_as_grpc(http: httpx.Client, stub: Any, method: str, body: dict, status: str,
                                   http_status: int) -> None:
    assert error_of(call(http, method, body)) == (http_status, status)
    request = json_format.ParseDict(body, getattr(pb, stub_request_name(method))())
    with pytest.raises(grpc.RpcError) as e:
        result = getattr(stub, method)(request, timeout=10)
        if method == "Infer":
            list(result)
    assert e.value.code().name == status


def stub_request_name(method: str) -> str:
    return {"StatFile": "FilePath"}.get(method, f"{method}Request")


def test_events_stream_as_sse(server: LlmosdServer, http: httpx.Client) -> None:
    seen: list[dict] = []
    subscribed = threading.Event()

    def listen() -> None:
        with httpx.Client(base_url=server.http, timeout=30) as client:
            with client.stream("POST", "/v1/kernel/Events", json={}) as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                for name, data in sse_events(r):
                    assert name == "message"
                    seen.append(data)
                    subscribed.set()
                    if data["kind"] == "ended" and data["process"]["name"] == "sse-target":
                        return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    assert subscribed.wait(10)
    ok(http, "Spawn", {"lua": "return 7", "name": "sse-target"})
    listener.join(20)
    assert not listener.is_alive()
    kinds = [(e["kind"], e.get("process", {}).get("name")) for e in seen]
    assert kinds[0] == ("subscribed", None)
    assert ("spawned", "sse-target") in kinds and kinds[-1] == ("ended", "sse-target")


def test_files_body_in_and_sse_out(http: httpx.Client) -> None:
    payload = bytes(range(256)) * 5000  # 1.28 MB: more than one chunk each way
    r = http.post("/v1/kernel/WriteFile", params={"path": "http/blob.bin"}, content=payload)
    assert r.status_code == 200, r.text
    assert r.json()["size"] == str(len(payload))
    r = http.post("/v1/kernel/WriteFile", params={"path": "http/blob.bin", "append": "true"}, content=b"tail")
    assert r.json()["size"] == str(len(payload) + 4)
    with http.stream("POST", "/v1/kernel/ReadFile", json={"path": "http/blob.bin"}) as r:
        events = list(sse_events(r))
    assert events[-1] == ("end", {})
    data = b"".join(base64.b64decode(d["data"]) for name, d in events[:-1])
    assert data == payload + b"tail"
    assert [e["path"] for e in ok(http, "ListFiles", {"path": "http"})["entries"]] == ["http/blob.bin"]
    assert error_of(call(http, "ReadFile", {"path": "http/none"})) == (404, "NOT_FOUND")
    for params in ({"path": "x", "append": "maybe"}, {"path": "x", "bogus": "1"}, {"path": "x", "pid": "abc"},
                   {"path": "../x"}):
        assert error_of(http.post("/v1/kernel/WriteFile", params=params, content=b"z")) == (400, "INVALID_ARGUMENT")
    assert error_of(call(http, "StatFile", {"path": "x"})) == (404, "NOT_FOUND")  # no failed write appeared


def test_a_recv_whose_client_goes_away_loses_no_message(server: LlmosdServer, http: httpx.Client, stub: Any) -> None:
    port = int(ok(http, "OpenPort")["pid"])

    def abandoned_recv() -> None:
        with httpx.Client(base_url=server.http, timeout=0.5) as client:
            with pytest.raises(httpx.ReadTimeout):
                client.post("/v1/kernel/Recv", json={"pid": port})

    for i in range(5):  # the message sent after the client left goes to the next Recv
        abandoned_recv()
        ok(http, "Send", {"from": port, "to": port, "body": i})
        assert ok(http, "Recv", {"pid": port, "timeoutMs": 5000})["message"]["body"] == i
    assert stub.Recv(pb.RecvRequest(pid=port, timeout_ms=0)).timed_out


def test_console_is_served_from_the_package(http: httpx.Client) -> None:
    for path in ("/../../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/..%2f..%2fmain.py"):
        assert error_of(http.get(path)) == (404, "NOT_FOUND")
    if not (CONSOLE / "index.html").is_file():
        assert error_of(http.get("/")) == (404, "NOT_FOUND")
        return
    r = http.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.content == (CONSOLE / "index.html").read_bytes()
    for asset in sorted(CONSOLE.iterdir()):
        if asset.is_file():
            assert http.get(f"/{asset.name}").content == asset.read_bytes()


def test_http_and_grpc_share_one_kernel(http: httpx.Client, stub: Any) -> None:
    port = stub.OpenPort(pb.OpenPortRequest()).pid
    ok(http, "Send", {"from": port, "to": port, "body": "over http"})
    assert stub.Recv(pb.RecvRequest(pid=port, timeout_ms=5000)).message.body.string_value == "over http"
    assert ok(http, "GetProcess", {"pid": port})["kind"] == "PORT"


def test_tokens_say_who_calls_over_http(server: LlmosdServer, http: httpx.Client) -> None:
    """The gateway decides callers as gRPC does (api/identity.py): a Bearer token's namespace
    and role; another namespace's processes do not exist for it; a token that is not live is 401;
    calls that change something are audited with their caller."""
    admin = {"Authorization": f"Bearer {(server.data_dir / 'admin.token').read_text().strip()}"}
    made = call(http, "CreateToken", {"namespace": "gamma", "role": "owner", "label": "http"}, headers=admin).json()
    gamma = {"Authorization": f"Bearer {made['token']}"}
    mine = ok(http, "Spawn", {"lua": "sys.recv()"})["pid"]  # no token on loopback: the owner of default
    assert error_of(call(http, "GetProcess", {"pid": mine}, headers=gamma)) == (404, "NOT_FOUND")
    assert error_of(call(http, "Kill", {"pid": mine}, headers=gamma)) == (404, "NOT_FOUND")
    theirs = call(http, "Spawn", {"lua": "sys.recv()"}, headers=gamma).json()["pid"]
    info = call(http, "GetProcess", {"pid": theirs}, headers=gamma).json()
    assert info["namespace"] == "gamma"
    assert error_of(call(http, "ListProcesses", {}, headers={"Authorization": "Bearer nope"})) == \
        (401, "UNAUTHENTICATED")
    entries = call(http, "ReadAudit", {"limit": 50}, headers=admin).json()["entries"]
    assert any(e["method"] == "Spawn" and e["namespace"] == "gamma" for e in entries)
    call(http, "Kill", {"pid": theirs}, headers=gamma)
    call(http, "Kill", {"pid": mine})


def test_http_off_loopback_needs_insecure(tmp_path: pathlib.Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-m", "llmosd", "--listen", "127.0.0.1:0", "--http", "0.0.0.0:0",
                          "--data-dir", str(tmp_path), "--model", "none"], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode != 0 and "--insecure" in out.stderr
