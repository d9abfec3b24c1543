"""Which of llmosd's Python modules run compiled, and the guard that keeps a stale build from running.

setup.py compiles the modules on the kernel's hot paths with Cython, from the same .py files: the
source stays the one owner of every rule. A compiled module sits next to its .py, and Python's
import prefers it, so an edit would run only after the next build. The build therefore records
each source's SHA-256 in compiled.json, and `SourceUnlessVouched` (installed by llmosd/__init__.py)
loads the .py instead of any compiled twin that the record does not vouch for, with a warning.
Under LLMOSD_INTERPRETED=1 it loads every .py (for pdb, coverage, sys.settrace).
"""
from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import pathlib
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
MANIFEST_NAME = "compiled.json"
MANIFEST = PACKAGE_DIR / MANIFEST_NAME
INTERPRETED_ENV = "LLMOSD_INTERPRETED"


def vouched() -> dict[str, str]:
    """Module name -> the SHA-256 of the source its compiled module was built from (the last build's)."""
    try:
        return json.loads(MANIFEST.read_text())
    except (OSError, ValueError):
        return {}


def source_hash(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest_text(sources: dict[str, pathlib.Path]) -> str:
    """The manifest of a build that compiled `sources` (module name -> its .py), as setup.py writes it."""
    return json.dumps({name: source_hash(path) for name, path in sources.items()}, indent=1, sort_keys=True) + "\n"


def stale() -> list[str]:
    """The compiled modules whose .py changed since the build (what a rebuild would fix)."""
    return sorted(name for name, digest in vouched().items()
                  if (source := _source_of(name)).exists() and source_hash(source) != digest)


def _source_of(name: str) -> pathlib.Path:
    return PACKAGE_DIR.joinpath(*name.split(".")[1:]).with_suffix(".py")


class SourceUnlessVouched(importlib.abc.MetaPathFinder):
    """Loads an llmosd module from its .py when a compiled twin is there but not vouched for by
    the manifest as built from exactly that source (or, with `interpreted`, always)."""

    def __init__(self, vouched: dict[str, str], interpreted: bool) -> None:
        self.vouched = vouched
        self.interpreted = interpreted

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith("llmosd.") or path is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
            return None
        source = pathlib.Path(spec.origin).with_name(fullname.rpartition(".")[2] + ".py")
        if not source.exists():
            return None  # a C extension (llmosd._kernel), not a compiled Python module
        if not self.interpreted:
            if self.vouched.get(fullname) == source_hash(source):
                return spec
            warnings.warn(f"{source} changed since it was compiled: it runs interpreted, slower, until the next "
                          "build (bash tools/setup.sh)", RuntimeWarning, stacklevel=2)
        return importlib.util.spec_from_file_location(fullname, source)


def install() -> None:
    """Put the guard first on the import path (once)."""
    if not any(isinstance(finder, SourceUnlessVouched) for finder in sys.meta_path):
        sys.meta_path.insert(0, SourceUnlessVouched(vouched(), os.environ.get(INTERPRETED_ENV) == "1"))


def is_compiled(module: ModuleType) -> bool:
    """Whether `module` runs compiled."""
    return not str(getattr(module, "__file__", "")).endswith(".py")


def mode() -> str:
    """How llmosd's modules run, in words (the server's start-up log, the benchmarks' headers)."""
    if os.environ.get(INTERPRETED_ENV) == "1":
        return f"interpreted ({INTERPRETED_ENV}=1)"
    built = vouched()
    if not built:
        return "interpreted (not compiled: run bash tools/setup.sh)"
    behind = stale()
    if behind:
        return f"{len(built) - len(behind)} of {len(built)} modules compiled ({', '.join(behind)} changed since the build)"
    return f"compiled ({len(built)} modules, Cython)"
