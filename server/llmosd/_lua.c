/*
 * llmosd._lua: the kernel's binding to the Lua states of its processes.
 *
 * A State is one process's Lua 5.4 state: only the libraries the sandbox
 * keeps (base, coroutine, table, string, math, utf8, os), memory counted and
 * capped by its own allocator, and the sandbox (_sandbox.c) built into it.
 * The kernel runs the program with resume(); the program reaches the kernel
 * through four bridge functions, C closures that call the process's Python
 * side (LuaProcess.check, send, try_recv and call).
 *
 * Lua runs without the GIL: resume() releases it, and a bridge call takes it
 * back while Python runs. Values cross by JSON's rules, converted here:
 *   - Python to Lua: None, booleans, numbers, bytes and str as strings, dicts
 *     as tables keyed by strings, lists as arrays (None inside is a hole);
 *   - Lua to Python: a string given directly as bytes (the kernel decides what
 *     it means), a table as a dict or a list with text strings inside (see
 *     lua_runtime.from_lua); a value that cannot cross becomes a BadValue
 *     saying why, which the kernel reports with its context.
 * A Lua error must never unwind through code holding Python references or
 * the GIL: values are pushed inside lua_pcall, and read with calls that
 * cannot raise.
 *
 * _preempt.c, compiled into this module, interrupts a running program on a
 * signal from the scheduler.
 *
 * Why not lupa's LuaRuntime: it opens every standard library and its own
 * Python module in each state (78 µs of every spawn here, and memory the
 * sandbox then drops), and wraps each value that crosses in a Python object.
 * lupa still provides the Lua library itself (see lua_api.h).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "lua_api.h"

#define MAX_DEPTH 64 /* how deep a value that crosses may nest */

enum { BRIDGE_CHECK, BRIDGE_SEND, BRIDGE_TRY_RECV, BRIDGE_CALL, BRIDGE_COUNT };
static const char *const BRIDGE_METHODS[BRIDGE_COUNT] = {"check", "send", "try_recv", "call"};

static PyObject *BadValue; /* the exception class whose instances stand for values that cannot cross */
static char STEP_KEY;      /* registry key (its address) of the sandbox's step function */

/* Each state keeps its small blocks (most of its objects) in chunks of its
 * own: Lua gives a block's size back when it frees or resizes it, so a block
 * needs no header, a freed one goes on its size class's list for the state to
 * reuse, and closing the state frees a few chunks instead of hundreds of
 * blocks (which took 40 µs of every process's end with malloc). Larger blocks
 * are malloc's. A state is only ever used by one thread at a time. */
#define GRAIN 16 /* more than any Lua object needs to be aligned to */
#define SMALL_MAX 256
#define CLASSES (SMALL_MAX / GRAIN)
#define CHUNK_BYTES 4096

typedef struct Chunk {
    struct Chunk *next;
} Chunk; /* its blocks start GRAIN bytes in */

typedef struct {
    size_t used;            /* bytes the state holds */
    size_t limit;           /* 0: no limit */
    void *free[CLASSES];    /* freed small blocks by size class, linked through their first word */
    char *next, *end;       /* the unused rest of the newest chunk */
    Chunk *chunks;          /* all of them, to free with the state */
} Heap;

typedef struct {
    PyObject_HEAD
    lua_State *L;
    Heap heap;
    PyObject *bridge;                 /* a weak reference to the process's Python side, which owns the state */
    PyObject *methods[BRIDGE_COUNT];  /* the bridge functions of its class */
} State;

static size_t size_class(size_t size) /* 1 <= size <= SMALL_MAX */
{
    return (size - 1) / GRAIN;
}

static void *take_small(Heap *heap, size_t size)
{
    size_t class = size_class(size), bytes = (class + 1) * GRAIN;
    void *block = heap->free[class];
    Chunk *chunk;
    if (block != NULL) {
        heap->free[class] = *(void **)block;
        return block;
    }
    if ((size_t)(heap->end - heap->next) < bytes) { /* the old chunk's tail, under one block, is left */
        chunk = malloc(CHUNK_BYTES);
        if (chunk == NULL)
            return NULL;
        chunk->next = heap->chunks;
        heap->chunks = chunk;
        heap->next = (char *)chunk + GRAIN;
        heap->end = (char *)chunk + CHUNK_BYTES;
    }
    block = heap->next;
    heap->next += bytes;
    return block;
}

static void give_back(Heap *heap, void *block, size_t size)
{
    size_t class;
    if (size > SMALL_MAX) {
        free(block);
        return;
    }
    class = size_class(size);
    *(void **)block = heap->free[class];
    heap->free[class] = block;
}

/* The allocator of every State; the state is its data. */
static void *allocate(void *ud, void *ptr, size_t osize, size_t nsize)
{
    Heap *heap = &((State *)ud)->heap;
    void *block;
    if (ptr == NULL)
        osize = 0; /* it then tells what kind of object is being made */
    if (nsize == 0) {
        if (ptr != NULL)
            give_back(heap, ptr, osize);
        heap->used -= osize;
        return NULL;
    }
    if (nsize > osize && heap->limit != 0 && heap->used + (nsize - osize) > heap->limit)
        return NULL; /* Lua raises "not enough memory" */
    if (ptr != NULL && osize > SMALL_MAX && nsize > SMALL_MAX) {
        block = realloc(ptr, nsize);
    } else if (ptr != NULL && osize <= SMALL_MAX && nsize <= SMALL_MAX && size_class(osize) == size_class(nsize)) {
        block = ptr;
    } else {
        block = nsize <= SMALL_MAX ? take_small(heap, nsize) : malloc(nsize);
        if (block != NULL && ptr != NULL) {
            memcpy(block, ptr, osize < nsize ? osize : nsize);
            give_back(heap, ptr, osize);
        }
    }
    if (block == NULL) {
        if (nsize > osize)
            return NULL;
        /* Lua relies on shrinking never failing. The block stays where it is,
         * counted at its new size as Lua will give it back; if it was malloc's
         * and is now small, it is reused as a small block and never returned
         * to malloc, which only matters with malloc failing. */
        block = ptr;
    }
    heap->used += nsize - osize;
    return block;
}

static State *state_of(lua_State *L)
{
    void *ud;
    lua_getallocf(L, &ud);
    return ud;
}

/* -- Python to Lua (inside lua_pcall: errors unwind to it) ---------------------------------- */
static void push_value(lua_State *L, PyObject *value, int depth)
{
    if (value == Py_None) {
        lua_pushnil(L);
    } else if (PyBool_Check(value)) {
        lua_pushboolean(L, value == Py_True);
    } else if (PyLong_Check(value)) {
        int overflow;
        long long n = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (overflow)
            lua_pushnumber(L, PyLong_AsDouble(value));
        else
            lua_pushinteger(L, n);
    } else if (PyFloat_Check(value)) {
        lua_pushnumber(L, PyFloat_AS_DOUBLE(value));
    } else if (PyBytes_Check(value)) {
        lua_pushlstring(L, PyBytes_AS_STRING(value), (size_t)PyBytes_GET_SIZE(value));
    } else if (PyUnicode_Check(value)) {
        Py_ssize_t len;
        const char *text = PyUnicode_AsUTF8AndSize(value, &len);
        if (text == NULL) {
            PyErr_Clear();
            luaL_error(L, "a string that is not valid text cannot pass to Lua");
        }
        lua_pushlstring(L, text, (size_t)len);
    } else if (PyDict_Check(value) || PyList_Check(value) || PyTuple_Check(value)) {
        if (depth > MAX_DEPTH)
            luaL_error(L, "value nests deeper than %d levels", MAX_DEPTH);
        luaL_checkstack(L, 3, "value nests too deep");
        if (PyDict_Check(value)) {
            Py_ssize_t pos = 0;
            PyObject *key, *item;
            lua_createtable(L, 0, (int)PyDict_GET_SIZE(value));
            while (PyDict_Next(value, &pos, &key, &item)) {
                push_value(L, key, depth + 1);
                push_value(L, item, depth + 1);
                lua_rawset(L, -3);
            }
        } else {
            PyObject *sequence = value;
            Py_ssize_t i, n = PySequence_Fast_GET_SIZE(sequence);
            lua_createtable(L, (int)n, 0);
            for (i = 0; i < n; i++) {
                PyObject *item = PySequence_Fast_GET_ITEM(sequence, i);
                if (item != Py_None) {
                    push_value(L, item, depth + 1);
                    lua_rawseti(L, -2, i + 1);
                }
            }
        }
    } else {
        luaL_error(L, "cannot pass a %s to Lua", Py_TYPE(value)->tp_name);
    }
}

/* Pushes the values of the tuple given as light userdata (or the one value,
 * if it is not a tuple): a Python function's answer, or resume()'s arguments. */
static int push_values(lua_State *L)
{
    PyObject *values = lua_touserdata(L, 1);
    Py_ssize_t i, n;
    lua_pop(L, 1);
    if (!PyTuple_Check(values)) {
        push_value(L, values, 0);
        return 1;
    }
    n = PyTuple_GET_SIZE(values);
    luaL_checkstack(L, (int)n, "too many values");
    for (i = 0; i < n; i++)
        push_value(L, PyTuple_GET_ITEM(values, i), 0);
    return (int)n;
}

/* -- Lua to Python (no call here can raise a Lua error) ------------------------------------- */
static PyObject *bad_value(const char *reason)
{
    PyErr_SetString(BadValue, reason);
    return NULL;
}

static PyObject *to_python(lua_State *L, int idx, int depth, int nested);

/* A string inside a table: text. */
static PyObject *text_to_python(lua_State *L, int idx)
{
    size_t len;
    const char *text = lua_tolstring(L, idx, &len);
    PyObject *value = PyUnicode_DecodeUTF8(text, (Py_ssize_t)len, NULL);
    if (value == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
        PyErr_Clear();
        return bad_value("strings must be UTF-8 text; send raw bytes as data");
    }
    return value;
}

static PyObject *table_key(lua_State *L, int idx)
{
    PyObject *number, *key;
    switch (lua_type(L, idx)) {
    case LUA_TSTRING:
        return text_to_python(L, idx);
    case LUA_TNUMBER: /* as Python's str() of the number */
        number = lua_isinteger(L, idx) ? PyLong_FromLongLong(lua_tointegerx(L, idx, NULL))
                                       : PyFloat_FromDouble(lua_tonumberx(L, idx, NULL));
        if (number == NULL)
            return NULL;
        key = PyObject_Str(number);
        Py_DECREF(number);
        return key;
    default:
        return bad_value("table keys must be strings or numbers");
    }
}

/* Keys 1..n (holes allowed, as nil stands for null) make a list, other keys
 * an object with string keys; an empty table is {}. */
static PyObject *table_to_python(lua_State *L, int idx, int depth)
{
    lua_Integer count = 0, top = 0, key;
    int is_list = 1;
    PyObject *out, *item, *name;
    if (depth >= MAX_DEPTH)
        return bad_value("tables nest deeper than 64 levels (a cycle?)");
    if (!lua_checkstack(L, 2)) { /* for lua_next's key and value; growing it may need memory */
        PyErr_SetString(PyExc_MemoryError, "not enough memory");
        return NULL;
    }
    idx = lua_absindex(L, idx);
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        count++;
        if (is_list && lua_type(L, -2) == LUA_TNUMBER && lua_isinteger(L, -2)
            && (key = lua_tointegerx(L, -2, NULL)) > 0)
            top = key > top ? key : top;
        else
            is_list = 0;
        lua_pop(L, 1);
    }
    is_list = count > 0 && is_list && top <= 2 * count;
    out = is_list ? PyList_New((Py_ssize_t)top) : PyDict_New();
    if (out == NULL)
        return NULL;
    if (is_list) {
        for (key = 0; key < top; key++) {
            Py_INCREF(Py_None);
            PyList_SET_ITEM(out, key, Py_None);
        }
    }
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        item = to_python(L, -1, depth + 1, 1);
        if (item == NULL)
            goto fail;
        if (is_list) {
            key = lua_tointegerx(L, -2, NULL);
            Py_SETREF(PyList_GET_ITEM(out, key - 1), item); /* it held None */
        } else {
            name = table_key(L, -2);
            if (name == NULL || PyDict_SetItem(out, name, item) < 0) {
                Py_XDECREF(name);
                Py_DECREF(item);
                goto fail;
            }
            Py_DECREF(name);
            Py_DECREF(item);
        }
        lua_pop(L, 1);
    }
    return out;
fail:
    lua_pop(L, 2); /* the key and value lua_next left */
    Py_DECREF(out);
    return NULL;
}

/* `nested`: inside a table, where strings are text and numbers must be finite. */
static PyObject *to_python(lua_State *L, int idx, int depth, int nested)
{
    size_t len;
    const char *text;
    lua_Number number;
    int type = lua_type(L, idx);
    switch (type) {
    case LUA_TNONE:
    case LUA_TNIL:
        Py_RETURN_NONE;
    case LUA_TBOOLEAN:
        return PyBool_FromLong(lua_toboolean(L, idx));
    case LUA_TNUMBER:
        if (lua_isinteger(L, idx))
            return PyLong_FromLongLong(lua_tointegerx(L, idx, NULL));
        number = lua_tonumberx(L, idx, NULL);
        if (nested && !isfinite(number))
            return bad_value("NaN and infinity are not JSON numbers");
        return PyFloat_FromDouble(number);
    case LUA_TSTRING:
        if (nested)
            return text_to_python(L, idx);
        text = lua_tolstring(L, idx, &len);
        return PyBytes_FromStringAndSize(text, (Py_ssize_t)len);
    case LUA_TTABLE:
        return table_to_python(L, idx, depth);
    default:
        PyErr_Format(BadValue, "a Lua %s cannot be sent or returned",
                     type == LUA_TFUNCTION ? "function" : type == LUA_TTHREAD ? "thread" : "userdata");
        return NULL;
    }
}

/* (head, values first..last) as a tuple, or without head if it is NULL; a
 * value that cannot cross is its BadValue. */
static PyObject *values_to_tuple(lua_State *L, PyObject *head, int first, int last)
{
    int offset = head != NULL, i;
    PyObject *out = PyTuple_New(offset + (last >= first ? last - first + 1 : 0)), *value, *type, *traceback;
    if (out == NULL)
        return NULL;
    if (head != NULL) {
        Py_INCREF(head);
        PyTuple_SET_ITEM(out, 0, head);
    }
    for (i = first; i <= last; i++) {
        value = to_python(L, i, 0, 0);
        if (value == NULL) {
            if (!PyErr_ExceptionMatches(BadValue)) {
                Py_DECREF(out);
                return NULL;
            }
            PyErr_Fetch(&type, &value, &traceback);
            PyErr_NormalizeException(&type, &value, &traceback);
            Py_XDECREF(type);
            Py_XDECREF(traceback);
        }
        PyTuple_SET_ITEM(out, offset + i - first, value);
    }
    return out;
}

/* -- The bridge: the program calling the kernel -------------------------------------------- */
/* Upvalue 1: which bridge method. Runs on a thread that released the GIL in resume(). */
static int bridge_call(lua_State *L)
{
    State *state = state_of(L);
    int which = (int)lua_tointegerx(L, lua_upvalueindex(1), NULL), nargs = lua_gettop(L), status = LUA_OK;
    char message[512] = "";
    PyObject *args, *result = NULL, *process;
    PyGILState_STATE gil = PyGILState_Ensure();
    process = PyWeakref_GetObject(state->bridge);
    if (process == Py_None)
        PyErr_SetString(PyExc_RuntimeError, "the process's kernel side is gone");
    else if ((args = values_to_tuple(L, process, 1, nargs)) != NULL) {
        result = PyObject_Call(state->methods[which], args, NULL);
        Py_DECREF(args);
    }
    if (result == NULL) { /* a kernel bug: the program sees it as a plain error */
        PyObject *type, *value, *traceback, *text;
        const char *utf8;
        PyErr_Fetch(&type, &value, &traceback);
        text = value != NULL ? PyObject_Str(value) : NULL;
        utf8 = text != NULL ? PyUnicode_AsUTF8(text) : NULL;
        snprintf(message, sizeof message, "kernel error in sys bridge %s: %s", BRIDGE_METHODS[which],
                 utf8 != NULL ? utf8 : "unknown");
        PyErr_Clear();
        Py_XDECREF(text);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(traceback);
    } else {
        lua_pushcfunction(L, push_values);
        lua_pushlightuserdata(L, result);
        status = lua_pcall(L, 1, LUA_MULTRET, 0);
        Py_DECREF(result);
    }
    PyGILState_Release(gil);
    if (result == NULL)
        return luaL_error(L, "%s", message);
    if (status != LUA_OK)
        return lua_error(L); /* out of memory while pushing the answer */
    return lua_gettop(L) - nargs;
}

/* -- State ----------------------------------------------------------------------------------- */
static PyObject *raise_lua_error(lua_State *L, int status)
{
    const char *text = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "error object is not a string";
    PyErr_SetString(status == LUA_ERRMEM ? PyExc_MemoryError : PyExc_RuntimeError, text);
    lua_settop(L, 0);
    return NULL;
}

static PyObject *State_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"memory_limit", NULL};
    Py_ssize_t limit = 0;
    State *state;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|n", keywords, &limit))
        return NULL;
    if (limit < 0)
        return PyErr_Format(PyExc_ValueError, "memory_limit must not be negative");
    state = (State *)type->tp_alloc(type, 0);
    if (state == NULL)
        return NULL;
    state->heap.limit = (size_t)limit;
    state->L = lua_newstate(allocate, state);
    if (state->L == NULL) {
        Py_DECREF(state);
        return PyErr_NoMemory();
    }
    return (PyObject *)state;
}

/* The state refers to its process only weakly, so that no reference cycle
 * keeps a finished process's state alive until Python's cycle collector. */
static void State_clear(State *state)
{
    int i;
    Py_CLEAR(state->bridge);
    for (i = 0; i < BRIDGE_COUNT; i++)
        Py_CLEAR(state->methods[i]);
}

static void State_dealloc(State *state)
{
    lua_State *L = state->L;
    State_clear(state);
    if (L != NULL) {
        /* A few microseconds with the state's own chunks: less than handing the GIL over. */
        Chunk *chunk, *next;
        lua_close(L);
        for (chunk = state->heap.chunks; chunk != NULL; chunk = next) {
            next = chunk->next;
            free(chunk);
        }
    }
    Py_TYPE(state)->tp_free((PyObject *)state);
}

typedef struct {
    PyObject *pid, *source, *chunk_name, *args, *hook_count;
} SandboxSpec;

/* Runs protected, with the GIL: the values the kernel gives the sandbox. */
static int push_spec(lua_State *L)
{
    SandboxSpec *spec = lua_touserdata(L, 1);
    lua_settop(L, 0);
    push_value(L, spec->pid, 0);
    push_value(L, spec->source, 0);
    push_value(L, spec->chunk_name, 0);
    push_value(L, spec->args, 0);
    push_value(L, spec->hook_count, 0);
    return 5;
}

/* Runs protected, without the GIL (it touches no Python object), on push_spec's
 * values: opens the libraries the sandbox keeps and builds the sandbox. */
static int build(lua_State *L)
{
    static const luaL_Reg libraries[] = {
        {"_G", luaopen_base},   {"coroutine", luaopen_coroutine}, {"table", luaopen_table},
        {"string", luaopen_string}, {"math", luaopen_math}, {"utf8", luaopen_utf8},
        {"os", luaopen_os},     {NULL, NULL},
    };
    const luaL_Reg *library;
    int i;
    for (library = libraries; library->name != NULL; library++) {
        luaL_requiref(L, library->name, library->func, 1);
        lua_pop(L, 1);
    }
    for (i = 0; i < BRIDGE_COUNT; i++) {
        lua_pushinteger(L, i);
        lua_pushcclosure(L, bridge_call, 1);
    }
    lua_rotate(L, 1, BRIDGE_COUNT); /* the bridge functions first */
    llmos_sandbox_open(L);          /* step, main_state */
    lua_pushvalue(L, -2);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &STEP_KEY);
    return 1;
}

static PyObject *State_open_sandbox(State *state, PyObject *args)
{
    PyObject *bridge;
    SandboxSpec spec;
    lua_State *L = state->L;
    lua_Integer main_state;
    int i, status;
    if (!PyArg_ParseTuple(args, "OOSSOO:open_sandbox", &bridge, &spec.pid, &spec.source, &spec.chunk_name,
                          &spec.args, &spec.hook_count))
        return NULL;
    if (state->bridge != NULL)
        return PyErr_Format(PyExc_RuntimeError, "the sandbox is built already");
    state->bridge = PyWeakref_NewRef(bridge, NULL);
    if (state->bridge == NULL)
        return NULL;
    for (i = 0; i < BRIDGE_COUNT; i++) {
        state->methods[i] = PyObject_GetAttrString((PyObject *)Py_TYPE(bridge), BRIDGE_METHODS[i]);
        if (state->methods[i] == NULL) {
            State_clear(state);
            return NULL;
        }
    }
    lua_settop(L, 0);
    lua_pushcfunction(L, build);
    lua_pushcfunction(L, push_spec);
    lua_pushlightuserdata(L, &spec);
    status = lua_pcall(L, 1, 5, 0);
    if (status == LUA_OK) {
        Py_BEGIN_ALLOW_THREADS
        status = lua_pcall(L, 5, 1, 0);
        Py_END_ALLOW_THREADS
    }
    if (status != LUA_OK)
        return raise_lua_error(L, status);
    main_state = lua_tointegerx(L, -1, NULL);
    lua_settop(L, 0);
    return PyLong_FromLongLong(main_state);
}

/* Resume the program with a syscall's answer: the sandbox's step (see _sandbox.c). */
static PyObject *State_resume(State *state, PyObject *args)
{
    lua_State *L = state->L;
    int status;
    PyObject *out;
    lua_settop(L, 0);
    if (lua_rawgetp(L, LUA_REGISTRYINDEX, &STEP_KEY) != LUA_TFUNCTION) {
        lua_settop(L, 0);
        return PyErr_Format(PyExc_RuntimeError, "the sandbox is not built");
    }
    lua_pushcfunction(L, push_values);
    lua_pushlightuserdata(L, args);
    status = lua_pcall(L, 1, LUA_MULTRET, 0);
    if (status != LUA_OK)
        return raise_lua_error(L, status);
    Py_BEGIN_ALLOW_THREADS
    status = lua_pcall(L, lua_gettop(L) - 1, LUA_MULTRET, 0);
    Py_END_ALLOW_THREADS
    if (status != LUA_OK)
        return raise_lua_error(L, status);
    out = values_to_tuple(L, NULL, 1, lua_gettop(L));
    lua_settop(L, 0);
    return out;
}

static PyObject *State_memory_used(State *state, PyObject *unused)
{
    (void)unused;
    return PyLong_FromSize_t(state->heap.used);
}

static PyMethodDef State_methods[] = {
    {"open_sandbox", (PyCFunction)State_open_sandbox, METH_VARARGS,
     "open_sandbox(bridge, pid, source, chunk_name, args, hook_count) -> main_state: build the "
     "sandbox; bridge (held weakly) has check, send, try_recv and call; main_state is the program coroutine's "
     "address"},
    {"resume", (PyCFunction)State_resume, METH_VARARGS,
     "resume(*answer) -> (\"sys\", name, *args) | (\"done\", value) | (\"error\", message, reason)"},
    {"memory_used", (PyCFunction)State_memory_used, METH_NOARGS, "memory_used() -> bytes the state holds"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject StateType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "llmosd._lua.State",
    .tp_doc = "State(memory_limit=0): a process's Lua state (0: no memory limit)",
    .tp_basicsize = sizeof(State),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = State_new,
    .tp_dealloc = (destructor)State_dealloc,
    .tp_methods = State_methods,
};

/* -- The module ------------------------------------------------------------------------------ */
static void *allocate_unlimited(void *ud, void *ptr, size_t osize, size_t nsize)
{
    (void)ud;
    (void)osize;
    if (nsize == 0) {
        free(ptr);
        return NULL;
    }
    return realloc(ptr, nsize);
}

static PyObject *syntax_error(PyObject *self, PyObject *args)
{
    const char *source, *chunk_name;
    Py_ssize_t len;
    lua_State *L;
    int status;
    PyObject *out;
    (void)self;
    if (!PyArg_ParseTuple(args, "y#y:syntax_error", &source, &len, &chunk_name))
        return NULL;
    L = lua_newstate(allocate_unlimited, NULL);
    if (L == NULL)
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    status = luaL_loadbufferx(L, source, (size_t)len, chunk_name, "t");
    Py_END_ALLOW_THREADS
    if (status == LUA_OK) {
        out = Py_None;
        Py_INCREF(out);
    } else {
        size_t text_len;
        const char *text = lua_tolstring(L, -1, &text_len);
        out = PyUnicode_DecodeUTF8(text, (Py_ssize_t)text_len, "replace");
    }
    lua_close(L);
    return out;
}

static PyObject *setup_preemption(PyObject *self, PyObject *arg)
{
    long sig = PyLong_AsLong(arg);
    (void)self;
    if (sig == -1 && PyErr_Occurred())
        return NULL;
    if (llmos_preempt_setup((int)sig) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *set_running(PyObject *self, PyObject *arg)
{
    void *L = PyLong_AsVoidPtr(arg);
    (void)self;
    if (L == NULL && PyErr_Occurred())
        return NULL;
    llmos_preempt_set_running(L);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"syntax_error", syntax_error, METH_VARARGS,
     "syntax_error(source: bytes, chunk_name: bytes) -> why the source does not compile as a Lua chunk, or None"},
    {"setup_preemption", setup_preemption, METH_O,
     "setup_preemption(signal): a thread that gets `signal` interrupts the program it runs (see _preempt.c)"},
    {"set_running", set_running, METH_O,
     "set_running(main_state): the program this thread now runs, as open_sandbox returned it (0: none)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_lua", "The kernel's binding to the Lua states of its processes.", -1, methods,
};

PyMODINIT_FUNC PyInit__lua(void)
{
    PyObject *m;
    if (PyType_Ready(&StateType) < 0)
        return NULL;
    m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    BadValue = PyErr_NewExceptionWithDoc("llmosd._lua.BadValue",
                                         "A Lua value that cannot cross into Python; args[0] says why.", NULL, NULL);
    if (BadValue == NULL || PyModule_AddObjectRef(m, "BadValue", BadValue) < 0
        || PyModule_AddObjectRef(m, "State", (PyObject *)&StateType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
