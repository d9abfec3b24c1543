"""Fair share of CPU between namespaces (issue 14), as cgroup v2's hierarchical cpu.weight: each
namespace gets its weight's share first, then shares it among its processes.

The run queue's policy on a simulated clock (seeded, exact), then a real llmosd on one virtual
CPU: namespace "one" runs 1 CPU-bound Lua process, namespace "many" runs 16, and the CPU each
namespace's processes actually used (Usage.cpu_ms) is compared as a ratio, never wall-clock.
"""
from __future__ import annotations

import random
import signal
import time

import grpc
import pytest

import llmos
from llmosd.kernel.process import DEFAULT_WEIGHT
from llmosd.kernel.run_queue import NAMESPACE_AGING, RunQueue
from llmosd_process import LlmosdServer
from statuses import code_of

QUANTUM = 10_000_000
AGING = 200_000_000
BUSY = "local x = 0 while true do x = x + 1 end"


class Proc:
    """What the run queue reads and writes of a process."""

    __slots__ = ("name", "priority", "weight", "vruntime", "queued_at", "namespace", "queued_vruntime")

    def __init__(self, name: str, namespace: str, weight: int = DEFAULT_WEIGHT) -> None:
        self.name, self.namespace, self.priority, self.weight = name, namespace, 0, weight
        self.vruntime, self.queued_at, self.queued_vruntime = 0.0, 0, 0.0


def simulate(procs: list[Proc], slices: int, weights: dict[str, int] | None = None,
             seed: int = 1) -> tuple[dict[str, int], dict[str, int]]:
    """Run CPU-bound `procs` on one simulated CPU for `slices` picks of random length (charging
    vruntime as the kernel does). Returns the CPU ns each namespace used, and the longest wait
    (queued to picked) of each namespace's processes."""
    rng = random.Random(seed)
    now = 0
    queue = RunQueue(AGING, lambda: now)
    for name, weight in (weights or {}).items():
        queue.set_weight(name, weight)
    for p in procs:
        queue.push(p, new=True)
    used: dict[str, int] = {p.namespace: 0 for p in procs}
    longest: dict[str, int] = {p.namespace: 0 for p in procs}
    for _ in range(slices):
        proc = queue.pop()
        longest[proc.namespace] = max(longest[proc.namespace], now - proc.queued_at)
        ran = rng.randint(QUANTUM // 10, QUANTUM)
        now += ran
        used[proc.namespace] += ran
        proc.vruntime += ran * DEFAULT_WEIGHT / proc.weight
        queue.push(proc)
    return used, longest


def test_one_busy_process_against_sixteen_gets_half() -> None:
    procs = [Proc("a", "one")] + [Proc(f"b{i}", "many") for i in range(16)]
    used, _ = simulate(procs, 20_000)
    assert used["one"] / (used["one"] + used["many"]) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("weights,share", [({"one": 300}, 0.75), ({"many": 300}, 0.25), ({"one": 50}, 1 / 3)])
def test_namespace_weights_shape_the_split(weights: dict[str, int], share: float) -> None:
    procs = [Proc("a", "one")] + [Proc(f"b{i}", "many", weight=50 + 100 * i) for i in range(4)]
    used, _ = simulate(procs, 20_000, weights)
    assert used["one"] / (used["one"] + used["many"]) == pytest.approx(share, abs=0.01)


def test_process_weights_share_a_namespace() -> None:
    """Within a namespace, processes share its part by their own weights."""
    procs = [Proc("a", "one"), Proc("heavy", "many", weight=300), Proc("light", "many", weight=100)]
    rng = random.Random(3)
    now = 0
    queue = RunQueue(AGING, lambda: now)
    for p in procs:
        queue.push(p, new=True)
    used = {p.name: 0 for p in procs}
    for _ in range(20_000):
        proc = queue.pop()
        ran = rng.randint(QUANTUM // 10, QUANTUM)
        now += ran
        used[proc.name] += ran
        proc.vruntime += ran * DEFAULT_WEIGHT / proc.weight
        queue.push(proc)
    total = sum(used.values())
    assert used["a"] / total == pytest.approx(0.5, abs=0.01)
    assert used["heavy"] / (used["heavy"] + used["light"]) == pytest.approx(0.75, abs=0.02)


def test_a_namespace_of_least_weight_still_runs() -> None:
    """Weight 1 against 10,000: its process still waits at most NAMESPACE_AGING x aging (plus a slice)."""
    procs = [Proc("a", "tiny")] + [Proc(f"b{i}", "huge") for i in range(3)]
    used, longest = simulate(procs, 20_000, {"tiny": 1, "huge": 10_000})
    assert used["tiny"] > 0
    assert longest["tiny"] <= NAMESPACE_AGING * AGING + QUANTUM


def test_a_namespace_back_from_idle_gets_a_bounded_credit() -> None:
    """A namespace that slept while another ran does not then monopolise the CPU for as long."""
    now = 0
    queue = RunQueue(AGING, lambda: now)
    sleeper, busy = Proc("s", "sleepy"), Proc("b", "busy")
    queue.push(busy, new=True)
    for _ in range(1000):  # 10 s of "busy" alone
        proc = queue.pop()
        now += QUANTUM
        proc.vruntime += QUANTUM
        queue.push(proc)
    queue.push(sleeper, new=True)
    run = []
    for _ in range(20):
        proc = queue.pop()
        run.append(proc.name)
        now += QUANTUM
        proc.vruntime += QUANTUM
        queue.push(proc)
    assert run.count("s") <= 14  # a credit of 2 quanta, then alternation


# -- a real server -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    # One virtual CPU: the whole CPU is the share, however loaded the machine is.
    s = LlmosdServer(tmp_path_factory.mktemp("fair") / "data", "--model", "none", "--cpus", "1")
    s.start()
    yield s
    s.stop(signal.SIGKILL)


def _cpu_ms(client: llmos.Client, pids: list[int]) -> int:
    return sum(client.get(pid).usage["cpu_ms"] for pid in pids)


def test_namespaces_split_the_cpu_whatever_their_process_counts(server: LlmosdServer) -> None:
    admin_token = (server.data_dir / "admin.token").read_text().strip()
    with llmos.Client(server.target, token=admin_token) as admin:
        clients = {ns: llmos.Client(server.target, token=admin.create_token(ns, "owner")[1]) for ns in ("one", "many")}
        pids = {"one": [clients["one"].spawn(lua=BUSY)], "many": [clients["many"].spawn(lua=BUSY) for _ in range(16)]}
        try:
            time.sleep(1.0)  # every process has run: shares are settled
            before = {ns: _cpu_ms(clients[ns], pids[ns]) for ns in pids}
            time.sleep(4.0)
            used = {ns: _cpu_ms(clients[ns], pids[ns]) - before[ns] for ns in pids}
            share = used["one"] / (used["one"] + used["many"])
            print(f"CPU used over 4 s on one virtual CPU: one {used['one']} ms, many {used['many']} ms, "
                  f"share of 'one' {share:.3f}")
            assert used["one"] + used["many"] > 400  # it ran (the split is of CPU actually used)
            assert share == pytest.approx(0.5, abs=0.05)
        finally:
            for ns, client in clients.items():
                for pid in pids[ns]:
                    client.kill(pid)
                client.close()


def test_only_admins_set_weights_and_every_caller_sees_its_own(server: LlmosdServer) -> None:
    admin_token = (server.data_dir / "admin.token").read_text().strip()
    with llmos.Client(server.target, token=admin_token) as admin:
        owner = llmos.Client(server.target, token=admin.create_token("weighed", "owner")[1])
        reader = llmos.Client(server.target, token=admin.create_token("weighed", "reader")[1])
        try:
            assert owner.get_namespace()["weight"] == DEFAULT_WEIGHT
            assert admin.set_namespace("weighed", weight=250)["weight"] == 250
            assert admin.set_namespace("weighed")["weight"] == 250  # 0: unchanged
            assert reader.get_namespace()["weight"] == 250
            assert code_of(lambda: owner.set_namespace("weighed", weight=500)) == grpc.StatusCode.PERMISSION_DENIED
            assert code_of(lambda: reader.set_namespace("weighed", weight=500)) == grpc.StatusCode.PERMISSION_DENIED
            for bad in (10_001, 2**32 - 1):
                assert code_of(lambda: admin.set_namespace("weighed", weight=bad)) == grpc.StatusCode.INVALID_ARGUMENT
            for bad_name in ("", "a\nb", "x" * 257):
                assert code_of(lambda: admin.set_namespace(bad_name, weight=5)) == grpc.StatusCode.INVALID_ARGUMENT
            assert owner.get_namespace()["weight"] == 250
        finally:
            owner.close()
            reader.close()


# -- the engine: tokens ---------------------------------------------------------------------------
ASKER = """
while true do sys.infer{prompt = "the same question", max_tokens = 24, temperature = 0} end
"""


def _tokens(client: llmos.Client, pids: list[int]) -> int:
    return sum(client.get(pid).usage["tokens"] for pid in pids)


def test_namespaces_split_the_engine_by_tokens(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Two namespaces of equal weight keep the engine saturated (16 requests waiting at once for 4
    places in a step), one with 4 asking processes and one with 12: each gets half the tokens."""
    s = LlmosdServer(tmp_path_factory.mktemp("fair-engine") / "data", "--model", "tiny", "--max-batch", "4",
                     "--cpus", "2")
    s.start()
    try:
        admin_token = (s.data_dir / "admin.token").read_text().strip()
        with llmos.Client(s.target, token=admin_token) as admin:
            clients = {ns: llmos.Client(s.target, token=admin.create_token(ns, "owner")[1]) for ns in ("few", "many")}
            pids = {"few": [clients["few"].spawn(lua=ASKER) for _ in range(4)],
                    "many": [clients["many"].spawn(lua=ASKER) for _ in range(12)]}
            try:
                deadline = time.monotonic() + 120  # the model loads first
                while _tokens(clients["many"], pids["many"]) == 0 and time.monotonic() < deadline:
                    time.sleep(0.2)
                time.sleep(1.0)
                before = {ns: _tokens(clients[ns], pids[ns]) for ns in pids}
                time.sleep(4.0)
                got = {ns: _tokens(clients[ns], pids[ns]) - before[ns] for ns in pids}
                share = got["few"] / (got["few"] + got["many"])
                print(f"tokens over 4 s: few {got['few']}, many {got['many']}, share of 'few' {share:.3f}")
                assert got["few"] + got["many"] > 200  # the engine served them (the split is of tokens)
                assert got["few"] / got["many"] == pytest.approx(1.0, abs=0.1)
            finally:
                for ns, client in clients.items():
                    for pid in pids[ns]:
                        client.kill(pid)
                    client.close()
    finally:
        s.stop(signal.SIGKILL)
