"""`llmos`: the command line client of an llmos kernel.

    llmos run agent.lua --args '{"n": 3}'      run it, streaming its log; print its result as JSON
    llmos run -d agent.py --name worker        start a Python agent in the background; print its pid
    llmos ps -a -o json / ps -q --state BLOCKED / inspect 12 13 / events / logs -f --tail 20 12
    llmos send worker '{"job": 1}' --from 7    print the message id (body: JSON, @FILE or - for stdin)
    llmos recv 7 --timeout 5                   print the message as JSON
    llmos wait 12 / kill 12 13 / port / infer "Once upon a time"
    llmos fs put notes.md docs/notes.md / fs cat docs/notes.md / fs ls docs / fs mv A B / fs rm A / fs mkdir D
    llmos dlq ls / dlq show 3 / dlq retry 3 --to worker / dlq purge --all      the dead-letter queue
    eval "$(llmos completion bash)"            shell completion (needs argcomplete)

The server is --server, else $LLMOS_SERVER, else 127.0.0.1:50051 (HOST:PORT or unix:PATH).
Exit status: 0 on success; 1 when the server refuses, a wait or recv times out, or the
process did not exit normally; 2 for a bad command line; 130 when `run` is interrupted
(Ctrl-C kills the process it started). Errors go to stderr as "llmos: CODE: message".
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import grpc

from . import __version__
from .client import Client, DeadLetter, ProcessInfo, ProcessState, default_target, program_source
from .errors import DeadlineExceeded, LlmosError
from .v1 import kernel_pb2 as pb

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """A command line the CLI cannot act on, found before anything is sent (exit status 2)."""


def _json_arg(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{what} is not valid JSON ({e}): {text!r}") from None


def _read_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _fail(code: str, message: str) -> int:
    print(f"llmos: {code}: {message}", file=sys.stderr)
    return EXIT_FAILED


def _report_end(info: ProcessInfo) -> int:
    """Exit status for an ended process; says on stderr why it did not exit normally."""
    if info.ok:
        return EXIT_OK
    detail = f": {info.error}" if info.error else ""
    return _fail(info.state, f"process {info.pid} ended ({info.exit_reason or 'no reason'}){detail}")


# -- commands -------------------------------------------------------------------------------

def _spawn_options(a: argparse.Namespace) -> dict[str, Any]:
    """What `run` and `spawn` pass to Client.spawn from their common flags."""
    return dict(args=_json_arg(a.args, "--args") if a.args is not None else None, name=a.name,
                priority=a.priority, weight=a.weight, limits=a.limits)


def _file_program(path: str) -> dict[str, str]:
    """spawn's program fields for a local file: a .py file is a Python agent, anything else Lua."""
    _read_file(path)  # a missing or unreadable file is a usage error
    language, source, source_name = program_source(os.path.abspath(path))
    return {language: source, "source_name": source_name or path}


def _print_line(line: str, at_ms: int = 0) -> None:
    print(line, flush=True)


def follow_log(k: Client, pid: int, offset: int = 0, until: float | None = None,
               on_line: Callable[[str, int], None] = _print_line, tail: int = 0,
               since_ms: int = 0) -> ProcessInfo | None:
    """Hand `pid`'s log lines from `offset` on (the last `tail`, those since `since_ms`) and their
    times to `on_line` as the server streams them (FollowLog), until the process ends (its final
    info) or time.monotonic() passes `until` (None)."""
    timeout = None if until is None else max(until - time.monotonic(), 0.001)
    try:
        for page in k.follow_log(pid, offset, tail=tail, since_ms=since_ms, timeout=timeout):
            for line, at_ms in zip(page.lines, page.times_ms):
                on_line(line, at_ms)
    except DeadlineExceeded:
        return None
    return k.wait(pid)


def cmd_run(k: Client, a: argparse.Namespace) -> int:
    pid = k.spawn(**_file_program(a.file), **_spawn_options(a))
    if a.monitor:
        k.monitor(a.monitor, pid)
    if a.detach:
        print(pid)
        return EXIT_OK
    try:
        info = follow_log(k, pid, until=None if a.timeout is None else time.monotonic() + a.timeout)
        if info is None:
            k.kill(pid, "timeout")
            info = k.wait(pid)
    except KeyboardInterrupt:  # as docker run: Ctrl-C ends what was started
        k.kill(pid, "interrupted")
        print(f"llmos: process {pid} killed (interrupted)", file=sys.stderr)
        return EXIT_INTERRUPTED
    if info.ok:
        print(_dumps(info.result))
    return _report_end(info)


def cmd_spawn(k: Client, a: argparse.Namespace) -> int:
    program = {"lua": a.lua, "python": a.python, "path": a.path}
    if a.file is not None:
        program = _file_program(a.file)
    pid = k.spawn(**program, **_spawn_options(a))
    if a.monitor:
        k.monitor(a.monitor, pid)
    print(pid)
    return EXIT_OK


def _body(text: str | None) -> Any:
    """A message body from the command line: JSON text, @FILE (JSON in a file) or - (JSON on stdin)."""
    if text is None:
        return None
    if text == "-":
        return _json_arg(sys.stdin.read(), "the message body (stdin)")
    if text.startswith("@"):
        return _json_arg(_read_file(text[1:]), f"the message body ({text[1:]})")
    return _json_arg(text, "the message body")


def cmd_send(k: Client, a: argparse.Namespace) -> int:
    to: int | str = int(a.to) if a.to.isdigit() else a.to
    print(k.send(to, _body(a.body), sender=a.sender, tag=a.tag, correlation_id=a.correlation_id,
                 notify_undelivered=a.notify_undelivered, idempotency_key=a.idempotency_key))
    return EXIT_OK


def cmd_recv(k: Client, a: argparse.Namespace) -> int:
    msg = k.recv(a.pid, sender=a.sender, tag=a.tag, correlation_id=a.correlation_id, timeout=a.timeout)
    if msg is None:
        return _fail("DEADLINE_EXCEEDED", f"no matching message for pid {a.pid} within {a.timeout:g} s")
    print(_dumps(msg.to_json()))
    return EXIT_OK


def cmd_wait(k: Client, a: argparse.Namespace) -> int:
    info = k.wait(a.pid, timeout=a.timeout)
    if info is None:
        return _fail("DEADLINE_EXCEEDED", f"process {a.pid} still running after {a.timeout:g} s")
    print(_dumps(info.to_json()))
    return _report_end(info)


def cmd_kill(k: Client, a: argparse.Namespace) -> int:
    """Kill each pid in turn; one line per pid; a pid the server refuses does not stop the others."""
    status = EXIT_OK
    for pid in a.pids:
        try:
            verdict = "killed" if k.kill(pid, a.reason) else "already ended"
            print(f"{pid} {verdict}" if len(a.pids) > 1 else verdict)
        except LlmosError as e:
            status = _fail(e.code.name, e.message)
    return status


def _kb(p: ProcessInfo) -> str:
    return str(p.usage.get("memory_bytes", 0) // 1024)


def _msgs(p: ProcessInfo) -> str:
    return f"{p.usage.get('messages_received', 0)}/{p.usage.get('messages_sent', 0)}"


def _state(p: ProcessInfo) -> str:
    return p.state + (f":{p.blocked_on}" if p.blocked_on else "")


def _when(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%dT%H:%M:%S") if ms else "-"


# `ps` columns: (header, cell). MSGS is messages received/sent, MAILBOX the messages waiting.
PS_COLUMNS: dict[str, Callable[[ProcessInfo], str]] = {
    "PID": lambda p: str(p.pid), "NAME": lambda p: p.name or "-", "KIND": lambda p: p.kind,
    "STATE": lambda p: p.state, "PRIO": lambda p: str(p.priority),
    "CPU_MS": lambda p: str(p.usage.get("cpu_ms", 0)), "MEM_KB": _kb,
    "TOKENS": lambda p: str(p.usage.get("tokens", 0)), "MSGS": _msgs,
    "MAILBOX": lambda p: str(p.usage.get("mailbox_len", 0)),
}
PS_WIDE_COLUMNS: dict[str, Callable[[ProcessInfo], str]] = {
    **PS_COLUMNS, "STATE": _state, "PARENT": lambda p: str(p.parent or "-"), "WEIGHT": lambda p: str(p.weight),
    "NAMESPACE": lambda p: p.namespace or "-", "STARTED": lambda p: _when(p.started_at_ms),
    "EXIT": lambda p: p.exit_reason or "-",
}


def format_ps(processes: Sequence[ProcessInfo], wide: bool = False) -> str:
    """The `llmos ps` table (`-o wide`: more columns)."""
    columns = PS_WIDE_COLUMNS if wide else PS_COLUMNS
    return _table(tuple(columns), [tuple(cell(p) for cell in columns.values()) for p in processes])


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart."""
    lines = [tuple(columns), *rows]
    widths = [max(len(row[i]) for row in lines) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines)


def cmd_ps(k: Client, a: argparse.Namespace) -> int:
    processes = k.ps(states=a.state, name=a.name, parent=a.parent, include_ended=a.all)
    if a.kind:
        processes = [p for p in processes if p.kind in a.kind]
    if a.quiet:
        print("\n".join(str(p.pid) for p in processes))
    elif a.output == "json":
        print(_dumps([p.to_json() for p in processes]))
    else:
        print(format_ps(processes, wide=a.output == "wide"))
    return EXIT_OK


def cmd_inspect(k: Client, a: argparse.Namespace) -> int:
    """Each process's full info as one JSON array, as docker inspect; unknown pids are reported on stderr."""
    found, status = [], EXIT_OK
    for pid in a.pids:
        try:
            found.append(k.get(pid).to_json())
        except LlmosError as e:
            status = _fail(e.code.name, e.message)
    print(json.dumps(found, ensure_ascii=False, indent=2))
    return status


def cmd_events(k: Client, a: argparse.Namespace) -> int:
    """Lifecycle events as they happen, one a line (`-o json`: one JSON object a line)."""
    for event in k.events(a.pid):
        if event.kind == "subscribed":
            continue
        if a.output == "json":
            print(_dumps({"kind": event.kind, "at_ms": event.at_ms, "process": event.process.to_json()}), flush=True)
            continue
        p = event.process
        what = f" {p.exit_reason}" if event.kind == "ended" and p.exit_reason else ""
        print(f"{_when(event.at_ms)} {event.kind:<7} {p.pid} {p.kind} {p.name or '-'} {p.state}{what}", flush=True)
    return EXIT_OK


def _log_time(at_ms: int) -> str:
    """A log line's time as -t prints it: ISO 8601 in UTC to the ms, "-" if unknown (a Python agent's
    line stored by an llmosd older than agents' line times)."""
    if not at_ms:
        return "-"
    return datetime.datetime.fromtimestamp(at_ms / 1000, datetime.timezone.utc).isoformat(timespec="milliseconds")


def cmd_logs(k: Client, a: argparse.Namespace) -> int:
    def on_line(line: str, at_ms: int) -> None:
        print(f"{_log_time(at_ms)} {line}" if a.timestamps else line, flush=True)

    if a.follow:
        # --tail 0: none of the lines so far, only new ones (tail 0 in a request means all)
        offset = k.read_log_page(a.pid, tail=1).next_offset if a.tail == 0 else 0
        follow_log(k, a.pid, offset, on_line=on_line, tail=a.tail or 0, since_ms=a.since)
        return EXIT_OK
    if a.tail == 0:  # no lines, but a log that is not there (never was, or no longer kept) is an error
        k.read_log_page(a.pid, tail=1)
        return EXIT_OK
    page = k.read_log_page(a.pid, tail=a.tail or 0, since_ms=a.since)
    for line, at_ms in zip(page.lines, page.times_ms):
        on_line(line, at_ms)
    return EXIT_OK


TOP_COLUMNS = ("PID", "NAME", "KIND", "STATE", "PRIO", "WEIGHT", "CPU%", "CPU_MS", "MEM_KB", "TOKENS", "MSGS",
               "MAILBOX")


def format_top(now: Sequence[ProcessInfo], before: dict[int, int], seconds: float) -> str:
    """The `llmos top` table: processes by CPU use over the last interval, busiest first."""
    def cpu_percent(p: ProcessInfo) -> float:
        return 100.0 * (p.usage.get("cpu_ms", 0) - before.get(p.pid, 0)) / (seconds * 1000) if seconds else 0.0

    busiest = sorted(now, key=lambda p: (-cpu_percent(p), p.pid))
    return _table(TOP_COLUMNS, [
        (str(p.pid), p.name or "-", p.kind, _state(p), str(p.priority), str(p.weight), f"{cpu_percent(p):.1f}",
         str(p.usage.get("cpu_ms", 0)), _kb(p), str(p.usage.get("tokens", 0)), _msgs(p),
         str(p.usage.get("mailbox_len", 0)))
        for p in busiest
    ])


def cmd_top(k: Client, a: argparse.Namespace) -> int:
    before: dict[int, int] = {}
    last = time.monotonic()
    shown = 0
    while a.iterations == 0 or shown < a.iterations:
        processes = k.ps()
        now = time.monotonic()
        table = format_top(processes, before, now - last if before else 0.0)
        if sys.stdout.isatty():
            print("\x1b[H\x1b[2J", end="")  # home and clear, like top
        print(f"llmos top - {len(processes)} processes ({k.target})\n{table}", flush=True)
        before, last = {p.pid: p.usage.get("cpu_ms", 0) for p in processes}, now
        shown += 1
        if a.iterations == 0 or shown < a.iterations:
            time.sleep(a.interval)
    return EXIT_OK


def cmd_port(k: Client, a: argparse.Namespace) -> int:
    print(k.open_port(a.name))
    return EXIT_OK


def cmd_infer(k: Client, a: argparse.Namespace) -> int:
    out = sys.stdout
    for chunk in k.infer(a.prompt, pid=a.pid, max_tokens=a.max_tokens, temperature=a.temperature, seed=a.seed,
                         stream=True, timeout=a.timeout):
        out.write(chunk.text)
        out.flush()
    out.write("\n")
    return EXIT_OK


def _local_pieces(path: str, size: int = 1 << 20) -> Iterator[bytes]:
    """A local file (or stdin for "-") in pieces, so that a large file is streamed."""
    try:
        f = sys.stdin.buffer if path == "-" else open(path, "rb")
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    try:
        while piece := f.read(size):
            yield piece
    finally:
        if f is not sys.stdin.buffer:
            f.close()


def cmd_fs_put(k: Client, a: argparse.Namespace) -> int:
    if a.local != "-":
        next(iter(_local_pieces(a.local, 0)), None)  # a missing local file is a usage error, before any RPC
    print(_dumps(k.write_file(a.path, _local_pieces(a.local), append=a.append).to_json()))
    return EXIT_OK


def cmd_fs_cat(k: Client, a: argparse.Namespace) -> int:
    out = sys.stdout.buffer
    for piece in k.open_file_stream(a.path, offset=a.offset, length=a.length):
        out.write(piece)
    out.flush()
    return EXIT_OK


def cmd_fs_ls(k: Client, a: argparse.Namespace) -> int:
    try:
        entries = k.list_files(a.path)
    except LlmosError as e:  # a file: show it alone, as ls does
        if e.code != grpc.StatusCode.FAILED_PRECONDITION:
            raise
        entries = [k.stat(a.path)]
    for e in entries:
        print(f"{'d' if e.is_dir else '-'} {e.size:>12} {e.path}{'/' if e.is_dir else ''}")
    return EXIT_OK


def cmd_fs_rm(k: Client, a: argparse.Namespace) -> int:
    k.delete_file(a.path)
    return EXIT_OK


def cmd_fs_mkdir(k: Client, a: argparse.Namespace) -> int:
    print(_dumps(k.make_dir(a.path).to_json()))
    return EXIT_OK


def cmd_fs_mv(k: Client, a: argparse.Namespace) -> int:
    print(_dumps(k.rename_file(a.src, a.dst).to_json()))
    return EXIT_OK


DLQ_COLUMNS = ("ID", "MESSAGE", "FROM", "RECEIVER", "TAG", "REASON", "ATTEMPTS", "DEAD_AT", "BODY")
BODY_SHOWN = 40  # characters of a body `dlq ls` shows


def format_dlq(letters: Sequence[DeadLetter]) -> str:
    """The `llmos dlq ls` table: one dead letter a line, oldest first, its body cut short."""
    def body(d: DeadLetter) -> str:
        text = _dumps(d.message.body)
        return text if len(text) <= BODY_SHOWN else text[:BODY_SHOWN - 3] + "..."

    return _table(DLQ_COLUMNS, [
        (str(d.id), str(d.message.id), str(d.message.sender), str(d.receiver), d.message.tag or "-", d.reason,
         str(d.attempts), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(d.dead_at_ms / 1000)), body(d))
        for d in letters
    ])


def cmd_dlq_ls(k: Client, a: argparse.Namespace) -> int:
    letters = k.dead_letters(a.receiver, limit=a.limit)
    print(_dumps([d.to_json() for d in letters]) if a.json else format_dlq(letters))
    return EXIT_OK


def cmd_dlq_show(k: Client, a: argparse.Namespace) -> int:
    print(_dumps(k.dead_letter(a.id).to_json()))
    return EXIT_OK


def cmd_dlq_retry(k: Client, a: argparse.Namespace) -> int:
    to = None if a.to is None else int(a.to) if a.to.isdigit() else a.to
    print(k.retry_dead_letter(a.id, to))
    return EXIT_OK


def cmd_dlq_purge(k: Client, a: argparse.Namespace) -> int:
    if bool(a.ids) + a.all + (a.before_ms is not None) != 1:
        raise UsageError("dlq purge takes dead letter IDs, --all or --before-ms, exactly one of them")
    print(k.purge_dead_letters(a.ids, all=a.all, before_ms=a.before_ms or 0))
    return EXIT_OK


# -- argument parsing -------------------------------------------------------------------------
def _pid(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 1 << 64:  # pids are uint64 (above 2^53, none exists)
        raise argparse.ArgumentTypeError(f"a pid is a positive integer below 2^64, not {text!r}")
    return int(text)


def _positive(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 1 << 63:  # ids and times: below SQLite's (and int64's) limit
        raise argparse.ArgumentTypeError(f"a positive integer below 2^63, not {text!r}")
    return int(text)


def _seconds(text: str, what: str = "a timeout") -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{what} is a number of seconds >= 0, not {text!r}")
    return value


def _interval(text: str) -> float:
    value = _seconds(text, "an interval")
    if value == 0:
        raise argparse.ArgumentTypeError(f"an interval is a number of seconds > 0, not {text!r}")
    return value


SINCE_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _since(text: str) -> int:
    """--since: a duration ago ("90s", "10m", "1.5h", "2d") or an ISO 8601 time (UTC unless it
    says), as ms since the epoch."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text)
    if match:
        return int((time.time() - float(match[1]) * SINCE_UNITS_S[match[2]]) * 1000)
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--since is a duration ago (90s, 10m, 2h, 1d) or an ISO 8601 time, not {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(int(when.timestamp() * 1000), 1)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"a count is an integer >= 0, not {text!r}")
    return int(text)


def _ranged(what: str, low: int, high: int) -> Callable[[str], int]:
    """An argparse type for an integer in [low, high] (the ranges in DECISIONS.md; the server checks again)."""
    def parse(text: str) -> int:
        if not re.fullmatch(r"[+-]?\d{1,12}", text) or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"{what} is an integer from {low} to {high}, not {text!r}")
        return int(text)
    parse.__name__ = what  # argparse names the type in its messages
    return parse


LIMIT_NAMES = tuple(f.name for f in pb.Limits.DESCRIPTOR.fields)


def _limits(text: str) -> dict[str, int]:
    """--limits: a JSON object or KEY=N,KEY=N (keys: the proto's Limits fields)."""
    if text.lstrip().startswith("{"):
        limits = _json_arg(text, "--limits")
    else:
        pairs = [item.partition("=") for item in text.split(",") if item.strip()]
        if any(not sep or not value.strip().isdigit() for _, sep, value in pairs):
            raise argparse.ArgumentTypeError(f"limits are KEY=N,... or a JSON object, not {text!r}")
        limits = {key.strip(): int(value) for key, _, value in pairs}
    if not isinstance(limits, dict):
        raise argparse.ArgumentTypeError(f"--limits must be an object, not {text!r}")
    unknown = sorted(set(limits) - set(LIMIT_NAMES))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown limit(s) {', '.join(unknown)}; limits are {', '.join(LIMIT_NAMES)}")
    if any(type(v) is not int or v < 0 for v in limits.values()):
        raise argparse.ArgumentTypeError(f"each limit is an integer >= 0: {text!r}")
    return limits


STATE_NAMES = tuple(s.value for s in ProcessState)
KIND_NAMES = tuple(n for n in pb.ProcessKind.keys() if n != "PROCESS_KIND_UNSPECIFIED")


def _add_spawn_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--args", metavar="JSON", help="the program's args, as JSON")
    p.add_argument("--name", help="a registered name for the process")
    p.add_argument("--priority", type=_ranged("priority", -20, 20), default=0,
                   help="-20..20, higher runs first (default 0)")
    p.add_argument("--weight", type=_ranged("weight", 1, 10_000), default=0,
                   help="share of CPU among processes of its priority, 1..10000 (default 100)")
    p.add_argument("--limits", type=_limits, metavar="KEY=N,...",
                   help=f"resource limits, as KEY=N,... or a JSON object; keys: {', '.join(LIMIT_NAMES)}")
    p.add_argument("--monitor", type=_pid, metavar="PID",
                   help="a process or port that gets an EXIT message when this one ends")


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors in the CLI's own format (still exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"llmos: INVALID_ARGUMENT: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `llmos` command."""
    parser = _Parser(prog="llmos", description="Talk to an llmos kernel (llmosd).",
                     epilog="Exit status: 0 ok, 1 refused/timed out/process failed, 2 bad usage, 130 interrupted.")
    parser.add_argument("--server", default=default_target(),
                        help="HOST:PORT or unix:PATH (default: $LLMOS_SERVER or 127.0.0.1:50051; now %(default)s)")
    parser.add_argument("--version", action="version", version=f"llmos {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("run", help="run a program (.lua or .py), streaming its log; print its result as JSON",
                       description="Run a program as docker run does: its log is printed as it is written, "
                                   "its result (JSON) when it ends; Ctrl-C kills it; -d prints its pid and returns.")
    p.add_argument("file", metavar="FILE", help="a local .lua file (Lua) or .py file (a Python agent)")
    p.add_argument("-d", "--detach", action="store_true", help="print the pid and return at once")
    p.add_argument("--timeout", type=_seconds, metavar="S", help="kill the program after S seconds")
    _add_spawn_flags(p)
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("spawn", help="start a process and print its pid")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("file", nargs="?", metavar="FILE", help="a local .lua or .py file")
    source.add_argument("--lua", metavar="SRC", help="Lua source text")
    source.add_argument("--python", metavar="SRC", help="Python source text (a Python agent)")
    source.add_argument("--path", metavar="P", help="a program under the server's userland root")
    _add_spawn_flags(p)
    p.set_defaults(handler=cmd_spawn)

    p = sub.add_parser("send", help="send a JSON message; print its id")
    p.add_argument("to", metavar="TO", help="a pid or a registered name")
    p.add_argument("body", nargs="?", metavar="BODY",
                   help="JSON text, @FILE (JSON read from FILE) or - (JSON read from stdin); none: null")
    p.add_argument("--from", dest="sender", type=_pid, default=0, metavar="PID", help="the sender (for replies)")
    p.add_argument("--tag", default="")
    p.add_argument("--correlation-id", default="", metavar="C")
    p.add_argument("--notify-undelivered", action="store_true",
                   help="if it is never delivered, --from gets an UNDELIVERED message (not the dead-letter queue)")
    p.add_argument("--idempotency-key", metavar="K",
                   help="sending again with the same key (and --from) stores nothing new (default: a random one)")
    p.set_defaults(handler=cmd_send)

    p = sub.add_parser("recv", help="take a message from a mailbox and print it as JSON")
    p.add_argument("pid", type=_pid, metavar="PID")
    p.add_argument("--from", dest="sender", type=_pid, metavar="PID", help="only messages from this pid")
    p.add_argument("--tag", help="only messages with this tag")
    p.add_argument("--correlation-id", metavar="C", help="only messages with this correlation id")
    p.add_argument("--timeout", type=_seconds, default=None, metavar="S", help="give up after S seconds")
    p.set_defaults(handler=cmd_recv)

    p = sub.add_parser("wait", help="wait for a process to end; print its final info as JSON")
    p.add_argument("pid", type=_pid, metavar="PID")
    p.add_argument("--timeout", type=_seconds, metavar="S", help="give up after S seconds")
    p.set_defaults(handler=cmd_wait)

    p = sub.add_parser("kill", help="end processes")
    p.add_argument("pids", nargs="+", type=_pid, metavar="PID")
    p.add_argument("--reason", default="killed", help="the exit reason to record (default %(default)s)")
    p.set_defaults(handler=cmd_kill)

    p = sub.add_parser("ps", help="list processes (live ones; -a: ended ones too)")
    p.add_argument("-a", "--all", action="store_true", help="include ended processes")
    p.add_argument("-q", "--quiet", action="store_true", help="print only pids")
    p.add_argument("-o", "--output", choices=("table", "wide", "json"), default="table",
                   help="table (default), wide (more columns) or json (every field)")
    p.add_argument("--state", action="append", type=str.upper, choices=STATE_NAMES, metavar="STATE",
                   help=f"only this state (repeatable): {', '.join(STATE_NAMES)}")
    p.add_argument("--kind", action="append", type=str.upper, choices=KIND_NAMES, metavar="KIND",
                   help=f"only this kind (repeatable): {', '.join(KIND_NAMES)}")
    p.add_argument("--name", help="only the process registered under this name")
    p.add_argument("--parent", type=_pid, default=0, metavar="PID", help="only children of PID")
    p.set_defaults(handler=cmd_ps)

    p = sub.add_parser("inspect", help="print processes' full info as a JSON array")
    p.add_argument("pids", nargs="+", type=_pid, metavar="PID")
    p.set_defaults(handler=cmd_inspect)

    p = sub.add_parser("events", help="print process events (spawned, ended) as they happen")
    p.add_argument("--pid", type=_pid, default=0, metavar="PID", help="only this process's events")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text", help="json: one object a line")
    p.set_defaults(handler=cmd_events)

    p = sub.add_parser("logs", help="print a process's log (print / sys.log lines, a Python agent's output)",
                       description="Print a process's log. NOT_FOUND (exit status 1) if there is no such process, "
                                   "or if it ended longer ago than the server keeps logs (llmosd --log-retention); "
                                   "a process that wrote nothing prints nothing (exit status 0).")
    p.add_argument("pid", type=_pid, metavar="PID")
    p.add_argument("-f", "--follow", action="store_true",
                   help="keep printing new lines as the server streams them, until the process ends")
    p.add_argument("-n", "--tail", type=_count, metavar="N", help="only the last N lines (then follow)")
    p.add_argument("--since", type=_since, default=0, metavar="WHEN",
                   help="only lines written since WHEN: a duration ago (90s, 10m, 2h, 1d) or an ISO 8601 time")
    p.add_argument("-t", "--timestamps", action="store_true",
                   help="begin each line with when it was written (UTC; '-' if unknown)")
    p.set_defaults(handler=cmd_logs)

    p = sub.add_parser("top", help="processes by CPU use, refreshed like top")
    p.add_argument("--interval", type=_interval, default=1.0, metavar="S", help="seconds between refreshes")
    p.add_argument("-n", "--iterations", type=_count, default=0, help="stop after this many refreshes (0: never)")
    p.set_defaults(handler=cmd_top)

    p = sub.add_parser("port", help="open a mailbox for this shell to receive on; print its pid")
    p.add_argument("--name", help="a registered name for the port")
    p.set_defaults(handler=cmd_port)

    p = sub.add_parser("infer", help="generate text, streamed as it arrives")
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=_count, default=0, metavar="N", help="0: the server's default")
    p.add_argument("--temperature", type=float, metavar="T", help="0: greedy")
    p.add_argument("--seed", type=_count, metavar="S")
    p.add_argument("--pid", type=_pid, default=0, metavar="PID", help="the process charged for the tokens")
    p.add_argument("--timeout", type=_seconds, metavar="S", help="deadline for the whole request")
    p.set_defaults(handler=cmd_infer)

    fs = sub.add_parser("fs", help="the namespace's file tree: ls, cat, put, rm, mv, mkdir").add_subparsers(
        dest="fs_command", required=True, metavar="FS_COMMAND", parser_class=_Parser)
    p = fs.add_parser("ls", help="list a directory (default: the root)")
    p.add_argument("path", nargs="?", default="")
    p.set_defaults(handler=cmd_fs_ls)
    p = fs.add_parser("cat", help="write a file's bytes to stdout")
    p.add_argument("path")
    p.add_argument("--offset", type=_count, default=0, metavar="N")
    p.add_argument("--length", type=_count, default=0, metavar="N", help="0: to the end")
    p.set_defaults(handler=cmd_fs_cat)
    p = fs.add_parser("put", help="upload a local file (- for stdin); print the file's info as JSON")
    p.add_argument("local")
    p.add_argument("path")
    p.add_argument("--append", action="store_true")
    p.set_defaults(handler=cmd_fs_put)
    p = fs.add_parser("rm", help="delete a file or an empty directory")
    p.add_argument("path")
    p.set_defaults(handler=cmd_fs_rm)
    p = fs.add_parser("mv", help="rename a file or directory; print its info as JSON")
    p.add_argument("src")
    p.add_argument("dst")
    p.set_defaults(handler=cmd_fs_mv)
    p = fs.add_parser("mkdir", help="make a directory with its missing parents; print its info as JSON")
    p.add_argument("path")
    p.set_defaults(handler=cmd_fs_mkdir)

    p = sub.add_parser("completion", help="print a shell completion script: eval \"$(llmos completion bash)\"")
    p.add_argument("shell", choices=("bash", "zsh", "fish", "tcsh"))
    p.set_defaults(handler=None)

    p = sub.add_parser("ns", help="the namespace's use and quotas as JSON (admin: any namespace, --weight sets)")
    p.add_argument("name", nargs="?", default="")
    p.add_argument("--weight", type=int, default=0, help="(admin) its share of CPU against other namespaces' "
                   "(1..10000, default 100)")
    p.set_defaults(handler=lambda k, a: _print_ok(
        k.set_namespace(a.name, a.weight) if a.weight else k.get_namespace(a.name)))

    p = sub.add_parser("audit", help="the audit log's newest calls, one JSON line each (admin)")
    p.add_argument("--limit", type=int, default=100, metavar="N")
    p.set_defaults(handler=lambda k, a: _print_ok(*k.read_audit(a.limit)))

    # Tokens (admin only; the client sends $LLMOS_TOKEN): create prints the secret once.
    tok = sub.add_parser("token", help="tokens: create, list, revoke (admin)").add_subparsers(
        dest="token_command", required=True, metavar="TOKEN_COMMAND")
    p = tok.add_parser("create", help="print a new token's id and secret as JSON")
    p.add_argument("namespace")
    p.add_argument("role", choices=["admin", "owner", "reader"])
    p.add_argument("--label", default="")
    p.set_defaults(handler=lambda k, a: _print_ok(
        dict(zip(("id", "token"), k.create_token(a.namespace, a.role, a.label)))))
    p = tok.add_parser("list", help="every token's id, namespace, role and label, one JSON line each")
    p.set_defaults(handler=lambda k, a: _print_ok(*k.list_tokens()))
    p = tok.add_parser("revoke", help="revoke a token by id")
    p.add_argument("id")
    p.set_defaults(handler=lambda k, a: EXIT_OK if k.revoke_token(a.id) else _fail("NOT_FOUND", f"no token {a.id}"))

    dlq = sub.add_parser("dlq", help="the namespace's dead-letter queue: ls, show, retry, purge").add_subparsers(
        dest="dlq_command", required=True, metavar="DLQ_COMMAND")
    p = dlq.add_parser("ls", help="list dead letters, oldest first")
    p.add_argument("--receiver", type=_pid, default=0, metavar="PID", help="only those that were in PID's mailbox")
    p.add_argument("--limit", type=_positive, metavar="N", help="at most N of them")
    p.add_argument("--json", action="store_true", help="print them as a JSON array, whole")
    p.set_defaults(handler=cmd_dlq_ls)
    p = dlq.add_parser("show", help="print a dead letter, with its history, as JSON")
    p.add_argument("id", type=_positive, metavar="ID")
    p.set_defaults(handler=cmd_dlq_show)
    p = dlq.add_parser("retry", help="send a dead letter's message again; print the new message id")
    p.add_argument("id", type=_positive, metavar="ID")
    p.add_argument("--to", metavar="TO", help="a pid or registered name (default: its receiver)")
    p.set_defaults(handler=cmd_dlq_retry)
    p = dlq.add_parser("purge", help="delete dead letters for good; print how many")
    p.add_argument("ids", nargs="*", type=_positive, metavar="ID")
    p.add_argument("--all", action="store_true", help="every one of the namespace")
    p.add_argument("--before-ms", type=_positive, metavar="MS", help="those that came before this unix time (ms)")
    p.set_defaults(handler=cmd_dlq_purge)
    return parser


def _print_ok(*values: Any) -> int:
    for value in values:
        print(_dumps(value))
    return EXIT_OK


def completion_script(shell: str) -> str:
    """The completion script of `llmos` for `shell`, from argcomplete (which completes at run time from
    the parser itself, so commands and flags never go stale)."""
    try:
        import argcomplete
    except ImportError:
        raise UsageError("shell completion needs argcomplete: pip install argcomplete") from None
    return argcomplete.shellcode(["llmos"], shell=shell)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `llmos` command; returns the exit status."""
    parser = build_parser()
    try:
        import argcomplete
        argcomplete.autocomplete(parser)  # returns at once unless the shell asks for completions
    except ImportError:
        pass
    a = parser.parse_args(argv)
    try:
        if a.command == "completion":
            print(completion_script(a.shell))
            return EXIT_OK
        with Client(a.server) as k:
            return a.handler(k, a)
    except UsageError as e:
        _fail("INVALID_ARGUMENT", str(e))
        return EXIT_USAGE
    except LlmosError as e:
        hint = ""
        if e.code == grpc.StatusCode.UNAVAILABLE:
            hint = f" (is llmosd running at {a.server}? set --server or LLMOS_SERVER)"
        return _fail(e.code.name, e.message + hint)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `llmos ps | head -1`
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
