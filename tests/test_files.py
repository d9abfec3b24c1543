"""Unit tests of llmosd.services.files: real files in temporary directories, real threads."""
from __future__ import annotations

import os
import pathlib
import threading
from typing import Iterator

import pytest

from llmosd.services import files as F
from llmosd.api.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from llmosd.services.files import FileLimits, FileStore

NS = "default"
LIMITS = FileLimits(max_file_bytes=16 << 20, namespace_bytes=32 << 20, namespace_files=50,
                    process_bytes=20 << 20, process_files=20)


@pytest.fixture
def store(tmp_path: pathlib.Path) -> Iterator[FileStore]:
    s = FileStore(tmp_path / "files", LIMITS)
    yield s
    s.close()


def tree(store: FileStore, ns: str = NS) -> pathlib.Path:
    return store.root / "ns" / F._namespace_dir(ns)


def snapshot(path: pathlib.Path) -> dict[str, bytes | None]:
    """Every entry under `path` (links not followed) with its content."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = pathlib.Path(dirpath, name)
            out[str(p.relative_to(path))] = p.read_bytes() if p.is_file() and not p.is_symlink() else None
    return out


# -- every call ------------------------------------------------------------------------------
def test_write_read_stat_list_rename_delete(store: FileStore) -> None:
    info = store.write(NS, 7, "notes/day 1.md", b"hello")
    assert (info.path, info.size, info.is_dir) == ("notes/day 1.md", 5, False)
    assert info.modified_ms > 0
    assert store.read(NS, "notes/day 1.md") == b"hello"
    assert store.read(NS, "./notes/../notes/day 1.md", offset=1, length=3) == b"ell"
    assert store.read(NS, "notes/day 1.md", offset=4) == b"o"
    assert store.read(NS, "notes/day 1.md", offset=99) == b""
    assert store.read(NS, "notes/day 1.md", length=0) == b""
    assert store.write(NS, 7, "notes/day 1.md", b", world", append=True).size == 12
    assert store.read(NS, "notes/day 1.md") == b"hello, world"
    assert store.stat(NS, "notes").is_dir
    assert store.stat(NS, "").is_dir and store.stat(NS, ".").path == ""
    store.mkdir(NS, "empty/deeper")
    assert [i.path for i in store.list(NS, "")] == ["empty", "notes"]
    assert [i.path for i in store.list(NS, "notes")] == ["notes/day 1.md"]
    assert store.usage(NS) == F.FileUsage(bytes=12, files=1, directories=3)
    assert store.process_usage(7) == F.FileUsage(bytes=12, files=1)

    moved = store.rename(NS, "notes/day 1.md", "archive/2026/day 1.md")
    assert moved.path == "archive/2026/day 1.md" and moved.size == 12
    with pytest.raises(NotFound):
        store.read(NS, "notes/day 1.md")
    assert store.read(NS, "archive/2026/day 1.md") == b"hello, world"
    assert store.process_usage(7).bytes == 12  # a rename keeps the owner
    store.rename(NS, "archive", "old")  # directories move whole
    assert store.read(NS, "old/2026/day 1.md") == b"hello, world"

    store.delete(NS, "old/2026/day 1.md")
    store.delete(NS, "old/2026")
    assert store.usage(NS) == F.FileUsage(bytes=0, files=0, directories=4)  # notes, empty, empty/deeper, old
    assert store.process_usage(7) == F.FileUsage()
    assert os.listdir(store.root / "tmp") == []


def test_rename_replaces_a_file_and_moves_its_accounting(store: FileStore) -> None:
    store.write(NS, 1, "a", b"aaaa")
    store.write(NS, 2, "b", b"bb")
    store.rename(NS, "a", "b")
    assert store.read(NS, "b") == b"aaaa"
    assert store.usage(NS) == F.FileUsage(bytes=4, files=1)
    assert store.process_usage(1) == F.FileUsage(bytes=4, files=1)
    assert store.process_usage(2) == F.FileUsage()
    assert store.rename(NS, "b", "b").size == 4  # onto itself: nothing happens


def test_errors_for_missing_and_misused_paths(store: FileStore) -> None:
    store.write(NS, 1, "dir/file", b"x")
    for call in (lambda: store.read(NS, "nope"), lambda: store.stat(NS, "dir/nope"),
                 lambda: store.list(NS, "nope"), lambda: store.delete(NS, "nope"),
                 lambda: store.rename(NS, "nope", "x"), lambda: store.read(NS, "nodir/file")):
        with pytest.raises(NotFound):
            call()
    for call in (lambda: store.read(NS, "dir"), lambda: store.list(NS, "dir/file"),
                 lambda: store.write(NS, 1, "dir", b"x"), lambda: store.write(NS, 1, "dir/file/under", b"x"),
                 lambda: store.delete(NS, "dir"), lambda: store.rename(NS, "dir/file", "dir"),
                 lambda: store.mkdir(NS, "dir/file"), lambda: store.read(NS, "")):
        with pytest.raises(FailedPrecondition):
            call()
    store.mkdir(NS, "other")
    with pytest.raises(FailedPrecondition):
        store.rename(NS, "other", "dir/file")  # a directory over a file
    for call in (lambda: store.delete(NS, ""), lambda: store.rename(NS, "", "x"),
                 lambda: store.rename(NS, "dir", "dir/sub"), lambda: store.read(NS, "dir/file", offset=-1),
                 lambda: store.read(NS, "dir/file", length=-1), lambda: store.open_reader(NS, "dir/file", chunk_size=0),
                 lambda: store.open_reader(NS, "dir/file", chunk_size=F.MAX_CHUNK + 1),
                 lambda: store.write("", 1, "f", b"x"), lambda: store.write("n" * 257, 1, "f", b"x")):
        with pytest.raises(InvalidArgument):
            call()
    assert store.read(NS, "dir/file") == b"x"


NAMESPACES = ("alpha", "beta", "with/slash", "..", "ünïcode", "p" * 256, "ü" * 256, "ü" * 62 + "x")


def test_namespaces_are_separate_trees(store: FileStore) -> None:
    """Any namespace name a token may carry (1 to 256 printable characters) has a tree of its own,
    whose usage is found again at start-up."""
    for ns in NAMESPACES:
        store.write(ns, 0, "same.txt", ns.encode())
    for ns in NAMESPACES:
        assert store.read(ns, "same.txt") == ns.encode()
        assert store.usage(ns).files == 1
    dirs = sorted(os.listdir(store.root / "ns"))
    assert dirs == sorted(F._namespace_dir(ns) for ns in NAMESPACES) and len(set(dirs)) == len(NAMESPACES)
    assert all(len(d.encode()) <= 255 for d in dirs)
    assert sorted(os.listdir(store.root)) == ["ns", "tmp"]
    again = FileStore(store.root, store.limits)
    assert [again.usage(ns).bytes for ns in NAMESPACES] == [len(ns.encode()) for ns in NAMESPACES]


# -- traversal ---------------------------------------------------------------------------------
REFUSED = [
    "../outside/secret.txt",
    "a/../../secret.txt",
    "..",
    "./../x",
    "sub/./../../x",
    "/etc/passwd",
    "/",
    "//etc/passwd",
    "a\0b",
    "sub/\0",
    "a//b",
    "sub/",
    "bad\x01name",
    "x" * 256,
    "d/" * (F.MAX_DEPTH + 1) + "f",
    "/".join(["y" * 200] * 6),  # over 1024 bytes
    "\ud800",
    "../n-other/secret",
    # planted on the host side, inside the tree:
    "link_dir/secret.txt",  # symlink to a directory outside
    "link_dir",
    "link_file",  # symlink to a file outside
    "link_abs/passwd",  # absolute symlink to /etc
    "sub/link_up/etc/passwd",  # relative symlink climbing out
    "sub/link_up",
    "sub/loop/x",  # a symlink to itself
    "hard",  # a hard link to a file outside
    "fifo",  # would block an open without O_NONBLOCK
]


@pytest.fixture
def planted(store: FileStore, tmp_path: pathlib.Path) -> pathlib.Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"SECRET")
    store.write(NS, 1, "sub/ok.txt", b"fine")
    store.write("other", 1, "secret", b"OTHER")
    root = tree(store)
    (root / "link_dir").symlink_to(outside)
    (root / "link_file").symlink_to(outside / "secret.txt")
    (root / "link_abs").symlink_to("/etc")
    (root / "sub" / "link_up").symlink_to("../../../../..")
    (root / "sub" / "loop").symlink_to("loop")
    os.link(outside / "secret.txt", root / "hard")
    os.mkfifo(root / "fifo")
    return outside


def attempts(store: FileStore, path: str) -> list:
    return [
        lambda: store.read(NS, path), lambda: store.stat(NS, path), lambda: store.list(NS, path),
        lambda: store.write(NS, 1, path, b"PWNED"), lambda: store.write(NS, 1, path, b"PWNED", append=True),
        lambda: store.open_writer(NS, 1, path), lambda: store.delete(NS, path), lambda: store.mkdir(NS, path),
        lambda: store.rename(NS, path, "moved"), lambda: store.rename(NS, "sub/ok.txt", path),
        lambda: store.open_reader(NS, path),
    ]


@pytest.mark.parametrize("path", REFUSED)
def test_traversal_attempts_are_refused(store: FileStore, planted: pathlib.Path, path: str) -> None:
    """Every call refuses every path with InvalidArgument, and nothing changes,
    inside the tree or out."""
    before_outside = snapshot(planted)
    before_tree = snapshot(store.root)
    for i, call in enumerate(attempts(store, path)):
        with pytest.raises(InvalidArgument):
            call()
            pytest.fail(f"call {i} on {path!r} was not refused")
    assert snapshot(planted) == before_outside
    assert snapshot(store.root) == before_tree
    assert store.read(NS, "sub/ok.txt") == b"fine"
    assert (planted / "secret.txt").read_bytes() == b"SECRET"


def test_a_namespace_root_planted_as_a_symlink_is_refused(store: FileStore, tmp_path: pathlib.Path) -> None:
    outside = tmp_path / "outside2"
    outside.mkdir()
    (store.root / "ns" / F._namespace_dir("evil")).symlink_to(outside)
    with pytest.raises(InvalidArgument):
        store.write("evil", 1, "f", b"x")
    with pytest.raises(InvalidArgument):
        store.list("evil", "")
    assert list(outside.iterdir()) == []


def test_odd_but_harmless_names_stay_inside(store: FileStore) -> None:
    for path in ("..\\..\\etc\\passwd", "...", "a/..b", "~root", "$HOME", "C:\\Windows", " ", "-rf"):
        store.write(NS, 1, path, b"inside")
        assert store.read(NS, path) == b"inside"
    assert (tree(store) / "..\\..\\etc\\passwd").read_bytes() == b"inside"
    assert (tree(store) / "a" / "..b").read_bytes() == b"inside"


def test_listing_hides_links_and_special_files(store: FileStore, planted: pathlib.Path) -> None:
    assert [i.path for i in store.list(NS, "")] == ["sub"]
    assert [i.path for i in store.list(NS, "sub")] == ["sub/ok.txt"]


# -- quotas ------------------------------------------------------------------------------------
def quota_store(tmp_path: pathlib.Path, **kw: int) -> FileStore:
    base = dict(max_file_bytes=1000, namespace_bytes=3000, namespace_files=10, process_bytes=2000,
                process_files=4)
    base.update(kw)
    return FileStore(tmp_path / "q", FileLimits(**base))


def test_file_size_quota(tmp_path: pathlib.Path) -> None:
    s = quota_store(tmp_path)
    s.write(NS, 1, "max", b"x" * 1000)
    with pytest.raises(ResourceExhausted, match="largest file"):
        s.write(NS, 1, "big", b"x" * 1001)
    with pytest.raises(ResourceExhausted, match="largest file"):
        s.write(NS, 1, "max", b"y", append=True)
    assert s.read(NS, "max") == b"x" * 1000
    with pytest.raises(NotFound):
        s.stat(NS, "big")
    assert os.listdir(s.root / "tmp") == []


def test_namespace_quotas(tmp_path: pathlib.Path) -> None:
    s = quota_store(tmp_path, process_bytes=10_000, process_files=100)
    for i in range(3):
        s.write(NS, i + 1, f"f{i}", b"x" * 1000)
    with pytest.raises(ResourceExhausted, match="quota of 3000"):
        s.write(NS, 9, "f3", b"x")
    s.write(NS, 9, "f0", b"y" * 1000)  # replacing is fine: the old bytes go
    s.write("elsewhere", 9, "f", b"z" * 1000)  # another namespace has its own quota
    s.delete(NS, "f2")
    s.mkdir(NS, "a/b/c/d/e/f")  # 2 files + 6 directories
    s.write(NS, 9, "a/g", b"")
    s.write(NS, 9, "a/h", b"")
    with pytest.raises(ResourceExhausted, match="its quota is 10 in all"):
        s.write(NS, 9, "a/i", b"")
    with pytest.raises(ResourceExhausted, match="its quota is 10 in all"):
        s.mkdir(NS, "z")
    with pytest.raises(ResourceExhausted, match="its quota is 10 in all"):
        s.rename(NS, "a/g", "new/g")  # would create a directory
    s.rename(NS, "a/g", "a/b/g")  # no new entry
    assert s.usage(NS) == F.FileUsage(bytes=2000, files=4, directories=6)


def test_process_quotas_follow_ownership(tmp_path: pathlib.Path) -> None:
    s = quota_store(tmp_path)
    s.write(NS, 1, "a", b"x" * 1000)
    s.write(NS, 1, "b", b"x" * 1000)
    with pytest.raises(ResourceExhausted, match="pid 1 would own more than its quota of 2000"):
        s.write(NS, 1, "c", b"x")
    s.write(NS, 1, "a", b"y" * 1000)  # its own file: replaced, not added
    for name in ("e1", "e2"):
        s.write(NS, 1, name, b"")
    with pytest.raises(ResourceExhausted, match="pid 1 owns 4 files"):
        s.write(NS, 1, "e3", b"")
    s.write(NS, 2, "a", b"z")  # pid 2 overwrites: the file is now pid 2's
    assert s.process_usage(1) == F.FileUsage(bytes=1000, files=3)
    assert s.process_usage(2) == F.FileUsage(bytes=1, files=1)
    s.write(NS, 1, "c", b"x" * 1000)
    s.write(NS, 0, "unowned", b"x" * 100)  # pid 0: the namespace quota only
    s.process_ended(1)
    assert s.process_usage(1) == F.FileUsage()
    assert s.usage(NS) == F.FileUsage(bytes=2101, files=6)
    s.delete(NS, "c")  # no longer anyone's
    assert s.usage(NS).bytes == 1101


def test_streaming_writer_stops_at_the_first_chunk_past_a_quota(tmp_path: pathlib.Path) -> None:
    s = quota_store(tmp_path, max_file_bytes=10_000, namespace_bytes=2500, process_bytes=10_000)
    w = s.open_writer(NS, 1, "stream")
    w.write(b"x" * 1000)
    w.write(b"x" * 1000)
    other = s.open_writer(NS, 2, "other")  # the first writer's bytes are reserved
    with pytest.raises(ResourceExhausted, match="2500"):
        other.write(b"x" * 600)
    with pytest.raises(FailedPrecondition, match="already closed"):
        other.write(b"x")
    with pytest.raises(ResourceExhausted):
        w.write(b"x" * 501)
    assert os.listdir(s.root / "tmp") == []
    assert s._ns_reserved == {} and s._pid_reserved == {}
    with pytest.raises(NotFound):
        s.stat(NS, "stream")


def test_process_files_quota_refuses_a_writer_at_once(tmp_path: pathlib.Path) -> None:
    s = quota_store(tmp_path, process_files=1)
    s.write(NS, 1, "one", b"1")
    with pytest.raises(ResourceExhausted, match="owns 1 files"):
        s.open_writer(NS, 1, "two")
    assert os.listdir(s.root / "tmp") == []


# -- streaming and atomicity -------------------------------------------------------------------
def test_streaming_a_file_larger_than_the_largest_chunk(store: FileStore) -> None:
    size = 2 * F.MAX_CHUNK + 12345
    block = bytes(range(256)) * 256  # 64 KiB
    with store.open_writer(NS, 1, "big.bin") as w:
        while w.size < size:
            w.write(block[: min(len(block), size - w.size)])
    assert w.size == size
    expected = (block * (size // len(block) + 1))[:size]
    with store.open_reader(NS, "big.bin", chunk_size=F.MAX_CHUNK) as r:
        assert r.length == size and r.info.size == size
        chunks = list(r)
    assert [len(c) for c in chunks] == [F.MAX_CHUNK, F.MAX_CHUNK, 12345]
    assert b"".join(chunks) == expected
    assert store.read(NS, "big.bin") == expected
    ranged = store.open_reader(NS, "big.bin", offset=F.MAX_CHUNK - 10, length=100_000, chunk_size=30_000)
    assert [len(c) for c in ranged] == [30_000, 30_000, 30_000, 10_000]
    assert store.read(NS, "big.bin", offset=F.MAX_CHUNK - 10, length=100_000) == \
        expected[F.MAX_CHUNK - 10: F.MAX_CHUNK - 10 + 100_000]


def test_an_open_reader_keeps_the_version_it_opened(store: FileStore) -> None:
    store.write(NS, 1, "f", b"A" * 100_000)
    reader = store.open_reader(NS, "f", chunk_size=10_000)
    first = next(reader)
    store.write(NS, 1, "f", b"B" * 50_000)
    assert first + b"".join(reader) == b"A" * 100_000
    assert store.read(NS, "f") == b"B" * 50_000


def test_an_aborted_or_failed_writer_leaves_nothing(store: FileStore) -> None:
    store.write(NS, 1, "keep", b"original")
    with pytest.raises(RuntimeError):
        with store.open_writer(NS, 1, "keep") as w:
            w.write(b"half of the new ")
            raise RuntimeError("client went away")
    w2 = store.open_writer(NS, 1, "fresh/file")
    w2.write(b"data")
    w2.abort()
    assert store.read(NS, "keep") == b"original"
    with pytest.raises(NotFound):
        store.stat(NS, "fresh")  # parents are made only on commit
    assert os.listdir(store.root / "tmp") == []
    assert store._ns_reserved == {} and store._pid_reserved == {}
    assert store.usage(NS) == F.FileUsage(bytes=8, files=1)


def test_concurrent_writers_and_readers_never_mix_versions(store: FileStore) -> None:
    """Writers replace one file with distinct full contents (of distinct sizes);
    readers, reading all the while, only ever see one whole version."""
    writers, rounds = 4, 15
    versions = {bytes([65 + i]) * (200_000 + 1000 * i) for i in range(writers)}
    store.write(NS, 1, "shared", b"A" * 200_000)
    writing = threading.Event()
    stop = threading.Event()
    reads_while_writing = [0, 0]
    bad: list[str] = []

    def write(i: int) -> None:
        content = bytes([65 + i]) * (200_000 + 1000 * i)
        for r in range(rounds):
            if r % 3 == 2:  # streamed in pieces, too
                with store.open_writer(NS, 10 + i, "shared") as w:
                    for k in range(0, len(content), 30_000):
                        w.write(content[k:k + 30_000])
            else:
                store.write(NS, 10 + i, "shared", content)

    def read(j: int) -> None:
        writing.wait()
        while not stop.is_set():
            data = store.read(NS, "shared")
            if data not in versions:
                bad.append(f"{len(data)} bytes starting {data[:1]!r}")
            reads_while_writing[j] += 1

    readers = [threading.Thread(target=read, args=(j,)) for j in range(2)]
    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in readers + threads:
        t.start()
    writing.set()
    for t in threads:
        t.join(60)
    stop.set()
    for t in readers:
        t.join(10)
    assert not any(t.is_alive() for t in readers + threads)
    assert not bad
    assert all(n > 0 for n in reads_while_writing), reads_while_writing  # the readers did read meanwhile
    assert store.read(NS, "shared") in versions
    assert store.usage(NS).files == 1
    assert store.usage(NS).bytes == len(store.read(NS, "shared"))
    assert sum(store.process_usage(10 + i).files for i in range(writers)) == 1
    assert os.listdir(store.root / "tmp") == []


def test_concurrent_appends_all_land(store: FileStore) -> None:
    threads_n, each = 4, 25
    store.write(NS, 1, "log", b"")

    def append(i: int) -> None:
        for k in range(each):
            store.write(NS, 1, "log", f"{i}:{k}\n".encode(), append=True)

    threads = [threading.Thread(target=append, args=(i,)) for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    lines = store.read(NS, "log").decode().splitlines()
    assert sorted(lines) == sorted(f"{i}:{k}" for i in range(threads_n) for k in range(each))
    for i in range(threads_n):  # each thread's appends in its order
        assert [ln for ln in lines if ln.startswith(f"{i}:")] == [f"{i}:{k}" for k in range(each)]


# -- persistence -------------------------------------------------------------------------------
def test_a_new_store_on_the_same_root_finds_everything(tmp_path: pathlib.Path) -> None:
    root = tmp_path / "files"
    first = FileStore(root, LIMITS)
    first.write(NS, 1, "a/b/c.txt", b"persist me")
    first.write(NS, 1, "d.txt", b"12345")
    first.write("team", 2, "x", b"other namespace")
    first.mkdir(NS, "empty")
    usage = first.usage(NS)
    first.close()
    (root / "tmp" / "leftover.tmp").write_bytes(b"a write that a crash interrupted")

    second = FileStore(root, LIMITS)
    assert second.usage(NS) == usage == F.FileUsage(bytes=15, files=2, directories=3)
    assert second.usage("team") == F.FileUsage(bytes=15, files=1)
    assert second.read(NS, "a/b/c.txt") == b"persist me"
    assert second.read("team", "x") == b"other namespace"
    assert os.listdir(root / "tmp") == []
    assert second.process_usage(1) == F.FileUsage()  # pids do not outlive the server
    second.write(NS, 3, "d.txt", b"1")
    assert second.usage(NS).bytes == 11
    second.close()
