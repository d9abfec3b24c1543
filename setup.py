"""The build's one piece of code: pyproject.toml declares everything else.

The kernel's hot paths are plain Python modules, compiled with Cython as they are (no Cython
syntax, annotations not used as C types): the .py stays the one owner of every rule, and the
compiled module is a faster way to run it. A spawn costs 5-10% less CPU (tools/bench_kernel.py's
spawn figure with one virtual CPU; ARCHITECTURE.md has the trade-offs). The build records each
source's SHA-256 in llmosd/compiled.json (compiled.py owns its format), and llmosd/compiled.py loads
the .py instead of any compiled module whose source changed since (or of all of them, under
LLMOSD_INTERPRETED=1).
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
from types import ModuleType

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# The modules a spawn, a message and a slice pass through, by module name.
COMPILED = [
    "llmosd.kernel.kernel", "llmosd.kernel.run_queue", "llmosd.kernel.scheduler", "llmosd.kernel.store",
    "llmosd.kernel.namespaces", "llmosd.kernel.acks", "llmosd.kernel.logs", "llmosd.kernel.waiting",
    "llmosd.kernel.config", "llmosd.lua.slices", "llmosd.lua.runtime", "llmosd.services.files",
    "llmosd.services.sync", "llmosd.api.checks", "llmosd.api.authority",
]


def _source(module: str) -> str:
    return os.path.join("server", *module.split(".")) + ".py"


def _compiled_module() -> ModuleType:
    """llmosd/compiled.py, the manifest's one owner, loaded on its own (not the package)."""
    spec = importlib.util.spec_from_file_location("llmosd_compiled", _source("llmosd.compiled"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildExt(build_ext):
    """build_ext that builds in parallel and writes the manifest of what it compiled next to the
    modules (in the build, and in the source tree when building in place)."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if not self.parallel:
            self.parallel = os.cpu_count() or 1

    def run(self) -> None:
        super().run()
        compiled = _compiled_module()
        text = compiled.manifest_text({module: pathlib.Path(_source(module)) for module in COMPILED})
        places = [os.path.join(self.build_lib, "llmosd")]
        if self.inplace:
            places.append(self.get_finalized_command("build_py").get_package_dir("llmosd"))
        for place in places:
            os.makedirs(place, exist_ok=True)
            with open(os.path.join(place, compiled.MANIFEST_NAME), "w") as f:
                f.write(text)


setup(
    ext_modules=cythonize(
        # (-Warray-bounds: GCC misreads the generated float comparisons' check for None)
        [Extension(module, [_source(module)], extra_compile_args=["-Wno-array-bounds"]) for module in COMPILED],
        build_dir="build/cython",  # the generated C stays out of the source tree
        compiler_directives={"language_level": 3, "annotation_typing": False},
        nthreads=os.cpu_count() or 1,
        quiet=True,
    ),
    cmdclass={"build_ext": BuildExt},
)
