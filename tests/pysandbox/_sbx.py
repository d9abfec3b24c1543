"""Fixtures and helpers shared by the sandbox tests.

Test modules import the fixtures from here (no conftest.py: a second module named
``conftest`` on sys.path would shadow the one the other test suites import from).
"""
from __future__ import annotations

import itertools
import json
import textwrap
from typing import Callable, Iterator

import pytest

from llmosd.python.sandbox import Child, ExitStatus, Launcher, LauncherConfig, Limits, SpawnSpec

_pids = itertools.count(1000)
RunFn = Callable[..., "tuple[ExitStatus, str]"]


def spawn(launcher: Launcher, source: str, limits: Limits = Limits(), args: object = None,
          token: str = "tok", env: dict[str, str] | None = None) -> Child:
    """Start `source` (dedented) as a fresh agent."""
    return launcher.spawn(SpawnSpec(pid=next(_pids), token=token, source=textwrap.dedent(source),
                                    args_json=json.dumps(args), limits=limits, env=env or {}))


def layers_needed(launcher: Launcher, *names: str) -> None:
    """Skip when the host does not allow a layer a test is about."""
    missing = [n for n in names if n not in launcher.layers]
    if missing:
        pytest.skip(f"sandbox layers not available on this host: {missing}; notices: {launcher.notices}")


@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    """One real fork server per test module."""
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
