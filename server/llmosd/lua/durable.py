"""Durable Lua processes (spawn with durable): every syscall journaled, and answered from the journal
while the program replays after a restart (kernel/journal.py has the journal, the durability rule and
recovery; docs/durable-agents.md is the user's guide).

A durable process's bridge is a DurableLuaProcess: the same syscalls as LuaProcess's, each first
asked of the journal (`replayed`): answered from it while the replay lasts, else done live and
journaled. While it replays, the C fast paths between Lua processes decline it (lua/fast_paths.c), so
its sends and receives come here; once live (State.journal_live), the C side sends and receives for
it and journals through `journal_sent` and `answer`. Blocking syscalls are journaled when answered
(`answer`), and replayed by lua/slices.py before they would block.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from ..api.errors import FailedPrecondition, KernelError
from ..kernel.acks import Leased
from ..kernel.journal import LOCK_CALLS, REPLAY_DIVERGENCE, Divergence, ProcessJournal, args_hash, message_row
from ..kernel.mailbox import Message
from ..kernel.process import Process
from .runtime import _CALLS, LuaProcess, arguments

if TYPE_CHECKING:
    from ..kernel.kernel import Kernel

# Run before a durable process's program, on its first line (line numbers stay): what a program
# could reach that differs from run to run is made the same in every run (docs/durable-agents.md):
# math.random is seeded from the journal, os.time and os.date read the journaled sys.now, and
# pairs goes through keys in a fixed order (by type name, then value: booleans, numbers, strings; Lua 5.4 seeds its string
# hashes per state, so the table's own order changes with every run).
DURABLE_PRELUDE = (
    "do math.randomseed(%d) "
    "local next, sort, type, getmetatable, floor, now, time, date = "
    "next, table.sort, type, getmetatable, math.floor, sys.now, os.time, os.date "
    "local function before(a, b) local ta, tb = type(a), type(b) if ta ~= tb then return ta < tb end "
    "if ta == 'number' or ta == 'string' then return a < b end "
    "if ta == 'boolean' then return b and not a end return false end "
    "pairs = function(t) local mt = getmetatable(t) "
    "if type(mt) == 'table' and mt.__pairs then return mt.__pairs(t) end "
    "local keys, n = {}, 0 for k in next, t do n = n + 1 keys[n] = k end sort(keys, before) "
    "local i = 0 return function() i = i + 1 local k = keys[i] if k ~= nil then return k, t[k] end end, t, nil end "
    "os.time = function(t) if t == nil then return floor(now() / 1000) end return time(t) end "
    "os.date = function(f, t) return date(f, t or os.time()) end "
    "end "
)
# Calls whose effect is the kernel's memory, done again when replayed (their answer is the journal's).
_REAPPLIED = frozenset(("monitor",))
# Calls whose effect other processes see at once: journaled under the kernel lock (journaled_locked).
_JOURNALED_UNDER_LOCK = frozenset(("lock_release", "cond_signal", "cond_broadcast"))
# File calls that change the tree: everything journaled before them is committed first (output commit).
_FILE_CHANGES = frozenset(("fs.write", "fs.delete", "fs.rename", "fs.mkdir"))
_LIVE = object()  # a durable call that is not answered from the journal


class DurableLuaProcess(LuaProcess):
    """A durable process's bridge: LuaProcess's syscalls, journaled and replayed."""

    def __init__(self, kernel: Kernel, proc: Process) -> None:
        self.journal: ProcessJournal = kernel.journals[proc.pid]
        self.pending_call: tuple[str, tuple] | None = None  # a blocking call made live, until answered
        self._sent: tuple | None = None  # a send's journaled answer
        self.call_digest = 0  # the arguments hash of the call being made
        self.call_under_lock: tuple[str, tuple] | None = None  # the call journaled_locked journals
        self.cond_mutex: str | None = None  # the mutex a condition wait released, until it holds it again
        self.cond_resume: Any = None  # where a wait replayed to its journal's end goes on (replay_cond_wait)
        super().__init__(kernel, proc)
        self.state.journal_live = not self.journal.replaying

    def source(self) -> str:
        return DURABLE_PRELUDE % self.journal.seed + self.proc.program

    def replayed(self, call: str, args: tuple) -> Any:
        """The journal's answer to a durable process's call while it replays, else _LIVE. A call
        that diverges ends the process (CRASHED, replay_divergence) at its next check."""
        journal = self.journal
        if journal.divergence is not None:
            return None, journal.divergence.encode()
        if not journal.replaying:
            return _LIVE
        try:
            answer = journal.replay(call, args)
        except Divergence as e:
            self.proc.kill_reason = REPLAY_DIVERGENCE  # ends it at its next check or blocking call
            return None, str(e).encode()
        if not journal.replaying:
            self.state.journal_live = True  # its replay is over: the C side sends and receives from here
        return answer

    def lock_note(self, call: str, args: tuple) -> tuple | None:
        """What a lock call's entry says of its lock (kernel/journal.py's LOCK_CALLS): (name, kind, permits)."""
        try:
            if call == "lock_release":
                (name,) = arguments("lock.release", name=args[0] if args else None)
                return name, "mutex", 1
            name, kind, permits, _ = self.lock_options(args[0] if args else None, args[1] if len(args) > 1 else None,
                                                       "sys.lock.acquire")
            return name, kind, permits
        except KernelError:
            return None

    def send(self, to: Any, body: Any, tag: Any, data: Any, correlation_id: Any, notify_undelivered: Any = None,
             idempotency_key: Any = None, on_sent: Callable[[Message], list] | None = None) -> tuple:
        args = (to, body, tag, data, correlation_id, notify_undelivered, idempotency_key)
        answer = self.replayed("send", args)
        if answer is not _LIVE:
            return answer
        journal, digest = self.journal, args_hash(args)
        self._sent = None

        def journaled(msg: Message) -> list:
            self._sent = (msg.id, len(self.proc.mailbox))
            return journal.entry_ops("send", digest, self._sent)

        answer = super().send(to, body, tag, data, correlation_id, notify_undelivered, idempotency_key, journaled)
        if self._sent is not None:
            return self._sent
        journal.record("send", args, answer)  # refused: nothing was sent
        return answer

    def journal_sent(self, args: tuple, msg: Message, stored: bool) -> None:
        """lua/fast_paths.c's send of this live process (kernel lock held, `msg` not delivered yet): its
        entry, with the message's copy if `stored` (a durable receiver), as one unit of the store's
        queue, as Kernel.send queues a send from here."""
        ops = self.journal.entry_ops("send", args_hash(args), (msg.id, len(self.proc.mailbox)))
        if stored:
            ops.append(message_row(msg))
        self.journal.store.enqueue(ops)

    def try_recv(self, sender: Any, tag: Any, correlation_id: Any, timeout_ms: Any) -> tuple:
        args = (sender, tag, correlation_id, timeout_ms)
        answer = self.replayed("try_recv", args)
        if answer is _LIVE:
            answer = super().try_recv(sender, tag, correlation_id, timeout_ms)
            self.journal.record("try_recv", args, answer, self.journal.received(answer[0] if answer else None))
        return answer

    def call(self, op: bytes, *args: Any) -> Any:
        if op == b"log":  # not journaled (a line may show an address): written live, not again in a replay
            return None if self.journal.replaying else super().call(op, *args)
        entry = _DURABLE_CALLS.get(op)
        if entry is None:
            return super().call(op, *args)
        handler, arity = entry
        return self._journaled_call(op, handler, args[:arity])

    def _journaled_call(self, op: bytes, handler: Callable[..., Any], args: tuple) -> Any:
        journal = self.journal
        name = op.decode() if op != b"fs" else f"fs.{args[0].decode(errors='replace')}"
        intended = False
        if name == "fs.write" and journal.peek() == "fs.write.intent":
            # An append that may have happened or not: journaled as intended, never as done.
            size = self.replayed("fs.write.intent", args)
            if type(size) is tuple:  # diverged
                return size
            intended = True
            if not journal.replaying:
                self._cut_file(args[1], size)
        answer = self.replayed(name, args)
        if answer is not _LIVE:
            if name in _REAPPLIED and answer is True:
                self.kernel.monitor_again(self.proc.pid, args[0] if args else None)
            return answer
        if name in _FILE_CHANGES:
            if name == "fs.write" and not intended:
                size = self._append_intent(args)
                if size is not None:
                    journal.record("fs.write.intent", args, size)
            journal.commit()  # what this change follows is durable before the tree shows it
        recorded = len(journal.entries)
        self.call_digest = args_hash(args)
        if name in _JOURNALED_UNDER_LOCK:
            self.call_under_lock = (name, args)
        try:
            answer = handler(self, *args)
        except FailedPrecondition as e:
            # No lease on it: one a restart lost is done with (the journal has its message).
            answer = True if name in ("ack", "nack") else (None, str(e).encode())
        except KernelError as e:
            answer = None, str(e).encode()
        finally:
            self.call_under_lock = None
        if len(journal.entries) == recorded:  # a spawn journals itself with a durable child's spec
            journal.record(name, args, answer, lock=self.lock_note(name, args) if name in LOCK_CALLS else None)
        return answer

    def journaled_locked(self, answer: Any, effects: list | None = None) -> Any:
        """A durable process's call whose effect other processes see at once (a release, a signal):
        its entry is queued before the kernel lock is let go, so that no entry of theirs that
        follows from it can come first in the journal (kernel lock held); `effects`, in its unit
        (the wakes a signal made). Returns `answer`."""
        call, self.call_under_lock = self.call_under_lock, None
        if call is not None:
            self.journal.record(call[0], call[1], answer, effects or (),
                                lock=self.lock_note(*call) if call[0] in LOCK_CALLS else None)
        return answer

    # -- condition variables: a wait is three entries (kernel/journal.py's LOCK_CALLS) ------------
    def _cond_wake(self, syscall: str, name: Any, wake: Callable[..., int]) -> int:
        (text,) = arguments(syscall, name=name)
        woken: list = []  # durable waiters' wake entries, in the unit of this signal's
        with self.kernel.lock:
            return self.journaled_locked(wake(self.proc.namespace, text, woken), woken)

    def replayed_cond_wait(self, call: str, args: tuple) -> Any:
        """sys.cond.wait's answer from the journal (kernel/journal.py's replay_cond_wait), else _LIVE,
        with `cond_resume` saying where the live wait goes on (and `cond_mutex` its mutex once released)."""
        answer, resume = self.journal.replay_cond_wait(lambda entry: self.replayed(entry, args))
        self.cond_resume = resume if answer is _LIVE else None
        self.cond_mutex = None if self.cond_resume is None else self.cond_wait_args(*args[:3])[1]
        return answer

    def cond_wait(self, waiter: Any, args: tuple) -> Any:
        """sys.cond.wait made live (kernel lock held), from where its journal ended: the answer now,
        or None with `waiter` registered. The release is journaled before the lock is let go (no
        one can take the mutex before the journal says it was given back), and the wake when a
        signal or timeout chooses this waiter (the journal's on_woken)."""
        name, lock_name, timeout = self.cond_wait_args(*args[:3])
        sync, proc, journal = self.kernel.sync, self.proc, self.journal
        resume = journal.resume_at_wait(self.cond_resume)
        self.cond_resume = None
        if type(resume) is dict:
            return sync.cond_reacquire(proc.namespace, lock_name, proc.pid, proc.priority, waiter, resume)
        sync.cond_wait(proc.namespace, name, lock_name, proc.pid, proc.priority, waiter, timeout,
                       journal.on_woken(args_hash(args)), holding=resume is None)
        if resume is None:
            journal.record("cond_wait", args, True, lock=(lock_name, "mutex", 1), cond=name)
            self.cond_mutex = lock_name
        return None

    def _journaled_outcome(self, call: str, args: tuple) -> tuple[str, tuple | None]:
        """The entry name and lock note of a blocking call's answer."""
        if call == "cond_wait":  # refused before it released anything, or the mutex held again
            mutex, self.cond_mutex = self.cond_mutex, None
            return ("cond_wait", None) if mutex is None else ("cond_reacquire", (mutex, "mutex", 1))
        return call, self.lock_note(call, args) if call in LOCK_CALLS else None

    def _append_intent(self, args: tuple) -> int | None:
        """An append's file size before it (-1: no file yet); None for a write that is not an append."""
        try:
            path, _, options = arguments("fs.write", path=args[1] if len(args) > 1 else None,
                                         data=args[2] if len(args) > 2 else None,
                                         options=args[3] if len(args) > 3 else None)
            append = options.get("append", False)
        except KernelError:
            return None  # refused: it changes nothing
        if not append or path is None:
            return None
        return self.kernel.files.size_before_append(self.proc.namespace, path)

    def _cut_file(self, path: Any, size: int) -> None:
        """Undo an append that may have happened after its intent was journaled."""
        (vpath, _, _) = arguments("fs.write", path=path, data=b"")
        self.kernel.files.cut_back(self.proc.namespace, self.proc.pid, vpath, size)

    def spawn(self, spec: Any = None) -> int:
        journal, digest = self.journal, self.call_digest  # of the call's arguments as the program gave them
        return self.kernel.spawn(self.spawn_spec(spec), self.caller,
                                 lambda pid: journal.entry_ops("spawn", digest, pid))

    def answer(self, syscall: str, value: Any) -> tuple:
        """The values to resume the program with, journaled."""
        answer = super().answer(syscall, value)
        pending = self.pending_call
        if pending is not None:
            self.pending_call = None
            # A durable process's message is received once journaled, with ack or without.
            received = value.msg if isinstance(value, Leased) else answer[0] if answer else None
            call, lock = self._journaled_outcome(*pending)
            self.journal.record(call, pending[1], answer, self.journal.received(received), lock=lock)
        return answer


# The bridge's call ops as DurableLuaProcess's methods (its spawn journals itself).
_DURABLE_CALLS: dict[bytes, tuple[Callable[..., Any], int]] = {
    op: (getattr(DurableLuaProcess, method.__name__), arity) for op, (method, arity) in _CALLS.items()
}
