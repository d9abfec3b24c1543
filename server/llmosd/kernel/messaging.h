/*
 * What lua/fast_paths.c and kernel/mailbox.c share: the kernel lock, messages, receive
 * filters and mailboxes (see kernel/mailbox.c), and the wake-up of a Lua process
 * blocked in a receive (see lua/fast_paths.c).
 */
#ifndef LLMOS_MESSAGING_H
#define LLMOS_MESSAGING_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pythread.h>

/* The kernel lock: a plain lock that C code can take without going through Python. */
typedef struct {
    PyObject_HEAD
    PyThread_type_lock lock;
    unsigned long owner; /* the thread holding it (PyThread_get_thread_ident), 0: none */
} Lock;

/* With the GIL held; waits for the lock without it. */
void llmos_lock(Lock *lock);
void llmos_unlock(Lock *lock);

typedef struct {
    PyObject_HEAD
    long long id, sender, to, sent_at_ms;
    PyObject *tag, *body, *data, *correlation_id; /* str, a JSON-shaped value, bytes, str */
    Py_ssize_t size; /* what it is charged: its body's encoded size, data, tag and correlation id */
    char notify_undelivered; /* its sender wants an UNDELIVERED notice if it dies (kernel/deadletters.py) */
} Message;

typedef struct {
    PyObject_HEAD
    PyObject *sender, *tag, *correlation_id; /* None: any */
    long long sender_pid;                    /* sender as a C integer (no pid matches one that overflows) */
} Match;

typedef struct {
    PyObject_HEAD
    long long owner;
    Py_ssize_t limit;      /* most messages waiting at once */
    Py_ssize_t byte_limit; /* most bytes (Message.size) waiting at once; 0: none */
    Py_ssize_t bytes;      /* bytes waiting */
    Message **ring; /* the queued messages, oldest at `head` */
    Py_ssize_t head, count, capacity;
    PyObject *receivers; /* list of (waiter, match), in arrival order; waiter None: the owner, see `blocked` */
    PyObject *blocked;   /* the owner's Process while it waits in a receive that lua/fast_paths.c registered */
    PyObject *core;      /* the kernel's _kernel.Core, which wakes the owner */
    PyObject *owner_state; /* borrowed: the owner's _kernel.State while it has one (a Lua process's) */
    char durable;        /* a port's: a message must be stored before Send answers (the kernel's Python side) */
    long long sent;      /* messages the owner sent */
    long long received;  /* messages handed to a receiver or taken out */
    long long stored_to; /* the last pid whose stored mailbox (a port's, a durable process's) the owner, not
                          * durable itself, sent to: lua/fast_paths.c hands its next sends there to the Python
                          * side at once (a mailbox is stored for good); 0: none */
} Mailbox;

extern PyTypeObject LockType, MessageType, MatchType, MailboxType;

/* -- The value model: what may cross into the kernel, and what it weighs ----------------------------
 * Values are JSON's: null, booleans, numbers (doubles: integers only within
 * +-2^53, where they are exact; no NaN or infinity), UTF-8 text, arrays, and
 * objects with text keys, nested at most LLMOS_MAX_DEPTH deep. A value's size
 * is the size of its google.protobuf.Value encoding, what a gRPC client sends:
 * the same bytes are counted whichever way a message arrives.
 * Depth 32: protobuf parsers (upb, C++, Java, Go) refuse messages nested past 100 levels, and
 * a value n arrays deep is 2n+1 levels, 2n+5 inside the deepest reply that carries one
 * (ListProcessesResponse > ProcessInfo > result), so whatever is accepted can be read back. */
#define LLMOS_MAX_DEPTH 32
#define LLMOS_STR_(x) #x
#define LLMOS_STR(x) LLMOS_STR_(x) /* a number macro as a string literal, for messages */
#define LLMOS_MAX_EXACT_INTEGER 9007199254740992LL /* 2^53 */

extern PyObject *llmos_BadValue, *llmos_TooLarge; /* a value that cannot cross; one over the size limit */

static inline Py_ssize_t llmos_varint_size(Py_ssize_t n)
{
    Py_ssize_t size = 1;
    for (; n >= 128; n >>= 7)
        size++;
    return size;
}

/* A length-delimited field: its tag, its length and its payload. */
static inline Py_ssize_t llmos_field_size(Py_ssize_t payload)
{
    return 1 + llmos_varint_size(payload) + payload;
}

enum { LLMOS_SCALAR_SIZE = 2, LLMOS_NUMBER_SIZE = 9 }; /* null or boolean; a double */

/* An object's entry (key and value) as it counts in the object's payload. */
static inline Py_ssize_t llmos_entry_size(Py_ssize_t key_bytes, Py_ssize_t value_size)
{
    return llmos_field_size(llmos_field_size(key_bytes) + llmos_field_size(value_size));
}

/* The encoded size of a JSON-shaped Python value, checked against the value
 * model; -1 with BadValue set if it breaks it, or TooLarge as soon as the
 * count passes `limit` (0: none), so that a huge value costs no more than the
 * limit to refuse. */
Py_ssize_t llmos_value_size(PyObject *value, Py_ssize_t limit);
/* Raises TooLarge for a value of more than `limit` bytes. */
void llmos_too_large(Py_ssize_t limit);

Message *llmos_make_message(long long id, long long sender, long long to, PyObject *tag, PyObject *body,
                            PyObject *data, PyObject *correlation_id, long long sent_at_ms, Py_ssize_t body_size);
/* A new message (id and time from the core), of at most the core's message
 * size limit plus `headroom` (body_size: the body's encoded size, -1 if not
 * known yet); NULL with an exception set (InvalidArgument for a body that is
 * not a JSON value, ResourceExhausted if too large). */
Message *llmos_new_message(PyObject *core, long long sender, long long to, PyObject *tag, PyObject *body,
                           PyObject *data, PyObject *correlation_id, Py_ssize_t body_size, Py_ssize_t headroom);
/* 1: handed to a waiting receiver, 0: queued, -1: refused (an exception is set). Kernel lock held. */
int llmos_deliver(Mailbox *mailbox, Message *msg, int limited);
/* The oldest message `match` (NULL: any) accepts, taken out; NULL if none (no exception). */
Message *llmos_take(Mailbox *mailbox, Match *match);
/* The owner, a Lua process, waits for a message `match` accepts; `proc` is its Process. */
int llmos_block_owner(Mailbox *mailbox, PyObject *proc, Match *match);
/* Wakes the owner `proc` of `mailbox` with `msg` (defined in lua/fast_paths.c). Kernel lock held. */
int llmos_wake(Mailbox *mailbox, PyObject *proc, Message *msg);

int llmos_messaging_init(PyObject *module);

/* A Process's fields that C reads and writes on every hand-off (kernel/process.c); Process
 * (kernel/process.py) subclasses this type. */
typedef struct {
    PyObject_HEAD
    PyObject *state, *blocked_on, *blocked_syscall, *resume_value, *kill_reason, *mailbox;
    PyObject *namespace; /* an interned str: two processes share a namespace iff the pointers are equal */
    double vruntime;
    long long weight;
} ProcessFields;
extern PyTypeObject ProcessFieldsType;
long long llmos_default_weight(void); /* kernel/process.py's DEFAULT_WEIGHT (once a process exists) */
int llmos_process_init(PyObject *module);

#endif
