"""Fixtures for the Python sandbox: one real fork server shared by the tests of a session."""
from __future__ import annotations

from typing import Iterator

import pytest
from _sbx import RunFn, spawn

from llmosd.pysandbox import ExitStatus, Launcher, LauncherConfig, Limits


@pytest.fixture(scope="session")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    root = tmp_path_factory.mktemp("pysandbox")
    with Launcher(LauncherConfig(work_root=root / "work", kernel_socket=root / "kernel.sock")) as lnch:
        yield lnch


@pytest.fixture
def run(launcher: Launcher) -> RunFn:
    """Run a program to its end; returns (exit status, process log)."""
    def _run(source: str, limits: Limits = Limits(), timeout: float = 30, **kw: object) -> tuple[ExitStatus, str]:
        child = spawn(launcher, source, limits, **kw)  # type: ignore[arg-type]
        status = child.wait(timeout)
        if status is None:
            child.kill()
            pytest.fail(f"agent did not end within {timeout}s; log: {child.read_log()!r}")
        return status, child.read_log().decode()
    return _run
