"""Random sequences of calls against a model of what must exist.

The model holds ports (their mailbox limit, name, the messages sent to them and
not yet received, in order), Lua relays (each forwards whatever it receives to
a sink port of its own: a message crosses gRPC -> Lua -> gRPC), registered
names, a directory of files and a few locks. Rules make the calls the model
understands and check the answer against it; one rule makes a hostile call of
any RPC (requests.py) naming the model's processes, and the model learns from
what it did. At the end of a sequence, every message the model still expects
must be received, exactly once and in order (no message is lost), then the
server is checked as after any example (harness.FuzzServer.after_example).
"""
from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle, RuleBasedStateMachine, consumes, initialize, multiple, precondition, rule, run_state_machine_as_test,
)

from llmos.v1 import kernel_pb2 as pb
from llmos.values import from_value

from . import requests as rq
from .harness import METHODS, OK, STATS, Example, FuzzServer, Violation, check_outcome, fail, short, violation
from .values import (
    MAX_DEPTH, MAX_MESSAGE_BYTES, Fate, JsonPlan, all_finite, depth_of, hostile_text, json_plans, name_is_valid,
    printable_name, same_json,
)

C = grpc.StatusCode
DEFAULT_MAILBOX = 200  # harness.SERVER_FLAGS --mailbox
RELAY = """
while true do
  local m = sys.recv{}
  local ok, err = pcall(sys.send, args, m.body, {tag = m.tag, correlation_id = m.correlation_id, data = m.data})
  if not ok then sys.send(args, tostring(err), {tag = 'relay-error'}) end
end
"""
_sequences = itertools.count(1)


def _one_component(name: str) -> bool:
    """A name the model's flat directory can hold as one entry."""
    return "/" not in name and name not in (".", "..") and "\0" not in name


@dataclass
class Expected:
    """A message Send accepted, not yet received."""

    id: int
    sender: int
    tag: str
    correlation_id: str
    body: Any
    data: bytes
    required: bool = True  # False: it may have gone (a hostile Recv gave up while it waited)
    doubtful: bool = False  # accepted though the model says it should not have been: anything may follow

    def matches(self, sender: int | None, tag: str | None, correlation_id: str | None) -> bool:
        return ((sender is None or self.sender == sender) and (tag is None or self.tag == tag)
                and (correlation_id is None or self.correlation_id == correlation_id))


@dataclass
class Port:
    pid: int
    limit: int
    name: str = ""
    queue: list[Expected] = field(default_factory=list)
    notices: int = 0        # EXIT notices that may be waiting (monitors asked for)
    ended: bool = False

    def bytes_waiting(self) -> int:
        return sum(len(e.data) for e in self.queue)


def _send_request(frm: int, to: int, plan: JsonPlan, tag: str, cid: str, data: bytes) -> pb.SendRequest:
    req = pb.SendRequest(to=to, tag=tag, correlation_id=cid, data=data)
    req.body.CopyFrom(plan.value())
    setattr(req, "from", frm)
    return req


class KernelModel(RuleBasedStateMachine):
    server: FuzzServer  # set by run_machine

    ports = Bundle("ports")
    files = Bundle("files")

    def __init__(self) -> None:
        super().__init__()
        self.srv = type(self).server
        self.srv.ensure()
        STATS.examples["machine"] += 1
        self.ex = Example(self.srv)
        self.seq = next(_sequences)
        self.model: dict[int, Port] = {}
        self.relays: dict[int, int] = {}           # relay pid -> its sink port
        self.sink_queue: dict[int, list[Expected]] = {}  # relay pid -> what its sink must get, in order
        self.relay_ended: set[int] = set()
        self.names: dict[str, int] = {}            # names the model knows were registered
        self.dir = f"fz-m{self.seq}"
        self.stored: dict[str, bytes] = {}         # file path -> contents
        self.holders: dict[str, int] = {}          # lock name -> holding port
        self.lock_names = [f"fz-m{self.seq}-lock{i}" for i in range(3)]

    # -- helpers ----------------------------------------------------------------------------
    def call(self, method: str, request: Any, deadline: float = 10.0, blocking: bool = False) -> Any:
        out = self.srv.call(method, request, deadline)
        STATS.rpc[(method, out.code.name)] += 1
        check_outcome(out, blocking, "machine", lambda: f"Reproducer: {method}({short(str(request), 300)})")
        return out

    def expect(self, rule: str, out: Any, allowed: set[grpc.StatusCode], why: str) -> bool:
        """Whether the answer is one the model allows (if not, a violation)."""
        if out.code not in allowed:
            names = "/".join(sorted(c.name for c in allowed))
            fail(f"model:{rule}:{out.code.name}", f"{rule} answered {out.code.name} "
                 f"{short(out.details)}; the model expects {names} ({why})")
            return False
        return True

    def named(self, name: str, pid: int) -> None:
        """A process has one registered name: a new one replaces the old."""
        self.names = {n: p for n, p in self.names.items() if p != pid}
        self.names[name] = pid

    def live_port(self, pid: int) -> Port | None:
        port = self.model.get(pid)
        return port if port is not None and not port.ended else None

    def end_port(self, port: Port) -> None:
        """The port has ended: its messages go with it, its name and locks are free."""
        port.ended = True
        port.queue.clear()
        self.names = {n: p for n, p in self.names.items() if p != port.pid}
        self.holders = {n: p for n, p in self.holders.items() if p != port.pid}

    def refresh(self, pids: set[int]) -> None:
        """After a hostile call: learn which of the model's processes it ended."""
        for pid in pids:
            if pid in self.model and not self.model[pid].ended or pid in self.relays and pid not in self.relay_ended:
                out = self.srv.call("GetProcess", pb.GetProcessRequest(pid=pid))
                if out.ok and out.response.state in (pb.EXITED, pb.KILLED, pb.CRASHED):
                    if pid in self.model:
                        self.end_port(self.model[pid])
                    else:
                        self.relay_ended.add(pid)
                        for e in self.sink_queue[pid]:
                            e.required = False  # it may have taken them and died before forwarding

    def take(self, port: Port, msg: pb.Message, sender: int | None, tag: str | None, cid: str | None,
             rule: str) -> None:
        """A Recv with this filter gave `msg`: it must be the oldest matching message."""
        for i, e in enumerate(port.queue):
            if e.id == msg.id:
                older = [o for o in port.queue[:i] if o.matches(sender, tag, cid) and o.required]
                if older:
                    return fail("model:order", f"{rule} on {port.pid} gave message {msg.id} while {older[0].id} "
                                f"(sent earlier, matching too) waits")
                self._same(e, msg, port.pid, rule)
                port.queue = [o for o in port.queue[:i] if not o.matches(sender, tag, cid)] + port.queue[i + 1:]
                return
        if msg.tag == "EXIT" and port.notices > 0:
            port.notices -= 1
            return
        return fail("model:unknown message", f"{rule} on {port.pid} gave message {msg.id} "
                    f"(from {getattr(msg, 'from')}, tag {msg.tag!r}) that the model never saw sent, "
                    f"or already received")

    def _same(self, e: Expected, msg: pb.Message, to: int, rule: str) -> None:
        got = (getattr(msg, "from"), msg.tag, msg.correlation_id, bytes(msg.data))
        want = (e.sender, e.tag, e.correlation_id, e.data)
        if e.doubtful:
            return
        if got != want or not same_json(from_value(msg.body), e.body):
            return fail("model:changed", f"{rule}: message {msg.id} to {to} came back as "
                        f"{short((got, from_value(msg.body)))}, sent as {short((want, e.body))}")

    # -- ports and relays ---------------------------------------------------------------------
    @initialize(target=ports)
    def first_ports(self) -> Any:
        pids = [self.srv.must("OpenPort", pb.OpenPortRequest()).pid for _ in range(2)]
        for pid in pids:
            self.ex.spawned(pid)
            self.model[pid] = Port(pid, DEFAULT_MAILBOX)
        sink = self.srv.must("OpenPort", pb.OpenPortRequest(mailbox=10_000)).pid
        relay = self.srv.spawn_lua(RELAY, args=sink)
        self.ex.spawned(sink), self.ex.spawned(relay)
        self.relays[relay] = sink
        self.sink_queue[relay] = []
        return multiple(*pids)

    @rule(target=ports, name=st.one_of(st.none(), printable_name(), hostile_text(12)),
          mailbox=st.sampled_from([0, 1, 3]))
    def open_port(self, name: str | None, mailbox: int) -> Any:
        out = self.call("OpenPort", pb.OpenPortRequest(name=name or "", mailbox=mailbox))
        if name and not name_is_valid(name):
            self.expect("OpenPort", out, {C.INVALID_ARGUMENT}, f"the name {name!r} is not printable")
        elif name and name in self.names:
            self.expect("OpenPort", out, {C.ALREADY_EXISTS}, f"{name!r} is {self.names[name]}'s")
        else:
            self.expect("OpenPort", out, {OK, C.ALREADY_EXISTS} if name else {OK}, "a new port")
        if not out.ok:
            return multiple()
        pid = self.ex.spawned(out.response.pid)
        self.model[pid] = Port(pid, mailbox or DEFAULT_MAILBOX, name or "")
        if name:
            self.names[name] = pid
        return pid

    @rule(frm=ports, to=ports, plan=json_plans(sized=False), tag=st.sampled_from(["", "a", "b", "EXIT"]),
          cid=st.sampled_from(["", "c1", "c2"]), data=st.binary(max_size=8))
    def send(self, frm: int, to: int, plan: JsonPlan, tag: str, cid: str, data: bytes) -> None:
        self._send(frm, to, plan, tag, cid, data)

    @precondition(lambda self: any(r not in self.relay_ended for r in self.relays))
    @rule(frm=ports, plan=json_plans(sized=False), data=st.binary(max_size=8))
    def send_to_relay(self, frm: int, plan: JsonPlan, data: bytes) -> None:
        relay = next(r for r in self.relays if r not in self.relay_ended)
        self._send(frm, relay, plan, "relayed", "", data)

    @rule(frm=ports, to=ports, plan=json_plans(sized=True))
    def send_big(self, frm: int, to: int, plan: JsonPlan) -> None:
        self._send(frm, to, plan, "big", "", b"")

    def _send(self, frm: int, to: int, plan: JsonPlan, tag: str, cid: str, data: bytes) -> None:
        request = _send_request(frm, to, plan, tag, cid, data)
        out = self.call("Send", request)
        allowed, why = self._send_outcomes(frm, to, plan, data)
        if request.ByteSize() > MAX_MESSAGE_BYTES:
            allowed.add(C.RESOURCE_EXHAUSTED)  # gRPC's own limit on what it receives may answer first
        expected = self.expect("Send", out, allowed, why)
        if out.ok:
            body = plan.expected() if plan.fate() in (Fate.OK, Fate.EITHER) else None
            self._accepted(out.response.message_id, frm, to, tag, cid, body, data, doubtful=not expected)

    def _send_outcomes(self, frm: int, to: int, plan: JsonPlan, data: bytes) -> tuple[set, str]:
        """What Send may answer, and why. With nothing wrong, OK only."""
        problems: list[tuple[grpc.StatusCode, str]] = []
        if (frm in self.model and self.model[frm].ended) or (to in self.model and self.model[to].ended) \
                or to in self.relay_ended:
            problems.append((C.FAILED_PRECONDITION, "an ended sender or receiver"))
        fate = plan.fate(len(data))
        if fate == Fate.INVALID:
            problems.append((C.INVALID_ARGUMENT, f"the value model refuses {plan.label}"))
        elif fate == Fate.TOO_BIG:
            problems.append((C.RESOURCE_EXHAUSTED, f"{plan.label} is over {MAX_MESSAGE_BYTES} bytes"))
        port = self.live_port(to)
        if port is not None and len(port.queue) >= port.limit:
            problems.append((C.RESOURCE_EXHAUSTED, f"a full mailbox ({len(port.queue)} of {port.limit})"))
        allowed = {code for code, _ in problems} or {OK}
        why = "; ".join(w for _, w in problems) or "a live sender and receiver, a valid value, room in the mailbox"
        if fate == Fate.EITHER:
            allowed.add(C.INVALID_ARGUMENT)  # nested deeper than every limit accepts
        if port is not None and (port.notices or port.bytes_waiting() > (1 << 20)):
            allowed.add(C.RESOURCE_EXHAUSTED)  # notices may fill it; a byte limit's default is not decided
        return allowed, why

    def _accepted(self, message_id: int, frm: int, to: int, tag: str, cid: str, body: Any, data: bytes,
                  doubtful: bool = False) -> None:
        if to in self.relays:
            relayed = through_lua(body)
            self.sink_queue[to].append(Expected(message_id, to, tag, cid, relayed, data, required=not doubtful,
                                                doubtful=doubtful or relayed is UNDECIDED))
        elif to in self.model:
            self.model[to].queue.append(Expected(message_id, frm, tag, cid, body, data, required=not doubtful,
                                                 doubtful=doubtful))

    @rule(port=ports, data=st.data())
    def recv(self, port: int, data: Any) -> None:
        p = self.model[port]
        known = p.queue[data.draw(st.integers(0, len(p.queue) - 1))] if p.queue else None
        sender = data.draw(st.sampled_from([None] + ([known.sender] if known else []) + [port]))
        tag = data.draw(st.sampled_from([None, "a", "EXIT"] + ([known.tag] if known else [])))
        cid = data.draw(st.sampled_from([None, "c2"] + ([known.correlation_id] if known else [])))
        req = pb.RecvRequest(pid=port, timeout_ms=0)
        if sender is not None:
            setattr(req, "from", sender)
        if tag is not None:
            req.tag = tag
        if cid is not None:
            req.correlation_id = cid
        out = self.call("Recv", req)
        if p.ended:
            self.expect("Recv", out, {C.FAILED_PRECONDITION}, "an ended port")
            return
        if not self.expect("Recv", out, {OK}, "a live port, timeout 0"):
            return
        if out.response.timed_out:
            waiting = [e for e in p.queue if e.matches(sender, tag, cid) and e.required]
            if waiting:
                return fail("model:lost", f"Recv(pid={port}, from={sender}, tag={tag!r}, correlation_id={cid!r}) "
                            f"found nothing, yet message {waiting[0].id} was accepted for it")
            return
        self.take(p, out.response.message, sender, tag, cid, "Recv")

    @rule(port=consumes(ports))
    def kill(self, port: int) -> None:
        p = self.model[port]
        out = self.call("Kill", pb.KillRequest(pid=port))
        if not self.expect("Kill", out, {OK}, "Kill of a port"):
            return
        if out.response.already_ended != p.ended:
            return fail("model:Kill", f"Kill({port}).already_ended is {out.response.already_ended}; "
                        f"the port {'had' if p.ended else 'had not'} ended")
        self.end_port(p)

    @rule(port=ports, name=st.one_of(printable_name(), hostile_text(12)))
    def register(self, port: int, name: str) -> None:
        p = self.model[port]
        out = self.call("Register", pb.RegisterRequest(pid=port, name=name))
        if not name_is_valid(name):
            self.expect("Register", out, {C.INVALID_ARGUMENT, C.FAILED_PRECONDITION} if p.ended
                        else {C.INVALID_ARGUMENT}, f"the name {name!r} is not printable")
        elif p.ended:
            self.expect("Register", out, {C.FAILED_PRECONDITION, C.NOT_FOUND}, "an ended port")
        elif self.names.get(name, port) != port:
            self.expect("Register", out, {C.ALREADY_EXISTS}, f"{name!r} is {self.names[name]}'s")
        else:  # a port that has a name already may be refused a second one (not decided)
            self.expect("Register", out, {OK, C.ALREADY_EXISTS, C.FAILED_PRECONDITION}, "a free name")
        if out.ok:
            self.named(name, port)
        self.names_resolve()

    def names_resolve(self) -> None:
        """Every name the model knows finds its port."""
        for name, pid in list(self.names.items()):
            out = self.call("ListProcesses", pb.ListProcessesRequest(name=name))
            if not self.expect("ListProcesses", out, {OK}, "a name filter"):
                return
            found = [p.pid for p in out.response.processes]
            if found != [pid]:
                return fail("model:names", f"ListProcesses(name={name!r}) gave {found}; registered to {pid}")

    @rule(watcher=ports, watched=ports)
    def monitor(self, watcher: int, watched: int) -> None:
        out = self.call("Monitor", pb.MonitorRequest(watcher=watcher, target=watched))
        w = self.model[watcher]
        if w.ended:
            self.expect("Monitor", out, {C.FAILED_PRECONDITION}, "an ended watcher")
        else:
            self.expect("Monitor", out, {OK, C.RESOURCE_EXHAUSTED, C.INVALID_ARGUMENT}, "a live watcher")
        if out.ok:
            w.notices += 1

    # -- files ----------------------------------------------------------------------------
    @rule(target=files, name=st.one_of(printable_name(), hostile_text(10)).filter(_one_component),
          data=st.binary(max_size=64), append=st.booleans())
    def write_file(self, name: str, data: bytes, append: bool) -> Any:
        path = f"{self.dir}/{name}"
        out = self.call("WriteFile", [pb.WriteFileRequest(path=path, data=data, append=append)])
        if not name_is_valid(name) or len(name.encode()) > 255:
            if not name_is_valid(name):
                self.expect("WriteFile", out, {C.INVALID_ARGUMENT}, f"the file name {name!r} is not printable")
            if out.ok:  # it was stored all the same
                self.stored[path] = (self.stored.get(path, b"") if append else b"") + data
                return path
            return multiple()
        if not self.expect("WriteFile", out, {OK}, "a printable name in a directory of its own"):
            return multiple()
        self.stored[path] = (self.stored.get(path, b"") if append else b"") + data
        if out.response.size != len(self.stored[path]):
            fail("model:files", f"WriteFile({path!r}) says {out.response.size} bytes; "
                 f"the model has {len(self.stored[path])}")
        return path

    @rule(path=files)
    def read_file(self, path: str) -> None:
        out = self.srv.call("ReadFile", pb.ReadFileRequest(path=path))
        STATS.rpc[("ReadFile", out.code.name)] += 1
        check_outcome(out, False, "machine")
        if path not in self.stored:
            self.expect("ReadFile", out, {C.NOT_FOUND}, "a deleted or renamed file")
            return
        if not self.expect("ReadFile", out, {OK}, "a file written"):
            return
        self.list_files()
        got = b"".join(c.data for c in out.items)
        if got != self.stored[path]:
            return fail("model:files", f"ReadFile({path!r}) gave {short(got)}; written: {short(self.stored[path])}")

    @rule(path=consumes(files))
    def delete_file(self, path: str) -> None:
        out = self.call("DeleteFile", pb.FilePath(path=path))
        self.expect("DeleteFile", out, {OK} if path in self.stored else {C.NOT_FOUND}, "the model's file")
        self.stored.pop(path, None)

    @rule(target=files, src=consumes(files), name=printable_name().filter(_one_component))
    def rename_file(self, src: str, name: str) -> Any:
        dst = f"{self.dir}/{name}"
        out = self.call("RenameFile", pb.RenameFileRequest(from_path=src, to_path=dst))
        if len(name.encode()) > 255:  # over the host's name limit: not decided
            if out.ok:
                self.stored[dst] = self.stored.pop(src)
                return dst
            return multiple()
        if src not in self.stored:
            self.expect("RenameFile", out, {C.NOT_FOUND}, "a file that is gone")
            return multiple()
        if not self.expect("RenameFile", out, {OK}, "a file to a free or file name"):
            return multiple()
        self.stored[dst] = self.stored.pop(src)
        return dst

    def list_files(self) -> None:
        """The model's directory lists exactly the model's files."""
        out = self.call("ListFiles", pb.FilePath(path=self.dir))
        if not self.stored:
            self.expect("ListFiles", out, {OK, C.NOT_FOUND}, "a directory that may not exist")
            return
        if not self.expect("ListFiles", out, {OK}, "the model's directory"):
            return
        got = {e.path: e.size for e in out.response.entries}
        want = {p: len(d) for p, d in self.stored.items()}
        if got != want:
            return fail("model:files", f"ListFiles({self.dir!r}) gave {short(got)}; the model has {short(want)}")

    # -- locks ----------------------------------------------------------------------------
    @rule(port=ports, index=st.integers(0, 2))
    def try_acquire(self, port: int, index: int) -> None:
        name, p = self.lock_names[index], self.model[port]
        holder = self.holders.get(name)
        if holder == port:
            return  # re-acquiring one's own mutex is not decided
        out = self.call("Acquire", pb.AcquireRequest(pid=port, name=name, timeout_ms=0))
        if p.ended:
            self.expect("Acquire", out, {C.FAILED_PRECONDITION}, "an ended holder")
            return
        if not self.expect("Acquire", out, {OK}, "a live port"):
            return
        if holder is None and not out.response.acquired:
            return fail("model:locks", f"{name} is free, and Acquire by {port} did not get it")
        if holder is not None and out.response.acquired:
            return fail("model:locks", f"{name} is held by {holder}, and {port} acquired it too")
        if out.response.acquired:
            self.holders[name] = port

    @rule(port=ports, index=st.integers(0, 2))
    def release(self, port: int, index: int) -> None:
        name = self.lock_names[index]
        out = self.call("Release", pb.ReleaseRequest(pid=port, name=name))
        if self.holders.get(name) == port:
            if self.expect("Release", out, {OK}, "the holder releases"):
                del self.holders[name]
        else:
            self.expect("Release", out, {C.FAILED_PRECONDITION, C.NOT_FOUND, C.PERMISSION_DENIED},
                        "not the holder")

    # -- anything, hostile ------------------------------------------------------------------
    @rule(data=st.data())
    def hostile(self, data: Any) -> None:
        live = [pid for pid, p in self.model.items() if not p.ended]
        ended = [pid for pid, p in self.model.items() if p.ended]
        relays = list(self.relays)
        pool = rq.Pool((live + ended + relays) or [0], list(self.names))
        method = data.draw(st.sampled_from(sorted(METHODS)), label="method")
        req = data.draw(rq.request(method, pool), label="hostile request")
        deadline, blocking = rq.deadline_for(req)
        out = self.srv.call(method, req.message, deadline, max_items=3 if method == "Events" else 10_000)
        STATS.rpc[(method, out.code.name)] += 1
        check_outcome(out, blocking, "machine", lambda: f"Reproducer: {req!r}")
        if out.ok and req.refusals:
            return fail(f"{method}:accepted", f"{method} answered OK though {'; '.join(req.refusals)}. "
                        f"Reproducer: {req!r}")
        self.learn(req, out)

    def learn(self, req: rq.Request, out: Any) -> None:
        """What a hostile call did to the model's world."""
        msg = req.messages[0] if req.messages else None
        named = {getattr(msg, f) for f in ("pid", "from", "to", "watcher", "target", "parent")
                 if msg is not None and f in msg.DESCRIPTOR.fields_by_name}
        if req.method == "Send" and out.ok:
            to = msg.to if msg.WhichOneof("target") == "to" else self.names.get(msg.to_name)
            if to is not None:
                sane = not msg.HasField("body") or (all_finite(msg.body) and depth_of(msg.body) <= MAX_DEPTH)
                body = from_value(msg.body) if msg.HasField("body") and sane else None
                self._accepted(out.response.message_id, getattr(msg, "from"), to, msg.tag, msg.correlation_id,
                               body, bytes(msg.data), doubtful=bool(req.refusals) or not sane)
        elif req.method == "Recv" and msg.pid in self.model:
            port = self.model[msg.pid]
            sender = getattr(msg, "from") if msg.HasField("from") else None
            tag = msg.tag if msg.HasField("tag") else None
            cid = msg.correlation_id if msg.HasField("correlation_id") else None
            if out.ok and not out.response.timed_out:
                self.take(port, out.response.message, sender, tag, cid, f"hostile {req!r}")
            elif out.code == C.DEADLINE_EXCEEDED or out.code == C.CANCELLED:
                for e in port.queue:  # our deadline passed: it may have taken one as it answered
                    if e.matches(sender, tag, cid):
                        e.required = False
                        break
        elif req.method == "Register" and out.ok:
            self.named(msg.name, msg.pid)
        elif req.method == "Monitor" and out.ok and msg.watcher in self.model:
            self.model[msg.watcher].notices += 1
        elif req.method == "Spawn" and out.ok:
            self.ex.spawned(out.response.pid)
            if msg.name:
                self.named(msg.name, out.response.pid)
            if msg.monitor and msg.parent in self.model:
                self.model[msg.parent].notices += 1
        elif req.method == "Acquire" and out.ok and out.response.acquired and msg.name in self.lock_names:
            self.holders[msg.name] = msg.pid
        elif req.method == "Release" and out.ok and self.holders.get(msg.name) == msg.pid:
            del self.holders[msg.name]
        elif req.method == "OpenPort" and out.ok:
            self.ex.spawned(out.response.pid)
            if msg.name:
                self.named(msg.name, out.response.pid)
        self.refresh(named)
        # names of processes outside the model may be gone by now: forget them
        self.names = {n: p for n, p in self.names.items() if p in self.model and not self.model[p].ended}

    # -- the end -----------------------------------------------------------------------------
    def teardown(self) -> None:
        if sys.exc_info()[0] is not None:  # a rule failed: report that, not what follows from it
            try:
                self.srv.after_example(self.ex)
            except Violation:
                self.srv.dirty = True
            return
        try:
            self.drain_all()
        finally:
            self.srv.after_example(self.ex)

    def drain_all(self) -> None:
        """Every name and file the model knows is there, and every message it still
        expects is, once and in order."""
        self.names_resolve()
        self.list_files()
        for port in self.model.values():
            if port.ended:
                continue
            for msg in self.srv.drain(port.pid):
                self.take(port, msg, None, None, None, "the final Recv")
            missing = [e.id for e in port.queue if e.required]
            if missing and not any(e.doubtful for e in port.queue):  # after a doubtful one, anything goes
                return fail("model:lost", f"messages {missing} were accepted for port {port.pid} and never "
                            f"received")
        deadline = time.monotonic() + 5
        for relay, sink in self.relays.items():
            queue = self.sink_queue[relay]
            while any(e.required for e in queue):
                out = self.srv.call("Recv", pb.RecvRequest(pid=sink, timeout_ms=200), deadline=5)
                if not out.ok:
                    raise violation(f"harness:Recv:{out.code.name}", f"Recv from a sink: {short(out.details)}")
                if out.response.timed_out:
                    if time.monotonic() > deadline:
                        lost = [e.id for e in queue if e.required]
                        return fail("model:lost", f"messages {lost} sent to relay {relay} never reached its "
                                    f"sink {sink}")
                    continue
                msg = out.response.message
                if msg.tag == "relay-error":
                    doubtful = next((k for k, e in enumerate(queue) if e.doubtful and not e.required), None)
                    if doubtful is None:
                        return fail("model:relay refused", f"a Lua process could not send on a value that gRPC "
                                    f"accepted: {short(from_value(msg.body))}")
                    del queue[doubtful]
                    continue
                i = next((k for k, e in enumerate(queue) if (e.tag, e.correlation_id, e.data) ==
                          (msg.tag, msg.correlation_id, bytes(msg.data))
                          and (e.doubtful or same_json(e.body, from_value(msg.body)))), None)
                if i is None or any(e.required for e in queue[:i]):
                    return fail("model:order", f"sink {sink} got {short((msg.tag, from_value(msg.body)))}; "
                                f"expected next: {short(queue[0].body) if queue else 'nothing'}")
                del queue[: i + 1]


UNDECIDED = object()  # a value whose shape after crossing Lua is not decided


def through_lua(value: Any) -> Any:
    """What a value becomes once a Lua process has received and sent it on (README):
    nil in a table is absent, so nulls in objects vanish, trailing nulls of arrays
    are lost and an empty table is {}. An array with holes left is UNDECIDED (when
    holes make it an object is not decided)."""
    if isinstance(value, list):
        items = [through_lua(v) for v in value]
        while items and items[-1] is None:
            items.pop()
        if any(v is None or v is UNDECIDED for v in items):
            return UNDECIDED
        return items or {}
    if isinstance(value, dict):
        items = {k: through_lua(v) for k, v in value.items() if v is not None}
        return UNDECIDED if any(v is UNDECIDED for v in items.values()) else items
    return value


def run_machine(server: FuzzServer, hyp_settings: settings) -> None:
    machine = type("KernelSequences", (KernelModel,), {"server": server})
    run_state_machine_as_test(machine, settings=hyp_settings)
