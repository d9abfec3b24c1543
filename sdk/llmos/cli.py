"""`llmos`: the command line client of an llmos kernel.

    llmos run agent.lua --args '{"n": 3}'      spawn, wait, print the result as JSON
    llmos spawn agent.lua --name worker        print the new pid
    llmos send worker '{"job": 1}' --from 7    print the message id
    llmos recv 7 --timeout 5                   print the message as JSON
    llmos wait 12 / kill 12 / ps --all / port / infer "Once upon a time"
    llmos fs put notes.md docs/notes.md / fs cat docs/notes.md / fs ls docs / fs mv A B / fs rm A
    llmos dlq ls / dlq show 3 / dlq retry 3 --to worker / dlq purge --all      the dead-letter queue

The server is --server, else $LLMOS_SERVER, else 127.0.0.1:50051 (HOST:PORT or unix:PATH).
Exit status: 0 on success; 1 when the server refuses, a wait or recv times out, or the
process did not exit normally; 2 for a bad command line. Errors go to stderr as
"llmos: CODE: message".
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Iterator, Sequence

import grpc

from .client import Client, DeadLetter, ProcessInfo, default_target
from .errors import LlmosError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


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
def cmd_run(k: Client, a: argparse.Namespace) -> int:
    args = _json_arg(a.args, "--args") if a.args is not None else None
    info = k.run(_read_file(a.file), args=args, timeout=a.timeout, source_name=os.path.basename(a.file))
    if info.ok:
        print(_dumps(info.result))
    return _report_end(info)


def cmd_spawn(k: Client, a: argparse.Namespace) -> int:
    args = _json_arg(a.args, "--args") if a.args is not None else None
    program = {"lua": a.lua, "path": a.path}
    if a.file is not None:
        program.update(lua=_read_file(a.file), source_name=os.path.basename(a.file))
    print(k.spawn(**program, args=args, name=a.name, priority=a.priority))
    return EXIT_OK


def cmd_send(k: Client, a: argparse.Namespace) -> int:
    to: int | str = int(a.to) if a.to.isdigit() else a.to
    body = _json_arg(a.body, "the message body")
    print(k.send(to, body, sender=a.sender, tag=a.tag, correlation_id=a.correlation_id,
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
    print("killed" if k.kill(a.pid, a.reason) else "already ended")
    return EXIT_OK


PS_COLUMNS = ("PID", "NAME", "KIND", "STATE", "PRIO", "CPU_MS", "MSGS", "MAILBOX")


def format_ps(processes: Sequence[ProcessInfo]) -> str:
    """The `llmos ps` table; MSGS is messages received/sent, MAILBOX the messages waiting."""
    return _table(PS_COLUMNS, [
        (str(p.pid), p.name or "-", p.kind, p.state, str(p.priority), str(p.usage.get("cpu_ms", 0)),
         f"{p.usage.get('messages_received', 0)}/{p.usage.get('messages_sent', 0)}",
         str(p.usage.get("mailbox_len", 0)))
        for p in processes
    ])


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart."""
    lines = [tuple(columns), *rows]
    widths = [max(len(row[i]) for row in lines) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines)


def cmd_ps(k: Client, a: argparse.Namespace) -> int:
    print(format_ps(k.ps(include_ended=a.all)))
    return EXIT_OK


def cmd_logs(k: Client, a: argparse.Namespace) -> int:
    offset = 0
    while True:
        lines, offset = k.read_log(a.pid, offset)
        for line in lines:
            print(line, flush=True)
        if not a.follow or k.get(a.pid).ended:
            return EXIT_OK
        time.sleep(a.interval)


TOP_COLUMNS = ("PID", "NAME", "KIND", "STATE", "PRIO", "WEIGHT", "CPU%", "CPU_MS", "MEM_KB", "TOKENS", "MSGS",
               "MAILBOX")


def format_top(now: Sequence[ProcessInfo], before: dict[int, int], seconds: float) -> str:
    """The `llmos top` table: processes by CPU use over the last interval, busiest first."""
    def cpu_percent(p: ProcessInfo) -> float:
        return 100.0 * (p.usage.get("cpu_ms", 0) - before.get(p.pid, 0)) / (seconds * 1000) if seconds else 0.0

    busiest = sorted(now, key=lambda p: (-cpu_percent(p), p.pid))
    return _table(TOP_COLUMNS, [
        (str(p.pid), p.name or "-", p.kind, p.state + (f":{p.blocked_on}" if p.blocked_on else ""),
         str(p.priority), str(p.weight), f"{cpu_percent(p):.1f}", str(p.usage.get("cpu_ms", 0)),
         str(p.usage.get("memory_bytes", 0) // 1024), str(p.usage.get("tokens", 0)),
         f"{p.usage.get('messages_received', 0)}/{p.usage.get('messages_sent', 0)}",
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
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"a pid is a positive integer, not {text!r}")
    return int(text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"a positive integer, not {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"a timeout is a number of seconds >= 0, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `llmos` command."""
    parser = argparse.ArgumentParser(prog="llmos", description="Talk to an llmos kernel (llmosd).",
                                     epilog="Exit status: 0 ok, 1 refused/timed out/process failed, 2 bad usage.")
    parser.add_argument("--server", default=default_target(),
                        help="HOST:PORT or unix:PATH (default: $LLMOS_SERVER or 127.0.0.1:50051; now %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run a Lua program to its end and print its result as JSON")
    p.add_argument("file", metavar="FILE.lua")
    p.add_argument("--args", metavar="JSON", help="the program's args, as JSON")
    p.add_argument("--timeout", type=_seconds, metavar="S", help="kill the program after S seconds")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("spawn", help="start a process and print its pid")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("file", nargs="?", metavar="FILE.lua", help="a local Lua file")
    source.add_argument("--lua", metavar="SRC", help="Lua source text")
    source.add_argument("--path", metavar="P", help="a program under the server's userland root")
    p.add_argument("--args", metavar="JSON", help="the program's args, as JSON")
    p.add_argument("--name", help="a registered name for the process")
    p.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
    p.set_defaults(handler=cmd_spawn)

    p = sub.add_parser("send", help="send a JSON message; print its id")
    p.add_argument("to", metavar="TO", help="a pid or a registered name")
    p.add_argument("body", metavar="JSON")
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

    p = sub.add_parser("kill", help="end a process")
    p.add_argument("pid", type=_pid, metavar="PID")
    p.add_argument("--reason", default="killed", help="the exit reason to record (default %(default)s)")
    p.set_defaults(handler=cmd_kill)

    p = sub.add_parser("ps", help="list processes")
    p.add_argument("--all", action="store_true", help="include ended processes")
    p.set_defaults(handler=cmd_ps)

    p = sub.add_parser("logs", help="print a process's log (print / sys.log lines, a Python agent's output)")
    p.add_argument("pid", type=int)
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until the process ends")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between looks with --follow")
    p.set_defaults(handler=cmd_logs)

    p = sub.add_parser("top", help="processes by CPU use, refreshed like top")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    p.add_argument("-n", "--iterations", type=int, default=0, help="stop after this many refreshes (0: never)")
    p.set_defaults(handler=cmd_top)

    p = sub.add_parser("port", help="open a mailbox for this shell to receive on; print its pid")
    p.add_argument("--name", help="a registered name for the port")
    p.set_defaults(handler=cmd_port)

    p = sub.add_parser("infer", help="generate text, streamed as it arrives")
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=int, default=0, metavar="N", help="0: the server's default")
    p.add_argument("--temperature", type=float, metavar="T", help="0: greedy")
    p.add_argument("--seed", type=int, metavar="S")
    p.add_argument("--pid", type=_pid, default=0, metavar="PID", help="the process charged for the tokens")
    p.add_argument("--timeout", type=_seconds, metavar="S", help="deadline for the whole request")
    p.set_defaults(handler=cmd_infer)

    fs = sub.add_parser("fs", help="the namespace's file tree: ls, cat, put, rm, mv").add_subparsers(
        dest="fs_command", required=True, metavar="FS_COMMAND")
    p = fs.add_parser("ls", help="list a directory (default: the root)")
    p.add_argument("path", nargs="?", default="")
    p.set_defaults(handler=cmd_fs_ls)
    p = fs.add_parser("cat", help="write a file's bytes to stdout")
    p.add_argument("path")
    p.add_argument("--offset", type=int, default=0, metavar="N")
    p.add_argument("--length", type=int, default=0, metavar="N", help="0: to the end")
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `llmos` command; returns the exit status."""
    a = build_parser().parse_args(argv)
    try:
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
