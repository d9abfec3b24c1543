"""The kernel's C extension, `_kernel` (its lock, mailboxes, processes' fields and Lua states; see
lua/state.c), loaded against lupa's Lua library.

lua/state.c and lua/sandbox.c call the Lua C API inside lupa's extension (lupa
provides the Lua library): that extension's symbols are made global before
our module is loaded against them. lupa ships no headers, so lua_api.h
declares the part of the API used, with values that depend on how that Lua
was built; they are checked here, before the module is loaded, and a Lua
that does not match fails the import with one line saying what differs.
Everything that uses the C side imports it from here.
"""
from __future__ import annotations

import ctypes
import os

import lupa
import lupa.lua54

# What lua_api.h assumes (Lua 5.4 as its luaconf.h configures it by default).
LUA_VERSION_NUM = 504
LUAI_MAXSTACK = 1_000_000
LUA_REGISTRYINDEX = -LUAI_MAXSTACK - 1000
LUA_RIDX_MAINTHREAD, LUA_RIDX_GLOBALS = 1, 2
LUA_EXTRASPACE = ctypes.sizeof(ctypes.c_void_p)
TYPE_TAGS = {"nil": 0, "boolean": 1, "light userdata": 2, "number": 3, "string": 4, "table": 5, "thread": 8,
             "userdata": 7}
SLACK = 64  # bytes the probe's allocator keeps before each block (see _probe_allocator)


class LuaMismatch(ImportError):
    """lupa's Lua is not the one lua_api.h was written for."""


def _api(lib: ctypes.CDLL) -> dict:
    L, i, ll, p, d, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_void_p, ctypes.c_double, ctypes.c_size_t
    signatures = {
        "lua_version": (d, [L]), "lua_newstate": (L, [p, p]), "lua_close": (None, [L]),
        "lua_checkstack": (i, [L, i]), "lua_type": (i, [L, i]), "lua_rawgeti": (i, [L, i, ll]),
        "lua_settop": (None, [L, i]), "lua_newthread": (L, [L]), "lua_pushinteger": (None, [L, ll]),
        "lua_tointegerx": (ll, [L, i, p]), "lua_pushnil": (None, [L]), "lua_pushboolean": (None, [L, i]),
        "lua_pushlightuserdata": (None, [L, p]), "lua_pushnumber": (None, [L, d]),
        "lua_pushlstring": (p, [L, ctypes.c_char_p, sz]), "lua_newuserdatauv": (p, [L, sz, i]),
    }
    api = {}
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
        api[name] = function
    return api


ALLOCATOR = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t)


def _probe_allocator() -> ALLOCATOR:
    """An allocator that keeps SLACK bytes before each block, so that the probe
    may look just before a thread (where lua_api.h puts the extra space)
    whatever size the extra space really has."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.restype, libc.free.argtypes = None, [ctypes.c_void_p]

    def allocate(ud: int | None, block: int | None, old: int, new: int) -> int | None:
        if new == 0:
            if block:
                libc.free(block - SLACK)
            return None
        fresh = libc.malloc(new + SLACK)
        if fresh is None:
            return None
        fresh += SLACK
        ctypes.memset(fresh - SLACK, 0, SLACK)
        if block:
            ctypes.memmove(fresh, block, min(old, new))
            libc.free(block - SLACK)
        return fresh

    return ALLOCATOR(allocate)


def check_lua(lib: ctypes.CDLL) -> None:
    """Raise LuaMismatch if the Lua in `lib` is not the one lua_api.h assumes."""
    api = _api(lib)
    version = api["lua_version"](None)
    if version != LUA_VERSION_NUM:
        raise LuaMismatch(f"llmosd needs Lua {LUA_VERSION_NUM} from lupa, but lupa {lupa.__version__} has {version:g}")
    allocator = _probe_allocator()
    state = api["lua_newstate"](ctypes.cast(allocator, ctypes.c_void_p), None)
    if not state:
        raise LuaMismatch("could not make a Lua state to check lupa's Lua against lua_api.h")
    try:
        problem = _probe(api, state)
    finally:
        api["lua_close"](state)
    if problem is not None:
        raise LuaMismatch(f"lupa {lupa.__version__}'s Lua 5.4 does not match llmosd's lua_api.h: {problem}")


def _probe(api: dict, state: int) -> str | None:
    """What differs from lua_api.h's assumptions, or None."""
    # A larger stack would make LUA_REGISTRYINDEX an ordinary (and out of range) index.
    if api["lua_checkstack"](state, LUAI_MAXSTACK + 16):
        return f"its stack may grow beyond LUAI_MAXSTACK = {LUAI_MAXSTACK}"
    if api["lua_type"](state, LUA_REGISTRYINDEX) != TYPE_TAGS["table"]:
        return f"the registry is not at LUA_REGISTRYINDEX = {LUA_REGISTRYINDEX} (another LUAI_MAXSTACK)"
    if api["lua_rawgeti"](state, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD) != TYPE_TAGS["thread"]:
        return "the registry's slot LUA_RIDX_MAINTHREAD does not hold the main thread"
    if api["lua_rawgeti"](state, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS) != TYPE_TAGS["table"]:
        return "the registry's slot LUA_RIDX_GLOBALS does not hold the globals"
    api["lua_settop"](state, 0)
    big = 2 ** 62 + 1
    api["lua_pushinteger"](state, big)
    if api["lua_tointegerx"](state, -1, None) != big:
        return "lua_Integer is not 64 bits"
    pushes = {
        "nil": lambda: api["lua_pushnil"](state), "boolean": lambda: api["lua_pushboolean"](state, 1),
        "light userdata": lambda: api["lua_pushlightuserdata"](state, 1),
        "number": lambda: api["lua_pushnumber"](state, 0.5), "string": lambda: api["lua_pushlstring"](state, b"s", 1),
        "userdata": lambda: api["lua_newuserdatauv"](state, 8, 1),
    }
    for name, push in pushes.items():
        push()
        if api["lua_type"](state, -1) != TYPE_TAGS[name]:
            return f"the type tag of a {name} is not {TYPE_TAGS[name]}"
    # A new thread copies the main thread's extra space, where the sandbox keeps its context.
    marker = 0x5EED_1E55
    ctypes.c_void_p.from_address(state - LUA_EXTRASPACE).value = marker
    thread = api["lua_newthread"](state)
    if ctypes.c_void_p.from_address(thread - LUA_EXTRASPACE).value != marker:
        return f"a thread's extra space (LUA_EXTRASPACE) is smaller than {LUA_EXTRASPACE} bytes"
    return None


_lupa_library = ctypes.CDLL(lupa.lua54.__file__, mode=os.RTLD_NOW | os.RTLD_GLOBAL | os.RTLD_NOLOAD)
check_lua(_lupa_library)
from . import _kernel  # noqa: E402

__all__ = ["_kernel"]
