"""The userland library: the modules Lua programs `require` (docs/userland-library.md).

A module name is a dotted identifier ("supervisor", "team.roles"); "a.b" is the file a/b.lua
of the first library directory that has it: the `--lib DIR`s in the order given, then llmos's
own (the package llmos.std, where the Python twins of its modules live too). No other name
reaches a file: no "..", "/", NUL or over-long names, and nothing outside these directories.
The source is read by the kernel once per server run and kept (the library is read-only while
the server runs: restart llmosd to pick up a changed module); each process compiles it with
load's metered parser (lua/sandbox.c's sb_require) and keeps the module's value.
"""
from __future__ import annotations

import functools
import re
import threading
from pathlib import Path

from ..api.errors import InvalidArgument, NotFound

MAX_MODULE_NAME = 256  # as other names (api/checks.py MAX_NAME_LEN)
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*\Z")


def bundled_dir() -> Path:
    """llmos's own library: the directory of the package llmos.std (shipped in the wheel)."""
    import llmos.std

    return Path(llmos.std.__file__).parent


def module_name(value: object) -> str:
    """`value` if it is a module name, else InvalidArgument saying what a name is."""
    if type(value) is bytes:
        value = value.decode(errors="replace")
    if not isinstance(value, str) or not 0 < len(value) <= MAX_MODULE_NAME or not _MODULE_NAME.match(value):
        shown = repr(value)[:80] if isinstance(value, str) else f"a {type(value).__name__}"
        raise InvalidArgument(f"require: {shown} is not a module name: names are dotted identifiers "
                              f"(letters, digits, _; like 'supervisor' or 'team.roles') of at most "
                              f"{MAX_MODULE_NAME} characters")
    return value


class Library:
    """The library directories and the sources read from them so far."""

    def __init__(self, lib_dirs: tuple[str, ...] = ()) -> None:
        self.dirs = tuple(Path(d).resolve() for d in lib_dirs) + (bundled_dir(),)
        self._sources: dict[str, tuple[bytes, bytes]] = {}
        self._lock = threading.Lock()  # a leaf lock: two processes may require at once

    def source(self, name: object) -> tuple[bytes, bytes]:
        """(source, chunk name) of the module `name`: InvalidArgument for a bad name,
        NotFound if no library directory has it."""
        name = module_name(name)
        with self._lock:
            found = self._sources.get(name)
        if found is not None:
            return found
        rel = "/".join(name.split(".")) + ".lua"
        for root in self.dirs:
            path = root / rel
            if path.is_file():
                try:
                    found = (path.read_bytes(), f"={rel}".encode())
                except OSError as e:
                    raise NotFound(f"require: module '{name}' cannot be read: {e.strerror}") from None
                with self._lock:
                    self._sources.setdefault(name, found)
                return found
        raise NotFound(f"require: module '{name}' not found in the userland library "
                       f"({len(self.dirs) - 1} --lib director{'y' if len(self.dirs) == 2 else 'ies'} "
                       f"and llmos's own)")


@functools.lru_cache(maxsize=None)
def library(lib_dirs: tuple[str, ...]) -> Library:
    """The one Library of a server's configured directories."""
    return Library(lib_dirs)
