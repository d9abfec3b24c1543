"""The kernel's C extension, `_lua`, loaded against lupa's Lua library.

_lua.c and _sandbox.c call the Lua C API inside lupa's extension (lupa
provides the Lua library): that extension's symbols are made global before
our module is loaded against them. Everything that uses the C side imports
it from here.
"""
from __future__ import annotations

import ctypes
import os

import lupa.lua54 as lupa

ctypes.CDLL(lupa.__file__, mode=os.RTLD_NOW | os.RTLD_GLOBAL | os.RTLD_NOLOAD)
from . import _lua  # noqa: E402

__all__ = ["_lua"]
