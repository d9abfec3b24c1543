"""A bounded chaos run (tools/chaos.py, the same pipeline with fewer items and kills): durable agents
under a durable supervisor (relays with and without ack, seeded infers, appends under a lock, a
bounded buffer with condition waits), the server kill -9'd at seeded random moments and restarted,
leave the same result and file tree as an uncrashed run, with no effect twice and no journaled infer
run again."""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tools"))
from chaos import kill_spacing, report, run_pipeline  # noqa: E402

ITEMS = 30
KILLS = 10  # issue 15: the server kill -9'd at 10 or more random moments


def test_a_supervised_pipeline_of_durable_agents_killed_at_random_moments_ends_as_if_never_killed(
        tmp_path: pathlib.Path) -> None:
    reference = run_pipeline(tmp_path / "reference", ITEMS, kills=0, seed=0)
    chaos = run_pipeline(tmp_path / "chaos", ITEMS, kills=KILLS, seed=11, spacing_s=kill_spacing(reference, KILLS))
    assert len(chaos.stages) >= 20 and chaos.infer_calls == 2 * ITEMS
    lines, problems = report(reference, chaos, ITEMS, 11, KILLS)  # fewer kills than KILLS is a problem
    print("\n".join(lines))
    assert problems == []
