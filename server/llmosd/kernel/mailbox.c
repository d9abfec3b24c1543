/*
 * Mailboxes with Erlang-style selective receive (part of the llmosd._kernel
 * module; mailbox.py re-exports them).
 *
 * A mailbox keeps messages in arrival order. `take` removes the oldest
 * message a filter accepts and leaves the others where they are. A receiver
 * that finds nothing registers as waiting; `deliver` hands a new message
 * straight to the first waiting receiver it suits, or queues it. Receivers
 * are Python waiters (an RPC, a Lua process's receive with a timeout) or,
 * for the commonest receive, the owner itself: a Lua process that lua/fast_paths.c
 * blocked without any Python object, woken through llmos_wake.
 *
 * Why C: Lua processes exchange messages through here without entering
 * Python (see lua/fast_paths.c), which is what lets two of them ping-pong at more than
 * 100,000 round trips a second. Every method is called with the kernel lock
 * held, which is also defined here, so that C can take it directly.
 *
 * Why one file: the kernel lock, messages, receive filters and mailboxes are
 * four small types read together (a mailbox is a queue of messages taken
 * through filters under the lock), set up by one init that they share.
 */
#include "messaging.h"

#include <limits.h>
#include <math.h>
#include <structmember.h>

static PyObject *ResourceExhausted; /* llmosd.errors.ResourceExhausted */
static Match *any_match;            /* the filter that accepts every message */
static PyObject *owner_any;         /* the receivers' entry (None, any_match): the owner waiting for anything */
static PyObject *S_queue, *S_complete, *S_abandon, *S_register;

/* -- Lock ------------------------------------------------------------------------------------ */
void llmos_lock(Lock *lock)
{
    if (!PyThread_acquire_lock(lock->lock, NOWAIT_LOCK)) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(lock->lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
    }
    lock->owner = PyThread_get_thread_ident();
}

void llmos_unlock(Lock *lock)
{
    lock->owner = 0;
    PyThread_release_lock(lock->lock);
}

static PyObject *Lock_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Lock *self;
    if (!PyArg_ParseTuple(args, ":Lock") || (kwds != NULL && PyDict_GET_SIZE(kwds) > 0))
        return PyErr_Format(PyExc_TypeError, "Lock() takes no arguments");
    self = (Lock *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->lock = PyThread_allocate_lock();
    if (self->lock == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    return (PyObject *)self;
}

static void Lock_dealloc(Lock *self)
{
    if (self->lock != NULL) {
        PyThread_acquire_lock(self->lock, NOWAIT_LOCK); /* a lock must not be freed while held */
        PyThread_release_lock(self->lock);
        PyThread_free_lock(self->lock);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Lock_acquire(Lock *self, PyObject *unused)
{
    (void)unused;
    llmos_lock(self);
    Py_RETURN_TRUE;
}

static int is_held(Lock *self)
{
    if (!PyThread_acquire_lock(self->lock, NOWAIT_LOCK))
        return 1;
    PyThread_release_lock(self->lock);
    return 0;
}

static PyObject *Lock_release(Lock *self, PyObject *args)
{
    (void)args;
    if (!is_held(self))
        return PyErr_Format(PyExc_RuntimeError, "release of an unlocked lock");
    if (self->owner != PyThread_get_thread_ident())
        return PyErr_Format(PyExc_RuntimeError, "release of the kernel lock by a thread that does not hold it");
    llmos_unlock(self);
    Py_RETURN_NONE;
}

static PyObject *Lock_locked(Lock *self, PyObject *unused)
{
    (void)unused;
    return PyBool_FromLong(is_held(self));
}

static PyMethodDef Lock_methods[] = {
    {"acquire", (PyCFunction)Lock_acquire, METH_NOARGS, "acquire(): wait for the lock (without the GIL) and take it"},
    {"release", (PyCFunction)Lock_release, METH_NOARGS, "release()"},
    {"locked", (PyCFunction)Lock_locked, METH_NOARGS, "locked() -> whether someone holds it"},
    {"__enter__", (PyCFunction)Lock_acquire, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)Lock_release, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

PyTypeObject LockType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "llmosd._kernel.Lock",
    .tp_doc = "Lock(): the kernel lock, not re-entrant; a context manager",
    .tp_basicsize = sizeof(Lock),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Lock_new,
    .tp_dealloc = (destructor)Lock_dealloc,
    .tp_methods = Lock_methods,
};

/* -- The value model ----------------------------------------------------------------------- */
PyObject *llmos_BadValue, *llmos_TooLarge;

void llmos_too_large(Py_ssize_t limit)
{
    PyErr_Format(llmos_TooLarge, "a value of more than %zd bytes (the message size limit)", limit);
}

static int bad_value(const char *reason)
{
    PyErr_SetString(llmos_BadValue, reason);
    return -1;
}

/* UTF-8 bytes of a str, or -1 with BadValue (lone surrogates are not text). */
static Py_ssize_t text_bytes(PyObject *text)
{
    Py_ssize_t len;
    if (PyUnicode_AsUTF8AndSize(text, &len) == NULL) {
        PyErr_Clear();
        return bad_value("strings must be valid Unicode text");
    }
    return len;
}

/* Adds `size` to *total; -1 with TooLarge once past the limit. */
static int charge(Py_ssize_t *total, Py_ssize_t size, Py_ssize_t limit)
{
    *total += size;
    if (limit > 0 && *total > limit) {
        llmos_too_large(limit);
        return -1;
    }
    return 0;
}

/* The value's encoded size added to *total (whose limit it checks as it goes). */
static int value_size(PyObject *v, int depth, Py_ssize_t *total, Py_ssize_t limit)
{
    Py_ssize_t inner = 0, n, i, before, key_bytes;
    if (v == Py_None || PyBool_Check(v))
        return charge(total, LLMOS_SCALAR_SIZE, limit);
    if (PyLong_Check(v)) {
        int overflow;
        long long n = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (overflow || n > LLMOS_MAX_EXACT_INTEGER || n < -LLMOS_MAX_EXACT_INTEGER)
            return bad_value("integers beyond +-2^53 are not exact JSON numbers");
        return charge(total, LLMOS_NUMBER_SIZE, limit);
    }
    if (PyFloat_Check(v)) {
        if (!isfinite(PyFloat_AS_DOUBLE(v)))
            return bad_value("NaN and infinity are not JSON numbers");
        return charge(total, LLMOS_NUMBER_SIZE, limit);
    }
    if (PyUnicode_Check(v)) {
        if ((n = text_bytes(v)) < 0)
            return -1;
        return charge(total, llmos_field_size(n), limit);
    }
    if (!PyList_Check(v) && !PyTuple_Check(v) && !PyDict_Check(v))
        return bad_value(PyBytes_Check(v) ? "strings must be UTF-8 text; send raw bytes as data"
                                          : "only JSON values can cross (null, booleans, numbers, text, arrays, objects)");
    if (depth >= LLMOS_MAX_DEPTH)
        return bad_value("values nest at most " LLMOS_STR(LLMOS_MAX_DEPTH) " levels deep");
    /* A container's payload is counted as it grows, so a huge one is refused
     * early; its own header is added at the end. */
    before = *total;
    if (PyDict_Check(v)) {
        PyObject *key, *item;
        Py_ssize_t pos = 0, item_start;
        while (PyDict_Next(v, &pos, &key, &item)) {
            if (!PyUnicode_Check(key))
                return bad_value("object keys must be text");
            if ((key_bytes = text_bytes(key)) < 0)
                return -1;
            item_start = *total;
            if (value_size(item, depth + 1, total, limit) < 0)
                return -1;
            n = *total - item_start;
            *total = item_start;
            if (charge(total, llmos_entry_size(key_bytes, n), limit) < 0)
                return -1;
        }
    } else {
        n = PySequence_Fast_GET_SIZE(v);
        for (i = 0; i < n; i++) {
            Py_ssize_t item_start = *total;
            if (value_size(PySequence_Fast_GET_ITEM(v, i), depth + 1, total, limit) < 0)
                return -1;
            inner = *total - item_start;
            *total = item_start;
            if (charge(total, llmos_field_size(inner), limit) < 0)
                return -1;
        }
    }
    inner = *total - before;
    *total = before;
    return charge(total, llmos_field_size(inner), limit);
}

Py_ssize_t llmos_value_size(PyObject *value, Py_ssize_t limit)
{
    Py_ssize_t total = 0;
    return value_size(value, 0, &total, limit) < 0 ? -1 : total;
}

static PyObject *value_size_py(PyObject *self, PyObject *args)
{
    PyObject *value;
    Py_ssize_t limit = 0, size;
    (void)self;
    if (!PyArg_ParseTuple(args, "O|n:value_size", &value, &limit))
        return NULL;
    size = llmos_value_size(value, limit);
    return size < 0 ? NULL : PyLong_FromSsize_t(size);
}

/* -- Message --------------------------------------------------------------------------------- */
Message *llmos_make_message(long long id, long long sender, long long to, PyObject *tag, PyObject *body,
                             PyObject *data, PyObject *correlation_id, long long sent_at_ms, Py_ssize_t body_size)
{
    Py_ssize_t tag_bytes, correlation_bytes;
    Message *msg;
    if (body_size < 0 && (body_size = llmos_value_size(body, 0)) < 0)
        return NULL;
    if ((tag_bytes = text_bytes(tag)) < 0 || (correlation_bytes = text_bytes(correlation_id)) < 0)
        return NULL;
    msg = PyObject_New(Message, &MessageType);
    if (msg == NULL)
        return NULL;
    msg->id = id;
    msg->sender = sender;
    msg->to = to;
    msg->sent_at_ms = sent_at_ms;
    Py_INCREF(tag);
    msg->tag = tag;
    Py_INCREF(body);
    msg->body = body;
    Py_INCREF(data);
    msg->data = data;
    Py_INCREF(correlation_id);
    msg->correlation_id = correlation_id;
    msg->size = body_size + PyBytes_GET_SIZE(data) + tag_bytes + correlation_bytes;
    msg->notify_undelivered = 0;
    return msg;
}

static PyObject *Message_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"id", "sender", "to", "tag", "body", "data", "correlation_id", "sent_at_ms", NULL};
    long long id, sender, to, sent_at_ms;
    PyObject *tag, *body, *data, *correlation_id;
    (void)type;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "LLLUOSUL:Message", keywords, &id, &sender, &to, &tag, &body, &data,
                                     &correlation_id, &sent_at_ms))
        return NULL;
    return (PyObject *)llmos_make_message(id, sender, to, tag, body, data, correlation_id, sent_at_ms, -1);
}

static void Message_dealloc(Message *msg)
{
    Py_DECREF(msg->tag);
    Py_DECREF(msg->body);
    Py_DECREF(msg->data);
    Py_DECREF(msg->correlation_id);
    PyObject_Free(msg);
}

static PyObject *Message_repr(Message *msg)
{
    return PyUnicode_FromFormat("Message(id=%lld, sender=%lld, to=%lld, tag=%R, body=%R)", msg->id, msg->sender,
                                msg->to, msg->tag, msg->body);
}

static PyMemberDef Message_members[] = {
    {"id", T_LONGLONG, offsetof(Message, id), READONLY, NULL},
    {"sender", T_LONGLONG, offsetof(Message, sender), READONLY, NULL},
    {"to", T_LONGLONG, offsetof(Message, to), READONLY, NULL},
    {"tag", T_OBJECT, offsetof(Message, tag), READONLY, NULL},
    {"body", T_OBJECT, offsetof(Message, body), READONLY, "a JSON-shaped Python value"},
    {"data", T_OBJECT, offsetof(Message, data), READONLY, NULL},
    {"correlation_id", T_OBJECT, offsetof(Message, correlation_id), READONLY, NULL},
    {"sent_at_ms", T_LONGLONG, offsetof(Message, sent_at_ms), READONLY, NULL},
    {"notify_undelivered", T_BOOL, offsetof(Message, notify_undelivered), 0,
     "its sender wants an UNDELIVERED notice if it dies (set by the kernel's send before delivery)"},
    {"size", T_PYSSIZET, offsetof(Message, size), READONLY,
     "bytes it is charged: its body's encoded size (as a google.protobuf.Value), data, tag and correlation id"},
    {NULL, 0, 0, 0, NULL},
};

PyTypeObject MessageType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "llmosd._kernel.Message",
    .tp_doc = "Message(id, sender, to, tag, body, data, correlation_id, sent_at_ms): immutable",
    .tp_basicsize = sizeof(Message),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Message_new,
    .tp_dealloc = (destructor)Message_dealloc,
    .tp_repr = (reprfunc)Message_repr,
    .tp_members = Message_members,
};

/* -- Match ----------------------------------------------------------------------------------- */
static PyObject *Match_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"sender", "tag", "correlation_id", NULL};
    PyObject *sender = Py_None, *tag = Py_None, *correlation_id = Py_None;
    Match *match;
    int overflow = 0;
    long long pid = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|OOO:Match", keywords, &sender, &tag, &correlation_id))
        return NULL;
    if (sender != Py_None) {
        if (!PyLong_Check(sender))
            return PyErr_Format(PyExc_TypeError, "Match: sender must be a pid (int) or None");
        pid = PyLong_AsLongLongAndOverflow(sender, &overflow);
        if (overflow)
            pid = LLONG_MIN;
    }
    if ((tag != Py_None && !PyUnicode_Check(tag)) || (correlation_id != Py_None && !PyUnicode_Check(correlation_id)))
        return PyErr_Format(PyExc_TypeError, "Match: tag and correlation_id must be str or None");
    match = (Match *)type->tp_alloc(type, 0);
    if (match == NULL)
        return NULL;
    Py_INCREF(sender);
    match->sender = sender;
    Py_INCREF(tag);
    match->tag = tag;
    Py_INCREF(correlation_id);
    match->correlation_id = correlation_id;
    match->sender_pid = pid;
    return (PyObject *)match;
}

static void Match_dealloc(Match *match)
{
    Py_XDECREF(match->sender);
    Py_XDECREF(match->tag);
    Py_XDECREF(match->correlation_id);
    Py_TYPE(match)->tp_free((PyObject *)match);
}

static int same_text(PyObject *a, PyObject *b)
{
    return a == b || PyUnicode_Compare(a, b) == 0; /* both are str: no error */
}

static int is_any(Match *match)
{
    return match == NULL || match == any_match
           || (match->sender == Py_None && match->tag == Py_None && match->correlation_id == Py_None);
}

static int accepts(Match *match, Message *msg)
{
    return is_any(match)
           || ((match->sender == Py_None || match->sender_pid == msg->sender)
               && (match->tag == Py_None || same_text(match->tag, msg->tag))
               && (match->correlation_id == Py_None || same_text(match->correlation_id, msg->correlation_id)));
}

static PyObject *Match_accepts(Match *match, PyObject *msg)
{
    if (!PyObject_TypeCheck(msg, &MessageType))
        return PyErr_Format(PyExc_TypeError, "accepts() takes a Message");
    return PyBool_FromLong(accepts(match, (Message *)msg));
}

static PyObject *Match_repr(Match *match)
{
    return PyUnicode_FromFormat("Match(sender=%R, tag=%R, correlation_id=%R)", match->sender, match->tag,
                                match->correlation_id);
}

static PyMethodDef Match_methods[] = {
    {"accepts", (PyCFunction)Match_accepts, METH_O, "accepts(msg) -> whether the filter lets `msg` through"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Match_members[] = {
    {"sender", T_OBJECT, offsetof(Match, sender), READONLY, NULL},
    {"tag", T_OBJECT, offsetof(Match, tag), READONLY, NULL},
    {"correlation_id", T_OBJECT, offsetof(Match, correlation_id), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

PyTypeObject MatchType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "llmosd._kernel.Match",
    .tp_doc = "Match(sender=None, tag=None, correlation_id=None): a receive filter; None matches anything",
    .tp_basicsize = sizeof(Match),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Match_new,
    .tp_dealloc = (destructor)Match_dealloc,
    .tp_repr = (reprfunc)Match_repr,
    .tp_methods = Match_methods,
    .tp_members = Match_members,
};

/* -- Mailbox: the queue ------------------------------------------------------------------------- */
/* A ring whose capacity is a power of two. */
#define AT(mb, i) ((mb)->ring[((mb)->head + (i)) & ((mb)->capacity - 1)])

static int make_room(Mailbox *mb)
{
    Py_ssize_t capacity = mb->capacity ? mb->capacity * 2 : 4, i;
    Message **ring;
    if (mb->count < mb->capacity)
        return 0;
    ring = PyMem_New(Message *, capacity);
    if (ring == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (i = 0; i < mb->count; i++)
        ring[i] = AT(mb, i);
    PyMem_Free(mb->ring);
    mb->ring = ring;
    mb->head = 0;
    mb->capacity = capacity;
    return 0;
}

/* Inserts a new reference to msg before position i. */
static int insert_at(Mailbox *mb, Py_ssize_t i, Message *msg)
{
    Py_ssize_t j;
    if (make_room(mb) < 0)
        return -1;
    for (j = mb->count; j > i; j--)
        AT(mb, j) = AT(mb, j - 1);
    Py_INCREF(msg);
    AT(mb, i) = msg;
    mb->count++;
    mb->bytes += msg->size;
    return 0;
}

/* Takes the message at position i out; the caller owns the reference. */
static Message *remove_at(Mailbox *mb, Py_ssize_t i)
{
    Message *msg = AT(mb, i);
    Py_ssize_t j;
    if (i == 0) {
        mb->head = (mb->head + 1) & (mb->capacity - 1);
    } else {
        for (j = i; j < mb->count - 1; j++)
            AT(mb, j) = AT(mb, j + 1);
    }
    mb->count--;
    mb->bytes -= msg->size;
    return msg;
}

/* 0 if `count` more messages of `size` bytes in all fit, else -1 with ResourceExhausted. */
static int check_room(Mailbox *mb, Py_ssize_t count, Py_ssize_t size)
{
    if (count > mb->limit - mb->count)
        PyErr_Format(ResourceExhausted,
                     "mailbox of pid %lld is full (%zd of its %zd messages waiting; %zd more asked for); the "
                     "receiver is not keeping up, retry later", mb->owner, mb->count, mb->limit, count);
    else if (mb->byte_limit > 0 && size > mb->byte_limit - mb->bytes)
        PyErr_Format(ResourceExhausted,
                     "mailbox of pid %lld is full (%zd of its %zd bytes taken; %zd more asked for); the receiver "
                     "is not keeping up, retry later", mb->owner, mb->bytes, mb->byte_limit, size);
    else
        return 0;
    return -1;
}

int llmos_deliver(Mailbox *mb, Message *msg, int limited)
{
    Py_ssize_t i, n = PyList_GET_SIZE(mb->receivers);
    for (i = 0; i < n; i++) {
        PyObject *entry = PyList_GET_ITEM(mb->receivers, i), *waiter, *done;
        int status = 0;
        if (!accepts((Match *)PyTuple_GET_ITEM(entry, 1), msg))
            continue;
        Py_INCREF(entry);
        if (PyList_SetSlice(mb->receivers, i, i + 1, NULL) < 0) {
            Py_DECREF(entry);
            return -1;
        }
        waiter = PyTuple_GET_ITEM(entry, 0);
        mb->received++;
        if (waiter == Py_None) { /* the owner, blocked by lua/fast_paths.c */
            PyObject *proc = mb->blocked;
            mb->blocked = NULL;
            status = proc != NULL ? llmos_wake(mb, proc, msg) : 0;
            Py_XDECREF(proc);
        } else if (PyObject_SetAttr(waiter, S_queue, Py_None) < 0
                   || (done = PyObject_CallMethodOneArg(waiter, S_complete, (PyObject *)msg)) == NULL) {
            status = -1;
        } else {
            Py_DECREF(done);
        }
        Py_DECREF(entry);
        return status < 0 ? -1 : 1;
    }
    if (limited && check_room(mb, 1, msg->size) < 0)
        return -1;
    return insert_at(mb, mb->count, msg);
}

Message *llmos_take(Mailbox *mb, Match *match)
{
    Py_ssize_t i;
    for (i = 0; i < mb->count; i++) {
        if (is_any(match) || accepts(match, AT(mb, i))) {
            mb->received++;
            return remove_at(mb, i);
        }
    }
    return NULL;
}

int llmos_block_owner(Mailbox *mb, PyObject *proc, Match *match)
{
    PyObject *entry = is_any(match) ? Py_NewRef(owner_any) : PyTuple_Pack(2, Py_None, (PyObject *)match);
    int status;
    if (entry == NULL)
        return -1;
    status = PyList_Append(mb->receivers, entry);
    Py_DECREF(entry);
    if (status == 0) {
        Py_INCREF(proc);
        Py_XSETREF(mb->blocked, proc);
    }
    return status;
}

/* -- Mailbox: the Python type ---------------------------------------------------------------------- */
static PyObject *Mailbox_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"owner", "limit", "core", "durable", "byte_limit", NULL};
    long long owner;
    Py_ssize_t limit, byte_limit = 0;
    PyObject *core;
    int durable = 0;
    Mailbox *mb;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "LnO|pn:Mailbox", keywords, &owner, &limit, &core, &durable,
                                     &byte_limit))
        return NULL;
    mb = (Mailbox *)type->tp_alloc(type, 0);
    if (mb == NULL)
        return NULL;
    mb->owner = owner;
    mb->limit = limit;
    mb->byte_limit = byte_limit;
    mb->durable = (char)durable;
    mb->receivers = PyList_New(0);
    if (mb->receivers == NULL) {
        Py_DECREF(mb);
        return NULL;
    }
    Py_INCREF(core);
    mb->core = core;
    return (PyObject *)mb;
}

static int Mailbox_traverse(Mailbox *mb, visitproc visit, void *arg)
{
    Py_VISIT(mb->receivers);
    Py_VISIT(mb->blocked);
    Py_VISIT(mb->core);
    return 0;
}

static int Mailbox_clear(Mailbox *mb)
{
    Py_CLEAR(mb->receivers);
    Py_CLEAR(mb->blocked);
    Py_CLEAR(mb->core);
    return 0;
}

static void Mailbox_dealloc(Mailbox *mb)
{
    PyObject_GC_UnTrack(mb);
    Mailbox_clear(mb);
    while (mb->count > 0)
        Py_DECREF(remove_at(mb, 0));
    PyMem_Free(mb->ring);
    Py_TYPE(mb)->tp_free((PyObject *)mb);
}

static Py_ssize_t Mailbox_len(Mailbox *mb)
{
    return mb->count;
}

static int check_types(PyObject *msg, PyObject *match)
{
    if (msg != NULL && !PyObject_TypeCheck(msg, &MessageType)) {
        PyErr_SetString(PyExc_TypeError, "expected a Message");
        return -1;
    }
    if (match != NULL && !PyObject_TypeCheck(match, &MatchType)) {
        PyErr_SetString(PyExc_TypeError, "expected a Match");
        return -1;
    }
    return 0;
}

static PyObject *Mailbox_deliver(Mailbox *mb, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"msg", "limited", NULL};
    PyObject *msg;
    int limited = 1, status;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|p:deliver", keywords, &msg, &limited) || check_types(msg, NULL))
        return NULL;
    status = llmos_deliver(mb, (Message *)msg, limited);
    return status < 0 ? NULL : PyBool_FromLong(status);
}

static PyObject *Mailbox_take(Mailbox *mb, PyObject *match)
{
    Message *msg;
    if (check_types(NULL, match))
        return NULL;
    msg = llmos_take(mb, (Match *)match);
    if (msg == NULL)
        Py_RETURN_NONE;
    return (PyObject *)msg;
}

static PyObject *Mailbox_put_back(Mailbox *mb, PyObject *msg)
{
    Py_ssize_t i;
    if (check_types(msg, NULL))
        return NULL;
    for (i = 0; i < mb->count && AT(mb, i)->id < ((Message *)msg)->id; i++)
        ;
    if (insert_at(mb, i, (Message *)msg) < 0)
        return NULL;
    mb->received--;
    Py_RETURN_NONE;
}

static PyObject *Mailbox_wait(Mailbox *mb, PyObject *args)
{
    PyObject *waiter, *match, *entry, *out;
    if (!PyArg_ParseTuple(args, "OO:wait", &waiter, &match) || check_types(NULL, match))
        return NULL;
    entry = PyTuple_Pack(2, waiter, match);
    if (entry == NULL)
        return NULL;
    out = PyObject_CallMethodObjArgs(waiter, S_register, mb->receivers, entry, NULL);
    Py_DECREF(entry);
    return out;
}

static PyObject *Mailbox_check_room(Mailbox *mb, PyObject *msg)
{
    if (check_types(msg, NULL) < 0 || check_room(mb, 1, ((Message *)msg)->size) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Mailbox_check_room_for(Mailbox *mb, PyObject *args)
{
    Py_ssize_t count, size;
    if (!PyArg_ParseTuple(args, "nn:check_room_for", &count, &size) || check_room(mb, count, size) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Mailbox_close(Mailbox *mb, PyObject *unused)
{
    PyObject *receivers = mb->receivers, *out;
    Py_ssize_t i;
    (void)unused;
    mb->receivers = PyList_New(0);
    if (mb->receivers == NULL) {
        mb->receivers = receivers;
        return NULL;
    }
    Py_CLEAR(mb->blocked);
    for (i = 0; i < PyList_GET_SIZE(receivers); i++) {
        PyObject *waiter = PyTuple_GET_ITEM(PyList_GET_ITEM(receivers, i), 0);
        if (waiter == Py_None)
            continue;
        if (PyObject_SetAttr(waiter, S_queue, Py_None) < 0
            || (out = PyObject_CallMethodNoArgs(waiter, S_abandon)) == NULL) {
            Py_DECREF(receivers);
            return NULL;
        }
        Py_DECREF(out);
    }
    Py_DECREF(receivers);
    Py_RETURN_NONE;
}

static PyMethodDef Mailbox_methods[] = {
    {"deliver", (PyCFunction)(void (*)(void))Mailbox_deliver, METH_VARARGS | METH_KEYWORDS,
     "deliver(msg, limited=True) -> True if handed to a waiting receiver, False if queued; a full "
     "mailbox refuses it (ResourceExhausted) unless `limited` is False"},
    {"take", (PyCFunction)Mailbox_take, METH_O, "take(match) -> the oldest message `match` accepts, taken out, or None"},
    {"put_back", (PyCFunction)Mailbox_put_back, METH_O,
     "put_back(msg): return a taken message that could not be handed over, in id order"},
    {"wait", (PyCFunction)Mailbox_wait, METH_VARARGS, "wait(waiter, match): register a waiting receiver"},
    {"check_room", (PyCFunction)Mailbox_check_room, METH_O,
     "check_room(msg): ResourceExhausted if `msg` would not fit (too many messages or bytes waiting)"},
    {"check_room_for", (PyCFunction)Mailbox_check_room_for, METH_VARARGS,
     "check_room_for(count, size): ResourceExhausted if `count` more messages of `size` bytes in all would not fit"},
    {"close", (PyCFunction)Mailbox_close, METH_NOARGS,
     "close(): the owner ended; every waiting receiver is abandoned (the messages stay)"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Mailbox_members[] = {
    {"owner", T_LONGLONG, offsetof(Mailbox, owner), READONLY, NULL},
    {"limit", T_PYSSIZET, offsetof(Mailbox, limit), READONLY, "most messages waiting at once"},
    {"byte_limit", T_PYSSIZET, offsetof(Mailbox, byte_limit), READONLY, "most bytes waiting at once (0: none)"},
    {"bytes", T_PYSSIZET, offsetof(Mailbox, bytes), READONLY, "bytes (Message.size) waiting"},
    {"durable", T_BOOL, offsetof(Mailbox, durable), READONLY, "a port's: messages are stored"},
    {"sent", T_LONGLONG, offsetof(Mailbox, sent), 0, "messages the owner sent (the kernel counts them)"},
    {"received", T_LONGLONG, offsetof(Mailbox, received), READONLY,
     "messages handed to a receiver or taken out (less those put back)"},
    {"receivers", T_OBJECT, offsetof(Mailbox, receivers), READONLY,
     "the waiting receivers, (waiter, match) in arrival order; waiter None is the owner"},
    {NULL, 0, 0, 0, NULL},
};

static PySequenceMethods Mailbox_as_sequence = {.sq_length = (lenfunc)Mailbox_len};

PyTypeObject MailboxType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "llmosd._kernel.Mailbox",
    .tp_doc = "Mailbox(owner, limit, core, durable=False, byte_limit=0): a process's messages, with selective "
              "receive",
    .tp_basicsize = sizeof(Mailbox),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = Mailbox_new,
    .tp_traverse = (traverseproc)Mailbox_traverse,
    .tp_clear = (inquiry)Mailbox_clear,
    .tp_dealloc = (destructor)Mailbox_dealloc,
    .tp_as_sequence = &Mailbox_as_sequence,
    .tp_methods = Mailbox_methods,
    .tp_members = Mailbox_members,
};

/* -- The module's part ------------------------------------------------------------------------------ */
static PyMethodDef messaging_functions[] = {
    {"value_size", value_size_py, METH_VARARGS,
     "value_size(value, limit=0) -> its size as a google.protobuf.Value encoding; BadValue if it breaks the value "
     "model (JSON; integers within +-2^53; LLMOS_MAX_DEPTH levels deep), TooLarge past `limit` (0: none)"},
    {NULL, NULL, 0, NULL},
};

int llmos_messaging_init(PyObject *module)
{
    PyObject *errors = PyImport_ImportModule("llmosd.api.errors");
    if (errors == NULL)
        return -1;
    ResourceExhausted = PyObject_GetAttrString(errors, "ResourceExhausted");
    Py_DECREF(errors);
    llmos_BadValue = PyErr_NewExceptionWithDoc("llmosd._kernel.BadValue",
                                               "A value that cannot cross into the kernel; args[0] says why.", NULL,
                                               NULL);
    llmos_TooLarge = llmos_BadValue == NULL ? NULL : PyErr_NewExceptionWithDoc(
        "llmosd._kernel.TooLarge", "A value over the message size limit; args[0] says so.", llmos_BadValue, NULL);
    if (llmos_TooLarge == NULL || PyModule_AddObjectRef(module, "BadValue", llmos_BadValue) < 0
        || PyModule_AddObjectRef(module, "TooLarge", llmos_TooLarge) < 0
        || PyModule_AddFunctions(module, messaging_functions) < 0)
        return -1;
    if (ResourceExhausted == NULL || PyType_Ready(&LockType) < 0 || PyType_Ready(&MessageType) < 0
        || PyType_Ready(&MatchType) < 0 || PyType_Ready(&MailboxType) < 0)
        return -1;
    any_match = (Match *)PyObject_CallNoArgs((PyObject *)&MatchType);
    owner_any = any_match != NULL ? PyTuple_Pack(2, Py_None, (PyObject *)any_match) : NULL;
    S_queue = PyUnicode_InternFromString("queue");
    S_complete = PyUnicode_InternFromString("complete");
    S_abandon = PyUnicode_InternFromString("abandon");
    S_register = PyUnicode_InternFromString("register");
    if (any_match == NULL || owner_any == NULL || S_queue == NULL || S_complete == NULL || S_abandon == NULL || S_register == NULL)
        return -1;
    if (PyModule_AddObjectRef(module, "Lock", (PyObject *)&LockType) < 0
        || PyModule_AddObjectRef(module, "Message", (PyObject *)&MessageType) < 0
        || PyModule_AddObjectRef(module, "Match", (PyObject *)&MatchType) < 0
        || PyModule_AddObjectRef(module, "Mailbox", (PyObject *)&MailboxType) < 0
        || PyModule_AddObjectRef(module, "ANY", (PyObject *)any_match) < 0)
        return -1;
    return 0;
}
