"""The server under test, calls made by method descriptor, and the invariants
checked after every example.

Invariants (issue 12, section 7):
- every call is answered with a documented status (never UNKNOWN or INTERNAL),
  an error with a message of at most 2 KiB (DECISIONS.md);
- health stays SERVING, timers still fire, Lua processes still run;
- whatever the kernel stored can be read back: GetProcess, Wait, ReadLog of every
  pid an example touched, ListProcesses(include_ended), a new Events stream;
- Kill ends a process; with no process left, the server's CPU returns near 0 and
  its RSS within a bound of where it started;
- the server logs no kernel error (a traceback) while it is fuzzed.

A violation raises an exception whose type is made per kind of failure (its
signature), so that Hypothesis shrinks and reports each kind on its own. When the
server itself was hurt (a probe failed, a process would not die, CPU or memory did
not come back), it is restarted on a fresh data directory before the next example:
a poisoned record would otherwise fail every later one.
"""
from __future__ import annotations

import contextlib
import pathlib
import re
import shutil
import signal
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import grpc
import psutil
from google.protobuf import descriptor, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmos.client import CHANNEL_OPTIONS
from llmos.v1 import kernel_pb2 as pb
from llmos.values import from_value, to_value
from llmosd_process import LlmosdServer

ROOT = pathlib.Path(__file__).resolve().parents[2]
SERVICE = pb.DESCRIPTOR.services_by_name["Kernel"]
METHODS: dict[str, descriptor.MethodDescriptor] = {m.name: m for m in SERVICE.methods}
OK = grpc.StatusCode.OK

# What the kernel may answer (README, DECISIONS.md). CANCELLED and DEADLINE_EXCEEDED
# are also what the client sees when it gives up itself; UNIMPLEMENTED only from a
# server without an engine or agents (the fuzzed server has both).
DOCUMENTED = frozenset({
    grpc.StatusCode.OK, grpc.StatusCode.CANCELLED, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DEADLINE_EXCEEDED,
})
MAX_STATUS_BYTES = 2048  # DECISIONS.md: status messages are truncated to 2 KiB
ANSWER_S = 10.0          # a call that cannot block must be answered within this
PROBE_S = 5.0            # a probe (a timer firing, a Lua process running) within this
KILL_S = 5.0             # a killed process must have ended within this
IDLE_CPU_PERCENT = 15.0  # of one core, over a quiet window, with no process left
IDLE_WAIT_S = 8.0        # how long CPU may take to go quiet once every process is gone
RSS_SLACK_BYTES = 256 << 20  # RSS above its start after an example's processes are gone
SERVER_FLAGS = (
    "--cpus", "2", "--mailbox", "200", "--kv-memory", str(32 << 20), "--max-batch", "8", "--log-level", "WARNING",
)
KERNEL_ERROR = re.compile(r"Traceback \(most recent call last\)| ERROR ")
# A Python exception's text leaking into an answer: the kernel did not classify it.
LEAKED_EXCEPTION = re.compile(
    r"Traceback|<class '|\b(?:Overflow|Type|Attribute|Key|Index|Value|Unicode\w*|Recursion|Memory|Runtime|"
    r"Assertion|System|Lookup|Name|ZeroDivision)Error\b|object has no attribute|NoneType",
)


# -- violations ------------------------------------------------------------------------------
class Violation(AssertionError):
    """An invariant does not hold. Subclassed per signature (see violation())."""

    signature = "violation"


_violation_types: dict[str, type[Violation]] = {}
# Kinds of violation already reported, which tools/fuzz.py passes over to find new ones.
TOLERATED: set[str] = set()


def violation(signature: str, message: str) -> Violation:
    """A Violation of the type made for `signature` ("Recv:UNKNOWN", "probe:timers", ...)."""
    cls = _violation_types.get(signature)
    if cls is None:
        name = "Violation_" + re.sub(r"\W+", "_", signature)
        cls = type(name, (Violation,), {"signature": signature})
        _violation_types[signature] = cls
    return cls(f"[{signature}] {message}")


def fail(signature: str, message: str) -> None:
    """Raise the violation, unless its kind is tolerated (then count it and go on)."""
    if signature in TOLERATED:
        STATS.tolerated[signature] += 1
        return
    STATS.violations[signature] += 1
    raise violation(signature, message)


def short(text: Any, limit: int = 300) -> str:
    s = text if isinstance(text, str) else repr(text)
    return s if len(s) <= limit else f"{s[:limit]}... ({len(s)} chars)"


# -- what was tried ------------------------------------------------------------------------
@dataclass
class Stats:
    """What the fuzzer tried, for tools/fuzz.py's table and the coverage checks."""

    rpc: Counter = field(default_factory=Counter)      # (method, status name)
    wire: Counter = field(default_factory=Counter)     # (method, status name) of mutated wire bytes
    agent: Counter = field(default_factory=Counter)    # (method, status name) from inside a Python agent
    lua: Counter = field(default_factory=Counter)      # (sys function, "ok" / "error")
    contexts: Counter = field(default_factory=Counter)  # Lua contexts a syscall was made in
    examples: Counter = field(default_factory=Counter)  # per target
    violations: Counter = field(default_factory=Counter)  # per signature
    tolerated: Counter = field(default_factory=Counter)   # violations of kinds already reported
    restarts: int = 0
    restart_seconds: float = 0.0


STATS = Stats()


# -- calls ------------------------------------------------------------------------------------
@dataclass
class Outcome:
    method: str
    code: grpc.StatusCode
    details: str
    response: Any = None             # a unary answer
    items: list = field(default_factory=list)  # a stream's answers
    elapsed: float = 0.0
    deadline: float = 0.0
    client_gave_up: bool = False     # we cancelled a stream, or our deadline passed

    @property
    def ok(self) -> bool:
        return self.code == OK


def may_block(method: descriptor.MethodDescriptor) -> bool:
    """A call that may wait: it has a timeout, or streams answers."""
    return method.server_streaming or "timeout_ms" in method.input_type.fields_by_name


def _bytes_in(x: bytes) -> bytes:
    return x


class Rpc:
    """Every method of the service, callable by name, with typed or raw messages."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.typed: dict[str, Any] = {}
        self.raw: dict[str, Any] = {}
        for m in SERVICE.methods:
            path = f"/{SERVICE.full_name}/{m.name}"
            request = message_factory.GetMessageClass(m.input_type)
            response = message_factory.GetMessageClass(m.output_type)
            kind = ("stream_" if m.client_streaming else "unary_") + ("stream" if m.server_streaming else "unary")
            make = getattr(channel, kind)
            self.typed[m.name] = make(path, request_serializer=request.SerializeToString,
                                      response_deserializer=response.FromString)
            self.raw[m.name] = make(path, request_serializer=_bytes_in, response_deserializer=_bytes_in)

    def call(self, method: str, request: Any, deadline: float = ANSWER_S, max_items: int = 10_000,
             raw: bool = False) -> Outcome:
        """Make one call; `request` is a message, or a list of them for a client stream
        (bytes instead with `raw`). A server stream is read up to `max_items`, then cancelled."""
        m = METHODS[method]
        fn = (self.raw if raw else self.typed)[method]
        out = Outcome(method, OK, "", deadline=deadline)
        start = time.monotonic()
        try:
            if m.client_streaming:
                out.response = fn(iter(request), timeout=deadline)
            elif m.server_streaming:
                stream = fn(request, timeout=deadline)
                try:
                    for item in stream:
                        out.items.append(item)
                        if len(out.items) >= max_items:
                            out.client_gave_up = True
                            stream.cancel()
                            break
                finally:
                    if not out.client_gave_up and stream.code() is None:
                        stream.cancel()
                if out.client_gave_up:
                    out.code = grpc.StatusCode.CANCELLED
            else:
                out.response = fn(request, timeout=deadline)
        except grpc.RpcError as e:
            out.code, out.details = e.code(), e.details() or ""
        out.elapsed = time.monotonic() - start
        if out.code == grpc.StatusCode.DEADLINE_EXCEEDED and out.elapsed >= deadline * 0.95:
            out.client_gave_up = True
        return out


def check_outcome(out: Outcome, blocking: bool, where: str = "rpc", reproducer: Callable[[], str] = lambda: "") -> None:
    """The status is documented, its message says something and fits in 2 KiB, and a
    call that cannot block was answered in time."""
    found = _outcome_problem(out, blocking, where)
    if found:
        fail(found[0], f"{found[1]}. {reproducer()}")


def _outcome_problem(out: Outcome, blocking: bool, where: str) -> tuple[str, str] | None:
    code, details, method = out.code, out.details, out.method
    if code == OK:
        return None
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and out.client_gave_up and not blocking:
        return f"{method}:no answer", f"{method} was not answered within {out.deadline:.0f} s"
    if code == grpc.StatusCode.CANCELLED and not out.client_gave_up:
        return f"{method}:CANCELLED", f"the server cancelled {method}: {short(details)}"
    if code not in DOCUMENTED:
        leaked = re.search(r"<class '(?:[\w.]+\.)?(\w+)'>", details)  # grpc's "Unexpected <class 'X'>: ..."
        kind = f"{code.name}:{leaked.group(1)}" if leaked else f"{method}:{code.name}"
        return kind, f"{where} {method} answered {code.name}: {short(details)}"
    if out.client_gave_up:
        return None
    if not details.strip():
        return f"{method}:{code.name}:no message", f"{method} answered {code.name} with no message"
    if len(details.encode()) > MAX_STATUS_BYTES:
        return f"{method}:long message", f"{method}'s {code.name} message is {len(details.encode())} bytes (> 2 KiB)"
    if LEAKED_EXCEPTION.search(details):
        return (f"{method}:{code.name}:leaked exception",
                f"{method} answered {code.name} with a Python exception's text: {short(details)}")
    return None


# -- the server ---------------------------------------------------------------------------
class FuzzServer:
    """An llmosd with the tiny model and Python agents, restarted on a fresh data
    directory whenever an invariant broke."""

    def __init__(self, workdir: pathlib.Path | None = None, extra: tuple[str, ...] = ()) -> None:
        self.own_workdir = workdir is None
        self.workdir = pathlib.Path(workdir or tempfile.mkdtemp(prefix="llmos-fuzz-"))
        self.extra = SERVER_FLAGS + tuple(extra)
        self.server: LlmosdServer | None = None
        self.channel: grpc.Channel | None = None
        self.rpc: Rpc | None = None
        self.health: Any = None
        self.generation = 0
        self.dirty = False
        self.probe_port = 0
        self.baseline_rss = 0
        self.log_offset = 0
        self.harness_pids: set[int] = set()  # ports the harness keeps (probe, collectors)

    # lifecycle
    def start(self) -> None:
        self.generation += 1
        data = self.workdir / f"gen{self.generation}" / "data"
        data.parent.mkdir(parents=True, exist_ok=True)
        self.server = LlmosdServer(data, *self.extra, userland_root=ROOT / "userland")
        self.server.start()
        # as the SDK's clients do: a reply may exceed gRPC's default 4 MiB (see fuzz-findings)
        self.channel = grpc.insecure_channel(self.server.target, options=CHANNEL_OPTIONS)
        self.rpc = Rpc(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + 60  # health is NOT_SERVING until the model has loaded
        while (self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=PROBE_S).status
               != health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline):
            time.sleep(0.05)
        self.log_offset = 0
        self.harness_pids = set()
        self.probe_port = self.open_port()
        self.dirty = False
        self.check_server([])
        self.wait_idle(record=False)
        self.baseline_rss = self.rss()

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.server is not None:
            self.server.stop(signal.SIGKILL)
        self.server = self.channel = self.rpc = None

    def close(self) -> None:
        self.stop()
        if self.own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def ensure(self) -> None:
        """Started, and restarted afresh if the last example broke something."""
        if self.server is None:
            self.start()
        elif self.dirty or self.server.proc is None or self.server.proc.poll() is not None:
            started = time.monotonic()
            STATS.restarts += 1
            self.stop()
            self.start()
            STATS.restart_seconds += time.monotonic() - started

    @property
    def pid(self) -> int:
        assert self.server is not None
        return self.server.pid

    # helpers the targets use
    def call(self, method: str, request: Any, deadline: float = ANSWER_S, **kw: Any) -> Outcome:
        assert self.rpc is not None
        return self.rpc.call(method, request, deadline, **kw)

    def must(self, method: str, request: Any, deadline: float = ANSWER_S) -> Any:
        """A call of the harness's own that must succeed."""
        out = self.call(method, request, deadline)
        check_outcome(out, blocking=False, where="harness")
        if not out.ok:
            raise violation(f"harness:{method}:{out.code.name}",
                            f"the harness's own {method}({short(str(request), 200)}) failed: {out.code.name} "
                            f"{short(out.details)}")
        return out.response

    def open_port(self, name: str = "", mailbox: int = 0) -> int:
        pid = self.must("OpenPort", pb.OpenPortRequest(name=name, mailbox=mailbox)).pid
        self.harness_pids.add(pid)
        return pid

    def spawn_lua(self, source: str, args: Any = None, **fields: Any) -> int:
        req = pb.SpawnRequest(lua=source, **fields)
        if args is not None:
            req.args.CopyFrom(to_value(args))
        return self.must("Spawn", req).pid

    def drain(self, port: int, **match: Any) -> list[pb.Message]:
        """Every message waiting at a port (that match), oldest first."""
        got = []
        while True:
            out = self.call("Recv", pb.RecvRequest(pid=port, timeout_ms=0, **match))
            check_outcome(out, blocking=False, where=f"Recv(timeout_ms=0) of what port {port} holds:")
            if not out.ok:
                fail(f"Recv:{out.code.name}", f"Recv(timeout_ms=0) of what port {port} holds answered "
                     f"{out.code.name} {short(out.details)}")
                return got
            if out.response.timed_out:
                return got
            got.append(out.response.message)

    # invariants
    def broken(self, signature: str, message: str) -> None:
        """The server itself is hurt: it is restarted before the next example."""
        self.dirty = True
        fail(signature, message)

    def check_server(self, pids: Iterable[int]) -> None:
        """Health, timers, a Lua process, the read-back of every pid given, a clean log."""
        for service in ("", SERVICE.full_name):
            try:
                status = self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=PROBE_S).status
            except grpc.RpcError as e:
                self.broken("probe:health", f"Health.Check({service!r}) failed: {e.code().name} {e.details()}")
                continue
            if status != health_pb2.HealthCheckResponse.SERVING:
                self.broken("probe:health", f"health of {service!r} is "
                            f"{health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")
        alive = self.call("GetProcess", pb.GetProcessRequest(pid=self.probe_port))
        if not alive.ok or alive.response.state in (pb.EXITED, pb.KILLED, pb.CRASHED):
            self.probe_port = self.open_port()  # a hostile call ended it: that is allowed
        out = self.call("Recv", pb.RecvRequest(pid=self.probe_port, timeout_ms=20, tag="never"), deadline=PROBE_S)
        if not out.ok or not out.response.timed_out:
            self.broken("probe:timers", f"Recv(timeout_ms=20) on a port answered {out.code.name} "
                        f"{short(out.details)} after {out.elapsed:.1f} s: timers no longer fire")
        pid = self.spawn_lua("sys.sleep(1) return 7")
        out = self.call("Wait", pb.WaitRequest(pid=pid, timeout_ms=int(PROBE_S * 1000)), deadline=PROBE_S + 2)
        if not out.ok or out.response.timed_out or out.response.process.state != pb.EXITED:
            state = pb.ProcessState.Name(out.response.process.state) if out.ok else out.code.name
            self.broken("probe:lua", f"a Lua process that sleeps 1 ms did not end within {PROBE_S:.0f} s "
                        f"({state}, {short(out.details)}): the scheduler or its timers are stuck")
        self.read_back(pids)
        events = self.call("Events", pb.EventsRequest(), deadline=PROBE_S, max_items=1)
        if not events.items or events.items[0].kind != "subscribed":
            self.broken("probe:Events", f"a new Events stream answered {events.code.name} {short(events.details)}")
        self.check_log()

    def read_back(self, pids: Iterable[int]) -> None:
        """Whatever is stored can be returned (DECISIONS.md)."""
        out = self.call("ListProcesses", pb.ListProcessesRequest(include_ended=True))
        if not out.ok:
            self.broken("readback:ListProcesses", f"ListProcesses(include_ended=true) answered {out.code.name} "
                        f"{short(out.details)}")
        for pid in sorted(set(pids)):
            for method, req in (("GetProcess", pb.GetProcessRequest(pid=pid)),
                                ("Wait", pb.WaitRequest(pid=pid, timeout_ms=0)),
                                ("ReadLog", pb.ReadLogRequest(pid=pid))):
                out = self.call(method, req)
                if not out.ok:
                    self.broken(f"readback:{method}", f"{method}(pid={pid}) of a process that exists answered "
                                f"{out.code.name} {short(out.details)}")

    def check_log(self) -> None:
        assert self.server is not None
        with open(self.server.log_path, "rb") as f:
            f.seek(self.log_offset)
            raw = f.read()
        self.log_offset += len(raw)
        text = raw.decode(errors="replace")
        found = KERNEL_ERROR.search(text)
        if found:
            start = text.rfind("\n", 0, found.start()) + 1
            error = re.search(r"^(\w+(?:Error|Exception))\b", text[start:], re.MULTILINE)
            kind = error.group(1) if error else "kernel error"
            fail(f"log:{kind}", f"the server logged: {short(text[start:], 1500)}")

    def live_pids(self, known: Iterable[int]) -> set[int]:
        out = self.call("ListProcesses", pb.ListProcessesRequest())
        live = {p.pid for p in out.response.processes} if out.ok else set(known)
        return live - self.harness_pids

    def end_processes(self, known: Iterable[int] = ()) -> None:
        """Kill every process but the harness's own ports; each must end."""
        live = self.live_pids(known)
        for pid in live:
            self.call("Kill", pb.KillRequest(pid=pid, reason="fuzz cleanup"))
        for pid in live:
            out = self.call("Wait", pb.WaitRequest(pid=pid, timeout_ms=int(KILL_S * 1000)), deadline=KILL_S + 2)
            if out.ok and out.response.timed_out:
                info = self.call("GetProcess", pb.GetProcessRequest(pid=pid))
                state = pb.ProcessState.Name(info.response.state) if info.ok else info.code.name
                self.broken("kill:no effect", f"pid {pid} was killed and is still {state} after {KILL_S:.0f} s")

    def cpu_seconds(self) -> float:
        proc = psutil.Process(self.pid)
        total = sum(proc.cpu_times()[:2])
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += sum(child.cpu_times()[:2])
        return total

    def rss(self) -> int:
        return psutil.Process(self.pid).memory_info().rss

    def wait_idle(self, record: bool = True) -> float:
        """Wait for a quiet window of the server's CPU; its lowest figure (% of a core)."""
        deadline = time.monotonic() + IDLE_WAIT_S
        lowest = 1e9
        while True:
            before, t0 = self.cpu_seconds(), time.monotonic()
            time.sleep(0.2)
            percent = 100 * (self.cpu_seconds() - before) / (time.monotonic() - t0)
            lowest = min(lowest, percent)
            if percent <= IDLE_CPU_PERCENT or time.monotonic() > deadline:
                break
        if record and lowest > IDLE_CPU_PERCENT:
            self.broken("cpu:not idle", f"with no process left the server still uses {lowest:.0f}% of a core "
                        f"after {IDLE_WAIT_S:.0f} s")
        return lowest

    def check_rss(self, slack: int = RSS_SLACK_BYTES) -> None:
        grown = self.rss() - self.baseline_rss
        if grown > slack:
            self.broken("rss:grown", f"with no process left the server's RSS is {grown >> 20} MiB above its "
                        f"start (bound {slack >> 20} MiB)")

    @contextlib.contextmanager
    def example(self, target: str) -> Iterator[Example]:
        """One example: a clean, checked server before; after, every process ended,
        the server probed and quiet (also after a violation, to learn whether the
        server was hurt and must be restarted)."""
        self.ensure()
        STATS.examples[target] += 1
        ex = Example(self)
        try:
            yield ex
        except Violation:
            try:  # a wrong answer need not have hurt the server: restart only if it did
                self.after_example(ex)
            except Violation:
                self.dirty = True
            raise
        except BaseException:
            self.dirty = True
            raise
        self.after_example(ex)

    def after_example(self, ex: Example) -> None:
        self.end_processes(ex.pids)
        self.check_server(ex.pids)
        self.wait_idle()
        self.check_rss()


class Example:
    """What one example made: the pids whose records must read back."""

    def __init__(self, server: FuzzServer) -> None:
        self.server = server
        self.pids: set[int] = set()

    def spawned(self, pid: int) -> int:
        self.pids.add(pid)
        return pid


def result_of(info: pb.ProcessInfo) -> Any:
    return from_value(info.result) if info.HasField("result") else None

