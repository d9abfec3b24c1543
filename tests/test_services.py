"""The file store and the lock table as clients see them: a real llmosd, real gRPC, real Lua processes.

Every file and lock call is made over gRPC (the raw stub, so status codes are checked as sent) and from
Lua (sys.fs, sys.lock). Each test works under a directory and lock names of its own, so the tests share
the session's server without depending on each other.
"""
from __future__ import annotations

import os
import pathlib
import signal
import time
import uuid
from typing import Any, Iterator

import grpc
import pytest

import llmos
from llmos.v1 import kernel_pb2 as pb
from llmos.v1 import kernel_pb2_grpc
from llmos.values import from_value
from llmosd_process import LlmosdServer
from statuses import code_of

MiB = 1 << 20
MAX_FILE_BYTES = 64 * MiB  # files.FileLimits.max_file_bytes, the server's default
STEP_S = 0.01
WAIT_S = 15.0


@pytest.fixture
def k(llmosd: LlmosdServer) -> Iterator[llmos.Client]:
    with llmos.connect(llmosd.target, rpc_timeout=30.0) as client:
        yield client


@pytest.fixture
def uniq() -> str:
    """A directory / lock-name prefix of the test's own."""
    return f"t{uuid.uuid4().hex[:10]}"


def lua(k: llmos.Client, source: str, args: Any = None, timeout: float = 30.0, **spawn: Any) -> Any:
    """Run a Lua program to its end and return its result; fail the test if it did not end well."""
    info = k.run(source, args=args, timeout=timeout, **spawn)
    assert info.ok, f"Lua program ended {info.state} ({info.exit_reason}): {info.error}"
    return info.result


def write(stub: Any, path: str, *pieces: bytes, append: bool = False, pid: int = 0) -> pb.FileInfo:
    first, *rest = pieces or (b"",)
    requests = [pb.WriteFileRequest(path=path, append=append, pid=pid, data=first)]
    requests += [pb.WriteFileRequest(data=p) for p in rest]
    return stub.WriteFile(iter(requests), timeout=30)


def read(stub: Any, path: str, offset: int = 0, length: int = 0) -> bytes:
    return b"".join(c.data for c in stub.ReadFile(pb.ReadFileRequest(path=path, offset=offset, length=length),
                                                    timeout=30))


def wait_until(what: str, check: Any, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(STEP_S)


def wait_blocked(k: llmos.Client, pid: int, on: str = "lock_acquire") -> None:
    def blocked() -> bool:
        info = k.get(pid)
        assert not info.ended, f"pid {pid} ended while we waited for it to block: {info.error}"
        return info.state == "BLOCKED" and info.blocked_on == on
    wait_until(f"pid {pid} to block in {on}", blocked)


def recv_bodies(k: llmos.Client, port: int, n: int, tag: str | None = None) -> list[Any]:
    out = []
    for _ in range(n):
        msg = k.recv(port, tag=tag, timeout=WAIT_S)
        assert msg is not None, f"only {len(out)} of {n} messages arrived: {out}"
        out.append(msg.body)
    return out


# -- files over gRPC ------------------------------------------------------------------------------
def test_grpc_file_calls(stub: Any, uniq: str) -> None:
    info = write(stub, f"{uniq}/x/notes.txt", b"hello ", b"wor", b"ld")
    assert (info.path, info.size, info.is_dir) == (f"{uniq}/x/notes.txt", 11, False)
    assert info.modified_ms > 0
    assert read(stub, f"{uniq}/x/notes.txt") == b"hello world"
    assert read(stub, f"{uniq}/x/notes.txt", offset=6, length=3) == b"wor"
    assert read(stub, f"{uniq}/x/notes.txt", offset=6) == b"world"
    assert read(stub, f"{uniq}/x/notes.txt", offset=100) == b""
    # "." and a ".." that stays inside the tree are resolved lexically
    assert read(stub, f"{uniq}/./x/../x/notes.txt") == b"hello world"

    assert write(stub, f"{uniq}/x/notes.txt", b"!", append=True).size == 12
    assert read(stub, f"{uniq}/x/notes.txt") == b"hello world!"
    assert write(stub, f"{uniq}/empty").size == 0  # one message, no data: an empty file
    assert read(stub, f"{uniq}/empty") == b""

    stat = stub.StatFile(pb.FilePath(path=f"{uniq}/x"))
    assert (stat.path, stat.is_dir, stat.size) == (f"{uniq}/x", True, 0)
    assert stub.StatFile(pb.FilePath(path=f"{uniq}/x/notes.txt")).size == 12
    assert stub.StatFile(pb.FilePath(path="")).is_dir
    listing = stub.ListFiles(pb.FilePath(path=uniq)).entries
    assert [(e.path, e.is_dir, e.size) for e in listing] == [(f"{uniq}/empty", False, 0), (f"{uniq}/x", True, 0)]
    assert uniq in [e.path for e in stub.ListFiles(pb.FilePath(path="")).entries]

    moved = stub.RenameFile(pb.RenameFileRequest(from_path=f"{uniq}/x/notes.txt", to_path=f"{uniq}/y/moved.txt"))
    assert (moved.path, moved.size) == (f"{uniq}/y/moved.txt", 12)
    assert code_of(stub.StatFile, pb.FilePath(path=f"{uniq}/x/notes.txt")) == grpc.StatusCode.NOT_FOUND
    assert read(stub, f"{uniq}/y/moved.txt") == b"hello world!"
    # a rename replaces a file at the destination, never a directory
    stub.RenameFile(pb.RenameFileRequest(from_path=f"{uniq}/empty", to_path=f"{uniq}/y/moved.txt"))
    assert read(stub, f"{uniq}/y/moved.txt") == b""
    assert code_of(stub.RenameFile, pb.RenameFileRequest(from_path=f"{uniq}/y/moved.txt", to_path=f"{uniq}/x")) \
        == grpc.StatusCode.FAILED_PRECONDITION

    assert code_of(stub.DeleteFile, pb.FilePath(path=f"{uniq}/y")) == grpc.StatusCode.FAILED_PRECONDITION
    stub.DeleteFile(pb.FilePath(path=f"{uniq}/y/moved.txt"))
    stub.DeleteFile(pb.FilePath(path=f"{uniq}/y"))
    assert [e.path for e in stub.ListFiles(pb.FilePath(path=uniq)).entries] == [f"{uniq}/x"]

    missing = f"{uniq}/nothing"
    for call, request in ((stub.StatFile, pb.FilePath(path=missing)), (stub.ListFiles, pb.FilePath(path=missing)),
                          (stub.DeleteFile, pb.FilePath(path=missing)),
                          (stub.ReadFile, pb.ReadFileRequest(path=missing)),
                          (stub.RenameFile, pb.RenameFileRequest(from_path=missing, to_path=f"{uniq}/z"))):
        assert code_of(call, request) == grpc.StatusCode.NOT_FOUND, call
    assert code_of(stub.ReadFile, pb.ReadFileRequest(path=f"{uniq}/x")) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(stub.WriteFile, iter([pb.WriteFileRequest(path=f"{uniq}/x")])) \
        == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(stub.WriteFile, iter([]), timeout=10) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(stub.DeleteFile, pb.FilePath(path="")) == grpc.StatusCode.INVALID_ARGUMENT
    # a write charged to a process needs a process that exists
    assert code_of(write, stub, f"{uniq}/p", b"x", pid=1 << 40) == grpc.StatusCode.NOT_FOUND

    made = stub.MakeDir(pb.FilePath(path=f"{uniq}/m/n/o"))  # with its missing parents
    assert (made.path, made.is_dir) == (f"{uniq}/m/n/o", True)
    assert stub.MakeDir(pb.FilePath(path=f"{uniq}/m/n/o")) == made  # an existing directory is fine
    assert [e.path for e in stub.ListFiles(pb.FilePath(path=f"{uniq}/m")).entries] == [f"{uniq}/m/n"]
    write(stub, f"{uniq}/m/file", b"x")
    for over_a_file in (f"{uniq}/m/file", f"{uniq}/m/file/below"):
        assert code_of(stub.MakeDir, pb.FilePath(path=over_a_file)) == grpc.StatusCode.FAILED_PRECONDITION


def test_a_file_larger_than_a_chunk_streams_both_ways(stub: Any, k: llmos.Client, uniq: str) -> None:
    data = os.urandom(3 * MiB + 12345)
    pieces = [data[i:i + 700_000] for i in range(0, len(data), 700_000)]  # not aligned with the server's chunks
    assert write(stub, f"{uniq}/big.bin", *pieces).size == len(data)
    chunks = list(stub.ReadFile(pb.ReadFileRequest(path=f"{uniq}/big.bin"), timeout=30))
    assert [len(c.data) for c in chunks] == [MiB, MiB, MiB, 12345]
    assert [c.offset for c in chunks] == [0, MiB, 2 * MiB, 3 * MiB]
    assert b"".join(c.data for c in chunks) == data
    # a range across a chunk boundary, with offsets counted from the file's start
    part = list(stub.ReadFile(pb.ReadFileRequest(path=f"{uniq}/big.bin", offset=MiB - 10, length=MiB + 20)))
    assert [c.offset for c in part] == [MiB - 10, 2 * MiB - 10]
    assert b"".join(c.data for c in part) == data[MiB - 10:2 * MiB + 10]
    # a Lua process reads the same bytes
    got = lua(k, """
        local whole = sys.fs.read(args.path)
        local part = sys.fs.read(args.path, {offset = args.offset, length = 8})
        return {size = #whole, part = {part:byte(1, -1)}, first = {whole:byte(1, 4)}}
    """, {"path": f"{uniq}/big.bin", "offset": 2 * MiB - 4})
    assert got == {"size": len(data), "part": list(data[2 * MiB - 4:2 * MiB + 4]), "first": list(data[:4])}


# -- files from Lua ---------------------------------------------------------------------------------
LUA_FILE_CALLS = r"""
local d = args.dir
local out = {}
out.write = sys.fs.write(d .. "/a/notes.txt", "hello world")
out.append = sys.fs.write(d .. "/a/notes.txt", "!", {append = true})
out.read = sys.fs.read(d .. "/a/notes.txt")
out.range = sys.fs.read(d .. "/a/notes.txt", {offset = 6, length = 5})
out.tail = sys.fs.read(d .. "/a/notes.txt", {offset = 6})
sys.fs.write(d .. "/bin", "\0\1\2\255")
out.binary_back = {sys.fs.read(d .. "/bin"):byte(1, -1)}
out.mkdir = sys.fs.mkdir(d .. "/empty/deeper")
out.stat = sys.fs.stat(d .. "/a/notes.txt")
out.stat_dir = sys.fs.stat(d .. "/a")
local names = {}
for i, e in ipairs(sys.fs.list(d)) do names[i] = e.path .. (e.is_dir and "/" or "") end
out.list = names
out.rename = sys.fs.rename(d .. "/a/notes.txt", d .. "/b/moved.txt")
out.moved = sys.fs.read(d .. "/b/moved.txt")
out.delete = sys.fs.delete(d .. "/b/moved.txt")
out.from_grpc = sys.fs.read(d .. "/from-grpc.txt")
-- errors are plain strings, caught by pcall
local errors = {}
local function fails(name, f, ...)
  local ok, err = pcall(f, ...)
  errors[name] = ok and "no error" or (type(err) .. ": " .. err)
end
fails("read_missing", sys.fs.read, d .. "/nothing")
fails("stat_missing", sys.fs.stat, d .. "/nothing")
fails("delete_missing", sys.fs.delete, d .. "/nothing")
fails("delete_nonempty", sys.fs.delete, d .. "/empty")
fails("read_dir", sys.fs.read, d .. "/a")
fails("write_number", sys.fs.write, d .. "/n", 42)
fails("path_number", sys.fs.read, 42)
fails("rename_over_dir", sys.fs.rename, d .. "/bin", d .. "/empty")
out.errors = errors
sys.fs.write(d .. "/from-lua.txt", "written by pid " .. sys.self())
return out
"""


def test_lua_file_calls(k: llmos.Client, uniq: str) -> None:
    k.write_file(f"{uniq}/from-grpc.txt", "written over gRPC")
    out = lua(k, LUA_FILE_CALLS, {"dir": uniq})
    assert out["write"]["path"] == f"{uniq}/a/notes.txt" and out["write"]["size"] == 11
    assert out["append"]["size"] == 12 and out["write"]["is_dir"] is False
    assert (out["read"], out["range"], out["tail"]) == ("hello world!", "world", "world!")
    assert out["binary_back"] == [0, 1, 2, 255]
    assert out["mkdir"]["is_dir"] and out["mkdir"]["path"] == f"{uniq}/empty/deeper"
    assert out["stat"]["size"] == 12 and out["stat"]["modified_ms"] > 0 and out["stat_dir"]["is_dir"]
    assert out["list"] == [f"{uniq}/a/", f"{uniq}/bin", f"{uniq}/empty/", f"{uniq}/from-grpc.txt"]
    assert out["rename"]["path"] == f"{uniq}/b/moved.txt" and out["moved"] == "hello world!"
    assert out["delete"] is True and out["from_grpc"] == "written over gRPC"
    errors = out["errors"]
    assert set(errors) == {"read_missing", "stat_missing", "delete_missing", "delete_nonempty", "read_dir",
                           "write_number", "path_number", "rename_over_dir"}
    for name, text in errors.items():
        assert text.startswith("string: "), (name, text)
    assert "no file" in errors["read_missing"] and "not empty" in errors["delete_nonempty"]
    assert "directory" in errors["read_dir"] and "must be a string" in errors["write_number"]
    # what Lua wrote, gRPC reads: one tree per namespace
    assert k.read_file(f"{uniq}/from-lua.txt").startswith(b"written by pid ")
    assert k.list_files(f"{uniq}/b") == []


# -- traversal ------------------------------------------------------------------------------------
TRAVERSALS = [
    "..", "../", "../x", "../../etc/passwd", "./..", "a/../..", "a/../../b", "a/b/../../../c", "x/./../../y",
    "/", "/etc/passwd", "/tmp/escape-abs", "//escape", "/../escape",
    "\0", "a\0b", "escape\0/../x", "a/\0",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_traversal_refused_over_grpc(stub: Any, uniq: str, path: str) -> None:
    stub.WriteFile(iter([pb.WriteFileRequest(path=f"{uniq}/ok", data=b"ok")]))
    attempts = {
        "write": lambda: write(stub, path, b"escaped"),
        "append": lambda: write(stub, path, b"escaped", append=True),
        "read": lambda: read(stub, path),
        "stat": lambda: stub.StatFile(pb.FilePath(path=path)),
        "list": lambda: stub.ListFiles(pb.FilePath(path=path)),
        "delete": lambda: stub.DeleteFile(pb.FilePath(path=path)),
        "mkdir": lambda: stub.MakeDir(pb.FilePath(path=path)),
        "rename_from": lambda: stub.RenameFile(pb.RenameFileRequest(from_path=path, to_path=f"{uniq}/got")),
        "rename_to": lambda: stub.RenameFile(pb.RenameFileRequest(from_path=f"{uniq}/ok", to_path=path)),
    }
    for name, attempt in attempts.items():
        assert code_of(attempt) == grpc.StatusCode.INVALID_ARGUMENT, (path, name)
    assert read(stub, f"{uniq}/ok") == b"ok"  # untouched, and the server still serves


LUA_TRAVERSAL = r"""
local results = {}
local ok_path = args.dir .. "/ok"
sys.fs.write(ok_path, "ok")
local ops = {
  write = function(p) return sys.fs.write(p, "escaped") end,
  append = function(p) return sys.fs.write(p, "escaped", {append = true}) end,
  read = function(p) return sys.fs.read(p) end,
  read_range = function(p) return sys.fs.read(p, {offset = 0, length = 4}) end,
  stat = function(p) return sys.fs.stat(p) end,
  list = function(p) return sys.fs.list(p) end,
  delete = function(p) return sys.fs.delete(p) end,
  mkdir = function(p) return sys.fs.mkdir(p) end,
  rename_from = function(p) return sys.fs.rename(p, args.dir .. "/got") end,
  rename_to = function(p) return sys.fs.rename(ok_path, p) end,
}
for _, p in ipairs(args.paths) do
  for name, op in pairs(ops) do
    local ok, err = pcall(op, p)
    if ok or type(err) ~= "string" then
      results[#results + 1] = name .. " " .. string.format("%q", p) .. " was not refused"
    end
  end
end
results[#results + 1] = sys.fs.read(ok_path)
return results
"""


def test_traversal_refused_in_lua(k: llmos.Client, uniq: str) -> None:
    # Lua strings may hold NUL bytes: the paths arrive byte for byte
    assert lua(k, LUA_TRAVERSAL, {"dir": uniq, "paths": TRAVERSALS}) == ["ok"]


def test_no_traversal_left_anything_outside_the_tree(llmosd: LlmosdServer, stub: Any, k: llmos.Client,
                                                     uniq: str) -> None:
    for path in TRAVERSALS:
        with pytest.raises(grpc.RpcError):
            write(stub, path, b"escaped")
    lua(k, "for _, p in ipairs(args) do pcall(sys.fs.write, p, 'escaped') end", TRAVERSALS)
    top = llmosd.data_dir.parent
    stray = [p for p in top.rglob("*") if "escape" in p.name or p.name == "passwd"]
    assert stray == []
    assert not pathlib.Path("/tmp/escape-abs").exists()


@pytest.fixture
def planted(llmosd: LlmosdServer, stub: Any, uniq: str, tmp_path: pathlib.Path) -> dict[str, pathlib.Path]:
    """Links and special files put into the namespace's tree on the host, pointing outside it."""
    write(stub, f"{uniq}/inner.txt", b"inner")
    tree = llmosd.data_dir / "files" / "ns" / "n-default" / uniq
    assert (tree / "inner.txt").read_bytes() == b"inner"  # the layout files.py documents
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"secret")
    outside_dir = tmp_path / "outside-dir"
    outside_dir.mkdir()
    (outside_dir / "secret.txt").write_bytes(b"secret")
    (tree / "file_link").symlink_to(outside)
    (tree / "dir_link").symlink_to(outside_dir)
    (tree / "inner_link").symlink_to("inner.txt")
    (tree / "dangling").symlink_to(tmp_path / "does-not-exist")
    (tree / "up_link").symlink_to("../..")
    os.mkfifo(tree / "fifo")
    os.link(outside, tree / "hard_link")  # same filesystem: pytest's tmp holds both
    return {"outside": outside, "outside_dir": outside_dir, "missing": tmp_path / "does-not-exist"}


PLANTED = ["file_link", "dir_link", "inner_link", "dangling", "up_link", "fifo", "hard_link",
           "dir_link/secret.txt", "dir_link/new.txt", "up_link/n-default", "inner_link/x"]


def test_host_planted_links_refused_over_grpc(stub: Any, uniq: str, planted: dict[str, pathlib.Path]) -> None:
    for name in PLANTED:
        path = f"{uniq}/{name}"
        attempts = {
            "write": lambda: write(stub, path, b"overwritten"),
            "append": lambda: write(stub, path, b"appended", append=True),
            "read": lambda: read(stub, path),
            "stat": lambda: stub.StatFile(pb.FilePath(path=path)),
            "delete": lambda: stub.DeleteFile(pb.FilePath(path=path)),
            "rename_from": lambda: stub.RenameFile(pb.RenameFileRequest(from_path=path, to_path=f"{uniq}/got")),
            "rename_to": lambda: stub.RenameFile(pb.RenameFileRequest(from_path=f"{uniq}/inner.txt", to_path=path)),
        }
        if name in ("dir_link", "up_link"):
            attempts["list"] = lambda: stub.ListFiles(pb.FilePath(path=path))
        for op, attempt in attempts.items():
            code = code_of(attempt)
            # "inner_link/x": the parent is a link, refused as such, or (stat'ed without following) not a directory
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, op, code)
    # the listing shows only what the store would open
    assert [e.path for e in stub.ListFiles(pb.FilePath(path=uniq)).entries] == [f"{uniq}/inner.txt"]
    assert planted["outside"].read_bytes() == b"secret"
    assert sorted(p.name for p in planted["outside_dir"].iterdir()) == ["secret.txt"]
    assert not planted["missing"].exists()
    assert read(stub, f"{uniq}/inner.txt") == b"inner"


LUA_PLANTED = r"""
local failures, d = {}, args.dir
local ops = {
  write = function(p) return sys.fs.write(p, "overwritten") end,
  append = function(p) return sys.fs.write(p, "appended", {append = true}) end,
  read = function(p) return sys.fs.read(p) end,
  stat = function(p) return sys.fs.stat(p) end,
  delete = function(p) return sys.fs.delete(p) end,
  mkdir_below = function(p) return sys.fs.mkdir(p .. "/sub") end,
  rename_from = function(p) return sys.fs.rename(p, d .. "/got") end,
  rename_to = function(p) return sys.fs.rename(d .. "/inner.txt", p) end,
}
for _, name in ipairs(args.names) do
  for op, f in pairs(ops) do
    local ok, err = pcall(f, d .. "/" .. name)
    if ok or type(err) ~= "string" then failures[#failures + 1] = op .. " " .. name end
  end
end
local listed = {}
for i, e in ipairs(sys.fs.list(d)) do listed[i] = e.path end
return {failures = table.concat(failures, "; "), listed = listed, inner = sys.fs.read(d .. "/inner.txt")}
"""


def test_host_planted_links_refused_in_lua(k: llmos.Client, uniq: str, planted: dict[str, pathlib.Path]) -> None:
    out = lua(k, LUA_PLANTED, {"dir": uniq, "names": PLANTED})
    assert out == {"failures": "", "listed": [f"{uniq}/inner.txt"], "inner": "inner"}
    assert planted["outside"].read_bytes() == b"secret"
    assert sorted(p.name for p in planted["outside_dir"].iterdir()) == ["secret.txt"]


# -- quotas ---------------------------------------------------------------------------------------
def test_a_file_past_the_largest_size_is_refused_over_grpc(k: llmos.Client, stub: Any, uniq: str) -> None:
    path = f"{uniq}/big"
    write(stub, path, b"old version")

    def pieces() -> Iterator[pb.WriteFileRequest]:
        yield pb.WriteFileRequest(path=path, data=bytes(MiB))
        for _ in range(MAX_FILE_BYTES // MiB - 1):
            yield pb.WriteFileRequest(data=bytes(MiB))
        yield pb.WriteFileRequest(data=b"!")  # one byte too many

    with pytest.raises(grpc.RpcError) as err:
        stub.WriteFile(pieces(), timeout=120)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert read(stub, path) == b"old version"  # the refused write changed nothing
    # an append that would grow the file past the limit is refused too (from the SDK: ResourceExhausted)
    with pytest.raises(llmos.ResourceExhausted):
        k.write_file(path, (bytes(MiB) for _ in range(MAX_FILE_BYTES // MiB)), append=True)
    assert k.read_file(path) == b"old version"


def test_a_file_past_the_largest_size_is_refused_in_lua(k: llmos.Client, uniq: str) -> None:
    out = lua(k, """
        sys.fs.write(args.path, "old version")
        local big = string.rep("x", args.max + 1)
        local ok, err = pcall(sys.fs.write, args.path, big)
        local ok2, err2 = pcall(sys.fs.write, args.path, string.rep("y", args.max - 5), {append = true})
        big = nil
        return {ok = ok, err = err, ok2 = ok2, err2 = err2, now = sys.fs.read(args.path)}
    """, {"path": f"{uniq}/big", "max": MAX_FILE_BYTES}, limits={"memory_bytes": 512 * MiB})
    assert out["ok"] is False and "largest file" in out["err"], out["err"]
    assert out["ok2"] is False and "largest file" in out["err2"], out["err2"]
    assert out["now"] == "old version"


# -- atomicity ------------------------------------------------------------------------------------
WRITER_LUA = """
for i = 1, args.rounds do
  sys.fs.write(args.path, string.rep(args.fill, args.size))
end
return args.rounds
"""

READER_LUA = """
local bad, seen = {}, {}
for i = 1, args.reads do
  local data = sys.fs.read(args.path)
  local first = data:sub(1, 1)
  if #data ~= args.size or data ~= string.rep(first, args.size) then
    bad[#bad + 1] = #data .. " bytes starting " .. string.format("%q", data:sub(1, 8))
  else
    seen[first] = true
  end
end
local versions = {}
for v in pairs(seen) do versions[#versions + 1] = v end
table.sort(versions)
return {bad = table.concat(bad, "; "), versions = table.concat(versions)}
"""


def test_concurrent_writers_never_show_half_a_file(k: llmos.Client, stub: Any, uniq: str) -> None:
    path, size, fills = f"{uniq}/shared.bin", 256 << 10, "ABCD"
    write(stub, path, b"0" * size)
    writers = [k.spawn(lua=WRITER_LUA, args={"path": path, "fill": f, "size": size, "rounds": 12}) for f in fills]
    readers = [k.spawn(lua=READER_LUA, args={"path": path, "size": size, "reads": 40}) for _ in range(2)]
    grpc_bad = []
    for _ in range(30):  # a gRPC reader alongside the Lua ones
        data = read(stub, path)
        if len(data) != size or data != data[:1] * size:
            grpc_bad.append((len(data), data[:8]))
    for pid in writers + readers:
        info = k.wait(pid, timeout=60)
        assert info is not None and info.ok, info
    for pid in readers:
        result = k.wait(pid).result
        assert result["bad"] == "", result["bad"][:300]
        assert result["versions"] and set(result["versions"]) <= set("0" + fills)
    assert grpc_bad == []
    final = read(stub, path)
    assert len(final) == size and final[:1] in fills.encode() and final == final[:1] * size


def test_concurrent_appends_all_land(k: llmos.Client, uniq: str) -> None:
    path = f"{uniq}/log.txt"
    source = """
        for i = 1, args.n do sys.fs.write(args.path, args.who .. ":" .. i .. "\\n", {append = true}) end
    """
    pids = [k.spawn(lua=source, args={"path": path, "who": f"w{w}", "n": 25}) for w in range(4)]
    for pid in pids:
        assert k.wait(pid, timeout=60).ok
    lines = k.read_file(path).decode().splitlines()
    assert sorted(lines) == sorted(f"w{w}:{i}" for w in range(4) for i in range(1, 26))
    for w in range(4):  # each writer's lines in its own order
        assert [ln for ln in lines if ln.startswith(f"w{w}:")] == [f"w{w}:{i}" for i in range(1, 26)]


# -- durability -----------------------------------------------------------------------------------
def test_files_survive_a_restart(fresh_llmosd: LlmosdServer) -> None:
    big = os.urandom(2 * MiB + 3)
    with llmos.connect(fresh_llmosd.target) as k:
        k.write_file("keep/grpc.bin", big)
        lua(k, """
            sys.fs.write("keep/lua.txt", "from lua")
            sys.fs.write("keep/lua.txt", " and more", {append = true})
            sys.fs.write("keep/gone.txt", "deleted")
            sys.fs.delete("keep/gone.txt")
            sys.fs.write("keep/old-name", "renamed")
            sys.fs.rename("keep/old-name", "keep/new-name")
            sys.fs.mkdir("keep/empty-dir")
        """)
    fresh_llmosd.stop(signal.SIGKILL)  # no clean shutdown: what was acknowledged must be on disk
    fresh_llmosd.start()
    with llmos.connect(fresh_llmosd.target) as k:
        assert k.read_file("keep/grpc.bin") == big
        assert [(f.path, f.is_dir) for f in k.list_files("keep")] == [
            ("keep/empty-dir", True), ("keep/grpc.bin", False), ("keep/lua.txt", False), ("keep/new-name", False)]
        assert lua(k, 'return sys.fs.read("keep/lua.txt") .. "|" .. sys.fs.read("keep/new-name")') \
            == "from lua and more|renamed"
        with pytest.raises(llmos.NotFound):
            k.stat("keep/gone.txt")


# -- locks over gRPC ------------------------------------------------------------------------------
def acquire(stub: Any, pid: int, name: str, **fields: Any) -> pb.AcquireResponse:
    return stub.Acquire(pb.AcquireRequest(pid=pid, name=name, **fields), timeout=30)


def test_grpc_lock_calls(stub: Any, k: llmos.Client, uniq: str) -> None:
    a, b, c = k.open_port(), k.open_port(), k.open_port()
    m = f"{uniq}-mutex"
    got = acquire(stub, a, m)
    assert (got.acquired, got.timed_out, got.previous_holder_died) == (True, False, 0)
    assert acquire(stub, b, m, timeout_ms=0).timed_out  # try: busy
    started = time.monotonic()
    timed = acquire(stub, b, m, timeout_ms=100)
    assert timed.timed_out and not timed.acquired and time.monotonic() - started >= 0.09
    assert code_of(acquire, stub, a, m) == grpc.StatusCode.FAILED_PRECONDITION  # no self-deadlock
    assert code_of(stub.Release, pb.ReleaseRequest(pid=b, name=m)) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(acquire, stub, b, m, semaphore=2) == grpc.StatusCode.FAILED_PRECONDITION  # kind differs

    waiting = stub.Acquire.future(pb.AcquireRequest(pid=b, name=m), timeout=30)  # queued or, if late, free
    stub.Release(pb.ReleaseRequest(pid=a, name=m))
    handed = waiting.result(timeout=WAIT_S)
    assert handed.acquired and handed.previous_holder_died == 0
    stub.Release(pb.ReleaseRequest(pid=b, name=m))
    assert acquire(stub, c, m, timeout_ms=0).acquired  # free again
    stub.Release(pb.ReleaseRequest(pid=c, name=m))

    for bad, code in (({"pid": 0}, grpc.StatusCode.INVALID_ARGUMENT),
                      ({"pid": 1 << 40}, grpc.StatusCode.NOT_FOUND),
                      ({"name": ""}, grpc.StatusCode.INVALID_ARGUMENT),
                      ({"name": "tab\there"}, grpc.StatusCode.INVALID_ARGUMENT),
                      ({"timeout_ms": -1}, grpc.StatusCode.INVALID_ARGUMENT)):
        fields = {"pid": a, "name": f"{uniq}-bad", **bad}
        assert code_of(stub.Acquire, pb.AcquireRequest(**fields)) == code, bad
    k.kill(c)
    assert code_of(acquire, stub, c, m) == grpc.StatusCode.FAILED_PRECONDITION  # an ended holder


def test_grpc_semaphore_of_n_permits(stub: Any, k: llmos.Client, uniq: str) -> None:
    name = f"{uniq}-sem"
    ports = [k.open_port() for _ in range(4)]
    for p in ports[:3]:
        assert acquire(stub, p, name, semaphore=3, timeout_ms=0).acquired
    assert acquire(stub, ports[3], name, semaphore=3, timeout_ms=0).timed_out
    assert code_of(acquire, stub, ports[3], name, semaphore=2) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(acquire, stub, ports[3], name) == grpc.StatusCode.FAILED_PRECONDITION  # not a mutex
    # one holder may take several permits; each release gives one back
    stub.Release(pb.ReleaseRequest(pid=ports[0], name=name))
    assert acquire(stub, ports[1], name, semaphore=3, timeout_ms=0).acquired
    assert acquire(stub, ports[3], name, semaphore=3, timeout_ms=0).timed_out
    stub.Release(pb.ReleaseRequest(pid=ports[1], name=name))
    assert acquire(stub, ports[3], name, semaphore=3, timeout_ms=0).acquired
    # a port that ends gives back every permit it held: two waiters are served, both told
    waiters = [k.open_port(), k.open_port()]
    futures = [stub.Acquire.future(pb.AcquireRequest(pid=w, name=name, semaphore=3), timeout=30) for w in waiters]
    time.sleep(0.3)  # let both queue (nothing tells a client that another's call is queued)
    k.kill(ports[1])  # held 1 permit (after one release)
    k.kill(ports[2])
    answers = [f.result(timeout=WAIT_S) for f in futures]
    assert all(a.acquired for a in answers)
    assert sorted(a.previous_holder_died for a in answers) == sorted([ports[1], ports[2]])


def test_a_cancelled_acquire_leaves_the_lock_free(stub: Any, k: llmos.Client, uniq: str) -> None:
    """Cancelled while queued, or cancelled just as it is granted: either way the lock ends up free
    (or, if the grant's answer reached the client first, held by the client, who then has it)."""
    name = f"{uniq}-cancel"
    holder, canceller, checker = k.open_port(), k.open_port(), k.open_port()
    for round_ in range(12):
        assert acquire(stub, holder, name, timeout_ms=0).acquired
        future = stub.Acquire.future(pb.AcquireRequest(pid=canceller, name=name), timeout=30)
        if round_ % 2:
            time.sleep(0.05)  # queued well before the cancel and the release
        cancelled = future.cancel()
        stub.Release(pb.ReleaseRequest(pid=holder, name=name))  # grants the waiter unless the cancel came first
        if not cancelled:  # the grant's answer arrived before the cancel: the lock is the canceller's
            assert future.result().acquired
            stub.Release(pb.ReleaseRequest(pid=canceller, name=name))
        got = acquire(stub, checker, name, timeout_ms=5000)
        assert got.acquired, f"round {round_}: a cancelled acquire left the lock held"
        stub.Release(pb.ReleaseRequest(pid=checker, name=name))


# -- locks from Lua ---------------------------------------------------------------------------------
LUA_LOCK_CALLS = r"""
local m, s = args.prefix .. "-m", args.prefix .. "-s"
local out, errors = {}, {}
out.acquire = sys.lock.acquire(m)
out.try_busy_self = select(2, pcall(sys.lock.try_acquire, m))   -- a mutex I hold: an error
out.release = sys.lock.release(m)
out.try_free = sys.lock.try_acquire(m)
out.acquire_timeout = sys.lock.acquire(m .. "-other", {timeout_ms = 50})
sys.lock.release(m)
for i = 1, 3 do out["sem" .. i] = sys.lock.acquire(s, {semaphore = 3}) end
out.sem_full = sys.lock.try_acquire(s, {semaphore = 3}) == nil
out.sem_full_wait = sys.lock.acquire(s, {semaphore = 3, timeout_ms = 30}) == nil
out.sem_wrong_size = select(2, pcall(sys.lock.acquire, s, {semaphore = 2}))
out.sem_as_mutex = select(2, pcall(sys.lock.acquire, s))
for i = 1, 3 do sys.lock.release(s) end
out.release_unheld = select(2, pcall(sys.lock.release, s))
out.bad_name = select(2, pcall(sys.lock.acquire, ""))
out.bad_opts = select(2, pcall(sys.lock.acquire, m, 5))
out.bad_semaphore = select(2, pcall(sys.lock.acquire, m, {semaphore = "two"}))
out.bad_semaphore_try = select(2, pcall(sys.lock.try_acquire, m, {semaphore = "two"}))
out.held_by_port = sys.lock.acquire(args.prefix .. "-port", {timeout_ms = 0}) == nil
return out
"""


def test_lua_lock_calls(stub: Any, k: llmos.Client, uniq: str) -> None:
    port = k.open_port()
    assert acquire(stub, port, f"{uniq}-port").acquired
    blocker = k.open_port()
    assert acquire(stub, blocker, f"{uniq}-m-other").acquired
    out = lua(k, LUA_LOCK_CALLS, {"prefix": uniq})
    assert out["acquire"] == {"acquired": True} and out["try_free"] == {"acquired": True}
    assert "already holds" in out["try_busy_self"]
    assert out["release"] is True
    assert "acquire_timeout" not in out  # nil on timeout
    assert all(out[f"sem{i}"] == {"acquired": True} for i in (1, 2, 3))
    assert out["sem_full"] and out["sem_full_wait"]
    assert "3 permits" in out["sem_wrong_size"] and "semaphore" in out["sem_as_mutex"]
    assert "does not hold" in out["release_unheld"]
    assert out["bad_name"].startswith("sys.lock.acquire: name"), out["bad_name"]
    assert out["bad_opts"].startswith("sys.lock.acquire: ") and "table of options" in out["bad_opts"], out["bad_opts"]
    # each call's errors name the call
    assert "sys.lock.acquire: semaphore must be an integer" in out["bad_semaphore"]
    assert "sys.lock.try_acquire: semaphore must be an integer" in out["bad_semaphore_try"]
    assert out["held_by_port"]  # Lua processes and ports share the namespace's locks
    # the Lua process ended holding nothing; the port still holds its lock
    assert acquire(stub, blocker, f"{uniq}-m", timeout_ms=0).acquired


HOLDER_LUA = """
assert(sys.lock.acquire(args.name, {semaphore = args.semaphore}))
sys.send(args.port, sys.self(), {tag = "held"})
if args.ending == "crash" then error("holder crashes while holding") end
if args.ending == "return" then return "ended holding the lock" end
sys.recv{tag = "never"}
"""

WAITER_LUA = """
local got = sys.lock.acquire(args.name, {semaphore = args.semaphore})
sys.send(args.port, got, {tag = "got"})
sys.recv{tag = "never"}  -- keep holding
"""


def test_a_killed_holders_lock_goes_to_the_waiting_process(k: llmos.Client, uniq: str) -> None:
    port, name = k.open_port(), f"{uniq}-dies"
    holder = k.spawn(lua=HOLDER_LUA, args={"name": name, "port": port, "ending": "kill", "semaphore": None})
    assert recv_bodies(k, port, 1, "held") == [holder]
    waiter = k.spawn(lua=WAITER_LUA, args={"name": name, "port": port, "semaphore": None})
    wait_blocked(k, waiter)
    k.kill(holder)
    assert recv_bodies(k, port, 1, "got") == [{"acquired": True, "previous_holder_died": holder}]
    assert k.wait(holder, timeout=WAIT_S).state == "KILLED"
    k.kill(waiter)


@pytest.mark.parametrize("ending", ["crash", "return"])
def test_a_holder_that_ends_by_itself_hands_over_to_a_queued_waiter(k: llmos.Client, uniq: str,
                                                                    ending: str) -> None:
    port, name = k.open_port(), f"{uniq}-ends"
    holder_src = """
        assert(sys.lock.acquire(args.name))
        sys.send(args.port, sys.self(), {tag = "held"})
        sys.recv{tag = "go"}
        if args.ending == "crash" then error("holder crashes while holding") end
        return "ended holding the lock"
    """
    holder = k.spawn(lua=holder_src, args={"name": name, "port": port, "ending": ending})
    assert recv_bodies(k, port, 1, "held") == [holder]
    waiter = k.spawn(lua=WAITER_LUA, args={"name": name, "port": port, "semaphore": None})
    wait_blocked(k, waiter)
    k.send(holder, None, tag="go")
    ended = k.wait(holder, timeout=WAIT_S)
    assert ended.state == ("CRASHED" if ending == "crash" else "EXITED")
    assert recv_bodies(k, port, 1, "got") == [{"acquired": True, "previous_holder_died": holder}]
    k.kill(waiter)


def test_a_killed_lua_holder_hands_over_to_a_waiting_port(stub: Any, k: llmos.Client, uniq: str) -> None:
    port, name = k.open_port(), f"{uniq}-port-waits"
    holder = k.spawn(lua=HOLDER_LUA, args={"name": name, "port": port, "ending": "kill", "semaphore": None})
    assert recv_bodies(k, port, 1, "held") == [holder]
    waiting = stub.Acquire.future(pb.AcquireRequest(pid=port, name=name), timeout=30)
    time.sleep(0.3)  # let the Acquire queue: nothing tells a client that its call is queued
    assert not waiting.done()
    k.kill(holder)
    got = waiting.result(timeout=WAIT_S)
    assert (got.acquired, got.previous_holder_died) == (True, holder)


def test_a_killed_port_hands_over_to_a_waiting_lua_process(stub: Any, k: llmos.Client, uniq: str) -> None:
    port, holder, name = k.open_port(), k.open_port(), f"{uniq}-port-holds"
    assert acquire(stub, holder, name).acquired
    waiter = k.spawn(lua=WAITER_LUA, args={"name": name, "port": port, "semaphore": None})
    wait_blocked(k, waiter)
    k.kill(holder)
    assert recv_bodies(k, port, 1, "got") == [{"acquired": True, "previous_holder_died": holder}]
    k.kill(waiter)


def test_semaphore_holder_death_serves_one_waiter_per_permit(stub: Any, k: llmos.Client, uniq: str) -> None:
    port, name = k.open_port(), f"{uniq}-sem-dies"
    holder = k.spawn(lua="""
        for i = 1, 2 do assert(sys.lock.acquire(args.name, {semaphore = 2})) end
        sys.send(args.port, sys.self(), {tag = "held"})
        sys.recv{tag = "never"}
    """, args={"name": name, "port": port})
    assert recv_bodies(k, port, 1, "held") == [holder]
    waiters = [k.spawn(lua=WAITER_LUA, args={"name": name, "port": port, "semaphore": 2}) for _ in range(3)]
    for w in waiters:
        wait_blocked(k, w)
    k.kill(holder)
    got = recv_bodies(k, port, 2, "got")
    assert got == [{"acquired": True, "previous_holder_died": holder}] * 2
    assert k.recv(port, tag="got", timeout=0.3) is None  # the third still waits: two permits only
    for w in waiters:
        k.kill(w)


def test_waiters_are_served_by_priority_then_in_arrival_order(stub: Any, k: llmos.Client, uniq: str) -> None:
    port, holder, name = k.open_port(), k.open_port(), f"{uniq}-prio"
    assert acquire(stub, holder, name).acquired
    source = """
        assert(sys.lock.acquire(args.name))
        sys.send(args.port, args.id, {tag = "got"})
        sys.lock.release(args.name)
    """
    priorities = [0, 5, 0, 10, 5, -3, 10, 0]
    pids = []
    for i, priority in enumerate(priorities):  # queued one after another, in this order
        pid = k.spawn(lua=source, args={"name": name, "port": port, "id": i}, priority=priority)
        wait_blocked(k, pid)
        pids.append(pid)
    stub.Release(pb.ReleaseRequest(pid=holder, name=name))
    order = recv_bodies(k, port, len(priorities), "got")
    expected = sorted(range(len(priorities)), key=lambda i: (-priorities[i], i))
    assert order == expected  # [3, 6, 1, 4, 0, 2, 7, 5]
    for pid in pids:
        assert k.wait(pid, timeout=WAIT_S).ok


def test_grpc_waiters_are_served_by_their_given_priority(stub: Any, k: llmos.Client, uniq: str) -> None:
    holder, name = k.open_port(), f"{uniq}-grpc-prio"
    assert acquire(stub, holder, name).acquired
    ports = [k.open_port() for _ in range(4)]
    futures = {}
    for p, priority in zip(ports, [1, 7, 1, 3]):
        futures[p] = stub.Acquire.future(pb.AcquireRequest(pid=p, name=name, priority=priority), timeout=30)
        time.sleep(0.1)  # arrival order matters within a priority
    order = []
    current = holder
    for _ in ports:
        stub.Release(pb.ReleaseRequest(pid=current, name=name))
        current = wait_until("a waiter to be granted",
                             lambda: next((p for p, f in futures.items() if f.done() and p not in order), None))
        assert futures[current].result().acquired
        order.append(current)
    stub.Release(pb.ReleaseRequest(pid=current, name=name))
    assert order == [ports[1], ports[3], ports[0], ports[2]]


def test_a_mutex_admits_one_lua_process_at_a_time(k: llmos.Client, uniq: str) -> None:
    """Lua processes increment a counter in a shared file, reading it and writing it back a moment later,
    under one mutex: no two are ever inside at once (each says "in" after acquiring and "out" before
    releasing) and no increment is lost, which two processes inside at once would do."""
    port, name, path = k.open_port(), f"{uniq}-mutex-n", f"{uniq}/counter"
    k.write_file(path, "0")
    source = """
        for i = 1, args.rounds do
            assert(sys.lock.acquire(args.name))
            sys.send(args.port, 1, {tag = "edge"})
            local n = tonumber(sys.fs.read(args.path))
            sys.sleep(1)
            sys.fs.write(args.path, tostring(n + 1))
            sys.send(args.port, -1, {tag = "edge"})
            sys.lock.release(args.name)
        end
    """
    processes, rounds = 6, 5
    pids = [k.spawn(lua=source, args={"name": name, "port": port, "path": path, "rounds": rounds})
            for _ in range(processes)]
    edges = recv_bodies(k, port, 2 * processes * rounds, "edge")
    inside, most = 0, 0
    for e in edges:
        inside += e
        most = max(most, inside)
    assert (inside, most) == (0, 1)
    for pid in pids:
        assert k.wait(pid, timeout=WAIT_S).ok
    assert k.read_file(path) == str(processes * rounds).encode()


def test_semaphore_never_admits_more_than_n_lua_processes(k: llmos.Client, uniq: str) -> None:
    port, name = k.open_port(), f"{uniq}-sem-n"
    source = """
        assert(sys.lock.acquire(args.name, {semaphore = 3}))
        sys.send(args.port, 1, {tag = "edge"})
        sys.sleep(20)
        sys.send(args.port, -1, {tag = "edge"})
        sys.lock.release(args.name)
    """
    pids = [k.spawn(lua=source, args={"name": name, "port": port}) for _ in range(8)]
    edges = recv_bodies(k, port, 16, "edge")
    inside, most = 0, 0
    for e in edges:  # a process says "in" after acquiring and "out" before releasing: the count is exact
        inside += e
        most = max(most, inside)
    assert inside == 0 and 1 <= most <= 3
    for pid in pids:
        assert k.wait(pid, timeout=WAIT_S).ok


def test_quotas_from_server_flags(tmp_path: Any) -> None:
    """Namespace and per-process quotas, set by llmosd's flags, refuse with RESOURCE_EXHAUSTED."""
    server = LlmosdServer(tmp_path / "data", "--model", "none", "--cpus", "2", "--namespace-files", "3",
                          "--process-file-bytes", "1000")
    server.start()
    try:
        stub = kernel_pb2_grpc.KernelStub(server.channel())
        pid = stub.Spawn(pb.SpawnRequest(lua="""
            sys.fs.write("a", ("x"):rep(600))
            local ok, err = pcall(sys.fs.write, "b", ("x"):rep(600))
            return {ok, err}
        """)).pid
        out = stub.Wait(pb.WaitRequest(pid=pid, timeout_ms=10_000)).process
        ok, err = from_value(out.result)
        assert ok is False and f"pid {pid} would own more than its quota of 1000 bytes" in err, err
        assert code_of(stub.StatFile, pb.FilePath(path="b")) == grpc.StatusCode.NOT_FOUND
        for name in ("n1", "n2"):
            stub.MakeDir(pb.FilePath(path=name))
        with pytest.raises(grpc.RpcError) as e:
            stub.MakeDir(pb.FilePath(path="n3"))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.StatFile(pb.FilePath(path="a")).size == 600
    finally:
        server.stop()
