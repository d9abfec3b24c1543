"""Durability benchmark: durable processes (journal, replay) on a real llmosd, side by side with a peer.

    python tools/bench_durable.py            # about a minute on 2 cores
    python tools/bench_durable.py --quick    # smaller counts, for a smoke test
    python tools/bench_durable.py --png out.png
    python tools/bench_durable.py --only ping_pong   # one row (or a few: --only ping_pong replay)
    python tools/bench_durable.py --only acknowledged_delivery --ack-batch 1000   # batches of 1000

Rows (one table; each row runs against its peer in the same run):
- durable Lua ping-pong: pairs of durable Lua processes, every send and receive journaled, round trips
  per second over all pairs, against the same pairs not durable (target >= 20,000 rt/s); it also prints
  the server's CPU time per round trip, which other load on the machine changes less than the rate;
- journaled syscalls per second, live (sys.now() in a loop in a durable process);
- restart: N durable idle processes (default 10,000, each blocked in sys.recv), server kill -9'd and
  started again: seconds from the new server's start until all are back, blocked in their receive
  again (target <= 10 s), against an empty server's start;
- replay: one durable process with M journaled syscalls (default 100,000) replayed after a kill -9:
  journal entries per second (target >= 50,000), over the whole restart (the server's own start,
  loading the journal, the replay until it blocks live again): a lower bound.

- acknowledged delivery (send, leased receive, ack), one 100-byte message at a time, by a durable Lua
  agent and by an SDK client on a port, against Redis Streams (XADD, XREADGROUP, XACK) with the same
  durability (appendonly yes, appendfsync everysec); Debian's redis-server is started and stopped here
  on a loopback port, with the `redis` client from PyPI (the row says how to install them if missing);
  and the same by an SDK client in batches of 100 (SendBatch, Recv with max_messages and ack, Ack with
  message_ids: three gRPC calls per batch) against Redis doing the same batching (100 XADDs pipelined,
  XREADGROUP COUNT 100, one XACK of 100 ids), same message size and durability.

ROWS is a list of row functions (each takes the run's Bench and returns a Row or a list of them).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable

import llmos
from llmos.v1 import kernel_pb2 as pb
from llmos.v1 import kernel_pb2_grpc
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))  # the tests' server launcher
from llmosd_process import LlmosdServer  # noqa: E402

PINGER_LUA = """
local peer = sys.spawn{lua = [[
  for i = 1, args do local m = sys.recv{} ; sys.send(m.from, m.body) end
]], args = args.n, durable = args.durable}
sys.recv{tag = "go"}
for i = 1, args.n do sys.send(peer, i) ; sys.recv{} end
return args.n
"""

NOW_LOOP_LUA = """
for i = 1, args.n do sys.now() end
sys.send(args.port, "done")
sys.recv{tag = "go"}
"""

IDLE_LUA = "sys.recv{tag = 'go'}"


@dataclasses.dataclass
class Row:
    name: str
    ours: float
    unit: str
    peer_name: str = ""
    peer: float | None = None
    target: str = ""
    met: bool | None = None

    def ratio(self) -> str:
        if self.peer is None or not self.peer:
            return ""
        return f"{self.ours / self.peer:.2f}x"


@dataclasses.dataclass
class Bench:
    quick: bool
    work: pathlib.Path
    cpus: int
    ack_batch: int = 100  # messages per call in the batched acknowledged-delivery rows (ours and Redis's alike)

    def server(self, name: str) -> LlmosdServer:
        return LlmosdServer(self.work / name, "--model", "none", "--cpus", str(self.cpus))


def _wait_state(server: LlmosdServer, states: list[int], count: int, timeout: float) -> float:
    """Poll until `count` processes are in `states`; the time it took (or raise)."""
    start = time.perf_counter()
    channel = server.channel()
    stub = kernel_pb2_grpc.KernelStub(channel)
    while True:
        n, after = 0, 0
        while True:
            reply = stub.ListProcesses(pb.ListProcessesRequest(states=states, page_size=10000, after_pid=after))
            n += len(reply.processes)
            after = reply.next_after_pid
            if not after:
                break
        if n >= count:
            channel.close()
            return time.perf_counter() - start
        if time.perf_counter() - start > timeout:
            raise RuntimeError(f"only {n} of {count} processes came back in {timeout:.0f} s")
        time.sleep(0.02)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (Linux's /proc)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ping_pong(b: Bench) -> Row:
    pairs, n = (4, 500) if b.quick else (8, 4000)
    rates, cpu_us = {}, {}
    server = b.server("ping-pong")
    server.start()
    try:
        with llmos.Client(server.target) as k:
            for durable in (False, True, False, True):  # alternate: the machine's speed drifts
                pids = [k.spawn(lua=PINGER_LUA, args={"n": n, "durable": durable}, durable=durable)
                        for _ in range(pairs)]
                _wait_state(server, [pb.BLOCKED], 2 * pairs, 60)
                cpu = _cpu_seconds(server.pid)
                start = time.perf_counter()
                for pid in pids:
                    k.send(pid, None, tag="go")
                for pid in pids:
                    info = k.wait(pid, timeout=600)
                    assert info is not None and info.state == "EXITED", info
                rate = pairs * n / (time.perf_counter() - start)
                rates[durable] = max(rates.get(durable, 0.0), rate)
                used = (_cpu_seconds(server.pid) - cpu) / (pairs * n) * 1e6
                cpu_us[durable] = min(cpu_us.get(durable, used), used)
    finally:
        server.stop()
    print(f"  ping-pong: server CPU per round trip {cpu_us[True]:.1f} us durable, {cpu_us[False]:.1f} us not durable",
          flush=True)
    return Row(f"durable Lua ping-pong, {pairs} pairs", rates[True], "rt/s", "not durable", rates[False],
               ">= 20,000 rt/s", rates[True] >= 20_000)


def journaled_calls(b: Bench) -> Row:
    n = 20_000 if b.quick else 200_000
    server = b.server("live")
    server.start()
    try:
        with llmos.Client(server.target) as k:
            port = k.open_port()
            rates = {}
            for durable in (False, True):
                start = time.perf_counter()
                pid = k.spawn(lua=NOW_LOOP_LUA, args={"n": n, "port": port}, durable=durable)
                assert k.recv(port, timeout=600) is not None
                rates[durable] = n / (time.perf_counter() - start)
                k.kill(pid)
    finally:
        server.stop()
    return Row("journaled sys.now() calls, live", rates[True], "calls/s", "not durable", rates[False])


def restart(b: Bench) -> Row:
    n = 1000 if b.quick else 10_000
    empty = b.server("empty")
    start = time.perf_counter()
    empty.start()
    empty_s = time.perf_counter() - start
    empty.stop()
    server = b.server("restart")
    server.start()
    try:
        with llmos.Client(server.target) as k:
            for _ in range(n):
                k.spawn(lua=IDLE_LUA, durable=True)
            _wait_state(server, [pb.BLOCKED], n, 600)
        server.stop(signal.SIGKILL)
        start = time.perf_counter()
        server.start()
        with llmos.Client(server.target) as k:
            _wait_state(server, [pb.BLOCKED], n, 600)
        seconds = time.perf_counter() - start
    finally:
        server.stop(signal.SIGKILL)
    return Row(f"restart: {n:,} durable idle processes back", seconds, "s", "empty server's start", empty_s,
               "<= 10 s", seconds <= 10)


def replay(b: Bench) -> Row:
    n = 20_000 if b.quick else 100_000
    server = b.server("replay")
    server.start()
    try:
        with llmos.Client(server.target) as k:
            port = k.open_port()
            pid = k.spawn(lua=NOW_LOOP_LUA, args={"n": n, "port": port}, durable=True)
            assert k.recv(port, timeout=600) is not None
            _wait_state(server, [pb.BLOCKED], 1, 60)
        server.stop(signal.SIGKILL)
        start = time.perf_counter()
        server.start()
        with llmos.Client(server.target) as k:
            while k.get(pid).blocked_on != "recv":
                time.sleep(0.005)
        seconds = time.perf_counter() - start  # the whole restart: the server's own start is counted too
    finally:
        server.stop(signal.SIGKILL)
    entries = n + 1  # and its send
    rate = entries / seconds
    return Row(f"replay of {entries:,} journal entries (server start included)", rate, "entries/s", target=">= 50,000 entries/s",
               met=rate >= 50_000)


REDIS_MISSING = ("redis-server and the redis client are needed: apt-get install -y redis-server "
                 "&& pip install redis")


# -- Redis Streams, the peer of acknowledged delivery --------------------------------------------------
class RedisServer:
    """Debian's redis-server on a free loopback port, its AOF in `data_dir`, stopped on exit."""

    def __init__(self, data_dir: pathlib.Path) -> None:
        self.data_dir = data_dir
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def __enter__(self) -> "RedisServer":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.data_dir),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis  # noqa: PLC0415 (optional: only this row needs it)

        client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        client.close()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def redis_available() -> bool:
    return importlib.util.find_spec("redis") is not None and shutil.which("redis-server") is not None


def redis_streams_rate(port: int, n: int, body: str) -> float:
    """XADD, XREADGROUP (COUNT 1, a consumer group), XACK, one message at a time: messages per second."""
    import redis  # noqa: PLC0415

    r = redis.Redis(host="127.0.0.1", port=port)
    r.delete("bench")
    r.xgroup_create("bench", "workers", id="0", mkstream=True)
    warm = min(1000, n)
    for count in (warm, n):  # the first round warms up; the second is timed
        start = time.perf_counter()
        for _ in range(count):
            r.xadd("bench", {"body": body})
            (_, ((message_id, fields),)), = r.xreadgroup("workers", "c1", {"bench": ">"}, count=1)
            r.xack("bench", "workers", message_id)
        elapsed = time.perf_counter() - start
    assert not r.xpending("bench", "workers")["pending"], "a message left unacknowledged"
    r.close()
    return n / elapsed


def redis_streams_batched_rate(port: int, n: int, body: str, batch: int) -> float:
    """The same in batches of `batch`, as Redis clients batch: XADD of `batch` messages pipelined (one round
    trip), XREADGROUP COUNT `batch`, XACK of their `batch` ids: messages per second."""
    import redis  # noqa: PLC0415

    r = redis.Redis(host="127.0.0.1", port=port)
    r.delete("bench-batched")
    r.xgroup_create("bench-batched", "workers", id="0", mkstream=True)
    for count in (min(10 * batch, n), n):  # the first round warms up; the second is timed
        start = time.perf_counter()
        for _ in range(count // batch):
            pipe = r.pipeline(transaction=False)
            for _ in range(batch):
                pipe.xadd("bench-batched", {"body": body})
            pipe.execute()
            (_, entries), = r.xreadgroup("workers", "c1", {"bench-batched": ">"}, count=batch)
            assert len(entries) == batch, len(entries)
            r.xack("bench-batched", "workers", *[message_id for message_id, _ in entries])
        elapsed = time.perf_counter() - start
    assert not r.xpending("bench-batched", "workers")["pending"], "a message left unacknowledged"
    r.close()
    return n // batch * batch / elapsed


# -- llmos: acknowledged delivery -------------------------------------------------------------------------
ACK_LOOP_LUA = """
local me, body = sys.self(), args.body
local function loop(n)
  for _ = 1, n do
    sys.send(me, body)
    local m = sys.recv{ack = true}
    sys.ack(m)
  end
end
loop(args.warm)
local start = sys.now()
loop(args.n)
return sys.now() - start
"""


def lua_agent_rate(k: llmos.Client, n: int, body: str) -> float:
    """A durable Lua agent's send, recv{ack=true} and ack of its own messages: messages per second."""
    pid = k.spawn(lua=ACK_LOOP_LUA, args={"n": n, "warm": min(1000, n), "body": body}, durable=True)
    info = k.wait(pid, timeout=600)
    if info is None or not info.ok:
        raise RuntimeError(f"the Lua agent ended {info and info.state}: {info and info.error}")
    return n / max(info.result / 1000, 1e-9)


def client_rate(k: llmos.Client, n: int, body: str) -> float:
    """An SDK client's send, recv(ack=True) and ack on a port (stored), one at a time: messages per second."""
    port = k.open_port()
    warm = min(1000, n)
    for count in (warm, n):  # the first round warms up; the second is timed
        start = time.perf_counter()
        for _ in range(count):
            k.send(port, body)
            m = k.recv(port, ack=True, timeout=60)
            k.ack(port, m.id)
        elapsed = time.perf_counter() - start
    k.kill(port)
    return n / elapsed


def client_batched_rate(k: llmos.Client, n: int, body: str, batch: int) -> float:
    """An SDK client's send_batch, recv_many(ack=True) and ack_many of `batch` messages at a time on a port
    (all stored before SendBatch answers, leased, then deleted): messages per second."""
    port = k.open_port()
    for count in (min(10 * batch, n), n):  # the first round warms up; the second is timed
        start = time.perf_counter()
        for _ in range(count // batch):
            k.send_batch(port, [body] * batch)
            got = k.recv_many(port, batch, ack=True, timeout=60)
            assert len(got) == batch, len(got)
            not_leased = k.ack_many(port, got)
            assert not not_leased, not_leased
        elapsed = time.perf_counter() - start
    k.kill(port)
    return n // batch * batch / elapsed


def acknowledged_delivery(b: Bench) -> list[Row]:
    """Send, leased receive and ack of 100-byte messages, one at a time, against Redis Streams with the
    same durability: a durable Lua agent's mailbox and a port are stored before Send answers (SQLite WAL,
    synchronous=NORMAL); Redis runs with appendonly yes, appendfsync everysec. Target: >= 2x Redis."""
    n, body, batch = (2000 if b.quick else 20000), "x" * 100, b.ack_batch
    batched_n = 10 * n
    server = b.server("acks")
    server.start()
    try:
        with llmos.Client(server.target) as k:
            lua = lua_agent_rate(k, n, body)
            client = client_rate(k, max(n // 10, 100), body)
        # Pipelined XADDs carry no idempotency keys: neither do these batches (the SDK's retries make them).
        with llmos.Client(server.target, send_retry=None) as k:
            batched = client_batched_rate(k, batched_n, body, batch)
    finally:
        server.stop()
    peer = batched_peer = None
    if redis_available():
        with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp, RedisServer(pathlib.Path(tmp)) as redis:
            peer = redis_streams_rate(redis.port, max(n // 10, 100), body)
            batched_peer = redis_streams_batched_rate(redis.port, batched_n, body, batch)
    else:
        print(f"  Redis Streams row skipped: {REDIS_MISSING}", flush=True)
    peer_name = "Redis Streams (XADD, XREADGROUP, XACK)"
    batched_peer_name = f"Redis Streams (pipelined XADD x{batch}, XREADGROUP COUNT {batch}, XACK of {batch} ids)"
    return [Row("acked delivery, 100 B: a durable Lua agent", lua, "msg/s", peer_name, peer, ">= 2x Redis",
                None if peer is None else lua >= 2 * peer),
            Row("acked delivery, 100 B: an SDK client on a port (a gRPC call each)", client, "msg/s", peer_name,
                peer, ">= 2x Redis", None if peer is None else client >= 2 * peer),
            Row(f"acked delivery, 100 B: an SDK client on a port, batches of {batch} (SendBatch, Recv "
                "max_messages, Ack message_ids)", batched, "msg/s", batched_peer_name, batched_peer, ">= 2x Redis",
                None if batched_peer is None else batched >= 2 * batched_peer)]


ROWS: list[Callable[[Bench], Row | list[Row]]] = [ping_pong, journaled_calls, restart, replay, acknowledged_delivery]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--ack-batch", type=int, default=100,
                        help="messages per call in the batched acknowledged-delivery rows (1..1000; default 100)")
    parser.add_argument("--png", help="also draw the rows (ours against the peer) into this PNG (matplotlib)")
    parser.add_argument("--only", nargs="+", choices=[row.__name__ for row in ROWS], metavar="ROW",
                        help=f"run only these rows: {', '.join(row.__name__ for row in ROWS)}")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(args.quick, pathlib.Path(tmp), args.cpus, args.ack_batch)
        for row in ROWS:
            if args.only and row.__name__ not in args.only:
                continue
            made = row(bench)
            for r in made if isinstance(made, list) else [made]:
                rows.append(r)
                print(f"  {r.name}: {r.ours:,.1f} {r.unit}", flush=True)
    header = ("row", "ours", "peer", "ratio", "target", "met")
    table = [header] + [
        (r.name, f"{r.ours:,.1f} {r.unit}", f"{r.peer_name} {r.peer:,.1f}" if r.peer is not None else "", r.ratio(),
         r.target, "" if r.met is None else "yes" if r.met else "NO")
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    if args.png:
        draw(rows, args.png)


def draw(rows: list[Row], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG")
        return
    fig, axes = plt.subplots(1, len(rows), figsize=(4 * len(rows), 3.5))
    for ax, r in zip(axes if len(rows) > 1 else [axes], rows):
        labels, values = ["ours"], [r.ours]
        if r.peer is not None:
            labels.append(r.peer_name)
            values.append(r.peer)
        ax.bar(labels, values)
        ax.set_title(r.name, fontsize=8)
        ax.set_ylabel(r.unit)
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
