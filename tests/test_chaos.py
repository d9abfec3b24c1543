"""A bounded chaos run (tools/chaos.py): a pipeline of durable Lua agents, the server kill -9'd at
seeded random moments and restarted, leaves the same result and file tree as an uncrashed run, with
no effect twice."""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tools"))
from chaos import compare, run_pipeline  # noqa: E402


def test_a_pipeline_of_durable_agents_killed_at_random_moments_ends_as_if_never_killed(tmp_path: pathlib.Path) -> None:
    reference = run_pipeline(tmp_path / "reference", stages=5, items=60, kills=0, seed=0)
    chaos = run_pipeline(tmp_path / "chaos", stages=5, items=60, kills=4, seed=11)
    assert chaos.kills >= 2, "the run ended before the server could be killed"
    assert compare(reference, chaos) == []
