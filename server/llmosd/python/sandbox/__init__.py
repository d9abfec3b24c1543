"""Sandboxed, fast-starting Python agent processes for llmosd (independent of gRPC).

Usage::

    launcher = Launcher(LauncherConfig(work_root=Path(...), kernel_socket=Path(...)))
    launcher.start()                      # fork server up; launcher.layers says what is enforced
    child = launcher.spawn(SpawnSpec(pid=7, token="...", source="print('hi')", args_json="{}",
                                     limits=Limits(cpu_s=10, memory_bytes=1 << 30, wall_s=60)))
    child.os_pid; child.stop(); child.cont(); child.kill(); child.rss()
    child.cpu_time()                      # CPU seconds of all its threads and processes
    status = child.wait(timeout)          # ExitStatus(reason, code, signal, error, cpu_s, max_rss)
    child.read_log()                      # stdout+stderr, also at child.log_path
    launcher.shutdown()                   # kills every agent; so does the death of this process

How it works. ``start()`` launches a fork server (zygote.py): a separate,
single-threaded interpreter (``LauncherConfig.python``) that imports json,
grpc, protobuf and the llmos SDK (when importable) once. Each ``spawn()``
sends it a request; it clone()s a child straight into new namespaces, and the
child confines itself (child.py) and runs the program as ``__main__``. The
program's token, source, arguments and environment travel in a memfd from
the launcher to that child only, so no agent can find another's token in the
memory it inherits from the zygote.

Inside the agent:
  * environment: LLMOS_PID, LLMOS_TOKEN, LLMOS_SOCKET (the kernel's Unix socket
    path, reachable despite the network namespace), LLMOS_ARGS (JSON text),
    LLMOS_WORKDIR, HOME and TMPDIR (= the working directory), plus SpawnSpec.env;
  * cwd: a private directory, work_root/agents/<pid>, removed when the agent has
    ended (kept with LauncherConfig(keep_workdirs=True));
  * stdout/stderr: the process log, work_root/logs/<pid>.log (kept; appended to);
  * os.getpid() is 1 when the pid namespace is active.

Layers, each used where the host allows it and otherwise skipped with a
logged warning (``launcher.layers``, ``launcher.notices``):
  * "rlimits": address space, CPU seconds (SIGKILL at the limit), open files,
    file size, no core dumps; processes via RLIMIT_NPROC (``fork_limit ==
    "rlimit"``: needs a user namespace and a non-root launcher, since the
    kernel exempts uid 0). As root, ``fork_limit == "seccomp"``: threads only.
  * "userns", "netns", "pidns": own user namespace (ids mapped to the
    launcher's, capabilities dropped), no network but Unix path sockets, own
    pid namespace (other processes cannot be named, and when the agent dies
    everything it started dies too).
  * "landlock" (+ "landlock_net", "landlock_signal" by ABI): read-only access
    to the interpreter's sys.path, the preloaded packages and system libraries,
    read-write to the working directory and /dev/null, no execve, no TCP, no
    signals or abstract sockets leaving the agent.
  * "seccomp": no ptrace, mount, namespaces, kexec, bpf, io_uring, keyrings,
    module loading; socket() for AF_UNIX only (unless allow_network); no
    setsid/setpgid, so that whatever an agent forks stays in its process group,
    which Child.stop/cont/kill signal as one; no processes with fork_limit
    "seccomp"; no_new_privs.
The agent's death is reported by the fork server (its parent); agents get
PR_SET_PDEATHSIG from it, and it gets PR_SET_PDEATHSIG from the launcher
thread that started it and watches its control socket.
"""
from .launcher import ExitStatus, Child, Launcher, LauncherConfig, Limits, SandboxError, SpawnSpec

__all__ = ["Child", "ExitStatus", "Launcher", "LauncherConfig", "Limits", "SandboxError", "SpawnSpec"]
