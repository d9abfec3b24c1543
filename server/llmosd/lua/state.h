/*
 * What lua/state.c (the Lua states of processes) and lua/fast_paths.c (the kernel's C side
 * of messaging and switching) share.
 */
#ifndef LLMOS_LUA_STATE_H
#define LLMOS_LUA_STATE_H

#include "../kernel/messaging.h"

#include "lua_api.h"

/* The bridge functions of a state: what the program calls the kernel with. */
enum { BRIDGE_CHECK, BRIDGE_SEND, BRIDGE_TRY_RECV, BRIDGE_CALL, BRIDGE_COUNT };

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
    Py_ssize_t value_limit;           /* the most bytes a value from the program may take (the message limit) */
    long long slice_start;            /* monotonic ns when the running slice began */
    long long cpu_ns;                 /* time holding a virtual CPU, in the slices that ended */
    long long cpu_used_ns;            /* CPU time actually used in them (see lua/state.c's slice clock) */
    long long slice_cpu_start;        /* the thread's CPU time when the slice began, if measured */
    int measure_cpu;                  /* whether this slice's CPU time is measured */
    int in_slice;
    int built;                        /* the sandbox is built (by the first step) */
    char journal_live;                /* a durable process past its replay: lua/fast_paths.c journals its sends
                                       * and receives through its Python side (lua/durable.py) */
} State;

extern PyTypeObject StateType, CoreType;

/* lua/state.c */
State *llmos_state_of(lua_State *L);
/* A lua_CFunction, run protected: pushes the values of the tuple given as light userdata. */
int llmos_push_values(lua_State *L);
/* What converting one Lua value has cost so far, in encoded bytes (see messaging.h), and may cost;
 * the tables converted so far (so that a table reached again, in a DAG, costs one lookup), and
 * the depth of the deepest table reached. */
typedef struct {
    Py_ssize_t used, limit;
    PyObject *seen; /* {table address: (value, encoded size, height)}, made on first use */
    int deepest;
} LuaValueBudget;
/* A budget of the state's value limit; release it with llmos_value_budget_done. */
LuaValueBudget llmos_value_budget(lua_State *L);
void llmos_value_budget_done(LuaValueBudget *budget);
/* A Lua value as Python's (nested: inside a table, where strings are text and numbers follow the value
 * model); NULL with BadValue if it cannot cross, TooLarge once it costs more than the budget allows. */
PyObject *llmos_to_python(lua_State *L, int idx, int depth, int nested, LuaValueBudget *budget);
/* A Lua string as text; NULL with BadValue if it is not UTF-8. */
PyObject *llmos_text_to_python(lua_State *L, int idx);
/* The text of the exception set (or `fallback`), into out; clears it. */
void llmos_error_text(char *out, size_t size, const char *fallback);
/* Lua values first..last as the tuple a bridge method gets them in (head: its first item, if not NULL). */
PyObject *llmos_values_to_tuple(lua_State *L, PyObject *head, int first, int last);
/* Calls bridge method `which` of the process's Python side with the Lua arguments. */
int llmos_call_bridge(lua_State *L, int which);
/* Runs the program until its next yield, answering the syscall it waits in (see lua/state.c). */
int llmos_run_step(State *state, PyObject *answer, long long *now);
PyObject *llmos_step_results(lua_State *L, int status);

/* lua/fast_paths.c */
long long llmos_monotonic_ns(void);
int llmos_is_process(PyObject *proc);
/* Charges `ran` ns of CPU to the process's vruntime. */
int llmos_charge(PyObject *proc, long long ran);
int llmos_bridge_send(lua_State *L);
int llmos_bridge_try_recv(lua_State *L);
int llmos_core_init(PyObject *module);

#endif
