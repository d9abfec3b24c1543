"""Per-namespace virtual file trees under the server's data directory.

Layout on the host (`root` is e.g. DATA_DIR/files):
    root/ns/n-<name>/...   a namespace's tree, holding plain files and directories
    root/ns/x-<hex>/...    (a name outside [A-Za-z0-9_-] is hex-encoded, and one too
    root/ns/h-<sha256>/... long for a directory name is a digest: _namespace_dir)
    root/tmp/              staging for writes in progress; emptied at start-up

Paths are virtual and relative to the namespace's root: "notes/today.md".
"" and "." name the root itself. "." components are dropped and ".." is
resolved lexically (sound because no link is ever followed); a path that would
climb above the root, starts with "/", holds NUL or control characters, has an
empty component ("a//b", "a/"), a component over 255 UTF-8 bytes, more than 32
components or more than 1024 bytes is refused with InvalidArgument.

Resolution never trusts the host tree: every directory is opened relative to
its parent's descriptor with O_NOFOLLOW|O_DIRECTORY (openat-style), and the
last component is checked with lstat and opened with O_NOFOLLOW|O_NONBLOCK,
then re-checked with fstat. A symbolic link anywhere in a path is refused
(InvalidArgument), never followed, created, replaced or deleted; so are FIFOs,
devices and sockets, and regular files with more than one hard link (the
store makes none, so such a file was planted from outside and may alias a
host file).

Writes never change a file in place. Data goes to a staging file, is
fsynced, and os.replace()s the target (then the directory is fsynced): a
reader, which reads from one open descriptor, sees the old version or the new
one, never a mix; concurrent writers to one path each replace it whole, the
last to commit wins. An append copies the current file and the new bytes into
a new staging file under the store's lock, so concurrent appends all land and
none is lost; its cost is the size of the file, so prefer many small files to
one long log. Staging lives in one directory (root/tmp) rather than the
target's, which is as atomic (same filesystem) and lets missing parent
directories be created only when a write commits. rename() is os.rename():
atomic; it replaces a file at the destination but never a directory.

Directories: write, rename and mkdir create missing parents; delete removes a
file or an empty directory.

Quotas (FileLimits; 0 is not "unlimited"):
- max_file_bytes: the size of one file (default 64 MiB);
- namespace_bytes, namespace_files: bytes of all files, and number of files
  plus directories, in a namespace (default 1 GiB, 10,000);
- process_bytes, process_files: bytes and number of files a process owns
  (default 256 MiB, 1,000). The last process to write a file owns it;
  owner_pid 0 means no process (an external client) and is counted against the
  namespace only.
Past a quota an operation fails with ResourceExhausted and changes nothing; a
streaming writer is stopped at the first chunk that cannot fit.

Durability: namespace usage is rebuilt at start-up by walking the trees (the
host tree is the truth). Ownership is kept in memory only: processes do not
outlive the server and pids are never reused, so after a restart no live
process owns anything and the files count against their namespace alone.
Call process_ended(pid) when a process ends so that its files stop counting
against it and the table stays small.

Thread-safety: one lock guards accounting and every change to the trees;
reads take no lock. Only one FileStore may use a root at a time (start-up
empties root/tmp).

Why one file: every operation walks paths the same openat-style way and
charges the same per-namespace and per-process quotas; split, each part would
reach into the others' private state.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import stat as st
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..api import checks as C
from ..api.errors import FailedPrecondition, InvalidArgument, KernelError, NotFound, ResourceExhausted

MAX_PATH_BYTES = 1024
MAX_NAME_BYTES = 255
MAX_DEPTH = 32
DEFAULT_CHUNK = 1 << 20
MAX_CHUNK = 4 << 20

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted in the tree must not hang the server.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_STAGE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_PLAIN_NAMESPACE = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class FileLimits:
    max_file_bytes: int = 64 << 20
    namespace_bytes: int = 1 << 30
    namespace_files: int = 10_000  # files and directories
    process_bytes: int = 256 << 20
    process_files: int = 1_000


@dataclass(frozen=True)
class FileInfo:
    path: str  # normalised virtual path; "" is the namespace's root
    size: int
    is_dir: bool
    modified_ms: int


@dataclass
class FileUsage:
    bytes: int = 0
    files: int = 0
    directories: int = 0


def normalize(path: str) -> tuple[str, ...]:
    """A virtual path as its components, or InvalidArgument (see the module doc)."""
    if not isinstance(path, str):
        raise InvalidArgument("a path must be a string")
    if "\0" in path:
        raise InvalidArgument("a path must not contain NUL bytes")
    try:
        size = len(path.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidArgument("a path must be valid UTF-8 text") from None
    if size > MAX_PATH_BYTES:
        raise InvalidArgument(f"a path is at most {MAX_PATH_BYTES} bytes; this one has {size}")
    if path.startswith("/"):
        raise InvalidArgument(
            f"{path!r}: paths are relative to the namespace's file tree (write 'a/b.txt', not '/a/b.txt')")
    if path in ("", "."):
        return ()
    parts: list[str] = []
    for comp in path.split("/"):
        if comp == "":
            raise InvalidArgument(f"{path!r}: empty path component (a doubled or trailing '/')")
        if comp == ".":
            continue
        if comp == "..":
            if not parts:
                raise InvalidArgument(f"{path!r} climbs above the root of the namespace's file tree")
            parts.pop()
            continue
        if len(comp.encode("utf-8")) > MAX_NAME_BYTES:
            raise InvalidArgument(f"{path!r}: a name is at most {MAX_NAME_BYTES} bytes")
        if not comp.isprintable():  # as every name in the kernel (checks.name)
            raise InvalidArgument(f"{path!r}: names must be printable (no control, format, bidi-override or "
                                  "separator characters but the space)")
        parts.append(comp)
    if len(parts) > MAX_DEPTH:
        raise InvalidArgument(f"{path!r}: paths are at most {MAX_DEPTH} components deep")
    return tuple(parts)


def _namespace_dir(namespace: str) -> str:
    """The directory of a namespace's tree: its name when that is plain and short, its UTF-8 in hex
    when that fits a directory name, else a digest of it (a namespace name is up to 256 characters,
    checks.name, a directory name up to 255 bytes)."""
    C.name(namespace, "namespace")
    if _PLAIN_NAMESPACE.fullmatch(namespace) and len(namespace) <= MAX_NAME_BYTES - 2:
        return "n-" + namespace
    encoded = namespace.encode("utf-8", "surrogatepass")
    if 2 * len(encoded) <= MAX_NAME_BYTES - 2:
        return "x-" + encoded.hex()
    return "h-" + hashlib.sha256(encoded).hexdigest()


def _is_namespace_dir(dirname: str) -> bool:
    return dirname[:2] in ("n-", "x-", "h-")


def _os_error(e: OSError, vpath: str) -> Exception:
    """The kernel error for an OS error met while resolving or changing `vpath`."""
    code = e.errno
    if code == errno.ELOOP:
        return InvalidArgument(f"{vpath!r} goes through a symbolic link; the file store never follows links")
    if code == errno.ENOENT:
        return NotFound(f"no file or directory {vpath!r}")
    if code == errno.ENOTDIR:
        return FailedPrecondition(f"{vpath!r}: a component of the path is a file, not a directory")
    if code == errno.EISDIR:
        return FailedPrecondition(f"{vpath!r} is a directory")
    if code == errno.ENOTEMPTY:
        return FailedPrecondition(f"directory {vpath!r} is not empty")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted("the server's disk is full")
    if code == errno.ENAMETOOLONG:
        return InvalidArgument(f"{vpath!r}: name too long")
    if code == errno.EINVAL:
        return InvalidArgument(f"{vpath!r}: {e.strerror}")
    return e


def _info(vpath: str, s: os.stat_result) -> FileInfo:
    is_dir = st.S_ISDIR(s.st_mode)
    return FileInfo(vpath, 0 if is_dir else s.st_size, is_dir, s.st_mtime_ns // 1_000_000)


def _check_entry(s: os.stat_result, vpath: str) -> None:
    """Refuse anything but a directory or a singly linked regular file."""
    mode = s.st_mode
    if st.S_ISLNK(mode):
        raise InvalidArgument(f"{vpath!r} is a symbolic link; the file store never follows links")
    if st.S_ISREG(mode):
        if s.st_nlink > 1:
            raise InvalidArgument(f"{vpath!r} has other hard links (planted outside the server); refused")
    elif not st.S_ISDIR(mode):
        raise InvalidArgument(f"{vpath!r} is not a regular file or directory")


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _copy(src: int, dst: int, count: int) -> None:
    offset = 0
    while offset < count:
        sent = os.sendfile(dst, src, offset, count - offset)
        if sent == 0:
            raise OSError(errno.EIO, "file shorter than expected")
        offset += sent


class FileReader:
    """Chunks of one version of a file: it reads from one open descriptor, so a
    concurrent replacement is not seen. Close it (or use `with`) if not read to the end."""

    def __init__(self, fd: int, info: FileInfo, start: int, end: int, chunk_size: int) -> None:
        self.info = info  # the file as opened
        self.length = end - start  # bytes this reader yields in all
        self._fd: int | None = fd
        self._pos = start
        self._end = end
        self._chunk = chunk_size

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._fd is None or self._pos >= self._end:
            self.close()
            raise StopIteration
        data = os.pread(self._fd, min(self._chunk, self._end - self._pos), self._pos)
        if not data:  # cannot happen to an immutable file, but never loop on it
            self.close()
            raise StopIteration
        self._pos += len(data)
        return data

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> FileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FileWriter:
    """A write in progress: chunks go to a staging file; close() commits it
    atomically, abort() (or an exception inside `with`) throws it away."""

    def __init__(self, store: FileStore, namespace: str, pid: int, parts: tuple[str, ...], append: bool,
                 base: int, credit: int, pid_credit: int) -> None:
        self.namespace = namespace
        self.pid = pid
        self.path = "/".join(parts)
        self.append = append
        self.size = 0  # bytes written through this writer
        self._store = store
        self._parts = parts
        self._base = base  # bytes already in the file when appending
        # The old file's bytes, which the new version replaces: quota checks while
        # streaming count them as freed (the commit checks exactly).
        self._credit = credit
        self._pid_credit = pid_credit
        self._reserved = 0
        self.staged = f"{secrets.token_hex(8)}.tmp"
        self._fd: int | None = os.open(self.staged, _STAGE_FLAGS, 0o600, dir_fd=store._staging)

    def write(self, chunk: bytes) -> None:
        if self._fd is None:
            raise FailedPrecondition(f"the write of {self.path!r} is already closed")
        try:
            self._store._reserve(self, len(chunk))
            _write_all(self._fd, chunk)
        except OSError as e:
            self.abort()
            raise _os_error(e, self.path) from None
        except BaseException:
            self.abort()
            raise
        self.size += len(chunk)

    def close(self) -> FileInfo:
        """Commit: the file now holds what was written (after what it held, if appending)."""
        if self._fd is None:
            raise FailedPrecondition(f"the write of {self.path!r} is already closed")
        try:
            os.fsync(self._fd)  # outside the store's lock: the slow part
            os.close(self._fd)
            self._fd = None
            info = self._store._commit(self)
            self.staged = ""
            return info
        except OSError as e:
            self.abort()
            raise _os_error(e, self.path) from None
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        if self.staged:
            self._store._discard(self)
            self.staged = ""

    def __enter__(self) -> FileWriter:
        return self

    def __exit__(self, kind: type | None, *exc: object) -> None:
        if kind is not None:
            self.abort()
        elif self._fd is not None:
            self.close()


class FileStore:
    def __init__(self, root: Path, limits: FileLimits | None = None) -> None:
        self.root = Path(root)
        self.limits = limits or FileLimits()
        self._lock = threading.Lock()
        self._usage: dict[str, FileUsage] = {}  # per namespace, by its directory's name
        self._proc: dict[int, FileUsage] = {}  # per owning process (files and bytes)
        self._owner: dict[int, tuple[int, int]] = {}  # inode -> (pid, size) of files written since start
        self._owned: dict[int, set[int]] = {}  # pid -> inodes
        self._ns_reserved: dict[str, int] = {}  # bytes being streamed, per namespace
        self._pid_reserved: dict[int, int] = {}
        for sub in ("ns", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        self._trees = os.open(self.root / "ns", _DIR_FLAGS)
        self._staging = os.open(self.root / "tmp", _DIR_FLAGS)
        for name in os.listdir(self._staging):
            os.unlink(name, dir_fd=self._staging)
        with os.scandir(self._trees) as entries:
            for entry in entries:
                if _is_namespace_dir(entry.name) and entry.is_dir(follow_symlinks=False):
                    usage = self._usage[entry.name] = FileUsage()
                    self._scan(os.open(entry.name, _DIR_FLAGS, dir_fd=self._trees), usage)

    def close(self) -> None:
        os.close(self._trees)
        os.close(self._staging)

    # -- writing ----------------------------------------------------------------------------
    def write(self, namespace: str, owner_pid: int, path: str, data: bytes, append: bool = False) -> FileInfo:
        """Write a whole file (or append to it) atomically."""
        writer = self.open_writer(namespace, owner_pid, path, append)
        writer.write(data)  # aborts the writer if it fails
        return writer.close()

    def open_writer(self, namespace: str, owner_pid: int, path: str, append: bool = False) -> FileWriter:
        """A streaming write: fails at once if the file could not be created at all."""
        parts = normalize(path)
        vpath = "/".join(parts)
        if not parts:
            raise FailedPrecondition("the root of the tree is a directory")
        with self._lock:
            old = self._existing(namespace, parts, vpath)
            old_size = old.st_size if old else 0
            self._check_quota(namespace, owner_pid, old_size if append else 0, old, 0, vpath)
            mine = old is not None and self._owns(owner_pid, old)
            if append:
                return FileWriter(self, namespace, owner_pid, parts, True, old_size, 0, 0)
            return FileWriter(self, namespace, owner_pid, parts, False, 0, old_size, old_size if mine else 0)

    def mkdir(self, namespace: str, path: str) -> FileInfo:
        """Create a directory and any missing parents; an existing directory is fine."""
        parts = normalize(path)
        vpath = "/".join(parts)
        with self._lock:
            fd, missing = self._descend(self._namespace_root(namespace), parts, vpath)
            try:
                usage = self._ns(namespace)
                if missing:
                    self._check_entries(namespace, len(missing))
                    fd = self._make_dirs(fd, missing, vpath)
                    usage.directories += len(missing)
                return _info(vpath, os.fstat(fd))
            finally:
                os.close(fd)

    def size_before_append(self, namespace: str, path: str) -> int | None:
        """What a durable process's append intent journals: the file's size (-1: no file yet; None: a
        path the write refuses too). cut_back undoes the append to it."""
        try:
            return self.stat(namespace, path).size
        except NotFound:
            return -1
        except KernelError:
            return None

    def cut_back(self, namespace: str, owner_pid: int, path: str, size: int) -> None:
        """Undo an append that may have happened (a durable process's append intent, kernel/journal.py):
        the file back to its `size` bytes before it, or gone if there was none (-1)."""
        try:
            if size < 0:
                self.delete(namespace, path)
            elif self.stat(namespace, path).size > size:
                self.write(namespace, owner_pid, path, self.read(namespace, path, 0, size))
        except KernelError:
            pass  # nothing to undo

    def delete(self, namespace: str, path: str) -> None:
        """Delete a file or an empty directory."""
        parts = normalize(path)
        vpath = "/".join(parts)
        if not parts:
            raise InvalidArgument("the root of the tree cannot be deleted")
        with self._lock:
            parent = self._open_dir(namespace, parts[:-1], vpath)
            try:
                s = self._lstat(parent, parts[-1], vpath)
                if s is None:
                    raise NotFound(f"no file or directory {vpath!r}")
                try:
                    if st.S_ISDIR(s.st_mode):
                        os.rmdir(parts[-1], dir_fd=parent)
                    else:
                        os.unlink(parts[-1], dir_fd=parent)
                    os.fsync(parent)
                except OSError as e:
                    raise _os_error(e, vpath) from None
                self._forget(namespace, s)
            finally:
                os.close(parent)

    def rename(self, namespace: str, src: str, dst: str) -> FileInfo:
        """Move a file or directory atomically. An existing file at `dst` is
        replaced; an existing directory is not (FailedPrecondition)."""
        sparts, dparts = normalize(src), normalize(dst)
        svpath, dvpath = "/".join(sparts), "/".join(dparts)
        if not sparts or not dparts:
            raise InvalidArgument("the root of the tree cannot be renamed or replaced")
        if dparts[:len(sparts)] == sparts and dparts != sparts:
            raise InvalidArgument(f"cannot move {svpath!r} into itself ({dvpath!r})")
        with self._lock:
            sdir = self._open_dir(namespace, sparts[:-1], svpath)
            ddir = -1
            try:
                moving = self._lstat(sdir, sparts[-1], svpath)
                if moving is None:
                    raise NotFound(f"no file or directory {svpath!r}")
                if sparts == dparts:
                    return _info(dvpath, moving)
                ddir, missing = self._descend(self._namespace_root(namespace), dparts[:-1], dvpath)
                old = None if missing else self._lstat(ddir, dparts[-1], dvpath)
                if old is not None and st.S_ISDIR(old.st_mode):
                    raise FailedPrecondition(f"{dvpath!r} exists and is a directory")
                if old is not None and st.S_ISDIR(moving.st_mode):
                    raise FailedPrecondition(f"{dvpath!r} exists and is a file; {svpath!r} is a directory")
                if missing:
                    self._check_entries(namespace, len(missing))
                    ddir = self._make_dirs(ddir, missing, dvpath)
                    self._ns(namespace).directories += len(missing)
                try:
                    os.rename(sparts[-1], dparts[-1], src_dir_fd=sdir, dst_dir_fd=ddir)
                    os.fsync(ddir)
                    os.fsync(sdir)
                except OSError as e:
                    raise _os_error(e, f"{svpath} -> {dvpath}") from None
                if old is not None:
                    self._forget(namespace, old)
                return _info(dvpath, moving)
            finally:
                os.close(sdir)
                if ddir >= 0:
                    os.close(ddir)

    # -- reading ----------------------------------------------------------------------------
    def read(self, namespace: str, path: str, offset: int = 0, length: int | None = None) -> bytes:
        """A whole file, or `length` bytes from `offset` (fewer at the end)."""
        return b"".join(self.open_reader(namespace, path, offset, length, MAX_CHUNK))

    def open_reader(self, namespace: str, path: str, offset: int = 0, length: int | None = None,
                    chunk_size: int = DEFAULT_CHUNK) -> FileReader:
        """Chunks of at most `chunk_size` bytes of one version of the file."""
        if type(offset) is not int or offset < 0:
            raise InvalidArgument("offset must be a non-negative integer")
        if length is not None and (type(length) is not int or length < 0):
            raise InvalidArgument("length must be a non-negative integer")
        if type(chunk_size) is not int or not 1 <= chunk_size <= MAX_CHUNK:
            raise InvalidArgument(f"chunk_size must be 1 to {MAX_CHUNK} bytes")
        parts = normalize(path)
        vpath = "/".join(parts)
        if not parts:
            raise FailedPrecondition("the root of the tree is a directory")
        parent = self._open_dir(namespace, parts[:-1], vpath)
        try:
            s = self._lstat(parent, parts[-1], vpath)
            if s is None:
                raise NotFound(f"no file {vpath!r}")
            if st.S_ISDIR(s.st_mode):
                raise FailedPrecondition(f"{vpath!r} is a directory")
            fd = os.open(parts[-1], _READ_FLAGS, dir_fd=parent)
        except OSError as e:
            raise _os_error(e, vpath) from None
        finally:
            os.close(parent)
        try:
            s = os.fstat(fd)  # what was opened may differ from what lstat saw
            if not st.S_ISREG(s.st_mode):
                raise InvalidArgument(f"{vpath!r} is not a regular file")
            _check_entry(s, vpath)
        except BaseException:
            os.close(fd)
            raise
        start = min(offset, s.st_size)
        end = s.st_size if length is None else min(s.st_size, start + length)
        return FileReader(fd, _info(vpath, s), start, end, chunk_size)

    def stat(self, namespace: str, path: str) -> FileInfo:
        parts = normalize(path)
        vpath = "/".join(parts)
        fd = self._open_dir(namespace, parts[:-1], vpath)
        try:
            if not parts:
                return _info("", os.fstat(fd))
            s = self._lstat(fd, parts[-1], vpath)
            if s is None:
                raise NotFound(f"no file or directory {vpath!r}")
            return _info(vpath, s)
        finally:
            os.close(fd)

    def list(self, namespace: str, path: str = "") -> list[FileInfo]:
        """The files and directories in a directory, by name. What the store
        refuses to open (links, FIFOs, hard-linked files put there on the host)
        is not shown."""
        parts = normalize(path)
        vpath = "/".join(parts)
        fd = self._open_dir(namespace, parts, vpath)
        try:
            out = []
            with os.scandir(fd) as entries:
                for entry in entries:
                    path = f"{vpath}/{entry.name}" if vpath else entry.name
                    try:
                        s = entry.stat(follow_symlinks=False)
                        _check_entry(s, path)
                    except (FileNotFoundError, InvalidArgument):  # deleted while we looked; not usable
                        continue
                    out.append(_info(path, s))
            out.sort(key=lambda i: i.path)
            return out
        finally:
            os.close(fd)

    # -- accounting -------------------------------------------------------------------------
    def usage(self, namespace: str) -> FileUsage:
        with self._lock:
            u = self._usage.get(_namespace_dir(namespace)) or FileUsage()
            return FileUsage(u.bytes, u.files, u.directories)

    def process_usage(self, pid: int) -> FileUsage:
        with self._lock:
            u = self._proc.get(pid) or FileUsage()
            return FileUsage(u.bytes, u.files)

    def process_ended(self, pid: int) -> None:
        """`pid` has ended: its files stay, owned by nobody."""
        with self._lock:
            for inode in self._owned.pop(pid, ()):
                del self._owner[inode]
            self._proc.pop(pid, None)

    def _ns(self, namespace: str) -> FileUsage:
        name = _namespace_dir(namespace)
        usage = self._usage.get(name)
        if usage is None:
            usage = self._usage[name] = FileUsage()
        return usage

    def _owns(self, pid: int, s: os.stat_result) -> bool:
        owner = self._owner.get(s.st_ino)
        return pid != 0 and owner is not None and owner[0] == pid

    def _check_entries(self, namespace: str, new: int) -> None:
        usage = self._ns(namespace)
        limit = self.limits.namespace_files
        if usage.files + usage.directories + new > limit:
            raise ResourceExhausted(
                f"namespace {namespace!r} has {usage.files} files and {usage.directories} directories; "
                f"its quota is {limit} in all")

    def _check_quota(self, namespace: str, pid: int, new_size: int, old: os.stat_result | None,
                     new_dirs: int, vpath: str) -> None:
        """Would writing `new_size` bytes over `old` (None: a new file) fit?"""
        lim = self.limits
        if new_size > lim.max_file_bytes:
            raise ResourceExhausted(
                f"{vpath!r} would be {new_size} bytes; the largest file allowed is {lim.max_file_bytes} bytes")
        usage = self._ns(namespace)
        old_size = old.st_size if old is not None else 0
        total = usage.bytes - old_size + new_size
        if total > lim.namespace_bytes:
            raise ResourceExhausted(
                f"namespace {namespace!r} would hold {total} bytes of files; its quota is {lim.namespace_bytes}")
        self._check_entries(namespace, new_dirs + (old is None))
        if pid:
            mine = old is not None and self._owns(pid, old)
            proc = self._proc.get(pid) or FileUsage()
            total = proc.bytes - (old_size if mine else 0) + new_size
            if total > lim.process_bytes:
                raise ResourceExhausted(
                    f"pid {pid} would own {total} bytes of files; the quota per process is {lim.process_bytes}")
            if not mine and proc.files + 1 > lim.process_files:
                raise ResourceExhausted(
                    f"pid {pid} owns {proc.files} files; the quota per process is {lim.process_files}")

    def _reserve(self, writer: FileWriter, n: int) -> None:
        """Count `n` more streamed bytes against the quotas, before writing them."""
        lim = self.limits
        ns, pid = writer.namespace, writer.pid
        with self._lock:
            size = writer._base + writer.size + n
            if size > lim.max_file_bytes:
                raise ResourceExhausted(
                    f"{writer.path!r} would grow past {lim.max_file_bytes} bytes, the largest file allowed")
            reserved = self._ns_reserved.get(ns, 0) + n
            if self._ns(ns).bytes + reserved - writer._credit > lim.namespace_bytes:
                raise ResourceExhausted(
                    f"namespace {ns!r} would hold more than its quota of {lim.namespace_bytes} bytes of files")
            if pid:
                pid_reserved = self._pid_reserved.get(pid, 0) + n
                proc = self._proc.get(pid) or FileUsage()
                if proc.bytes + pid_reserved - writer._pid_credit > lim.process_bytes:
                    raise ResourceExhausted(
                        f"pid {pid} would own more than its quota of {lim.process_bytes} bytes of files")
                self._pid_reserved[pid] = pid_reserved
            self._ns_reserved[ns] = reserved
            writer._reserved += n

    def _unreserve(self, writer: FileWriter) -> None:
        n, writer._reserved = writer._reserved, 0
        if n:
            for table, key in ((self._ns_reserved, writer.namespace), (self._pid_reserved, writer.pid)):
                if key in table:
                    left = table[key] - n
                    if left:
                        table[key] = left
                    else:
                        del table[key]

    def _discard(self, writer: FileWriter) -> None:
        with self._lock:
            self._unreserve(writer)
        try:
            os.unlink(writer.staged, dir_fd=self._staging)
        except FileNotFoundError:  # committed already
            pass

    def _commit(self, writer: FileWriter) -> FileInfo:
        parts, vpath, ns, pid = writer._parts, writer.path, writer.namespace, writer.pid
        with self._lock:
            self._unreserve(writer)
            fd, missing = self._descend(self._namespace_root(ns), parts[:-1], vpath)
            extra = ""  # a second staging file, for an append
            try:
                old = None if missing else self._lstat(fd, parts[-1], vpath)
                if old is not None and st.S_ISDIR(old.st_mode):
                    raise FailedPrecondition(f"{vpath!r} is a directory")
                new_size = writer.size + (old.st_size if writer.append and old is not None else 0)
                self._check_quota(ns, pid, new_size, old, len(missing), vpath)
                if missing:
                    fd = self._make_dirs(fd, missing, vpath)
                    self._ns(ns).directories += len(missing)
                staged = writer.staged
                if writer.append and old is not None:
                    staged = extra = self._append_copy(fd, parts[-1], old, writer)
                os.replace(staged, parts[-1], src_dir_fd=self._staging, dst_dir_fd=fd)
                os.fsync(fd)
                s = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
            except OSError as e:
                raise _os_error(e, vpath) from None
            finally:
                os.close(fd)
                if extra:
                    self._unlink_staged(extra)  # a no-op once committed
            if old is not None:
                self._forget(ns, old)
            usage = self._ns(ns)
            usage.bytes += s.st_size
            usage.files += 1
            if pid:
                self._owner[s.st_ino] = (pid, s.st_size)
                self._owned.setdefault(pid, set()).add(s.st_ino)
                proc = self._proc.setdefault(pid, FileUsage())
                proc.bytes += s.st_size
                proc.files += 1
        return _info(vpath, s)

    def _append_copy(self, parent: int, name: str, old: os.stat_result, writer: FileWriter) -> str:
        """A staging file holding the current file followed by the writer's bytes.
        Made under the lock, so appends that race each other all land."""
        extra = f"{secrets.token_hex(8)}.tmp"
        out = os.open(extra, _STAGE_FLAGS, 0o600, dir_fd=self._staging)
        try:
            src = os.open(name, _READ_FLAGS, dir_fd=parent)
            try:
                if os.fstat(src).st_ino != old.st_ino:
                    raise FailedPrecondition(f"{writer.path!r} changed while appending; try again")
                _copy(src, out, old.st_size)
            finally:
                os.close(src)
            tail = os.open(writer.staged, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._staging)
            try:
                _copy(tail, out, writer.size)
            finally:
                os.close(tail)
            os.fsync(out)
        except BaseException:
            os.close(out)
            self._unlink_staged(extra)
            raise
        os.close(out)
        self._unlink_staged(writer.staged)
        return extra

    def _unlink_staged(self, name: str) -> None:
        try:
            os.unlink(name, dir_fd=self._staging)
        except FileNotFoundError:
            pass

    def _forget(self, namespace: str, s: os.stat_result) -> None:
        """An entry left the tree (deleted or replaced): take it off the books."""
        usage = self._ns(namespace)
        if st.S_ISDIR(s.st_mode):
            usage.directories -= 1
            return
        usage.bytes -= s.st_size
        usage.files -= 1
        owner = self._owner.pop(s.st_ino, None)
        if owner is not None:
            pid, size = owner
            self._owned[pid].discard(s.st_ino)
            proc = self._proc[pid]
            proc.bytes -= size
            proc.files -= 1

    # -- resolving paths --------------------------------------------------------------------
    def _namespace_root(self, namespace: str) -> int:
        """A descriptor of the namespace's tree, created on first use."""
        name = _namespace_dir(namespace)
        try:
            try:
                return os.open(name, _DIR_FLAGS, dir_fd=self._trees)
            except FileNotFoundError:
                try:
                    os.mkdir(name, 0o700, dir_fd=self._trees)
                except FileExistsError:
                    pass
                return os.open(name, _DIR_FLAGS, dir_fd=self._trees)
        except OSError as e:
            if e.errno in (errno.ENOTDIR, errno.ELOOP):
                raise InvalidArgument(
                    f"the file tree of namespace {namespace!r} is not a directory (a link put there on the host?)"
                ) from None
            raise _os_error(e, "") from None

    def _descend(self, fd: int, comps: tuple[str, ...], vpath: str) -> tuple[int, tuple[str, ...]]:
        """Open the directories `comps` below `fd` (which it takes over) one at a
        time, never following a link. Returns the deepest one it could open and
        the components missing below it."""
        for i, comp in enumerate(comps):
            try:
                nxt = os.open(comp, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                return fd, comps[i:]
            except OSError as e:
                try:
                    if e.errno in (errno.ENOTDIR, errno.ELOOP):
                        # Say why: a link or special file is refused as such.
                        self._lstat(fd, comp, vpath)
                    raise _os_error(e, vpath) from None
                finally:
                    os.close(fd)
            os.close(fd)
            fd = nxt
        return fd, ()

    def _open_dir(self, namespace: str, comps: tuple[str, ...], vpath: str) -> int:
        fd, missing = self._descend(self._namespace_root(namespace), comps, vpath)
        if missing:
            os.close(fd)
            raise NotFound(f"no file or directory {vpath!r}")
        return fd

    def _make_dirs(self, fd: int, comps: tuple[str, ...], vpath: str) -> int:
        """Create `comps` below `fd` (which it takes over); the deepest, opened."""
        try:
            for comp in comps:
                os.mkdir(comp, 0o700, dir_fd=fd)
                os.fsync(fd)
                nxt = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nxt
        except OSError as e:
            os.close(fd)
            raise _os_error(e, vpath) from None
        return fd

    def _lstat(self, parent: int, name: str, vpath: str) -> os.stat_result | None:
        """The entry `name` in `parent`, None if absent; refused if it is anything
        but a directory or a singly linked regular file."""
        try:
            s = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise _os_error(e, vpath) from None
        _check_entry(s, vpath)
        return s

    def _existing(self, namespace: str, parts: tuple[str, ...], vpath: str) -> os.stat_result | None:
        """The regular file at `parts`, None if there is none yet."""
        fd, missing = self._descend(self._namespace_root(namespace), parts[:-1], vpath)
        try:
            s = None if missing else self._lstat(fd, parts[-1], vpath)
        finally:
            os.close(fd)
        if s is not None and st.S_ISDIR(s.st_mode):
            raise FailedPrecondition(f"{vpath!r} is a directory")
        return s

    def _scan(self, fd: int, usage: FileUsage) -> None:
        """Add up a tree left by an earlier run (takes over `fd`)."""
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    s = entry.stat(follow_symlinks=False)
                    if st.S_ISDIR(s.st_mode):
                        usage.directories += 1
                        self._scan(os.open(entry.name, _DIR_FLAGS, dir_fd=fd), usage)
                    elif st.S_ISREG(s.st_mode):
                        usage.files += 1
                        usage.bytes += s.st_size
        finally:
            os.close(fd)
