/*
 * llmosd._kernel's core: the kernel's C side of messages between processes,
 * and of handing a worker's CPU from one Lua process to the next.
 *
 * send and try_recv, two of a state's bridge functions (see lua/state.c), are C
 * first: a message to another process goes straight into its mailbox
 * (kernel/mailbox.c), or the hands of a receiver blocked there, and a waiting
 * message is taken without Python. Core.run runs a process and, when it
 * blocks in a receive, blocks it on its mailbox and switches this worker to
 * the process a send woke (the scheduler's runnext), so that processes
 * exchanging messages never enter Python. What this side does not handle
 * (ports, names, raw data, odd filters, values to report as errors, a
 * quantum spent) goes to the Python side (lua/runtime.py, kernel.py), which
 * handles it as it always did. Both sides change the process table and
 * mailboxes under the one kernel lock.
 *
 * Why one file: send, try-receive, the blocking receive and the hand-off to
 * the process a send woke are one protocol over the same per-thread runnext
 * slot and Process fields; split, each part would need the others' statics.
 */
#include "state.h"

#include <string.h>
#include <structmember.h>
#include <time.h>

typedef struct {
    PyObject_HEAD
    Lock *lock;                       /* the kernel lock */
    PyObject *procs;                  /* pid -> Process, the live ones */
    PyObject *running;                /* thread ident -> the Process it runs (the scheduler's) */
    PyObject *make_runnable;          /* the scheduler's */
    PyObject *reserve_ids;            /* () -> (first, end): a block of message ids from the store */
    long long next_id, end_id;        /* the block in use */
    long long spare_first, spare_end; /* the next block, reserved ahead off the kernel lock (refill_ids) */
    PyThread_type_lock refill_lock;   /* serializes reserve_ids (the store's take_ids wants one caller) */
    long long quantum_ns;
    Py_ssize_t max_message_bytes;     /* the one size limit of a message, on every path */
} Core;

/* The Process attributes and values the C side reads and writes. */
static PyObject *ResourceExhausted, *InvalidArgument; /* llmosd.errors' */
static PyObject *S_state, *S_runtime, *S_RUNNABLE, *S_RUNNING, *S_BLOCKED, *S_recv, *S_answer, *S_pending_call,
    *S_journal_sent, *S_check_room, *empty_text, *empty_bytes, *no_values;


/* A process woken by the one this worker thread runs, to run next on this
 * thread without a trip through the run queue (Go's runnext); the scheduler
 * uses the same slot (offer_next, take_next). runnext_state is its State
 * when a receive woke it, which the core can switch to at once. */
static __thread PyObject *runnext;
static __thread PyObject *runnext_state;
static __thread int on_worker; /* this thread is one of the scheduler's workers */

long long llmos_monotonic_ns(void) /* the clock of Python's time.perf_counter_ns */
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

/* The kernel's Process class (a subclass of ProcessFields, kernel/process.c), given when the
 * first Core is made: a hand-off tests a process's type exactly, which is cheaper than a subtype
 * check. */
static PyTypeObject *process_type;

static int set_process_type(PyTypeObject *type)
{
    if (process_type != NULL) {
        if (process_type == type)
            return 0;
        PyErr_Format(PyExc_TypeError, "the kernel's processes are %s already", process_type->tp_name);
        return -1;
    }
    if (!PyType_IsSubtype(type, &ProcessFieldsType)) {
        PyErr_Format(PyExc_TypeError, "%s must be a subclass of ProcessFields", type->tp_name);
        return -1;
    }
    Py_INCREF(type);
    process_type = type;
    return 0;
}

int llmos_is_process(PyObject *proc)
{
    return process_type != NULL && Py_IS_TYPE(proc, process_type);
}

#define FIELDS(proc) ((ProcessFields *)(proc))

static void set_object(PyObject **slot, PyObject *value)
{
    Py_INCREF(value);
    Py_XSETREF(*slot, value);
}

/* vruntime: CPU time scaled by DEFAULT_WEIGHT / weight, which orders the run queue. The one
 * place this charge is made: Python agents' slices call it too (Core.charge). */
int llmos_charge(PyObject *proc, long long ran)
{
    ProcessFields *fields = FIELDS(proc);
    fields->vruntime += (double)ran * (double)llmos_default_weight() / (double)(fields->weight > 0 ? fields->weight : 1);
    return 0;
}

/* A message that breaks the value model or the size limit becomes the
 * kernel's error for it: InvalidArgument or ResourceExhausted. */
static Message *refuse_message(Core *core)
{
    PyObject *type, *value, *traceback, *text;
    int too_large = PyErr_ExceptionMatches(llmos_TooLarge);
    if (!too_large && !PyErr_ExceptionMatches(llmos_BadValue))
        return NULL;
    PyErr_Fetch(&type, &value, &traceback);
    text = value != NULL ? PyObject_Str(value) : NULL;
    if (too_large)
        PyErr_Format(ResourceExhausted, "message larger than the limit of %zd bytes", core->max_message_bytes);
    else if (text != NULL)
        PyErr_Format(InvalidArgument, "message body: %U", text);
    Py_XDECREF(text);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
    return NULL;
}

/* Message ids come from the store in blocks. Reserving one may wait for the disk, so the
 * next block is reserved ahead, without the kernel lock, by refill_ids (called after a run and
 * after a send from Python); new_message then switches blocks without calling out. All of this
 * runs with the GIL held, which orders the accesses to the block fields. */
static void lock_refill(Core *core)
{
    if (!PyThread_acquire_lock(core->refill_lock, NOWAIT_LOCK)) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(core->refill_lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
    }
}

static int reserve_block(Core *core, long long *first, long long *end) /* refill_lock held */
{
    PyObject *block = PyObject_CallNoArgs(core->reserve_ids);
    if (block == NULL)
        return -1;
    if (!PyArg_ParseTuple(block, "LL:reserve_ids", first, end) || *end <= *first) {
        Py_DECREF(block);
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "reserve_ids gave an empty block");
        return -1;
    }
    Py_DECREF(block);
    return 0;
}

static int use_spare(Core *core)
{
    if (core->spare_end <= core->spare_first)
        return 0;
    core->next_id = core->spare_first;
    core->end_id = core->spare_end;
    core->spare_first = core->spare_end = 0;
    return 1;
}

/* Reserve the next block unless one is ready; without the kernel lock. */
static int refill(Core *core)
{
    long long first, end;
    int status = 0;
    if (core->spare_end > core->spare_first)
        return 0;
    lock_refill(core);
    if (core->spare_end <= core->spare_first) {
        status = reserve_block(core, &first, &end);
        if (status == 0) {
            core->spare_first = first;
            core->spare_end = end;
        }
    }
    PyThread_release_lock(core->refill_lock);
    return status;
}

static PyObject *Core_refill_ids(Core *core, PyObject *unused)
{
    (void)unused;
    if (refill(core) < 0)
        return NULL;
    Py_RETURN_NONE;
}

Message *llmos_new_message(PyObject *core_object, long long sender, long long to, PyObject *tag, PyObject *body,
                           PyObject *data, PyObject *correlation_id, Py_ssize_t body_size, Py_ssize_t headroom)
{
    Core *core = (Core *)core_object;
    Py_ssize_t limit = core->max_message_bytes + headroom;
    Message *msg;
    if (body_size < 0 && (body_size = llmos_value_size(body, limit)) < 0)
        return refuse_message(core);
    if (core->next_id >= core->end_id && !use_spare(core)) {
        /* No block reserved ahead (start-up, or ids used faster than refill_ids ran): reserve one
         * now, which may wait for the disk with the kernel lock held. */
        int failed;
        lock_refill(core);
        failed = !use_spare(core) && reserve_block(core, &core->next_id, &core->end_id) < 0;
        PyThread_release_lock(core->refill_lock);
        if (failed)
            return NULL;
    }
    msg = llmos_make_message(core->next_id++, sender, to, tag, body, data, correlation_id, wall_ms(), body_size);
    if (msg == NULL)
        return refuse_message(core);
    if (msg->size > limit) { /* ids only grow: the one taken is skipped */
        Py_DECREF(msg);
        llmos_too_large(limit);
        return refuse_message(core);
    }
    return msg;
}

int llmos_wake(Mailbox *mailbox, PyObject *proc, Message *msg)
{
    PyObject *done;
    set_object(&FIELDS(proc)->resume_value, (PyObject *)msg);
    set_object(&FIELDS(proc)->state, S_RUNNABLE);
    set_object(&FIELDS(proc)->blocked_on, Py_None);
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

/* A Lua string as text for a message field, or NULL (no exception) if it is not valid text. */
static PyObject *text_field(lua_State *L, int idx)
{
    PyObject *value;
    if (lua_isnil(L, idx)) {
        Py_INCREF(empty_text);
        return empty_text;
    }
    value = llmos_text_to_python(L, idx);
    if (value == NULL)
        PyErr_Clear();
    return value;
}

enum { SEND_DONE, SEND_DECLINED, SEND_REFUSED };

/* A durable process's Python side (lua/durable.py), held weakly by its state; NULL (no exception) if gone. */
static PyObject *bridge_of(State *state)
{
    PyObject *bridge = PyWeakref_GetObject(state->bridge);
    return bridge != NULL && bridge != Py_None ? bridge : NULL;
}

/* A live durable sender's send of `msg` (its bridge arguments `args`) into `mailbox`, before it is
 * delivered (kernel lock held): the message fits, and the journal has the send, with the message's
 * copy if its receiver is durable, as one unit of the store's queue (kernel/journal.py), so that
 * nothing its receiver does with it can come first in the journal. -1: not journaled (the Python
 * side sends instead, and journals whatever it answers). */
static int journal_send(State *state, PyObject *args, Message *msg, Mailbox *mailbox)
{
    PyObject *bridge = bridge_of(state), *done;
    if (bridge == NULL || (done = PyObject_CallMethodOneArg((PyObject *)mailbox, S_check_room, (PyObject *)msg)) == NULL)
        return -1;
    Py_DECREF(done);
    done = PyObject_CallMethodObjArgs(bridge, S_journal_sent, args, (PyObject *)msg,
                                      mailbox->durable ? Py_True : Py_False, NULL);
    Py_XDECREF(done);
    return done != NULL ? 0 : -1;
}

/* sys.send(to, body, tag, data, correlation_id) to a process's mailbox, with
 * the GIL held: the message id and the sender's mailbox length on `id` and
 * `waiting`, or why it was refused in `error`. Declined: the Python side
 * handles what this does not (names, ports, raw data, values to report). */
static int send_message(State *state, lua_State *L, long long *id, Py_ssize_t *waiting, char *error, size_t size)
{
    Core *core = (Core *)state->core;
    PyObject *body, *tag = NULL, *correlation_id = NULL, *key = NULL, *dst, *mailbox, *args = NULL;
    Message *msg = NULL;
    int result = SEND_DECLINED, delivered, journaled;
    Py_ssize_t waiting_before;
    LuaValueBudget budget;
    /* A durable sender journals its sends: here once its replay is over, with the arguments as its
     * Python side would get them (their hash is the journal's). */
    if (core == NULL || state->mailbox == NULL || (state->mailbox->durable && !state->journal_live))
        return SEND_DECLINED;
    journaled = state->mailbox->durable;
    if (journaled && (args = llmos_values_to_tuple(L, NULL, 1, 7)) == NULL) {
        PyErr_Clear();
        return SEND_DECLINED;
    }
    budget = llmos_value_budget(L);
    body = llmos_to_python(L, 2, 0, 1, &budget); /* a body is JSON, of at most a message's size */
    llmos_value_budget_done(&budget);
    if (body == NULL) {
        PyErr_Clear();
        Py_XDECREF(args);
        return SEND_DECLINED;
    }
    if ((tag = text_field(L, 3)) == NULL || (correlation_id = text_field(L, 5)) == NULL
        || (key = PyLong_FromLongLong(lua_tointegerx(L, 1, NULL))) == NULL)
        goto out;
    llmos_lock(core->lock);
    dst = PyDict_GetItemWithError(core->procs, key);
    /* Another namespace (different interned strings) is the Python side's to refuse. A stored
     * mailbox is a port's (the Python side commits its message before Send answers) or a durable Lua
     * process's, the one with a state: a durable sender's journal unit stores its copy. */
    if (dst != NULL && Py_IS_TYPE(dst, process_type) && Py_IS_TYPE(mailbox = FIELDS(dst)->mailbox, &MailboxType)
        && ((Mailbox *)mailbox)->durable && !journaled)
        state->mailbox->stored_to = ((Mailbox *)mailbox)->owner; /* for good: its next sends there go to Python */
    else if (dst != NULL && Py_IS_TYPE(dst, process_type) && Py_IS_TYPE(mailbox = FIELDS(dst)->mailbox, &MailboxType)
             && (!((Mailbox *)mailbox)->durable || ((Mailbox *)mailbox)->owner_state != NULL)
             && FIELDS(dst)->namespace == FIELDS(state->proc)->namespace) {
        msg = llmos_new_message(state->core, state->pid, ((Mailbox *)mailbox)->owner, tag, body, empty_bytes,
                                correlation_id, budget.used, 0);
        if (journaled && (msg == NULL || journal_send(state, args, msg, (Mailbox *)mailbox) < 0)) {
            llmos_unlock(core->lock);
            goto out; /* declined: the Python side refuses it, journaled (an id skipped: ids only grow) */
        }
        waiting_before = state->mailbox->count; /* what the journal answers (a send to itself adds one) */
        delivered = msg != NULL ? llmos_deliver((Mailbox *)mailbox, msg, !journaled) : -1;
        if (delivered < 0) {
            llmos_error_text(error, size, "unknown error");
            result = SEND_REFUSED;
        } else {
            result = SEND_DONE;
            *id = msg->id;
            *waiting = journaled ? waiting_before : state->mailbox->count;
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
    Py_XDECREF(args);
    return result;
}

/* The bridge's send (to, body, tag, data, correlation_id) -> message id and
 * the sender's mailbox length, or nil and why not. A message between
 * processes goes straight into the receiver's mailbox, or its hands. */
int llmos_bridge_send(lua_State *L)
{
    State *state = llmos_state_of(L);
    long long id = 0;
    Py_ssize_t waiting = 0;
    char error[512];
    int result, tag = lua_type(L, 3), correlation_id = lua_type(L, 5);
    PyGILState_STATE gil;
    lua_settop(L, 7); /* to, body, tag, data, correlation_id, notify_undelivered, idempotency_key */
    if (!lua_isinteger(L, 1) || !lua_isnil(L, 4) || !lua_isnil(L, 6) || !lua_isnil(L, 7)
        || (tag != LUA_TNIL && tag != LUA_TSTRING)
        || (correlation_id != LUA_TNIL && correlation_id != LUA_TSTRING)
        /* Read without the GIL: only this process's sends (on the thread running it) write it. */
        || (state->mailbox != NULL && state->mailbox->stored_to == lua_tointegerx(L, 1, NULL)))
        return llmos_call_bridge(L, BRIDGE_SEND);
    gil = PyGILState_Ensure();
    result = send_message(state, L, &id, &waiting, error, sizeof error);
    PyGILState_Release(gil);
    if (result == SEND_DECLINED)
        return llmos_call_bridge(L, BRIDGE_SEND);
    if (result == SEND_REFUSED) {
        lua_pushnil(L);
        lua_pushstring(L, error);
        return 2;
    }
    lua_pushinteger(L, id);
    lua_pushinteger(L, (lua_Integer)waiting);
    return 2;
}

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
 * in *match (NULL: any message). -1 (no exception): the Python side decides
 * (and refuses: a `from` no process can have is the table's rule, api/checks.py sender). */
static int recv_filter(lua_State *L, int idx, Match **match)
{
    PyObject *sender = NULL, *tag = NULL, *correlation_id = NULL;
    *match = NULL;
    if (lua_isnil(L, idx) && lua_isnil(L, idx + 1) && lua_isnil(L, idx + 2))
        return 0;
    if (lua_isnil(L, idx)) {
        Py_INCREF(Py_None);
        sender = Py_None;
    } else if (lua_isinteger(L, idx) && lua_tointegerx(L, idx, NULL) >= 0
               && lua_tointegerx(L, idx, NULL) <= LLMOS_MAX_EXACT_INTEGER) {
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

/* The answer to a receive of `state`'s process; a durable one's is journaled by its Python side
 * (lua/durable.py answer, with the call receive() noted), which makes it as message_answer does. */
static PyObject *receive_answer(State *state, PyObject *msg)
{
    PyObject *bridge;
    if (!state->mailbox->durable)
        return message_answer(msg, state->mailbox);
    if ((bridge = bridge_of(state)) == NULL)
        return PyErr_Occurred() ? NULL : PyErr_Format(PyExc_RuntimeError, "the process's kernel side is gone");
    return PyObject_CallMethodObjArgs(bridge, S_answer, S_recv, msg, NULL);
}

/* A live durable process's receive is journaled once answered: its call, ("recv", its arguments as
 * the yield gives them to the Python side), is noted on its Python side first, wherever the answer
 * comes from (receive_answer, or the scheduler's resume in lua/slices.py). */
static int note_receive(State *state, lua_State *L)
{
    PyObject *bridge = bridge_of(state), *call;
    int status;
    if (bridge == NULL || (call = Py_BuildValue("(ON)", S_recv, llmos_values_to_tuple(L, NULL, 3, 6))) == NULL)
        return -1;
    status = PyObject_SetAttr(bridge, S_pending_call, call);
    Py_DECREF(call);
    return status;
}

/* The bridge's try_recv (from, tag, correlation_id, timeout_ms) -> the
 * message's values and how many wait after it, or nil: sys.recv takes a
 * waiting message without a trip through the scheduler. Filters the C side
 * does not check go to the Python side, which reports what is wrong. */
int llmos_bridge_try_recv(lua_State *L)
{
    State *state = llmos_state_of(L);
    int timeout = lua_type(L, 4), status;
    Match *match;
    Message *msg;
    PyObject *answer;
    PyGILState_STATE gil;
    lua_settop(L, 4);
    if (state->core == NULL || state->mailbox == NULL || state->mailbox->durable /* journaled: kernel/journal.py */
        || (timeout != LUA_TNIL && (timeout != LUA_TNUMBER || !(lua_tonumber(L, 4) >= 0))))
        return llmos_call_bridge(L, BRIDGE_TRY_RECV);
    gil = PyGILState_Ensure();
    if (recv_filter(L, 1, &match) < 0) {
        PyGILState_Release(gil);
        return llmos_call_bridge(L, BRIDGE_TRY_RECV);
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
    lua_pushcfunction(L, llmos_push_values);
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
    if ((mailbox->durable && !state->journal_live) /* replayed by the Python side */ || lua_gettop(L) != 6
        || !lua_isnil(L, 6) || !lua_text_is(L, 1, "sys") || !lua_text_is(L, 2, "recv") || recv_filter(L, 3, &match) < 0)
        return RECV_DECLINED;
    if (mailbox->durable && note_receive(state, L) < 0) {
        PyErr_Clear();
        Py_XDECREF(match);
        return RECV_DECLINED;
    }
    llmos_lock(core->lock);
    if (FIELDS(proc)->kill_reason == Py_None) {
        *taken = llmos_take(mailbox, match);
        if (*taken != NULL) {
            result = RECV_TAKEN;
        } else if (llmos_block_owner(mailbox, proc, match) == 0) {
            set_object(&FIELDS(proc)->state, S_BLOCKED);
            set_object(&FIELDS(proc)->blocked_on, S_recv);
            set_object(&FIELDS(proc)->blocked_syscall, S_recv);
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
    value = FIELDS(next)->resume_value;
    ready = Py_IS_TYPE(value, &MessageType) && FIELDS(next)->kill_reason == Py_None
            && is_text(FIELDS(next)->state, S_RUNNABLE) && (*answer = receive_answer(state, value)) != NULL;
    if (ready) {
        set_object(&FIELDS(next)->resume_value, no_values);
        set_object(&FIELDS(next)->state, S_RUNNING);
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
    long long started = llmos_monotonic_ns(), now = started;
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
        if (refill(core) < 0) /* without the kernel lock, as here: one compare while a block is ready */
            goto done;
        status = llmos_run_step(state, answer, &now);
        Py_CLEAR(answer);
        if (status < 0)
            break;
        /* Past a quantum, the Python side decides whether others go first. */
        if (status == LUA_OK && now - started < core->quantum_ns) {
            taken = NULL;
            switch (receive(core, state, &taken)) {
            case RECV_TAKEN:
                answer = receive_answer(state, (PyObject *)taken);
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
        out = llmos_step_results(state->L, status);
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
    Py_ssize_t headroom = 0;
    PyObject *tag, *body, *data, *correlation_id;
    if (!PyArg_ParseTuple(args, "LLUOSU|n:new_message", &sender, &to, &tag, &body, &data, &correlation_id, &headroom)
        || headroom < 0)
        return headroom < 0 ? PyErr_Format(PyExc_ValueError, "headroom must not be negative") : NULL;
    return (PyObject *)llmos_new_message((PyObject *)core, sender, to, tag, body, data, correlation_id, -1, headroom);
}

static PyObject *Core_charge(Core *core, PyObject *args)
{
    PyObject *proc;
    long long ns;
    (void)core;
    if (!PyArg_ParseTuple(args, "OL:charge", &proc, &ns))
        return NULL;
    if (!llmos_is_process(proc))
        return PyErr_Format(PyExc_TypeError, "charge: proc must be the kernel's Process");
    if (llmos_charge(proc, ns) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Core_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"lock", "procs", "scheduler", "reserve_ids", "quantum_ns", "process_type",
                               "max_message_bytes", NULL};
    PyObject *lock, *procs, *scheduler, *reserve_ids, *process_class;
    long long quantum_ns;
    Py_ssize_t max_message_bytes;
    Core *core;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O!OOLO!n:Core", keywords, &LockType, &lock, &PyDict_Type, &procs,
                                     &scheduler, &reserve_ids, &quantum_ns, &PyType_Type, &process_class,
                                     &max_message_bytes)
        || set_process_type((PyTypeObject *)process_class) < 0)
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
    core->refill_lock = PyThread_allocate_lock();
    if (core->refill_lock == NULL) {
        Py_DECREF(core);
        return PyErr_NoMemory();
    }
    core->quantum_ns = quantum_ns;
    core->max_message_bytes = max_message_bytes;
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
    if (core->refill_lock != NULL)
        PyThread_free_lock(core->refill_lock);
    Py_TYPE(core)->tp_free((PyObject *)core);
}

static PyMethodDef Core_methods[] = {
    {"run", (PyCFunction)Core_run, METH_VARARGS,
     "run(proc, answer) -> (proc, out): run the Lua process `proc`, resumed with the tuple `answer`, and the "
     "processes it hands the CPU to when it blocks in a receive; `proc` is the one that ran last, `out` what its "
     "step returned (see State.resume), or None if it is blocked on its mailbox"},
    {"charge", (PyCFunction)Core_charge, METH_VARARGS,
     "charge(proc, ns): add `ns` of CPU to proc's vruntime, scaled by its weight (the one vruntime charge)"},
    {"refill_ids", (PyCFunction)Core_refill_ids, METH_NOARGS,
     "refill_ids(): reserve the next block of message ids unless one is ready (never with the kernel lock held)"},
    {"new_message", (PyCFunction)Core_new_message, METH_VARARGS,
     "new_message(sender, to, tag, body, data, correlation_id, headroom=0) -> a Message with the next id, sent now; "
     "InvalidArgument if its body is not a JSON value (see value_size), ResourceExhausted if it is larger than "
     "max_message_bytes + headroom"},
    {NULL, NULL, 0, NULL},
};

PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "llmosd._kernel.Core",
    .tp_doc = "Core(lock, procs, scheduler, reserve_ids, quantum_ns, process_type, max_message_bytes): the kernel's "
              "C side, where Lua "
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

static PyMethodDef core_functions[] = {
    {"become_worker", become_worker, METH_NOARGS,
     "become_worker(): this thread is a scheduler worker, with a runnext slot"},
    {"offer_next", offer_next, METH_O,
     "offer_next(proc) -> True if `proc` is to run next on this worker thread (its slot was free)"},
    {"take_next", take_next, METH_NOARGS, "take_next() -> the process to run next on this thread, or None"},
    {"has_next", has_next, METH_NOARGS, "has_next() -> whether a process waits to run next on this thread"},
    {NULL, NULL, 0, NULL},
};

static int intern_names(void)
{
    static const struct {
        PyObject **name;
        const char *text;
    } names[] = {
        {&S_state, "state"}, {&S_runtime, "runtime"}, {&S_RUNNABLE, "RUNNABLE"},
        {&S_RUNNING, "RUNNING"}, {&S_BLOCKED, "BLOCKED"}, {&S_recv, "recv"}, {&S_answer, "answer"},
        {&S_pending_call, "pending_call"}, {&S_journal_sent, "journal_sent"}, {&S_check_room, "check_room"},
        {&empty_text, ""},
    };
    size_t i;
    for (i = 0; i < sizeof names / sizeof names[0]; i++)
        if ((*names[i].name = PyUnicode_InternFromString(names[i].text)) == NULL)
            return -1;
    empty_bytes = PyBytes_FromString("");
    no_values = PyTuple_New(0);
    return empty_bytes != NULL && no_values != NULL ? 0 : -1;
}

int llmos_core_init(PyObject *module)
{
    PyObject *errors = PyImport_ImportModule("llmosd.api.errors");
    if (errors == NULL)
        return -1;
    ResourceExhausted = PyObject_GetAttrString(errors, "ResourceExhausted");
    InvalidArgument = PyObject_GetAttrString(errors, "InvalidArgument");
    Py_DECREF(errors);
    if (ResourceExhausted == NULL || InvalidArgument == NULL || PyType_Ready(&CoreType) < 0 || intern_names() < 0
        || PyModule_AddFunctions(module, core_functions) < 0)
        return -1;
    return PyModule_AddObjectRef(module, "Core", (PyObject *)&CoreType);
}

