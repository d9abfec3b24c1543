"""The gRPC servers of the syscall table: one on --listen for external clients, with health and
reflection, and one on the agent socket for Python agents (every call carries an agent's token)."""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..kernel.kernel import Kernel
from ..kernel.process import PYTHON
from .doors import kernel_service
from .syscalls import SERVICE

log = logging.getLogger("llmosd")
HEALTH_PERIOD_S = 0.05  # how often the health service looks for wedged virtual CPUs


@dataclass(frozen=True)
class TlsFiles:
    """The listener's TLS: its certificate chain and key, and the CA of client certificates (mutual TLS)."""

    cert: bytes
    key: bytes
    client_ca: bytes | None

    @classmethod
    def read(cls, cert: str, key: str, client_ca: str | None) -> TlsFiles:
        def pem(path: str) -> bytes:
            with open(path, "rb") as f:
                return f.read()

        return cls(pem(cert), pem(key), pem(client_ca) if client_ca else None)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.client_ca,
                                           require_client_auth=self.client_ca is not None)


class GrpcServers:
    def __init__(self, server: grpc.aio.Server, agent_server: grpc.aio.Server | None, health_watch: asyncio.Task,
                 where: str, on_stop: Callable[[], None] | None = None) -> None:
        self.server = server
        self.agent_server = agent_server
        self.on_stop = on_stop  # told before the servers stop (durable Python agents stay live)
        self.health_watch = health_watch
        self.where = where  # the address clients reach: HOST:PORT (the port picked if 0 was asked) or unix:PATH

    @classmethod
    async def start(cls, kernel: Kernel, listen: str, wedged_ns: int, single_user: bool = True,
                    tls: TlsFiles | None = None) -> GrpcServers:
        server = grpc.aio.server(options=[
            ("grpc.so_reuseport", 0),  # gRPC's default lets a second server share the port; refuse it instead
            ("grpc.max_receive_message_length", kernel.config.max_message_bytes + (64 << 10)),
            ("grpc.max_send_message_length", kernel.config.max_message_bytes + (64 << 10)),
        ])
        client_certificates = tls is not None and tls.client_ca is not None
        server.add_generic_rpc_handlers([kernel_service(kernel, single_user=single_user,
                                                        client_certificates=client_certificates)])
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection([SERVICE.full_name, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        try:
            port = server.add_secure_port(listen, tls.credentials()) if tls else server.add_insecure_port(listen)
        except RuntimeError:  # taken between main.refuse_bound_port's probe and now, or not an address
            port = 0
        if port == 0 and not listen.startswith("unix:"):
            raise SystemExit(f"llmosd: cannot listen on {listen} (already in use, or not an address)")
        await server.start()
        if listen.startswith("unix:"):
            # Single-user mode trusts whoever can connect: only the server's user may.
            os.chmod(listen.removeprefix("unix:").removeprefix("//"), 0o600)
        agent_server = None
        if kernel.config.agent_socket:
            # Python agents' own door: every call must carry an agent's token.
            if os.path.exists(kernel.config.agent_socket):
                os.unlink(kernel.config.agent_socket)
            agent_server = grpc.aio.server(options=[("grpc.http2.bdp_probe", 0)])
            # (and the Python runtime's own calls for durable agents: python/durable.py)
            agent_server.add_generic_rpc_handlers([kernel_service(kernel, agents=True),
                                                   *kernel.runtimes[PYTHON].agent_services()])
            agent_server.add_insecure_port(f"unix:{kernel.config.agent_socket}")
            await agent_server.start()
        health_set = asyncio.Event()
        health_watch = asyncio.create_task(watch_health(kernel, health_servicer, wedged_ns, health_set))
        await health_set.wait()  # a status from the start: a client told "listening" never gets NOT_FOUND
        where = listen if listen.startswith("unix:") else f"{listen.rsplit(':', 1)[0]}:{port}"
        on_stop = kernel.runtimes[PYTHON].server_stopping if agent_server is not None else None
        return cls(server, agent_server, health_watch, where, on_stop)

    async def stop(self) -> None:
        if self.on_stop is not None:
            self.on_stop()
        self.health_watch.cancel()
        await self.server.stop(grace=1.0)
        if self.agent_server is not None:
            await self.agent_server.stop(grace=0.5)


async def watch_health(kernel: Kernel, servicer: health.aio.HealthServicer, wedged_ns: int,
                       first_set: asyncio.Event) -> None:
    """The overall service and the kernel's are SERVING once the model has loaded (NOT_SERVING
    before, and for good if it failed to load), and NOT_SERVING again while a virtual CPU is
    wedged: its thread has been stuck in one C call more than `wedged_ns` past the time it was due
    to give the CPU back (the scheduler has handed the CPU to another thread meanwhile, see
    scheduler.py), until it checks in. `first_set` is set once the first status is."""
    inference = kernel.inference
    serving: bool | None = None
    wedged = False
    while True:
        loaded = inference is None or inference.loaded
        stuck_ns = kernel.scheduler.stuck_ns()
        if (stuck_ns > wedged_ns) != wedged:
            wedged = not wedged
            if wedged:
                log.warning("a virtual CPU is wedged (a thread %.0f ms in one C call past its due time)",
                            stuck_ns / 1e6)
            else:
                log.warning("no virtual CPU is wedged any more")
        now = loaded and not wedged
        if now != serving:
            log.info("health: %s%s", "SERVING" if now else "NOT_SERVING",
                     "" if loaded else " until the model has loaded")
            serving = now
            status = health_pb2.HealthCheckResponse.SERVING if now else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", SERVICE.full_name):
                await servicer.set(name, status)
            first_set.set()
        await asyncio.sleep(HEALTH_PERIOD_S)
