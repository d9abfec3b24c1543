"""Process logs in memory, bounded three ways so that no program can make the
kernel hold more than the operator allows: a line is cut at MAX_LINE
characters, a process keeps its last `process_chars` characters (and
MAX_LINES lines), and all logs together, of live and ended processes, hold at
most `total_chars`; over that, the logs of the processes that ended longest
ago are dropped first (ReadLog reports them as dropped), then the writer's
own oldest lines. Sizes are counted in characters, what a str costs at least.

Each line is kept with the time it was written (ms since the epoch; a Python
agent's lines, read from its output file, with the times its stdio wrote at
their starts: python/sandbox/launcher.py read_log_lines). An ended process's
log is also written to the store (kernel/store.py, bounded by --log-retention),
so ReadLog finds it after a restart or once memory has let it go.

Also the server's own log as JSON lines (llmosd --log-format json): JsonFormatter.
"""
from __future__ import annotations

import datetime
import json
import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .process import Process
    from .store import ProcessRecord

MAX_LINES = 1000
MAX_LINE = 16 << 10

LogLine = tuple[int, str]  # (written at, ms since the epoch (0: unknown, an older llmosd's agent line); the text)


def cut_line(line: str, chars: int | None = None) -> str:
    """`line` cut at MAX_LINE characters, saying how many were cut; `chars`: the whole line's
    length where `line` is only its start (a reader that keeps no more)."""
    chars = len(line) if chars is None else chars
    return line if chars <= MAX_LINE else f"{line[:MAX_LINE]} ... [{chars - MAX_LINE} characters cut]"


class Logs:
    def __init__(self, process_chars: int, total_chars: int) -> None:
        self.process_chars = process_chars
        self.total_chars = total_chars
        self.used = 0  # characters held, live and ended
        self._ended: OrderedDict[int, tuple[ProcessRecord, int]] = OrderedDict()  # pid -> (record, characters)

    def append(self, proc: Process, line: str, at_ms: int | None = None) -> str:
        """Add a line written at `at_ms` (None: now) to `proc`'s log (kernel lock held); the line
        as kept."""
        line = cut_line(line)
        log = proc.log
        log.append((int(time.time() * 1000) if at_ms is None else at_ms, line))
        proc.log_bytes += len(line)
        self.used += len(line)
        while len(log) > MAX_LINES or (proc.log_bytes > self.process_chars and len(log) > 1):
            self._drop_first(proc)
        while self.used > self.total_chars and self._ended:
            self._drop_ended()
        while self.used > self.total_chars and len(log) > 1:
            self._drop_first(proc)
        return line

    def replace(self, proc: Process, lines: list[LogLine]) -> None:
        """`proc`'s log is `lines` now (a Python agent's, read from its output at its end)."""
        self.used -= proc.log_bytes
        proc.log[:] = []
        proc.log_bytes = 0
        for at_ms, line in lines:
            self.append(proc, line, at_ms)

    def ended(self, proc: Process, rec: ProcessRecord) -> None:
        """`proc` ended: its log stays with its record, the first to go when memory runs short."""
        if proc.log_bytes:
            self._ended[proc.pid] = (rec, proc.log_bytes)

    def forget(self, pid: int) -> None:
        """An ended process's record leaves memory: so does its log."""
        entry = self._ended.pop(pid, None)
        if entry is not None:
            self.used -= entry[1]

    def _drop_first(self, proc: Process) -> None:
        _, first = proc.log.pop(0)
        proc.log_bytes -= len(first)
        proc.log_dropped += 1
        self.used -= len(first)

    def _drop_ended(self) -> None:
        _, (rec, chars) = self._ended.popitem(last=False)
        rec.log_dropped += len(rec.log or ())
        rec.log = []
        self.used -= chars


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (ISO 8601, UTC, ms), level, logger, message; the pid of the
    process a line is about (a process's own log line, see Kernel.log) and any exception."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
        }
        pid = getattr(record, "pid", None)
        if pid is not None:
            out["pid"] = pid
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)
