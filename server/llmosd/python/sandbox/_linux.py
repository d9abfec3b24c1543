"""Thin ctypes bindings for the Linux facilities the sandbox uses (x86-64 only).

Constants come from the kernel's UAPI headers (linux/sched.h, linux/prctl.h,
linux/seccomp.h, linux/filter.h, linux/landlock.h, asm/unistd_64.h).
Everything here is safe to call in a single-threaded, freshly forked child.
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from typing import Iterable

_libc = ctypes.CDLL(None, use_errno=True)
# PyDLL keeps the GIL held across the call: the clone child must come back
# holding it, exactly as after fork() (see clone_fork).
_pylibc = ctypes.PyDLL(None, use_errno=True)
for _f in (_libc.syscall, _pylibc.syscall):
    _f.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int

IS_X86_64 = platform.machine() == "x86_64"

# asm/unistd_64.h
NR = {
    "socket": 41, "socketpair": 53, "clone": 56, "fork": 57, "vfork": 58, "kill": 62,
    "ptrace": 101, "syslog": 103, "setpgid": 109, "setsid": 112, "rt_sigqueueinfo": 129,
    "uselib": 134, "personality": 135, "ustat": 136, "sysfs": 139, "vhangup": 153, "pivot_root": 155,
    "chroot": 161, "acct": 163,
    "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169, "iopl": 172,
    "ioperm": 173, "init_module": 175, "delete_module": 176, "quotactl": 179, "nfsservctl": 180,
    "gettid": 186, "tkill": 200, "lookup_dcookie": 212, "tgkill": 234, "kexec_load": 246,
    "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272, "rt_tgsigqueueinfo": 297,
    "perf_event_open": 298, "fanotify_init": 300, "name_to_handle_at": 303,
    "open_by_handle_at": 304, "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311,
    "kcmp": 312, "finit_module": 313, "seccomp": 317, "kexec_file_load": 320, "bpf": 321,
    "userfaultfd": 323, "pidfd_send_signal": 424, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
    "fsconfig": 431, "fsmount": 432, "fspick": 433, "pidfd_open": 434, "clone3": 435,
    "pidfd_getfd": 438, "process_madvise": 440, "mount_setattr": 442, "quotactl_fd": 443,
    "landlock_create_ruleset": 444, "landlock_add_rule": 445, "landlock_restrict_self": 446,
}

# linux/sched.h
CLONE_NEWNS = 0x00020000
CLONE_THREAD = 0x00010000
CLONE_CHILD_CLEARTID = 0x00200000
CLONE_CHILD_SETTID = 0x01000000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWTIME = 0x00000080
CLONE_NEW_ANY = (CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER
                 | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWTIME)
_SIGCHLD = 17

# linux/prctl.h
PR_SET_PDEATHSIG = 1
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
PR_GET_TID_ADDRESS = 40
SECCOMP_MODE_FILTER = 2


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def prctl(option: int, arg2: int = 0) -> None:
    """prctl(2) with one integer argument."""
    _check(_libc.prctl(option, ctypes.c_ulong(arg2), 0, 0, 0), f"prctl({option})")


def _glibc_tid_address() -> int:
    """Address of glibc's cached tid for the calling thread (0 if unknown).

    glibc's fork() has the kernel store the child's tid there
    (CLONE_CHILD_SETTID); a raw clone must do the same or glibc keeps the
    parent's tid in its thread descriptor.
    """
    ptr = ctypes.c_void_p()
    if _libc.prctl(PR_GET_TID_ADDRESS, ctypes.byref(ptr), 0, 0, 0) != 0:
        return 0
    return ptr.value or 0


_TID_ADDRESS = _glibc_tid_address()


def clone_fork(ns_flags: int) -> int:
    """fork() whose child starts in new namespaces (CLONE_NEW* in ns_flags).

    Behaves like os.fork(): returns 0 in the child and the child's pid in the
    parent, and runs CPython's before/after-fork hooks around the raw clone.
    Python's own os.fork() cannot pass namespace flags, and unshare() cannot put
    the caller itself into a new pid namespace.
    """
    flags = ns_flags | _SIGCHLD
    tid_ptr = None
    if _TID_ADDRESS:
        flags |= CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID
        tid_ptr = ctypes.c_void_p(_TID_ADDRESS)
    ctypes.pythonapi.PyOS_BeforeFork()
    pid = _pylibc.syscall(NR["clone"], ctypes.c_ulong(flags), None, None, tid_ptr, ctypes.c_ulong(0))
    if pid == 0:
        ctypes.pythonapi.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    ctypes.pythonapi.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, f"clone: {os.strerror(err)}")
    return pid


def drop_capabilities() -> None:
    """Clear the effective, permitted and inheritable capability sets (capset(2), v3)."""
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, pid 0 = self
    data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable} words, all zero
    _check(_libc.syscall(126, header, data), "capset")


# --- Landlock (linux/landlock.h) -------------------------------------------
LL_FS_EXECUTE = 1 << 0
LL_FS_WRITE_FILE = 1 << 1
LL_FS_READ_FILE = 1 << 2
LL_FS_READ_DIR = 1 << 3
LL_FS_REFER = 1 << 13      # ABI 2
LL_FS_TRUNCATE = 1 << 14   # ABI 3
LL_FS_IOCTL_DEV = 1 << 15  # ABI 5
LL_NET_BIND_TCP = 1 << 0   # ABI 4
LL_NET_CONNECT_TCP = 1 << 1
LL_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
LL_SCOPE_SIGNAL = 1 << 1
_LL_RULE_PATH_BENEATH = 1
_LL_CREATE_RULESET_VERSION = 1
# Rights that may be granted on a non-directory; the rest only make sense on directories.
_LL_FILE_RIGHTS = LL_FS_EXECUTE | LL_FS_WRITE_FILE | LL_FS_READ_FILE | LL_FS_TRUNCATE | LL_FS_IOCTL_DEV


def landlock_abi() -> int:
    """The running kernel's Landlock ABI version, 0 when Landlock is unavailable."""
    if not IS_X86_64:
        return 0
    ret = _libc.syscall(NR["landlock_create_ruleset"], None, ctypes.c_size_t(0),
                        ctypes.c_uint32(_LL_CREATE_RULESET_VERSION))
    return max(int(ret), 0)


def landlock_fs_rights(abi: int) -> int:
    """All filesystem rights the given ABI knows (all of them get handled, i.e. denied by default)."""
    rights = (1 << 13) - 1  # ABI 1: EXECUTE .. MAKE_SYM
    if abi >= 2:
        rights |= LL_FS_REFER
    if abi >= 3:
        rights |= LL_FS_TRUNCATE
    if abi >= 5:
        rights |= LL_FS_IOCTL_DEV
    return rights


def landlock_restrict(abi: int, rules: Iterable[tuple[str, int]], deny_tcp: bool = True) -> None:
    """Confine the calling thread: only `rules` (path, rights) grant filesystem access.

    Also denies TCP bind/connect (ABI >= 4, unless deny_tcp is False) and, with
    ABI >= 6, signals and abstract Unix sockets that leave the new domain.
    Needs no_new_privs (or CAP_SYS_ADMIN) beforehand. Paths that do not exist
    are skipped.
    """
    handled_fs = landlock_fs_rights(abi)
    handled_net = LL_NET_BIND_TCP | LL_NET_CONNECT_TCP if abi >= 4 and deny_tcp else 0
    scoped = LL_SCOPE_ABSTRACT_UNIX_SOCKET | LL_SCOPE_SIGNAL if abi >= 6 else 0
    if abi >= 6:
        attr = struct.pack("=QQQ", handled_fs, handled_net, scoped)
    elif abi >= 4:
        attr = struct.pack("=QQ", handled_fs, handled_net)
    else:
        attr = struct.pack("=Q", handled_fs)
    buf = ctypes.create_string_buffer(attr, len(attr))
    ruleset = _check(_libc.syscall(NR["landlock_create_ruleset"], buf, ctypes.c_size_t(len(attr)),
                                   ctypes.c_uint32(0)), "landlock_create_ruleset")
    try:
        for path, rights in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                if not os.path.isdir(path):
                    rights &= _LL_FILE_RIGHTS
                rights &= handled_fs
                rule = ctypes.create_string_buffer(struct.pack("=Qi", rights, fd), 12)  # packed struct
                _check(_libc.syscall(NR["landlock_add_rule"], ctypes.c_int(ruleset),
                                     ctypes.c_int(_LL_RULE_PATH_BENEATH), rule, ctypes.c_uint32(0)),
                       f"landlock_add_rule({path})")
            finally:
                os.close(fd)
        _check(_libc.syscall(NR["landlock_restrict_self"], ctypes.c_int(ruleset), ctypes.c_uint32(0)),
               "landlock_restrict_self")
    finally:
        os.close(ruleset)


# --- seccomp BPF (linux/filter.h, linux/seccomp.h, linux/audit.h) ------------
_BPF_LD_W_ABS = 0x00 | 0x00 | 0x20
_BPF_JMP_JEQ_K = 0x05 | 0x10
_BPF_JMP_JGE_K = 0x05 | 0x30
_BPF_JMP_JSET_K = 0x05 | 0x40
_BPF_RET_K = 0x06
_AUDIT_ARCH_X86_64 = 62 | 0x80000000 | 0x40000000
_OFF_NR, _OFF_ARCH, _OFF_ARG0 = 0, 4, 16  # struct seccomp_data; args are 64-bit, little endian
RET_ALLOW = 0x7FFF0000
RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000
_X32_SYSCALL_BIT = 0x40000000


def ret_errno(err: int) -> int:
    """The seccomp action 'fail the call with errno err'."""
    return _RET_ERRNO | (err & 0xFFFF)


# Denied outright: debugging other processes, namespaces/mounts, kernel
# modules and images, eBPF, keyrings, io_uring (its ops bypass seccomp),
# handle-based opens that skip path checks, and other host-admin calls; and
# leaving the agent's process group, which the scheduler stops and continues
# as one (the agent made it with setsid() before confining itself).
DENIED_SYSCALLS = (
    "setsid", "setpgid",
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd", "process_madvise",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "open_tree", "move_mount",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "bpf",
    "perf_event_open", "userfaultfd", "add_key", "request_key", "keyctl",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "name_to_handle_at",
    "open_by_handle_at", "fanotify_init", "reboot", "swapon", "swapoff", "acct", "syslog",
    "iopl", "ioperm", "quotactl", "quotactl_fd", "lookup_dcookie", "nfsservctl", "uselib",
    "vhangup", "sysfs", "ustat", "personality", "seccomp",
    "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self",
)
_SIGNAL_SYSCALLS = ("kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "pidfd_open")
AF_UNIX = 1


def build_seccomp_filter(allow_fork: bool, allow_inet: bool, signal_self_only: int | None) -> bytes:
    """A classic-BPF seccomp program implementing the agent policy.

    allow_fork: False refuses new processes (fork, vfork, clone without
    CLONE_THREAD) with EAGAIN, threads stay allowed. allow_inet: False lets
    socket() create AF_UNIX sockets only. signal_self_only: if a pid is given,
    the kill family may target only that pid (or 0, its own process group);
    used when neither a pid namespace nor Landlock signal scoping isolates the
    agent. clone3 answers ENOSYS so that libc falls back to clone(), whose
    flags a filter can inspect.
    """
    prog: list[tuple[int, int, int, int]] = []

    def ins(code: int, jt: int, jf: int, k: int) -> None:
        prog.append((code, jt, jf, k))

    eperm = ret_errno(errno.EPERM)
    ins(_BPF_LD_W_ABS, 0, 0, _OFF_ARCH)
    ins(_BPF_JMP_JEQ_K, 1, 0, _AUDIT_ARCH_X86_64)
    ins(_BPF_RET_K, 0, 0, RET_KILL_PROCESS)
    ins(_BPF_LD_W_ABS, 0, 0, _OFF_NR)
    ins(_BPF_JMP_JGE_K, 0, 1, _X32_SYSCALL_BIT)  # the x32 ABI would dodge every number below
    ins(_BPF_RET_K, 0, 0, eperm)
    for name in DENIED_SYSCALLS:
        ins(_BPF_JMP_JEQ_K, 0, 1, NR[name])
        ins(_BPF_RET_K, 0, 0, eperm)
    ins(_BPF_JMP_JEQ_K, 0, 1, NR["clone3"])
    ins(_BPF_RET_K, 0, 0, ret_errno(errno.ENOSYS))
    if not allow_fork:
        for name in ("fork", "vfork"):
            ins(_BPF_JMP_JEQ_K, 0, 1, NR[name])
            ins(_BPF_RET_K, 0, 0, ret_errno(errno.EAGAIN))
    # clone: never into new namespaces; without fork rights, threads only.
    tail = [
        (_BPF_LD_W_ABS, 0, 0, _OFF_ARG0),
        (_BPF_JMP_JSET_K, 0, 1, CLONE_NEW_ANY),
        (_BPF_RET_K, 0, 0, eperm),
    ]
    if not allow_fork:
        tail += [(_BPF_JMP_JSET_K, 1, 0, CLONE_THREAD), (_BPF_RET_K, 0, 0, ret_errno(errno.EAGAIN))]
    tail.append((_BPF_RET_K, 0, 0, RET_ALLOW))
    ins(_BPF_JMP_JEQ_K, 0, len(tail), NR["clone"])
    prog.extend(tail)
    if not allow_inet:
        ins(_BPF_JMP_JEQ_K, 0, 4, NR["socket"])
        ins(_BPF_LD_W_ABS, 0, 0, _OFF_ARG0)
        ins(_BPF_JMP_JEQ_K, 1, 0, AF_UNIX)
        ins(_BPF_RET_K, 0, 0, ret_errno(errno.EAFNOSUPPORT))
        ins(_BPF_RET_K, 0, 0, RET_ALLOW)
    if signal_self_only is not None:
        for name in _SIGNAL_SYSCALLS:
            ins(_BPF_JMP_JEQ_K, 0, 5, NR[name])
            ins(_BPF_LD_W_ABS, 0, 0, _OFF_ARG0)
            ins(_BPF_JMP_JEQ_K, 2, 0, signal_self_only)
            ins(_BPF_JMP_JEQ_K, 1, 0, 0)
            ins(_BPF_RET_K, 0, 0, eperm)
            ins(_BPF_RET_K, 0, 0, RET_ALLOW)
    ins(_BPF_RET_K, 0, 0, RET_ALLOW)
    return b"".join(struct.pack("=HBBI", *i) for i in prog)


def seccomp_install(program: bytes) -> None:
    """Install a seccomp filter on the calling thread (no_new_privs must be set)."""
    n = len(program) // 8
    filt = ctypes.create_string_buffer(program, len(program))

    class _SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = _SockFprog(n, ctypes.cast(filt, ctypes.c_void_p))
    _check(_libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog), 0, 0),
           "prctl(PR_SET_SECCOMP)")

