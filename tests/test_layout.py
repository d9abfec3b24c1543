"""The server's layout (ARCHITECTURE.md): no import cycles, the kernel independent of its userlands,
and no source file so long that it hides what it holds."""
from __future__ import annotations

import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "server" / "llmosd"
MAX_LINES = 600
USERLANDS = ("llmosd.lua", "llmosd.python")
# Packages that must never import a userland: the kernel reaches one through kernel/runtime.py's
# interface; the syscall table and the services reach the kernel only.
USERLAND_FREE = ("llmosd.kernel", "llmosd.api", "llmosd.services", "llmosd.engine")


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    """Every llmosd module `name` imports, anywhere in it (TYPE_CHECKING blocks and functions too:
    a cycle there is still two modules that each need the other)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from . import x` imports the module x when there is one
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in modules or node.module is None else target)
    return {m for m in out if m.startswith("llmosd") and m != name}


def _native_modules() -> set[str]:
    """The C extensions' module names (from pyproject.toml): imports of them resolve too."""
    text = (PACKAGE.parent.parent / "pyproject.toml").read_text()
    return set(re.findall(r'^name = "(llmosd\.[\w.]+)"', text, re.M))


def test_every_import_of_the_package_names_a_module_that_exists() -> None:
    """A relative import that names no module (left behind by a move) fails only when it runs,
    which for an import inside a function may be a rare error path."""
    modules = _modules()
    known = set(modules) | _native_modules()
    missing = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level and node.module:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + [node.module])
                if target not in known:
                    missing.append(f"{name} imports {target}")
    assert missing == []


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(name, path, modules) if m in modules} for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_server_package_has_no_import_cycle() -> None:
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_kernel_api_and_services_never_import_a_userland() -> None:
    wrong = sorted(
        f"{name} imports {target}" for name, targets in _graph().items() if name.startswith(USERLAND_FREE)
        for target in targets if target.startswith(USERLANDS)
    )
    assert wrong == []


def _opening_comment(path: pathlib.Path) -> str:
    text = path.read_text()
    if path.suffix == ".py":
        return ast.get_docstring(ast.parse(text)) or ""
    match = re.match(r"\s*/\*(.*?)\*/", text, re.S)
    return match.group(1) if match else ""


@pytest.mark.parametrize("path", sorted(p for ext in ("py", "c", "h") for p in PACKAGE.rglob(f"*.{ext}")),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_long_file_says_why(path: pathlib.Path) -> None:
    lines = path.read_text().count("\n")
    if lines > MAX_LINES:
        assert "Why one file" in _opening_comment(path), (
            f"{path.name} has {lines} lines: split it, or say why it is one file in its opening docstring/comment "
            f"(a paragraph starting 'Why one file')")
