"""Shared fixtures: a real llmosd process serving over real gRPC."""
from __future__ import annotations

import pathlib
import signal
from typing import Iterator

import pytest

import llmos
from llmosd_process import LlmosdServer

ROOT = pathlib.Path(__file__).resolve().parent.parent
USERLAND = ROOT / "userland"
# Two virtual CPUs whatever the machine: by default llmosd takes one per core, and tests of scheduling
# or timing must not pass on one machine and fail on another.
PINNED = ("--cpus", "2")


@pytest.fixture(scope="session")
def llmosd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlmosdServer]:
    """One server shared by the tests of a session (tests must not depend on each other's processes)."""
    server = LlmosdServer(tmp_path_factory.mktemp("llmosd") / "data", *PINNED, userland_root=USERLAND)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fresh_llmosd(tmp_path: pathlib.Path) -> Iterator[LlmosdServer]:
    """A server of the test's own, for tests that restart or kill it. It runs no
    inference engine (loading torch and a model would only slow these tests)."""
    server = LlmosdServer(tmp_path / "data", "--model", "none", *PINNED, userland_root=USERLAND)
    server.start()
    yield server
    server.stop(signal.SIGKILL)


@pytest.fixture
def stub(llmosd: LlmosdServer) -> Iterator:
    from llmos.v1 import kernel_pb2_grpc

    with llmosd.channel() as channel:
        yield kernel_pb2_grpc.KernelStub(channel)


@pytest.fixture(scope="module")
def client(server: LlmosdServer) -> Iterator[llmos.Client]:
    """An SDK client of the module's own `server` fixture (a module that has one)."""
    with llmos.Client(server.target) as c:
        yield c
