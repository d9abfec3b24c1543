"""The fuzzer (tests/fuzzing/) under its CI profile: seeded (derandomized), no
database, a fixed number of examples per target, no shrinking (a violation's
message holds the exact call, program or sequence that broke the invariant).
`python tools/fuzz.py --minutes N` runs the same targets for longer with random
seeds. One server for the module (tiny model, Python agents), restarted on a fresh
data directory whenever an example broke it.

Invariants checked after every example: see tests/fuzzing/harness.py.
"""
from __future__ import annotations

from typing import Iterator

import pytest

from fuzzing import lua_programs, requests, targets
from fuzzing.harness import METHODS, STATS, FuzzServer

from llmos.v1 import kernel_pb2 as pb
from llmos.values import from_value


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[FuzzServer]:
    server = FuzzServer()
    server.start()
    yield server
    server.close()


def test_every_rpc_field_has_a_strategy() -> None:
    """A new RPC or field is fuzzed without a change, unless its type is new (a map, a new
    kind of scalar): then this fails and says where to add one."""
    requests.check_strategies()


def test_every_sys_function_has_a_strategy(fuzz_server: FuzzServer) -> None:
    fuzz_server.ensure()
    pid = fuzz_server.spawn_lua(lua_programs.LIST_SYS)
    info = fuzz_server.must("Wait", pb.WaitRequest(pid=pid, timeout_ms=10_000)).process
    assert sorted(from_value(info.result)) == sorted(lua_programs.SYS_FUNCTIONS), \
        "a sys function the fuzzer does not call (or calls, but is gone): update lua_programs.SYS_FUNCTIONS"


def test_every_rpc_with_hostile_fields(fuzz_server: FuzzServer) -> None:
    targets.run("rpc", fuzz_server, "ci")
    assert set(METHODS) <= {method for method, _ in STATS.rpc}, "an RPC the profile never called"


def test_every_rpc_with_mutated_wire_bytes(fuzz_server: FuzzServer) -> None:
    targets.run("wire", fuzz_server, "ci")


def test_lua_programs_calling_every_sys_function(fuzz_server: FuzzServer) -> None:
    targets.run("lua", fuzz_server, "ci")
    called = {name for name, _ in STATS.lua}
    assert set(lua_programs.SYS_FUNCTIONS) <= called, sorted(set(lua_programs.SYS_FUNCTIONS) - called)
    assert set(lua_programs.CONTEXTS) <= set(STATS.contexts)


def test_python_agents_making_hostile_calls(fuzz_server: FuzzServer) -> None:
    targets.run("python", fuzz_server, "ci")


def test_random_sequences_against_a_model(fuzz_server: FuzzServer) -> None:
    targets.run("machine", fuzz_server, "ci")
