/*
 * llmosd._kernel, the kernel's C side, is one extension module: the kernel lock, mailboxes and
 * messages (kernel/mailbox.c), process fields (kernel/process.c), the core that moves messages and
 * hands the CPU between Lua processes (lua/fast_paths.c, lua/preempt.c) and, here, its processes'
 * Lua states. One module, because those hot paths call each other directly (no capsule indirection).
 *
 * A State is one process's Lua 5.4 state: only the libraries the sandbox
 * keeps (base, coroutine, table, string, math, utf8, os), memory counted and
 * capped by its own allocator, and the sandbox (lua/sandbox.c) built into it.
 * The kernel runs the program with resume(), or the core's run (lua/fast_paths.c);
 * the program reaches the kernel through four bridge functions, C closures
 * for the process's Python side (LuaProcess.check, send, try_recv and call),
 * of which send and try_recv are the core's first.
 *
 * Lua runs without the GIL: resume() releases it, and a bridge call takes it
 * back while Python runs. Values cross by JSON's rules, converted here:
 *   - Python to Lua: None, booleans, numbers, bytes and str as strings, dicts
 *     as tables keyed by strings, lists as arrays (None inside is a hole);
 *   - Lua to Python: a string given directly as bytes (the kernel decides what
 *     it means), a table as a dict or a list with text strings inside (see
 *     lua/runtime.py's from_lua); a value that cannot cross becomes a BadValue
 *     saying why, which the kernel reports with its context.
 * A Lua error must never unwind through code holding Python references or
 * the GIL: values are pushed inside lua_pcall, and read with calls that
 * cannot raise.
 *
 * Compiled into this module too: lua/fast_paths.c, the kernel's C side of messages
 * and of switching between processes; kernel/mailbox.c, mailboxes and the kernel
 * lock; lua/preempt.c, which interrupts a running program on a signal from the
 * scheduler.
 *
 * Why not lupa's LuaRuntime: it opens every standard library and its own
 * Python module in each state (78 µs of every spawn here, and memory the
 * sandbox then drops), and wraps each value that crosses in a Python object.
 * lupa still provides the Lua library itself (see lua_api.h).
 *
 * Why one file: a State's allocator, value conversion and slice clock work on
 * the State struct and the Python objects it holds, and the module's init sets
 * them up with the other parts of the extension.
 */
#include "state.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <structmember.h>
#include <time.h>


static const char *const BRIDGE_METHODS[BRIDGE_COUNT] = {"check", "send", "try_recv", "call"};

static char STEP_KEY;      /* registry key (its address) of the sandbox's step function */

/* Chunks of closed states, the last closed first, for the next states to
 * be built: memory likely still in the CPU's caches. A state built in fresh
 * memory took 80 us instead of 45, the difference being cache misses. */
#define CACHED_CHUNKS 256 /* 1 MiB */
static Chunk *cached_chunks;
static int cached_count;
static pthread_mutex_t cache_lock = PTHREAD_MUTEX_INITIALIZER;

static Chunk *new_chunk(void)
{
    Chunk *chunk;
    pthread_mutex_lock(&cache_lock);
    chunk = cached_chunks;
    if (chunk != NULL) {
        cached_chunks = chunk->next;
        cached_count--;
    }
    pthread_mutex_unlock(&cache_lock);
    return chunk != NULL ? chunk : malloc(CHUNK_BYTES);
}

static void drop_chunks(Chunk *chunk)
{
    Chunk *next;
    pthread_mutex_lock(&cache_lock);
    for (; chunk != NULL && cached_count < CACHED_CHUNKS; chunk = next, cached_count++) {
        next = chunk->next;
        chunk->next = cached_chunks;
        cached_chunks = chunk;
    }
    pthread_mutex_unlock(&cache_lock);
    for (; chunk != NULL; chunk = next) {
        next = chunk->next;
        free(chunk);
    }
}

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
        chunk = new_chunk();
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

State *llmos_state_of(lua_State *L)
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
        if (depth > LLMOS_MAX_DEPTH)
            luaL_error(L, "value nests deeper than %d levels", LLMOS_MAX_DEPTH);
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

/* A received message as the values sys.recv makes its table of: id, from,
 * to, tag, body, data, correlation_id, sent_at_ms (empty data and
 * correlation id are nil). */
enum { MESSAGE_VALUES = 8 };

static void push_message(lua_State *L, Message *msg)
{
    lua_pushinteger(L, msg->id);
    lua_pushinteger(L, msg->sender);
    lua_pushinteger(L, msg->to);
    push_value(L, msg->tag, 0);
    push_value(L, msg->body, 0);
    if (PyBytes_GET_SIZE(msg->data) > 0)
        push_value(L, msg->data, 0);
    else
        lua_pushnil(L);
    if (PyUnicode_GET_LENGTH(msg->correlation_id) > 0)
        push_value(L, msg->correlation_id, 0);
    else
        lua_pushnil(L);
    lua_pushinteger(L, msg->sent_at_ms);
}

/* Pushes the values of the tuple given as light userdata (or the one value,
 * if it is not a tuple): a Python function's answer, or resume()'s arguments.
 * A Message among them stands for its MESSAGE_VALUES values. */
int llmos_push_values(lua_State *L)
{
    PyObject *values = lua_touserdata(L, 1), *item;
    Py_ssize_t i, n;
    int pushed = 0;
    lua_pop(L, 1);
    if (!PyTuple_Check(values)) {
        push_value(L, values, 0);
        return 1;
    }
    n = PyTuple_GET_SIZE(values);
    for (i = 0; i < n; i++) {
        item = PyTuple_GET_ITEM(values, i);
        luaL_checkstack(L, MESSAGE_VALUES, "too many values");
        if (Py_IS_TYPE(item, &MessageType)) {
            push_message(L, (Message *)item);
            pushed += MESSAGE_VALUES;
        } else {
            push_value(L, item, 0);
            pushed++;
        }
    }
    return pushed;
}

/* -- Lua to Python (no call here can raise a Lua error) ------------------------------------- */
static PyObject *bad_value(const char *reason)
{
    PyErr_SetString(llmos_BadValue, reason);
    return NULL;
}

LuaValueBudget llmos_value_budget(lua_State *L)
{
    LuaValueBudget budget = {0, llmos_state_of(L)->value_limit, NULL, 0};
    return budget;
}

void llmos_value_budget_done(LuaValueBudget *budget)
{
    Py_CLEAR(budget->seen);
}

/* Bytes of a value converted between chances for other threads to take the GIL: a table
 * shared along many paths (a DAG) costs up to the whole budget to walk, a few hundred ms
 * at 4 MiB, and the rest of the server must not stall meanwhile. */
#define GIL_SHARE_BYTES (1 << 16)

/* Charges `size` bytes to the conversion; 0, or -1 with TooLarge past its limit. */
static int charge(LuaValueBudget *budget, Py_ssize_t size)
{
    Py_ssize_t before = budget->used;
    budget->used += size;
    if (budget->used > budget->limit) {
        llmos_too_large(budget->limit);
        return -1;
    }
    if (before / GIL_SHARE_BYTES != budget->used / GIL_SHARE_BYTES) {
        Py_BEGIN_ALLOW_THREADS /* a thread that asked for the GIL gets it here */
        Py_END_ALLOW_THREADS
    }
    return 0;
}

/* A string inside a table: text. */
PyObject *llmos_text_to_python(lua_State *L, int idx)
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
        return llmos_text_to_python(L, idx);
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
 * an object with string keys; an empty table is {}. Each entry is charged as
 * it is converted, so a table reached many times over (a DAG) costs no more
 * than the budget to refuse. */
static PyObject *table_to_python(lua_State *L, int idx, int depth, LuaValueBudget *budget)
{
    lua_Integer count = 0, top = 0, key;
    int is_list = 1;
    Py_ssize_t before = budget->used, item_start, key_bytes;
    PyObject *out, *item, *name, *address, *seen;
    int outer_deepest = budget->deepest, height;
    if (depth >= LLMOS_MAX_DEPTH)
        return bad_value("tables nest deeper than " LLMOS_STR(LLMOS_MAX_DEPTH) " levels (a cycle?)");
    if (budget->seen == NULL && (budget->seen = PyDict_New()) == NULL)
        return NULL;
    if ((address = PyLong_FromVoidPtr((void *)lua_topointer(L, idx))) == NULL)
        return NULL;
    seen = PyDict_GetItemWithError(budget->seen, address);
    if (seen != NULL) { /* reached again: the same value, charged again, as its encoding repeats it */
        Py_DECREF(address);
        height = (int)PyLong_AsLong(PyTuple_GET_ITEM(seen, 2));
        if (depth + height >= LLMOS_MAX_DEPTH)
            return bad_value("tables nest deeper than " LLMOS_STR(LLMOS_MAX_DEPTH) " levels (a cycle?)");
        budget->deepest = depth + height > budget->deepest ? depth + height : budget->deepest;
        if (charge(budget, PyLong_AsSsize_t(PyTuple_GET_ITEM(seen, 1))) < 0)
            return NULL;
        out = PyTuple_GET_ITEM(seen, 0);
        Py_INCREF(out);
        return out;
    }
    if (PyErr_Occurred()) {
        Py_DECREF(address);
        return NULL;
    }
    budget->deepest = depth;
    if (!lua_checkstack(L, 2)) { /* for lua_next's key and value; growing it may need memory */
        PyErr_SetString(PyExc_MemoryError, "not enough memory");
        Py_DECREF(address);
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
    /* The holes of a list are nulls, charged before they are made. */
    out = NULL;
    if (is_list && charge(budget, (top - count) * llmos_field_size(LLMOS_SCALAR_SIZE)) < 0)
        goto done;
    if ((out = is_list ? PyList_New((Py_ssize_t)top) : PyDict_New()) == NULL)
        goto done;
    if (is_list) {
        for (key = 0; key < top; key++) {
            Py_INCREF(Py_None);
            PyList_SET_ITEM(out, key, Py_None);
        }
    }
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        item_start = budget->used;
        item = llmos_to_python(L, -1, depth + 1, 1, budget);
        if (item == NULL)
            goto fail;
        if (is_list) {
            key = lua_tointegerx(L, -2, NULL);
            Py_SETREF(PyList_GET_ITEM(out, key - 1), item); /* it held None */
            item_start = budget->used - item_start;
            budget->used -= item_start;
            if (charge(budget, llmos_field_size(item_start)) < 0)
                goto fail;
        } else {
            name = table_key(L, -2);
            if (name != NULL && PyDict_Contains(out, name) == 1) /* {[1]=a, ["1"]=b} */
                PyErr_Format(llmos_BadValue, "two keys of one table are both %R as text", name);
            if (name == NULL || PyErr_Occurred() || PyDict_SetItem(out, name, item) < 0) {
                Py_XDECREF(name);
                Py_DECREF(item);
                goto fail;
            }
            /* a number's text is ASCII: as many bytes as characters */
            if (lua_type(L, -2) == LUA_TSTRING) {
                size_t len;
                lua_tolstring(L, -2, &len); /* a string key: no conversion, lua_next stays valid */
                key_bytes = (Py_ssize_t)len;
            } else {
                key_bytes = PyUnicode_GET_LENGTH(name);
            }
            Py_DECREF(name);
            Py_DECREF(item);
            item_start = budget->used - item_start;
            budget->used -= item_start;
            if (charge(budget, llmos_entry_size(key_bytes, item_start)) < 0)
                goto fail;
        }
        lua_pop(L, 1);
    }
    item_start = budget->used - before;
    budget->used = before;
    if (charge(budget, llmos_field_size(item_start)) < 0)
        goto done;
    height = budget->deepest - depth;
    budget->deepest = budget->deepest > outer_deepest ? budget->deepest : outer_deepest;
    seen = Py_BuildValue("(Onn)", out, budget->used - before, (Py_ssize_t)height);
    if (seen == NULL || PyDict_SetItem(budget->seen, address, seen) < 0) {
        Py_XDECREF(seen);
        goto done;
    }
    Py_DECREF(seen);
    Py_DECREF(address);
    return out;
fail:
    lua_pop(L, 2); /* the key and value lua_next left */
done:
    Py_DECREF(address);
    Py_XDECREF(out);
    return NULL;
}

PyObject *llmos_to_python(lua_State *L, int idx, int depth, int nested, LuaValueBudget *budget)
{
    size_t len;
    const char *text;
    lua_Number number;
    lua_Integer integer;
    PyObject *out;
    int type = lua_type(L, idx);
    switch (type) {
    case LUA_TNONE:
    case LUA_TNIL:
        if (charge(budget, LLMOS_SCALAR_SIZE) < 0)
            return NULL;
        Py_RETURN_NONE;
    case LUA_TBOOLEAN:
        if (charge(budget, LLMOS_SCALAR_SIZE) < 0)
            return NULL;
        return PyBool_FromLong(lua_toboolean(L, idx));
    case LUA_TNUMBER:
        if (charge(budget, LLMOS_NUMBER_SIZE) < 0)
            return NULL;
        if (lua_isinteger(L, idx)) {
            integer = lua_tointegerx(L, idx, NULL);
            if (nested && (integer > LLMOS_MAX_EXACT_INTEGER || integer < -LLMOS_MAX_EXACT_INTEGER))
                return bad_value("integers beyond +-2^53 are not exact JSON numbers");
            return PyLong_FromLongLong(integer);
        }
        number = lua_tonumberx(L, idx, NULL);
        if (nested && !isfinite(number))
            return bad_value("NaN and infinity are not JSON numbers");
        return PyFloat_FromDouble(number);
    case LUA_TSTRING:
        text = lua_tolstring(L, idx, &len);
        if (!nested) /* raw bytes, which the kernel bounds as what they are for (a file's data, a message's) */
            return PyBytes_FromStringAndSize(text, (Py_ssize_t)len);
        if (charge(budget, llmos_field_size((Py_ssize_t)len)) < 0)
            return NULL;
        return llmos_text_to_python(L, idx);
    case LUA_TTABLE:
        out = table_to_python(L, idx, depth, budget);
        return out;
    default:
        PyErr_Format(llmos_BadValue, "a Lua %s cannot be sent or returned",
                     type == LUA_TFUNCTION ? "function" : type == LUA_TTHREAD ? "thread" : "userdata");
        return NULL;
    }
}

/* (head, values first..last) as a tuple, or without head if it is NULL; a
 * value that cannot cross is its BadValue (or TooLarge). Each value may be
 * as large as a message. A table given as an argument starts a level above
 * the values' limit of depth: it may be an options table (sys.spawn{args = v}),
 * whose fields are values of their own, and a value given as a whole argument
 * (a body, a result) is checked as a value again where the kernel takes it. */
PyObject *llmos_values_to_tuple(lua_State *L, PyObject *head, int first, int last)
{
    int offset = head != NULL, i;
    PyObject *out = PyTuple_New(offset + (last >= first ? last - first + 1 : 0)), *value, *type, *traceback;
    LuaValueBudget budget;
    if (out == NULL)
        return NULL;
    if (head != NULL) {
        Py_INCREF(head);
        PyTuple_SET_ITEM(out, 0, head);
    }
    for (i = first; i <= last; i++) {
        budget = llmos_value_budget(L);
        value = llmos_to_python(L, i, lua_type(L, i) == LUA_TTABLE ? -1 : 0, 0, &budget);
        llmos_value_budget_done(&budget);
        if (value == NULL) {
            if (!PyErr_ExceptionMatches(llmos_BadValue)) {
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
void llmos_error_text(char *out, size_t size, const char *fallback)
{
    PyObject *type, *value, *traceback, *text;
    const char *utf8;
    PyErr_Fetch(&type, &value, &traceback);
    text = value != NULL ? PyObject_Str(value) : NULL;
    utf8 = text != NULL ? PyUnicode_AsUTF8(text) : NULL;
    snprintf(out, size, "%s", utf8 != NULL ? utf8 : fallback);
    PyErr_Clear();
    Py_XDECREF(text);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
}

/* Calls bridge method `which` with the Lua arguments. Runs on a thread that
 * released the GIL in resume(). */
int llmos_call_bridge(lua_State *L, int which)
{
    State *state = llmos_state_of(L);
    int nargs = lua_gettop(L), status = LUA_OK;
    char message[512] = "", error[448];
    PyObject *args, *result = NULL, *process;
    PyGILState_STATE gil = PyGILState_Ensure();
    process = PyWeakref_GetObject(state->bridge);
    if (process == Py_None)
        PyErr_SetString(PyExc_RuntimeError, "the process's kernel side is gone");
    else if ((args = llmos_values_to_tuple(L, process, 1, nargs)) != NULL) {
        result = PyObject_Call(state->methods[which], args, NULL);
        Py_DECREF(args);
    }
    if (result == NULL) { /* a kernel bug: the program sees it as a plain error */
        llmos_error_text(error, sizeof error, "unknown");
        snprintf(message, sizeof message, "kernel error in sys bridge %s: %s", BRIDGE_METHODS[which], error);
    } else {
        lua_pushcfunction(L, llmos_push_values);
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

/* Upvalue 1: which bridge method. */
static int bridge_call(lua_State *L)
{
    return llmos_call_bridge(L, (int)lua_tointegerx(L, lua_upvalueindex(1), NULL));
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
    static char *keywords[] = {"memory_limit", "value_limit", NULL};
    Py_ssize_t limit = 0, value_limit = 0;
    State *state;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|nn", keywords, &limit, &value_limit))
        return NULL;
    if (limit < 0 || value_limit < 0)
        return PyErr_Format(PyExc_ValueError, "memory_limit and value_limit must not be negative");
    state = (State *)type->tp_alloc(type, 0);
    if (state == NULL)
        return NULL;
    state->heap.limit = (size_t)limit;
    state->value_limit = value_limit > 0 ? value_limit : PY_SSIZE_T_MAX;
    state->measure_cpu = 1; /* the first slice may be a long one (a CPU-bound program's first quantum) */
    state->L = lua_newstate(allocate, state);
    if (state->L == NULL) {
        Py_DECREF(state);
        return PyErr_NoMemory();
    }
    return (PyObject *)state;
}

/* The state refers to its process's Python side only weakly; its Process
 * and the core hold it in a cycle that the kernel breaks when the process
 * ends (Process.runtime = None), and that the cycle collector can see. */
static int State_traverse(State *state, visitproc visit, void *arg)
{
    Py_VISIT(state->proc);
    Py_VISIT(state->mailbox);
    Py_VISIT(state->core);
    return 0;
}

static int State_clear(State *state)
{
    int i;
    Py_CLEAR(state->bridge);
    for (i = 0; i < BRIDGE_COUNT; i++)
        Py_CLEAR(state->methods[i]);
    Py_CLEAR(state->proc);
    /* state->mailbox is set only once it is known to be a Mailbox (open_sandbox) */
    if (state->mailbox != NULL && state->mailbox->owner_state == (PyObject *)state)
        state->mailbox->owner_state = NULL;
    Py_CLEAR(state->mailbox);
    Py_CLEAR(state->core);
    return 0;
}

static void State_dealloc(State *state)
{
    lua_State *L = state->L;
    PyObject_GC_UnTrack(state);
    State_clear(state);
    if (L != NULL) {
        /* A few microseconds with the state's own chunks: less than handing the GIL over. */
        lua_close(L);
        drop_chunks(state->heap.chunks);
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
 * values: builds the sandbox, with the libraries it keeps (lua/sandbox.c). */
static int build(lua_State *L)
{
    int i;
    /* Nothing built here is garbage: collecting meanwhile only costs time. */
    lua_gc(L, LUA_GCSTOP);
    for (i = 0; i < BRIDGE_COUNT; i++) {
        lua_pushinteger(L, i);
        lua_pushcclosure(L, i == BRIDGE_SEND ? llmos_bridge_send : i == BRIDGE_TRY_RECV ? llmos_bridge_try_recv : bridge_call, 1);
    }
    lua_rotate(L, 1, BRIDGE_COUNT); /* the bridge functions first */
    llmos_sandbox_open(L);          /* step, main_state */
    lua_pushvalue(L, -2);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &STEP_KEY);
    lua_gc(L, LUA_GCRESTART);
    return 1;
}

static PyObject *State_open_sandbox(State *state, PyObject *args)
{
    PyObject *bridge, *proc, *core, *pid, *mailbox;
    SandboxSpec spec;
    lua_State *L = state->L;
    int i, status;
    if (!PyArg_ParseTuple(args, "OOO!SSOO:open_sandbox", &bridge, &proc, &CoreType, &core, &spec.source,
                          &spec.chunk_name, &spec.args, &spec.hook_count))
        return NULL;
    if (state->bridge != NULL)
        return PyErr_Format(PyExc_RuntimeError, "the sandbox is built already");
    if (!llmos_is_process(proc))
        return PyErr_Format(PyExc_TypeError, "open_sandbox: proc must be the kernel's Process");
    pid = PyObject_GetAttrString(proc, "pid");
    mailbox = PyObject_GetAttrString(proc, "mailbox");
    if (pid == NULL || mailbox == NULL || !PyLong_Check(pid) || !PyObject_TypeCheck(mailbox, &MailboxType)
        || (state->pid = PyLong_AsLongLong(pid)) == -1) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "open_sandbox: the process needs a pid and a Mailbox");
        Py_XDECREF(pid);
        Py_XDECREF(mailbox);
        return NULL;
    }
    state->bridge = PyWeakref_NewRef(bridge, NULL);
    if (state->bridge == NULL) {
        Py_DECREF(pid);
        Py_DECREF(mailbox);
        return NULL;
    }
    state->mailbox = (Mailbox *)mailbox;
    state->mailbox->owner_state = (PyObject *)state;
    Py_INCREF(proc);
    state->proc = proc;
    Py_INCREF(core);
    state->core = core;
    for (i = 0; i < BRIDGE_COUNT; i++) {
        state->methods[i] = PyObject_GetAttrString((PyObject *)Py_TYPE(bridge), BRIDGE_METHODS[i]);
        if (state->methods[i] == NULL) {
            Py_DECREF(pid);
            State_clear(state);
            return NULL;
        }
    }
    /* The build itself waits for the first step, which runs it without the
     * GIL together with the program's start: one GIL hand-off fewer for
     * every process. */
    lua_settop(L, 0);
    lua_pushcfunction(L, build);
    lua_pushcfunction(L, push_spec);
    spec.pid = pid;
    lua_pushlightuserdata(L, &spec);
    status = lua_pcall(L, 1, 5, 0);
    Py_DECREF(pid);
    if (status != LUA_OK)
        return raise_lua_error(L, status);
    Py_RETURN_NONE;
}

/* -- The slice clock ---------------------------------------------------------------------------------
 * Two figures: time holding a virtual CPU (cpu_ns), which the scheduler
 * charges for fairness (vruntime), and CPU time actually used (cpu_used_ns),
 * which Usage reports and limits.cpu_ms bounds. They differ when the host
 * has fewer cores than there are virtual CPUs, or is busy. The thread's CPU
 * clock costs a system call (~0.4 µs, twenty times the monotonic clock): it
 * is read when a process's first slice and slices that follow a long one (a
 * CPU-bound process's) begin, and when they end if they lasted
 * MEASURE_AFTER_NS; a short slice, such as one of a message hand-off or a
 * short program's whole life, is charged its wall time, which it cannot
 * exceed by more than its own length. */
#define MEASURE_AFTER_NS 1000000LL /* slices at least this long have their successors' CPU time measured */

static long long thread_cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Nanoseconds this thread has spent in Lua steps, without the GIL: the scheduler tells work that
 * can use a second CPU from work that holds the GIL by it (kernel/scheduler.py, "Spreading"). */
static __thread long long lua_ns_of_thread;

static void begin_slice_at(State *state, long long now)
{
    state->slice_start = now;
    if (state->measure_cpu)
        state->slice_cpu_start = thread_cpu_ns();
    state->in_slice = 1;
    llmos_preempt_set_running(state->main_co);
}

/* Charges the slice to the process: its CPU time, and its vruntime (CPU time
 * scaled by DEFAULT_WEIGHT / weight), which orders the run queue. */
static int end_slice(State *state, long long *now)
{
    long long ran;
    llmos_preempt_set_running(NULL);
    state->in_slice = 0;
    *now = llmos_monotonic_ns();
    ran = *now - state->slice_start;
    state->cpu_ns += ran;
    lua_ns_of_thread += ran;
    /* A short slice is charged its wall time even when measured: the clock's second read (a
     * system call, every spawn's first slice) would change its charge by less than its length. */
    state->cpu_used_ns += state->measure_cpu && ran >= MEASURE_AFTER_NS ? thread_cpu_ns() - state->slice_cpu_start
                                                                         : ran;
    state->measure_cpu = ran >= MEASURE_AFTER_NS;
    return state->proc != NULL ? llmos_charge(state->proc, ran) : 0;
}

static PyObject *State_begin_slice(State *state, PyObject *unused)
{
    (void)unused;
    begin_slice_at(state, llmos_monotonic_ns());
    Py_RETURN_NONE;
}

static PyObject *State_end_slice(State *state, PyObject *unused)
{
    long long now;
    (void)unused;
    if (end_slice(state, &now) < 0)
        return NULL;
    Py_RETURN_NONE;
}

enum { START_FAILED = 100 }; /* run_step's status when the sandbox could not be built: START_FAILED + Lua's */

/* The first step: build the sandbox (open_sandbox left build and its
 * arguments on the stack) and start the program, all without the GIL. */
static int start(State *state, long long *now)
{
    lua_State *L = state->L;
    int status;
    begin_slice_at(state, *now);
    Py_BEGIN_ALLOW_THREADS
    status = lua_pcall(L, 5, 1, 0);
    if (status == LUA_OK) {
        state->main_co = (lua_State *)(intptr_t)lua_tointegerx(L, -1, NULL);
        llmos_preempt_set_running(state->main_co);
        state->built = 1;
        lua_settop(L, 0);
        lua_rawgetp(L, LUA_REGISTRYINDEX, &STEP_KEY);
        status = lua_pcall(L, 0, LUA_MULTRET, 0);
    } else {
        status += START_FAILED;
    }
    Py_END_ALLOW_THREADS
    if (end_slice(state, now) < 0) {
        lua_settop(L, 0);
        return -1;
    }
    return status;
}

/* Runs the program until its next yield, with `answer` (a tuple of values)
 * for the syscall it is blocked in, its slice starting at *now; *now is then
 * when it ended. Leaves the step's results on L's stack; on failure, its
 * error message. */
int llmos_run_step(State *state, PyObject *answer, long long *now)
{
    lua_State *L = state->L;
    int status;
    if (!state->built) {
        if (lua_gettop(L) != 6 || PyTuple_GET_SIZE(answer) != 0) {
            PyErr_SetString(PyExc_RuntimeError, "a program starts once, with no answer; open_sandbox first");
            return -1;
        }
        return start(state, now);
    }
    lua_settop(L, 0);
    if (lua_rawgetp(L, LUA_REGISTRYINDEX, &STEP_KEY) != LUA_TFUNCTION) {
        lua_settop(L, 0);
        lua_pushliteral(L, "the sandbox is not built");
        return LUA_ERRRUN;
    }
    lua_pushcfunction(L, llmos_push_values);
    lua_pushlightuserdata(L, answer);
    status = lua_pcall(L, 1, LUA_MULTRET, 0);
    if (status != LUA_OK)
        return status;
    begin_slice_at(state, *now);
    Py_BEGIN_ALLOW_THREADS
    status = lua_pcall(L, lua_gettop(L) - 1, LUA_MULTRET, 0);
    Py_END_ALLOW_THREADS
    if (end_slice(state, now) < 0) {
        lua_settop(L, 0);
        return -1;
    }
    return status;
}

/* The step's results as Python values; a failure of the step itself (out of
 * memory in the kernel's part of it) as ("error", message), and of the
 * sandbox's build as ("unstarted", message, whether memory ran out). */
PyObject *llmos_step_results(lua_State *L, int status)
{
    PyObject *out;
    if (status >= START_FAILED) {
        const char *text = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "the sandbox could not be built";
        out = Py_BuildValue("(yyO)", "unstarted", text, status - START_FAILED == LUA_ERRMEM ? Py_True : Py_False);
    } else if (status == LUA_OK) {
        out = llmos_values_to_tuple(L, NULL, 1, lua_gettop(L));
    } else {
        size_t len = 0;
        const char *text = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &len) : NULL;
        if (text == NULL) {
            text = "error object is not a string";
            len = strlen(text);
        }
        out = Py_BuildValue("(yy#)", "error", text, (Py_ssize_t)len);
    }
    lua_settop(L, 0);
    return out;
}

/* Resume the program with a syscall's answer: the sandbox's step (see lua/sandbox.c). */
static PyObject *State_resume(State *state, PyObject *args)
{
    long long now = llmos_monotonic_ns();
    int status = llmos_run_step(state, args, &now);
    return status < 0 ? NULL : llmos_step_results(state->L, status);
}

static PyObject *State_memory_used(State *state, PyObject *unused)
{
    (void)unused;
    return PyLong_FromSize_t(state->heap.used);
}

static PyMethodDef State_methods[] = {
    {"open_sandbox", (PyCFunction)State_open_sandbox, METH_VARARGS,
     "open_sandbox(bridge, proc, core, source, chunk_name, args, hook_count): build the sandbox for the "
     "Process proc; bridge (held weakly) has check, send, try_recv and call"},
    {"resume", (PyCFunction)State_resume, METH_VARARGS,
     "resume(*answer) -> (\"sys\", name, *args) | (\"done\", value) | (\"error\", message[, reason]); "
     "a slice of the process's CPU time"},
    {"begin_slice", (PyCFunction)State_begin_slice, METH_NOARGS,
     "begin_slice(): the process holds a CPU from now, and preemption interrupts it on this thread"},
    {"end_slice", (PyCFunction)State_end_slice, METH_NOARGS,
     "end_slice(): the slice is over; charge it to the process's cpu_ns and vruntime"},
    {"memory_used", (PyCFunction)State_memory_used, METH_NOARGS, "memory_used() -> bytes the state holds"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef State_members[] = {
    {"slice_start", T_LONGLONG, offsetof(State, slice_start), READONLY,
     "time.perf_counter_ns() when the running slice began"},
    {"cpu_ns", T_LONGLONG, offsetof(State, cpu_ns), READONLY,
     "time holding a virtual CPU, in the slices that ended (what fairness charges)"},
    {"cpu_used_ns", T_LONGLONG, offsetof(State, cpu_used_ns), READONLY,
     "CPU time actually used in the slices that ended"},
    {"in_slice", T_INT, offsetof(State, in_slice), READONLY, NULL},
    {"journal_live", T_BOOL, offsetof(State, journal_live), 0,
     "a durable process past its replay: the C side sends and receives for it, journaled (lua/durable.py)"},
    {NULL, 0, 0, 0, NULL},
};

PyTypeObject StateType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "llmosd._kernel.State",
    .tp_doc = "State(memory_limit=0, value_limit=0): a process's Lua state; the most bytes it may hold, and that "
              "one value it gives the kernel may take (encoded; 0: no limit)",
    .tp_basicsize = sizeof(State),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = State_new,
    .tp_traverse = (traverseproc)State_traverse,
    .tp_clear = (inquiry)State_clear,
    .tp_dealloc = (destructor)State_dealloc,
    .tp_methods = State_methods,
    .tp_members = State_members,
};

/* -- The module ------------------------------------------------------------------------------ */
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
    L = lua_newstate(llmos_allocate_unlimited, NULL);
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

/* A copy of `n` bytes of `text` (NULL: NULL), kept for ever: the sys layout's. */
static int lasting_copy(const char *text, size_t n, const char **out)
{
    char *copy;
    *out = NULL;
    if (text == NULL)
        return 0;
    copy = PyMem_RawMalloc(n + 1);
    if (copy == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(copy, text, n);
    copy[n] = '\0';
    *out = copy;
    return 0;
}

static const char *utf8_or_null(PyObject *text)
{
    return text == Py_None ? NULL : PyUnicode_AsUTF8(text);
}

/* A tuple of str (or None) as a NULL-terminated array of lasting copies (or NULL). */
static int lasting_keys(PyObject *keys, const char *const **out)
{
    const char **copy;
    Py_ssize_t i, n;
    *out = NULL;
    if (keys == Py_None)
        return 0;
    if (!PyTuple_Check(keys) || (n = PyTuple_GET_SIZE(keys)) > 32) {
        PyErr_SetString(PyExc_TypeError, "option keys: a tuple of at most 32 str");
        return -1;
    }
    copy = PyMem_RawCalloc((size_t)n + 1, sizeof *copy);
    if (copy == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(keys, i);
        const char *key = PyUnicode_Check(item) ? PyUnicode_AsUTF8(item) : NULL;
        if (key == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "option keys: a tuple of at most 32 str");
            return -1;
        }
        if (lasting_copy(key, strlen(key), &copy[i]) < 0)
            return -1;
    }
    *out = copy;
    return 0;
}

static PyObject *set_sys_layout(PyObject *self, PyObject *layout)
{
    static const char *const WAYS[] = {"c", "call", "yield"};
    llmos_SysEntry *entries;
    Py_ssize_t n, i;
    size_t unknown;
    int status;
    (void)self;
    if (!PyTuple_Check(layout))
        return PyErr_Format(PyExc_TypeError, "set_sys_layout takes a tuple of (path, how, op, file_op, options)");
    n = PyTuple_GET_SIZE(layout);
    entries = PyMem_RawCalloc(n > 0 ? (size_t)n : 1, sizeof *entries);
    if (entries == NULL)
        return PyErr_NoMemory();
    /* Made once at import and kept for ever; a failure stops the server (nothing is freed). */
    for (i = 0; i < n; i++) {
        llmos_SysEntry *e = &entries[i];
        PyObject *path, *how, *op, *file_op, *options;
        const char *path_text, *how_text, *op_text, *file_op_text, *dot;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(layout, i), "UUOOO", &path, &how, &op, &file_op, &options))
            return NULL;
        path_text = PyUnicode_AsUTF8(path);
        how_text = PyUnicode_AsUTF8(how);
        op_text = utf8_or_null(op);
        file_op_text = utf8_or_null(file_op);
        if (path_text == NULL || how_text == NULL || (op != Py_None && op_text == NULL)
            || (file_op != Py_None && file_op_text == NULL))
            return NULL;
        for (e->how = 0; e->how < 3 && strcmp(how_text, WAYS[e->how]) != 0; e->how++)
            ;
        if (e->how == 3)
            return PyErr_Format(PyExc_ValueError, "sys.%s: no way %s", path_text, how_text);
        if (e->how != LLMOS_SYS_C && op_text == NULL)
            return PyErr_Format(PyExc_ValueError, "sys.%s: a call or yield needs its op", path_text);
        dot = strrchr(path_text, '.');
        if (lasting_copy(dot != NULL ? path_text : NULL, dot != NULL ? (size_t)(dot - path_text) : 0, &e->table) < 0
            || lasting_copy(dot != NULL ? dot + 1 : path_text, strlen(dot != NULL ? dot + 1 : path_text), &e->name) < 0
            || lasting_copy(op_text, op_text != NULL ? strlen(op_text) : 0, &e->op) < 0
            || lasting_copy(file_op_text, file_op_text != NULL ? strlen(file_op_text) : 0, &e->file_op) < 0
            || lasting_keys(options, &e->options) < 0)
            return NULL;
    }
    status = llmos_sandbox_set_layout(entries, (size_t)n, &unknown);
    if (status == -1)
        return PyErr_NoMemory();
    if (status == -2)
        return PyErr_Format(PyExc_ValueError, "the sandbox has no function for sys.%R",
                            PyTuple_GET_ITEM(PyTuple_GET_ITEM(layout, (Py_ssize_t)unknown), 0));
    if (status == -3)
        return PyErr_Format(PyExc_RuntimeError, "this Lua's libraries are not what the sandbox's templates expect");
    Py_RETURN_NONE;
}

static PyObject *thread_lua_ns(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyLong_FromLongLong(lua_ns_of_thread);
}

static PyMethodDef methods[] = {
    {"thread_lua_ns", thread_lua_ns, METH_NOARGS,
     "thread_lua_ns() -> the nanoseconds this thread has spent running Lua (without the GIL), so far"},
    {"syntax_error", syntax_error, METH_VARARGS,
     "syntax_error(source: bytes, chunk_name: bytes) -> why the source does not compile as a Lua chunk, or None"},
    {"set_sys_layout", set_sys_layout, METH_O,
     "set_sys_layout(api.table.lua_layout()): what every state's sys table is made of (once, before any state)"},
    {"setup_preemption", setup_preemption, METH_O,
     "setup_preemption(signal): a thread that gets `signal` interrupts the program it runs (see lua/preempt.c)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernel", "The kernel's C side: its lock, mailboxes, processes' fields and Lua states.",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__kernel(void)
{
    PyObject *m;
    if (PyType_Ready(&StateType) < 0)
        return NULL;
    m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "State", (PyObject *)&StateType) < 0
        || llmos_messaging_init(m) < 0 || llmos_process_init(m) < 0 || llmos_core_init(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
