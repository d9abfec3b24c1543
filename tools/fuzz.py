"""Fuzz llmosd for N minutes and print what was tried and what broke.

    python tools/fuzz.py --minutes 10
    python tools/fuzz.py --minutes 2 --targets lua,rpc --seed 7

The same targets as tests/test_fuzz.py (tests/fuzzing/), with random seeds and
more examples per round. A round that finds a new kind of violation shrinks it
to a minimal reproducer; from then on that kind is counted but passed over, so
that later rounds look for others. At the end: calls and statuses per RPC (typed,
mutated wire bytes, from inside a Python agent), Lua syscalls and the contexts
they were made in, examples per target, and every kind of violation found with
its minimal reproducer. Exits 1 if any was found.
"""
from __future__ import annotations

import argparse
import pathlib
import random
import sys
import time
import traceback
from collections import Counter, defaultdict

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))

from fuzzing import targets  # noqa: E402
from fuzzing.harness import STATS, TOLERATED, FuzzServer, Violation  # noqa: E402
from hypothesis.internal.conjecture import engine  # noqa: E402

# Hypothesis shrinks for up to 5 minutes; against a real server (restarted after
# each break) a minute gives a short enough reproducer and leaves time to look on.
SHRINK_SECONDS = 60
if hasattr(engine, "MAX_SHRINKING_SECONDS"):
    engine.MAX_SHRINKING_SECONDS = SHRINK_SECONDS

TARGETS = ["rpc", "wire", "lua", "python", "machine"]


def violations_in(error: BaseException) -> list[BaseException]:
    """The failures in what Hypothesis raised (one, or a group of them: several bugs, or
    a flaky one, whose notes the group carries)."""
    if isinstance(error, BaseExceptionGroup):
        found = [v for e in error.exceptions for v in violations_in(e)]
        for v in found:
            for note in [f"({type(error).__name__}: {str(error)[:300]})"] + getattr(error, "__notes__", []):
                if note not in getattr(v, "__notes__", []):
                    v.add_note(note)
        return found
    return [error]


def reproducer(error: BaseException) -> str:
    notes = "\n".join(getattr(error, "__notes__", []))
    return f"{error}\n{notes}".strip()


def status_table(title: str, counts: Counter) -> None:
    if not counts:
        return
    per_method: dict[str, Counter] = defaultdict(Counter)
    for (method, code), n in counts.items():
        per_method[method][code] += n
    codes = sorted({code for _, code in counts}, key=lambda c: (c != "OK", c))
    width = max(len(m) for m in per_method) + 2
    print(f"\n{title}")
    print(f"{'method':<{width}}{'calls':>7}  " + "  ".join(f"{c:>19}" for c in codes))
    for method in sorted(per_method):
        row = per_method[method]
        print(f"{method:<{width}}{sum(row.values()):>7}  " + "  ".join(f"{row.get(c, 0) or '':>19}" for c in codes))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0, help="how long to fuzz (default %(default)s)")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, of " + ", ".join(TARGETS))
    p.add_argument("--seed", type=int, default=None, help="seed of the first round (later rounds: seed+1, ...)")
    a = p.parse_args()
    chosen = [t.strip() for t in a.targets.split(",") if t.strip()]
    unknown = set(chosen) - set(TARGETS)
    if unknown:
        p.error(f"unknown targets: {', '.join(sorted(unknown))}")
    seed = a.seed if a.seed is not None else random.randrange(2**32)
    found: dict[str, tuple[str, int, str]] = {}  # signature -> (target, seed, reproducer)
    crashes: list[str] = []
    server = FuzzServer()
    end = time.monotonic() + a.minutes * 60
    rounds = 0
    print(f"fuzzing {', '.join(chosen)} for {a.minutes:g} min from seed {seed}", flush=True)
    try:
        while time.monotonic() < end:
            target = chosen[rounds % len(chosen)]
            round_seed = seed + rounds
            rounds += 1
            started = time.monotonic()
            try:
                targets.run(target, server, "long", seed=round_seed)
                outcome = "clean"
            except BaseException as error:  # noqa: BLE001 - Hypothesis raises groups and our violations
                if isinstance(error, KeyboardInterrupt):
                    raise
                new = []
                for v in violations_in(error):
                    if isinstance(v, Violation):
                        if v.signature not in found:
                            found[v.signature] = (target, round_seed, reproducer(v))
                            new.append(v.signature)
                        TOLERATED.add(v.signature)
                    else:
                        crashes.append(f"{target} seed {round_seed}: " + "".join(traceback.format_exception(v)))
                        server.dirty = True
                outcome = f"found {', '.join(new) or 'nothing new'}"
            print(f"round {rounds}: {target} seed {round_seed}: {outcome} ({time.monotonic() - started:.0f} s)",
                  flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    finally:
        server.close()
    report(found, crashes, rounds)
    return 1 if found or crashes else 0


def report(found: dict[str, tuple[str, int, str]], crashes: list[str], rounds: int) -> None:
    print(f"\n== {rounds} rounds; examples per target: {dict(STATS.examples)}; server restarts: {STATS.restarts}")
    status_table("gRPC calls (typed requests with hostile fields) by status", STATS.rpc)
    status_table("mutated wire bytes by status", STATS.wire)
    status_table("calls from inside Python agents (agent socket) by status", STATS.agent)
    if STATS.lua:
        print("\nLua syscalls and value round trips")
        names = sorted({n for n, _ in STATS.lua})
        width = max(map(len, names)) + 2
        print(f"{'sys function':<{width}}{'ok':>7}{'error':>7}")
        for n in names:
            print(f"{n:<{width}}{STATS.lua[(n, 'ok')]:>7}{STATS.lua[(n, 'error')]:>7}")
        print("contexts: " + ", ".join(f"{c} {n}" for c, n in sorted(STATS.contexts.items())))
    print(f"\n== {len(found)} kinds of violation" + (f" (then seen again: {dict(STATS.tolerated)})" if found else ""))
    for signature, (target, seed, text) in sorted(found.items()):
        print(f"\n--- {signature}  [{target}, seed {seed}]\n{text}")
    for crash in crashes:
        print(f"\n--- the fuzzer itself failed\n{crash}")


if __name__ == "__main__":
    sys.exit(main())
