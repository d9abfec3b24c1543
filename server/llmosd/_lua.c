/*
 * llmosd._lua: the kernel's binding to the Lua states of its processes.
 *
 * A State is one process's Lua 5.4 state: only the libraries the sandbox
 * keeps (base, coroutine, table, string, math, utf8, os), memory counted and
 * capped by its own allocator, and the sandbox (_sandbox.c) built into it.
 * The kernel runs the program with resume(), or Core.run; the program
 * reaches the kernel through four bridge functions, C closures for the
 * process's Python side (LuaProcess.check, send, try_recv and call).
 *
 * The Core is the kernel's C side of messaging. send and try_recv are C
 * first: a message to another process goes straight into its mailbox
 * (_mailbox.c), or the hands of a receiver blocked there, and a waiting
 * message is taken without Python. Core.run runs a process and, when it
 * blocks in a receive, blocks it on its mailbox and switches this worker to
 * the process a send woke (the scheduler's runnext), so that two processes
 * exchanging messages never enter Python. What the C side does not handle
 * (ports, names, raw data, odd filters, values to report as errors, a
 * quantum spent) goes to the Python side, which handles it as before.
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
#include "messaging.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <structmember.h>
#include <time.h>

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
    PyObject *proc;                   /* the process's Process */
    Mailbox *mailbox;                 /* its mailbox */
    long long pid;
    PyObject *core;                   /* the kernel's Core */
    lua_State *main_co;               /* the program's coroutine, which preemption interrupts */
    long long slice_start;            /* monotonic ns when the running slice began */
    long long cpu_ns;                 /* CPU time of the slices that ended */
    int in_slice;
    int built;                        /* the sandbox is built (by the first step) */
} State;

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
static int push_values(lua_State *L)
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
/* Calls bridge method `which` with the Lua arguments. Runs on a thread that
 * released the GIL in resume(). */
static int call_bridge(lua_State *L, int which)
{
    State *state = state_of(L);
    int nargs = lua_gettop(L), status = LUA_OK;
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

/* Upvalue 1: which bridge method. */
static int bridge_call(lua_State *L)
{
    return call_bridge(L, (int)lua_tointegerx(L, lua_upvalueindex(1), NULL));
}

static int bridge_try_recv(lua_State *L); /* the kernel's C side, below */

/* -- The kernel's C side: messages between processes ----------------------------------------------- */
typedef struct {
    PyObject_HEAD
    Lock *lock;                       /* the kernel lock */
    PyObject *procs;                  /* pid -> Process, the live ones */
    PyObject *running;                /* thread ident -> the Process it runs (the scheduler's) */
    PyObject *make_runnable;          /* the scheduler's */
    PyObject *reserve_ids;            /* () -> (first, end): a block of message ids from the store */
    long long next_id, end_id;        /* the block in use */
    long long quantum_ns;
} Core;

static PyTypeObject CoreType;

/* The Process attributes and values the C side reads and writes. */
static PyObject *S_state, *S_mailbox, *S_runtime, *S_pid, *S_RUNNABLE, *S_RUNNING, *S_BLOCKED, *S_recv, *S_error,
    *empty_text, *empty_bytes,
    *no_values;

#define DEFAULT_WEIGHT 100 /* scheduler.DEFAULT_WEIGHT */

/* A process woken by the one this worker thread runs, to run next on this
 * thread without a trip through the run queue (Go's runnext); the scheduler
 * uses the same slot (offer_next, take_next). runnext_state is its State
 * when a receive woke it, which the core can switch to at once. */
static __thread PyObject *runnext;
static __thread PyObject *runnext_state;
static __thread int on_worker; /* this thread is one of the scheduler's workers */

static long long monotonic_ns(void) /* the clock of Python's time.perf_counter_ns */
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static long long wall_ms(void) /* as store.now_ms */
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec * 1000LL + ts.tv_nsec / 1000000;
}

static int is_text(PyObject *value, PyObject *text)
{
    return value == text || (PyUnicode_Check(value) && PyUnicode_Compare(value, text) == 0);
}

/* The Process fields read and written on every hand-off, reached through
 * their slots' offsets: Process is a slots class (process.py), and attribute
 * lookup cost more than the rest of a hand-off. The offsets come from the
 * class's member descriptors when the first Core is made. */
static PyTypeObject *process_type;
static Py_ssize_t AT_STATE, AT_BLOCKED_ON, AT_BLOCKED_SYSCALL, AT_RESUME_VALUE, AT_KILL_REASON, AT_VRUNTIME,
    AT_WEIGHT, AT_MAILBOX;

static int find_slot(PyTypeObject *type, const char *name, Py_ssize_t *at)
{
    PyObject *descr = PyDict_GetItemString(type->tp_dict, name);
    if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type)
        || ((PyMemberDescrObject *)descr)->d_member->type != T_OBJECT_EX) {
        PyErr_Format(PyExc_TypeError, "%s.%s must be a slot", type->tp_name, name);
        return -1;
    }
    *at = ((PyMemberDescrObject *)descr)->d_member->offset;
    return 0;
}

static int find_process_slots(PyTypeObject *type)
{
    if (process_type != NULL) {
        if (process_type == type)
            return 0;
        PyErr_Format(PyExc_TypeError, "the kernel's processes are %s already", process_type->tp_name);
        return -1;
    }
    if (find_slot(type, "state", &AT_STATE) < 0 || find_slot(type, "blocked_on", &AT_BLOCKED_ON) < 0
        || find_slot(type, "blocked_syscall", &AT_BLOCKED_SYSCALL) < 0
        || find_slot(type, "resume_value", &AT_RESUME_VALUE) < 0 || find_slot(type, "kill_reason", &AT_KILL_REASON) < 0
        || find_slot(type, "vruntime", &AT_VRUNTIME) < 0 || find_slot(type, "weight", &AT_WEIGHT) < 0
        || find_slot(type, "mailbox", &AT_MAILBOX) < 0)
        return -1;
    Py_INCREF(type);
    process_type = type;
    return 0;
}

/* A field of a Process (the dataclass sets every field, so it is never NULL). */
static PyObject *field(PyObject *proc, Py_ssize_t at)
{
    PyObject *value = *(PyObject **)((char *)proc + at);
    return value != NULL ? value : Py_None;
}

static void set_field(PyObject *proc, Py_ssize_t at, PyObject *value)
{
    PyObject **slot = (PyObject **)((char *)proc + at);
    Py_INCREF(value);
    Py_XSETREF(*slot, value);
}

Message *llmos_new_message(PyObject *core_object, long long sender, long long to, PyObject *tag, PyObject *body,
                           PyObject *data, PyObject *correlation_id)
{
    Core *core = (Core *)core_object;
    if (core->next_id >= core->end_id) {
        PyObject *block = PyObject_CallNoArgs(core->reserve_ids);
        long long first, end;
        if (block == NULL)
            return NULL;
        if (!PyArg_ParseTuple(block, "LL:reserve_ids", &first, &end) || end <= first) {
            Py_DECREF(block);
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_RuntimeError, "reserve_ids gave an empty block");
            return NULL;
        }
        Py_DECREF(block);
        core->next_id = first;
        core->end_id = end;
    }
    return llmos_make_message(core->next_id++, sender, to, tag, body, data, correlation_id, wall_ms());
}

int llmos_wake(Mailbox *mailbox, PyObject *proc, Message *msg)
{
    PyObject *done;
    set_field(proc, AT_RESUME_VALUE, (PyObject *)msg);
    set_field(proc, AT_STATE, S_RUNNABLE);
    set_field(proc, AT_BLOCKED_ON, Py_None);
    if (on_worker && runnext == NULL) {
        Py_INCREF(proc);
        runnext = proc;
        Py_XINCREF(mailbox->owner_state);
        Py_XSETREF(runnext_state, mailbox->owner_state);
        return 0;
    }
    done = PyObject_CallOneArg(((Core *)mailbox->core)->make_runnable, proc);
    Py_XDECREF(done);
    return done != NULL ? 0 : -1;
}

/* The error text of the exception set, as bytes for Lua; clears it. */
static void take_error(char *out, size_t size)
{
    PyObject *type, *value, *traceback, *text;
    const char *utf8;
    PyErr_Fetch(&type, &value, &traceback);
    text = value != NULL ? PyObject_Str(value) : NULL;
    utf8 = text != NULL ? PyUnicode_AsUTF8(text) : NULL;
    snprintf(out, size, "%s", utf8 != NULL ? utf8 : "unknown error");
    PyErr_Clear();
    Py_XDECREF(text);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
}

/* A Lua string as text for a message field, or NULL (no exception) if it is not valid text. */
static PyObject *text_field(lua_State *L, int idx)
{
    size_t len;
    const char *text;
    PyObject *value;
    if (lua_isnil(L, idx)) {
        Py_INCREF(empty_text);
        return empty_text;
    }
    text = lua_tolstring(L, idx, &len);
    value = PyUnicode_DecodeUTF8(text, (Py_ssize_t)len, NULL);
    if (value == NULL)
        PyErr_Clear();
    return value;
}

enum { SEND_DONE, SEND_DECLINED, SEND_REFUSED };

/* sys.send(to, body, tag, data, correlation_id) to a process's mailbox, with
 * the GIL held: the message id and the sender's mailbox length on `id` and
 * `waiting`, or why it was refused in `error`. Declined: the Python side
 * handles what this does not (names, ports, raw data, values to report). */
static int send_message(State *state, lua_State *L, long long *id, Py_ssize_t *waiting, char *error, size_t size)
{
    Core *core = (Core *)state->core;
    PyObject *body, *tag = NULL, *correlation_id = NULL, *key = NULL, *dst, *mailbox;
    Message *msg = NULL;
    int result = SEND_DECLINED, delivered;
    if (core == NULL || state->mailbox == NULL)
        return SEND_DECLINED;
    body = to_python(L, 2, 0, 1); /* a body is JSON: text strings, finite numbers */
    if (body == NULL) {
        PyErr_Clear();
        return SEND_DECLINED;
    }
    if ((tag = text_field(L, 3)) == NULL || (correlation_id = text_field(L, 5)) == NULL
        || (key = PyLong_FromLongLong(lua_tointegerx(L, 1, NULL))) == NULL)
        goto out;
    llmos_lock(core->lock);
    dst = PyDict_GetItemWithError(core->procs, key);
    if (dst != NULL && Py_IS_TYPE(dst, process_type) && Py_IS_TYPE(mailbox = field(dst, AT_MAILBOX), &MailboxType)
        && !((Mailbox *)mailbox)->durable
        && (msg = llmos_new_message(state->core, state->pid, ((Mailbox *)mailbox)->owner, tag, body, empty_bytes,
                                    correlation_id)) != NULL) {
        delivered = llmos_deliver((Mailbox *)mailbox, msg, 1);
        if (delivered < 0) {
            take_error(error, size);
            result = SEND_REFUSED;
        } else {
            result = SEND_DONE;
            *id = msg->id;
            *waiting = state->mailbox->count;
            state->mailbox->sent++;
        }
    }
    llmos_unlock(core->lock);
out:
    if (PyErr_Occurred())
        PyErr_Clear(); /* what failed otherwise is the Python side's to report, as it sends instead */
    Py_XDECREF(msg);
    Py_XDECREF(key);
    Py_XDECREF(correlation_id);
    Py_XDECREF(tag);
    Py_DECREF(body);
    return result;
}

/* The bridge's send (to, body, tag, data, correlation_id) -> message id and
 * the sender's mailbox length, or nil and why not. A message between
 * processes goes straight into the receiver's mailbox, or its hands. */
static int bridge_send(lua_State *L)
{
    State *state = state_of(L);
    long long id = 0;
    Py_ssize_t waiting = 0;
    char error[512];
    int result, tag = lua_type(L, 3), correlation_id = lua_type(L, 5);
    PyGILState_STATE gil;
    lua_settop(L, 5);
    if (!lua_isinteger(L, 1) || !lua_isnil(L, 4) || (tag != LUA_TNIL && tag != LUA_TSTRING)
        || (correlation_id != LUA_TNIL && correlation_id != LUA_TSTRING))
        return call_bridge(L, BRIDGE_SEND);
    gil = PyGILState_Ensure();
    result = send_message(state, L, &id, &waiting, error, sizeof error);
    PyGILState_Release(gil);
    if (result == SEND_DECLINED)
        return call_bridge(L, BRIDGE_SEND);
    if (result == SEND_REFUSED) {
        lua_pushnil(L);
        lua_pushstring(L, error);
        return 2;
    }
    lua_pushinteger(L, id);
    lua_pushinteger(L, (lua_Integer)waiting);
    return 2;
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
    /* Nothing built here is garbage: collecting meanwhile only costs time. */
    lua_gc(L, LUA_GCSTOP);
    for (library = libraries; library->name != NULL; library++) {
        luaL_requiref(L, library->name, library->func, 1);
        lua_pop(L, 1);
    }
    for (i = 0; i < BRIDGE_COUNT; i++) {
        lua_pushinteger(L, i);
        lua_pushcclosure(L, i == BRIDGE_SEND ? bridge_send : i == BRIDGE_TRY_RECV ? bridge_try_recv : bridge_call, 1);
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
    PyObject *bridge, *proc, *core;
    SandboxSpec spec;
    lua_State *L = state->L;
    int i, status;
    if (!PyArg_ParseTuple(args, "OOO!SSOO:open_sandbox", &bridge, &proc, &CoreType, &core, &spec.source,
                          &spec.chunk_name, &spec.args, &spec.hook_count))
        return NULL;
    if (state->bridge != NULL)
        return PyErr_Format(PyExc_RuntimeError, "the sandbox is built already");
    state->bridge = PyWeakref_NewRef(bridge, NULL);
    if (state->bridge == NULL)
        return NULL;
    if (!Py_IS_TYPE(proc, process_type))
        return PyErr_Format(PyExc_TypeError, "open_sandbox: proc must be the kernel's Process");
    spec.pid = PyObject_GetAttr(proc, S_pid);
    state->mailbox = (Mailbox *)PyObject_GetAttr(proc, S_mailbox);
    Py_XDECREF(spec.pid); /* the process holds it */
    if (spec.pid == NULL || state->mailbox == NULL || (state->pid = PyLong_AsLongLong(spec.pid)) == -1
        || !PyObject_TypeCheck(state->mailbox, &MailboxType)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "open_sandbox: the process needs a pid and a Mailbox");
        State_clear(state);
        return NULL;
    }
    state->mailbox->owner_state = (PyObject *)state;
    Py_INCREF(proc);
    state->proc = proc;
    Py_INCREF(core);
    state->core = core;
    for (i = 0; i < BRIDGE_COUNT; i++) {
        state->methods[i] = PyObject_GetAttrString((PyObject *)Py_TYPE(bridge), BRIDGE_METHODS[i]);
        if (state->methods[i] == NULL) {
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
    lua_pushlightuserdata(L, &spec);
    status = lua_pcall(L, 1, 5, 0);
    if (status != LUA_OK)
        return raise_lua_error(L, status);
    Py_RETURN_NONE;
}

/* -- The slice clock: CPU time is time spent holding a virtual CPU ----------------------------------- */
/* There are no more virtual CPUs than cores, so it tracks the thread's CPU
 * time, at a tenth of the cost of asking the OS on every resume. */
static void begin_slice_at(State *state, long long now)
{
    state->slice_start = now;
    state->in_slice = 1;
    llmos_preempt_set_running(state->main_co);
}

/* Charges the slice to the process: its CPU time, and its vruntime (CPU time
 * scaled by DEFAULT_WEIGHT / weight), which orders the run queue. */
static int end_slice(State *state, long long *now)
{
    long long ran, weight;
    PyObject *sum;
    llmos_preempt_set_running(NULL);
    state->in_slice = 0;
    *now = monotonic_ns();
    ran = *now - state->slice_start;
    state->cpu_ns += ran;
    if (state->proc == NULL)
        return 0;
    weight = PyLong_AsLongLong(field(state->proc, AT_WEIGHT));
    sum = PyFloat_FromDouble(PyFloat_AsDouble(field(state->proc, AT_VRUNTIME))
                             + (double)ran * DEFAULT_WEIGHT / (double)(weight > 0 ? weight : 1));
    if (sum == NULL || PyErr_Occurred()) {
        Py_XDECREF(sum);
        return -1;
    }
    set_field(state->proc, AT_VRUNTIME, sum);
    Py_DECREF(sum);
    return 0;
}

static PyObject *State_begin_slice(State *state, PyObject *unused)
{
    (void)unused;
    begin_slice_at(state, monotonic_ns());
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
static int run_step(State *state, PyObject *answer, long long *now)
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
    lua_pushcfunction(L, push_values);
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
static PyObject *step_results(lua_State *L, int status)
{
    PyObject *out;
    if (status >= START_FAILED) {
        const char *text = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "the sandbox could not be built";
        out = Py_BuildValue("(yyO)", "unstarted", text, status - START_FAILED == LUA_ERRMEM ? Py_True : Py_False);
    } else if (status == LUA_OK) {
        out = values_to_tuple(L, NULL, 1, lua_gettop(L));
    } else {
        size_t len = 0;
        const char *text = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &len) : NULL;
        if (text == NULL) {
            text = "error object is not a string";
            len = strlen(text);
        }
        out = Py_BuildValue("(Oy#)", S_error, text, (Py_ssize_t)len);
    }
    lua_settop(L, 0);
    return out;
}

/* Resume the program with a syscall's answer: the sandbox's step (see _sandbox.c). */
static PyObject *State_resume(State *state, PyObject *args)
{
    long long now = monotonic_ns();
    int status = run_step(state, args, &now);
    return status < 0 ? NULL : step_results(state->L, status);
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
    {"cpu_ns", T_LONGLONG, offsetof(State, cpu_ns), READONLY, "CPU time of the slices that ended"},
    {"in_slice", T_INT, offsetof(State, in_slice), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject StateType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "llmosd._lua.State",
    .tp_doc = "State(memory_limit=0): a process's Lua state (0: no memory limit)",
    .tp_basicsize = sizeof(State),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = State_new,
    .tp_traverse = (traverseproc)State_traverse,
    .tp_clear = (inquiry)State_clear,
    .tp_dealloc = (destructor)State_dealloc,
    .tp_methods = State_methods,
    .tp_members = State_members,
};

/* -- Core: running Lua processes, and handing the CPU from one to the next ----------------------- */
static int lua_text_is(lua_State *L, int idx, const char *text)
{
    size_t len;
    const char *value = lua_type(L, idx) == LUA_TSTRING ? lua_tolstring(L, idx, &len) : NULL;
    return value != NULL && len == strlen(text) && memcmp(value, text, len) == 0;
}

/* An optional text field of sys.recv's filter: None for nil; NULL (no
 * exception) for anything the Python side should check and report. */
static PyObject *filter_text(lua_State *L, int idx)
{
    if (lua_isnil(L, idx)) {
        Py_INCREF(Py_None);
        return Py_None;
    }
    return lua_type(L, idx) == LUA_TSTRING ? text_field(L, idx) : NULL;
}

/* sys.recv's filter from its from, tag and correlation_id at idx..idx+2,
 * in *match (NULL: any message). -1 (no exception): the Python side decides. */
static int recv_filter(lua_State *L, int idx, Match **match)
{
    PyObject *sender = NULL, *tag = NULL, *correlation_id = NULL;
    *match = NULL;
    if (lua_isnil(L, idx) && lua_isnil(L, idx + 1) && lua_isnil(L, idx + 2))
        return 0;
    if (lua_isnil(L, idx)) {
        Py_INCREF(Py_None);
        sender = Py_None;
    } else if (lua_isinteger(L, idx)) {
        sender = PyLong_FromLongLong(lua_tointegerx(L, idx, NULL));
    }
    if (sender != NULL && (tag = filter_text(L, idx + 1)) != NULL
        && (correlation_id = filter_text(L, idx + 2)) != NULL)
        *match = (Match *)PyObject_CallFunctionObjArgs((PyObject *)&MatchType, sender, tag, correlation_id, NULL);
    Py_XDECREF(sender);
    Py_XDECREF(tag);
    Py_XDECREF(correlation_id);
    PyErr_Clear();
    return *match != NULL ? 0 : -1;
}

/* The answer to a receive: the message and how many wait after it. */
static PyObject *message_answer(PyObject *msg, Mailbox *mailbox)
{
    PyObject *waiting = PyLong_FromSsize_t(mailbox->count), *answer;
    if (waiting == NULL)
        return NULL;
    answer = PyTuple_Pack(2, msg, waiting);
    Py_DECREF(waiting);
    return answer;
}

/* The bridge's try_recv (from, tag, correlation_id, timeout_ms) -> the
 * message's values and how many wait after it, or nil: sys.recv takes a
 * waiting message without a trip through the scheduler. Filters the C side
 * does not check go to the Python side, which reports what is wrong. */
static int bridge_try_recv(lua_State *L)
{
    State *state = state_of(L);
    int timeout = lua_type(L, 4), status;
    Match *match;
    Message *msg;
    PyObject *answer;
    PyGILState_STATE gil;
    lua_settop(L, 4);
    if (state->core == NULL || state->mailbox == NULL
        || (timeout != LUA_TNIL && (timeout != LUA_TNUMBER || !(lua_tonumber(L, 4) >= 0))))
        return call_bridge(L, BRIDGE_TRY_RECV);
    gil = PyGILState_Ensure();
    if (recv_filter(L, 1, &match) < 0) {
        PyGILState_Release(gil);
        return call_bridge(L, BRIDGE_TRY_RECV);
    }
    llmos_lock(((Core *)state->core)->lock);
    msg = llmos_take(state->mailbox, match);
    answer = msg != NULL ? message_answer((PyObject *)msg, state->mailbox) : NULL;
    llmos_unlock(((Core *)state->core)->lock);
    Py_XDECREF(match);
    Py_XDECREF(msg);
    if (answer == NULL) {
        PyErr_Clear();
        PyGILState_Release(gil);
        lua_pushnil(L);
        return 1;
    }
    lua_pushcfunction(L, push_values);
    lua_pushlightuserdata(L, answer);
    status = lua_pcall(L, 1, LUA_MULTRET, 0);
    Py_DECREF(answer);
    PyGILState_Release(gil);
    if (status != LUA_OK)
        return lua_error(L); /* out of memory while pushing the answer */
    return lua_gettop(L) - 4;
}

enum { RECV_DECLINED, RECV_TAKEN, RECV_BLOCKED };

/* After a step that yielded ("sys", "recv", from, tag, correlation_id,
 * timeout_ms) with no timeout: take a matching message (*taken), or block
 * the process on its mailbox, where a sender's llmos_wake finds it.
 * Declined: the Python side handles the syscall (and a process to end). */
static int receive(Core *core, State *state, Message **taken)
{
    lua_State *L = state->L;
    PyObject *proc = state->proc;
    Mailbox *mailbox = state->mailbox;
    Match *match;
    int result = RECV_DECLINED;
    if (lua_gettop(L) != 6 || !lua_isnil(L, 6) || !lua_text_is(L, 1, "sys") || !lua_text_is(L, 2, "recv")
        || recv_filter(L, 3, &match) < 0)
        return RECV_DECLINED;
    llmos_lock(core->lock);
    if (field(proc, AT_KILL_REASON) == Py_None) {
        *taken = llmos_take(mailbox, match);
        if (*taken != NULL) {
            result = RECV_TAKEN;
        } else if (llmos_block_owner(mailbox, proc, match) == 0) {
            set_field(proc, AT_STATE, S_BLOCKED);
            set_field(proc, AT_BLOCKED_ON, S_recv);
            set_field(proc, AT_BLOCKED_SYSCALL, S_recv);
            result = RECV_BLOCKED;
        }
    }
    llmos_unlock(core->lock);
    Py_XDECREF(match);
    if (PyErr_Occurred())
        PyErr_Clear();
    return result;
}

/* The process in runnext, if it can run on here at once: a Lua process that
 * a receive woke with a message (its answer goes to *answer; a process
 * blocked in a receive is never one preempted mid-slice), and not to end.
 * It is then RUNNING on this thread, and its State in *next_state. NULL: the
 * scheduler's worker takes it from here. */
static PyObject *switch_to_next(Core *core, PyObject *ident, State **next_state, PyObject **answer)
{
    PyObject *next = runnext, *value;
    State *state = (State *)runnext_state;
    int ready;
    if (next == NULL || state == NULL || state->proc != next)
        return NULL;
    llmos_lock(core->lock);
    value = field(next, AT_RESUME_VALUE);
    ready = Py_IS_TYPE(value, &MessageType) && field(next, AT_KILL_REASON) == Py_None
            && is_text(field(next, AT_STATE), S_RUNNABLE)
            && (*answer = message_answer(value, state->mailbox)) != NULL;
    if (ready) {
        set_field(next, AT_RESUME_VALUE, no_values);
        set_field(next, AT_STATE, S_RUNNING);
    }
    llmos_unlock(core->lock);
    if (PyErr_Occurred())
        PyErr_Clear();
    if (!ready)
        return NULL;
    runnext = runnext_state = NULL; /* their references are now the caller's */
    *next_state = state;
    if (PyDict_SetItem(core->running, ident, next) < 0)
        PyErr_Clear(); /* only the watchdog's view of who runs here is off */
    return next;
}

static State *state_of_process(PyObject *proc)
{
    PyObject *runtime = PyObject_GetAttr(proc, S_runtime), *state;
    if (runtime == NULL)
        return NULL;
    state = PyObject_GetAttr(runtime, S_state);
    Py_DECREF(runtime);
    if (state != NULL && !Py_IS_TYPE(state, &StateType)) {
        Py_DECREF(state);
        PyErr_SetString(PyExc_TypeError, "a Lua process's runtime has no State");
        return NULL;
    }
    return (State *)state;
}

static PyObject *Core_run(Core *core, PyObject *args)
{
    PyObject *proc, *answer, *out = NULL, *ident;
    State *state;
    long long started = monotonic_ns(), now = started;
    Message *taken;
    int status;
    if (!PyArg_ParseTuple(args, "OO!:run", &proc, &PyTuple_Type, &answer))
        return NULL;
    if ((state = state_of_process(proc)) == NULL)
        return NULL;
    if ((ident = PyLong_FromUnsignedLong(PyThread_get_thread_ident())) == NULL) {
        Py_DECREF(state);
        return NULL;
    }
    Py_INCREF(proc);
    Py_INCREF(answer);
    for (;;) {
        PyObject *next;
        status = run_step(state, answer, &now);
        Py_CLEAR(answer);
        if (status < 0)
            break;
        /* Past a quantum, the Python side decides whether others go first. */
        if (status == LUA_OK && now - started < core->quantum_ns) {
            taken = NULL;
            switch (receive(core, state, &taken)) {
            case RECV_TAKEN:
                answer = message_answer((PyObject *)taken, state->mailbox);
                Py_DECREF(taken);
                if (answer == NULL)
                    goto done;
                continue;
            case RECV_BLOCKED:
                lua_settop(state->L, 0);
                Py_CLEAR(state);
                next = switch_to_next(core, ident, &state, &answer);
                if (next == NULL) {
                    out = Py_BuildValue("(OO)", proc, Py_None);
                    goto done;
                }
                Py_SETREF(proc, next);
                continue;
            }
        }
        out = step_results(state->L, status);
        if (out != NULL)
            out = Py_BuildValue("(ON)", proc, out);
        break;
    }
done:
    Py_XDECREF(state);
    Py_XDECREF(answer);
    Py_DECREF(proc);
    Py_DECREF(ident);
    return out;
}

static PyObject *Core_new_message(Core *core, PyObject *args)
{
    long long sender, to;
    PyObject *tag, *body, *data, *correlation_id;
    if (!PyArg_ParseTuple(args, "LLUOSU:new_message", &sender, &to, &tag, &body, &data, &correlation_id))
        return NULL;
    return (PyObject *)llmos_new_message((PyObject *)core, sender, to, tag, body, data, correlation_id);
}

static PyObject *Core_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"lock", "procs", "scheduler", "reserve_ids", "quantum_ns", "process_type", NULL};
    PyObject *lock, *procs, *scheduler, *reserve_ids, *process_class;
    long long quantum_ns;
    Core *core;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O!OOLO!:Core", keywords, &LockType, &lock, &PyDict_Type, &procs,
                                     &scheduler, &reserve_ids, &quantum_ns, &PyType_Type, &process_class)
        || find_process_slots((PyTypeObject *)process_class) < 0)
        return NULL;
    core = (Core *)type->tp_alloc(type, 0);
    if (core == NULL)
        return NULL;
    Py_INCREF(lock);
    core->lock = (Lock *)lock;
    Py_INCREF(procs);
    core->procs = procs;
    Py_INCREF(reserve_ids);
    core->reserve_ids = reserve_ids;
    core->quantum_ns = quantum_ns;
    core->running = PyObject_GetAttrString(scheduler, "running");
    core->make_runnable = PyObject_GetAttrString(scheduler, "make_runnable");
    if (core->running == NULL || core->make_runnable == NULL) {
        Py_DECREF(core);
        return NULL;
    }
    if (!PyDict_Check(core->running)) {
        Py_DECREF(core);
        return PyErr_Format(PyExc_TypeError, "Core: scheduler.running must be a dict");
    }
    return (PyObject *)core;
}

static int Core_traverse(Core *core, visitproc visit, void *arg)
{
    Py_VISIT(core->lock);
    Py_VISIT(core->procs);
    Py_VISIT(core->running);
    Py_VISIT(core->make_runnable);
    Py_VISIT(core->reserve_ids);
    return 0;
}

static int Core_clear(Core *core)
{
    Py_CLEAR(core->lock);
    Py_CLEAR(core->procs);
    Py_CLEAR(core->running);
    Py_CLEAR(core->make_runnable);
    Py_CLEAR(core->reserve_ids);
    return 0;
}

static void Core_dealloc(Core *core)
{
    PyObject_GC_UnTrack(core);
    Core_clear(core);
    Py_TYPE(core)->tp_free((PyObject *)core);
}

static PyMethodDef Core_methods[] = {
    {"run", (PyCFunction)Core_run, METH_VARARGS,
     "run(proc, answer) -> (proc, out): run the Lua process `proc`, resumed with the tuple `answer`, and the "
     "processes it hands the CPU to when it blocks in a receive; `proc` is the one that ran last, `out` what its "
     "step returned (see State.resume), or None if it is blocked on its mailbox"},
    {"new_message", (PyCFunction)Core_new_message, METH_VARARGS,
     "new_message(sender, to, tag, body, data, correlation_id) -> a Message with the next id, sent now"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "llmosd._lua.Core",
    .tp_doc = "Core(lock, procs, scheduler, reserve_ids, quantum_ns, process_type): the kernel's C side, where Lua "
              "processes send, receive and hand the CPU to each other without entering Python; process_type is "
              "the slots class of its processes",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = Core_new,
    .tp_traverse = (traverseproc)Core_traverse,
    .tp_clear = (inquiry)Core_clear,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_methods = Core_methods,
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

static PyObject *become_worker(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    on_worker = 1;
    Py_RETURN_NONE;
}

static PyObject *offer_next(PyObject *self, PyObject *proc)
{
    (void)self;
    if (!on_worker || runnext != NULL)
        Py_RETURN_FALSE;
    Py_INCREF(proc);
    runnext = proc;
    Py_CLEAR(runnext_state);
    Py_RETURN_TRUE;
}

static PyObject *take_next(PyObject *self, PyObject *unused)
{
    PyObject *next = runnext;
    (void)self;
    (void)unused;
    runnext = NULL;
    Py_CLEAR(runnext_state);
    if (next == NULL)
        Py_RETURN_NONE;
    return next;
}

static PyObject *has_next(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyBool_FromLong(runnext != NULL);
}

static PyMethodDef methods[] = {
    {"become_worker", become_worker, METH_NOARGS,
     "become_worker(): this thread is a scheduler worker, with a runnext slot"},
    {"offer_next", offer_next, METH_O,
     "offer_next(proc) -> True if `proc` is to run next on this worker thread (its slot was free)"},
    {"take_next", take_next, METH_NOARGS, "take_next() -> the process to run next on this thread, or None"},
    {"has_next", has_next, METH_NOARGS, "has_next() -> whether a process waits to run next on this thread"},
    {"syntax_error", syntax_error, METH_VARARGS,
     "syntax_error(source: bytes, chunk_name: bytes) -> why the source does not compile as a Lua chunk, or None"},
    {"setup_preemption", setup_preemption, METH_O,
     "setup_preemption(signal): a thread that gets `signal` interrupts the program it runs (see _preempt.c)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_lua", "The kernel's binding to the Lua states of its processes.", -1, methods,
};

static int intern_names(void)
{
    static const struct {
        PyObject **name;
        const char *text;
    } names[] = {
        {&S_state, "state"}, {&S_mailbox, "mailbox"}, {&S_runtime, "runtime"}, {&S_pid, "pid"},
        {&S_RUNNABLE, "RUNNABLE"},
        {&S_RUNNING, "RUNNING"}, {&S_BLOCKED, "BLOCKED"}, {&S_recv, "recv"},
        {&empty_text, ""},
    };
    size_t i;
    for (i = 0; i < sizeof names / sizeof names[0]; i++)
        if ((*names[i].name = PyUnicode_InternFromString(names[i].text)) == NULL)
            return -1;
    S_error = PyBytes_FromString("error");
    empty_bytes = PyBytes_FromString("");
    no_values = PyTuple_New(0);
    return S_error != NULL && empty_bytes != NULL && no_values != NULL ? 0 : -1;
}

PyMODINIT_FUNC PyInit__lua(void)
{
    PyObject *m;
    if (PyType_Ready(&StateType) < 0 || PyType_Ready(&CoreType) < 0 || intern_names() < 0)
        return NULL;
    m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    BadValue = PyErr_NewExceptionWithDoc("llmosd._lua.BadValue",
                                         "A Lua value that cannot cross into Python; args[0] says why.", NULL, NULL);
    if (BadValue == NULL || PyModule_AddObjectRef(m, "BadValue", BadValue) < 0
        || PyModule_AddObjectRef(m, "State", (PyObject *)&StateType) < 0
        || PyModule_AddObjectRef(m, "Core", (PyObject *)&CoreType) < 0 || llmos_messaging_init(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
