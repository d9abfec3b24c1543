"""Shared fixtures: a real llmosd process serving over real gRPC."""
from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Iterator

import grpc
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
USERLAND = ROOT / "userland"


class LlmosdServer:
    """An llmosd subprocess on a loopback port; restartable on the same data directory."""

    def __init__(self, data_dir: pathlib.Path, *extra: str) -> None:
        self.data_dir = data_dir
        self.extra = list(extra)
        self.proc: subprocess.Popen | None = None
        self.target = ""
        self.log_path = data_dir.parent / f"{data_dir.name}-llmosd.log"

    def start(self, timeout: float = 30.0) -> str:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "llmosd", "--listen", "127.0.0.1:0", "--data-dir", str(self.data_dir),
             "--userland-root", str(USERLAND), *self.extra],
            stdout=subprocess.PIPE, stderr=log, cwd=ROOT,
        )
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if not line:
                raise RuntimeError(f"llmosd exited early; see {self.log_path}")
            found = re.search(r"listening on (\S+)", line)
            if found:
                self.target = found.group(1)
                break
        else:
            raise RuntimeError("llmosd did not start in time")
        # Keep draining stdout so the server never blocks on a full pipe.
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        return self.target

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)


@pytest.fixture(scope="session")
def llmosd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlmosdServer]:
    """One server shared by the tests of a session (tests must not depend on each other's processes)."""
    server = LlmosdServer(tmp_path_factory.mktemp("llmosd") / "data")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fresh_llmosd(tmp_path: pathlib.Path) -> Iterator[LlmosdServer]:
    """A server of the test's own, for tests that restart or kill it."""
    server = LlmosdServer(tmp_path / "data")
    server.start()
    yield server
    server.stop(signal.SIGKILL)


@pytest.fixture
def stub(llmosd: LlmosdServer) -> Iterator:
    from llmos.v1 import kernel_pb2_grpc

    with llmosd.channel() as channel:
        yield kernel_pb2_grpc.KernelStub(channel)
