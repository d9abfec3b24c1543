"""llmosd: the llmos kernel, a gRPC server for LLM agent processes."""
from .compiled import install as _install_compiled_guard

_install_compiled_guard()  # before any module that may run compiled is imported (compiled.py says why)
