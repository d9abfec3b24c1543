"""The kernel's hot modules run compiled (setup.py), never from a build older than their source
(llmosd/compiled.py), and run the same interpreted."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import pytest

import llmosd.kernel
from llmosd import compiled


def test_the_build_compiled_every_listed_module_from_its_current_source() -> None:
    vouched = compiled.vouched()
    assert "llmosd.kernel.kernel" in vouched and "llmosd.kernel.scheduler" in vouched
    assert compiled.stale() == []
    if os.environ.get(compiled.INTERPRETED_ENV) == "1":
        pytest.skip("LLMOSD_INTERPRETED=1: everything runs from source")
    for name in vouched:
        module = importlib.import_module(name)
        assert compiled.is_compiled(module), f"{name} runs from {module.__file__}"


def test_mode_says_how_the_modules_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(compiled.INTERPRETED_ENV, raising=False)
    assert compiled.mode() == f"compiled ({len(compiled.vouched())} modules, Cython)"
    monkeypatch.setattr(compiled, "stale", lambda: ["llmosd.kernel.kernel"])
    assert compiled.mode().endswith("(llmosd.kernel.kernel changed since the build)")
    monkeypatch.setattr(compiled, "vouched", lambda: {})
    assert compiled.mode().startswith("interpreted (not compiled")
    monkeypatch.setenv(compiled.INTERPRETED_ENV, "1")
    assert compiled.mode() == "interpreted (LLMOSD_INTERPRETED=1)"


def _spec(finder: compiled.SourceUnlessVouched, name: str):
    return finder.find_spec(name, llmosd.kernel.__path__)


def test_a_compiled_module_loads_only_when_the_manifest_vouches_for_its_source() -> None:
    name = "llmosd.kernel.run_queue"
    source = compiled.PACKAGE_DIR / "kernel" / "run_queue.py"
    good = compiled.SourceUnlessVouched({name: compiled.source_hash(source)}, interpreted=False)
    spec = _spec(good, name)
    assert spec is not None and not spec.origin.endswith(".py")  # the compiled twin
    for manifest in ({}, {name: "0" * 64}):  # never built, or built from another source
        with pytest.warns(RuntimeWarning, match="run_queue.py changed since it was compiled"):
            spec = _spec(compiled.SourceUnlessVouched(manifest, interpreted=False), name)
        assert spec.origin == str(source)
    everything = compiled.SourceUnlessVouched({name: compiled.source_hash(source)}, interpreted=True)
    assert _spec(everything, name).origin == str(source)


def test_the_guard_leaves_other_modules_to_the_default_import() -> None:
    finder = compiled.SourceUnlessVouched({}, interpreted=True)
    assert finder.find_spec("llmosd._kernel", llmosd.__path__) is None  # a C extension
    assert _spec(finder, "llmosd.kernel.journal") is None  # never compiled
    assert finder.find_spec("json", None) is None  # not ours


PROGRAM = """
local child = sys.spawn{lua = "return args * 2", args = 21, monitor = true}
local exit = sys.recv{tag = "EXIT"}
return {child = exit.body.pid == child, result = exit.body.result}
"""


@pytest.mark.parametrize("interpreted", ["1", "0"])
def test_the_kernel_runs_the_same_compiled_or_interpreted(tmp_path, interpreted: str) -> None:
    script = textwrap.dedent(f"""
        import json, time
        import llmosd.compiled as compiled
        import llmosd.kernel.kernel as kernel_module
        from llmosd.kernel.config import KernelConfig, SpawnSpec
        from llmosd.lua.slices import LuaRuntime
        k = kernel_module.Kernel(KernelConfig(data_dir={str(tmp_path)!r}, cpus=1))
        k.add_runtime(LuaRuntime(k))
        pid = k.spawn(SpawnSpec(lua={PROGRAM!r}))
        deadline = time.monotonic() + 30
        while pid in k.procs and time.monotonic() < deadline:
            time.sleep(0.01)
        rec = k.ended[pid]
        print(json.dumps([compiled.is_compiled(kernel_module), rec.state, rec.result]))
        k.shutdown()
    """)
    env = dict(os.environ, **{compiled.INTERPRETED_ENV: interpreted})
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    is_compiled, state, result = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    assert is_compiled == (interpreted == "0")
    assert (state, result) == ("EXITED", {"child": True, "result": 42})
