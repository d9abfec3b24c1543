"""Helpers shared by the sandbox tests."""
from __future__ import annotations

import itertools
import json
import textwrap
from typing import Callable

import pytest

from llmosd.pysandbox import Child, ExitStatus, Launcher, Limits, SpawnSpec

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
