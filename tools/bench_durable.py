"""Reliability benchmarks (issue 15), side by side with their peers, in one run.

    python tools/bench_durable.py            # about a minute on 2 cores
    python tools/bench_durable.py --quick    # smaller counts, for a smoke test

The table is printed, and drawn in bench-out/bench_durable.png when matplotlib is installed.

Each row is a function in ROWS: it gets a running llmosd (and the options) and returns Rows: a figure
of llmos's, and beside it its peer's figure and the ratio. A row whose peer is missing says how to get
it and is skipped, not failed.

Acknowledged delivery (send, leased receive, ack), against Redis Streams (XADD, XREADGROUP, XACK):
- the same message size (the body: --message-bytes of text, 100 by default), one message at a time (one
  round of send, receive and ack before the next, for both), one producer-consumer;
- the same durability: Redis with appendonly yes and appendfsync everysec (every command written to the
  AOF before it is answered, fsynced each second), llmos ports (every message written to SQLite's WAL,
  synchronous=NORMAL, before Send answers; fsynced at checkpoints): both keep every acknowledged
  write across a kill -9 of the server, and both may lose the last second or so to a crash of the
  machine. Lua agents' mailboxes are stored only when spawned durable (the `durable` spawn option, if
  this server has it); the row says which it measured;
- Redis is Debian's redis-server, started and stopped here on a loopback port of its own, with the
  `redis` client from PyPI; llmos is reached over loopback gRPC (the SDK) or runs the loop in a Lua agent.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Callable

import llmos

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))  # the tests' server launcher
from llmosd_process import LlmosdServer  # noqa: E402

REDIS_MISSING = ("redis-server and the redis client are needed: apt-get install -y redis-server "
                 "&& pip install redis")


@dataclasses.dataclass(frozen=True)
class Row:
    figure: str
    llmos: float  # per second
    unit: str
    peer: str = ""  # what it is compared with ("" none)
    peer_rate: float | None = None  # None: not measured (see note)
    target: float | None = None  # the ratio llmos / peer the issue asks for
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return self.llmos / self.peer_rate if self.peer_rate else None


@dataclasses.dataclass(frozen=True)
class Options:
    quick: bool
    messages: int
    message_bytes: int


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


def lua_agent_rate(k: llmos.Client, n: int, body: str) -> tuple[float, str]:
    """A Lua agent's send, recv{ack=true} and ack of its own messages: (messages per second, its mailbox)."""
    durable = "durable" in inspect.signature(k.spawn).parameters  # durable mailboxes, where the server has them
    pid = k.spawn(lua=ACK_LOOP_LUA, args={"n": n, "warm": min(1000, n), "body": body},
                  **({"durable": True} if durable else {}))
    info = k.wait(pid, timeout=600)
    if info is None or not info.ok:
        raise RuntimeError(f"the Lua agent ended {info and info.state}: {info and info.error}")
    return n / max(info.result / 1000, 1e-9), ("its mailbox stored (spawned durable)" if durable else
                                              "its mailbox in memory: this server has no durable spawn yet")


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


def row_acknowledged_delivery(server: LlmosdServer, opts: Options) -> list[Row]:
    body = "x" * opts.message_bytes
    with llmos.connect(server.target, rpc_timeout=None) as k:
        lua, mailbox = lua_agent_rate(k, opts.messages, body)
        client = client_rate(k, max(opts.messages // 10, 100), body)
    what = f"acked delivery, {opts.message_bytes} B (send, leased recv, ack)"
    peer_name, peer, note = "Redis Streams (XADD, XREADGROUP, XACK)", None, REDIS_MISSING
    if redis_available():
        with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp, RedisServer(pathlib.Path(tmp)) as redis:
            peer = redis_streams_rate(redis.port, max(opts.messages // 10, 100), body)
        note = "redis-py over loopback TCP, appendonly yes, appendfsync everysec"
    return [Row(f"{what}: a Lua agent", lua, "msg/s", peer_name, peer, 2.0, f"{note}; the agent: {mailbox}"),
            Row(f"{what}: an SDK client, a port", client, "msg/s", peer_name, peer, 2.0,
                f"{note}; the port's messages are stored (SQLite WAL); each call a gRPC round trip")]


# Each row function gets the server and the options, and returns its rows. More rows (durable processes,
# restarts, replay) go here.
ROWS: list[Callable[[LlmosdServer, Options], list[Row]]] = [row_acknowledged_delivery]


def print_table(rows: list[Row]) -> None:
    table = [("figure", "llmos", "peer", "peer's", "ratio", "target")]
    for r in rows:
        table.append((r.figure, f"{r.llmos:,.0f} {r.unit}", r.peer or "-",
                      f"{r.peer_rate:,.0f} {r.unit}" if r.peer_rate else "-",
                      f"{r.ratio:.2f}x" if r.ratio is not None else "-",
                      f">= {r.target:g}x" if r.target else "-"))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
    for r in rows:
        if r.note:
            print(f"note ({r.figure}): {r.note}")


def save_png(rows: list[Row], path: pathlib.Path) -> None:
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("no PNG: pip install matplotlib")
        return
    compared = [r for r in rows if r.peer_rate]
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.9 * max(len(compared), 1)))
    y = range(len(compared))
    ax.barh([i + 0.2 for i in y], [r.llmos for r in compared], height=0.4, label="llmos")
    ax.barh([i - 0.2 for i in y], [r.peer_rate for r in compared], height=0.4, label="peer")
    ax.set_yticks(list(y), [textwrap.fill(f"{r.figure} (vs {r.peer})", 50) for r in compared], fontsize=8)
    for i, r in zip(y, compared):
        ax.annotate(f"{r.ratio:.2f}x", (r.llmos, i + 0.2), xytext=(4, -3), textcoords="offset points", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("per second (log scale)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller counts, for a smoke test")
    parser.add_argument("--messages", type=int, default=50_000, help="messages of the Lua agent's loop")
    parser.add_argument("--message-bytes", type=int, default=100)
    parser.add_argument("--png", metavar="PATH", default="bench-out/bench_durable.png",
                        help="where to draw the compared rows (default %(default)s)")
    a = parser.parse_args()
    opts = Options(a.quick, 5_000 if a.quick else a.messages, a.message_bytes)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-durable-") as tmp:
        server = LlmosdServer(pathlib.Path(tmp) / "data", "--model", "none")
        server.start()
        try:
            for row in ROWS:
                rows += row(server, opts)
        finally:
            server.stop()
    print_table(rows)
    save_png(rows, pathlib.Path(a.png))


if __name__ == "__main__":
    main()
