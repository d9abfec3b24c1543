/*
 * What _core.c and _mailbox.c share: the kernel lock, messages, receive
 * filters and mailboxes (see _mailbox.c), and the wake-up of a Lua process
 * blocked in a receive (see _core.c).
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
} Lock;

/* With the GIL held; waits for the lock without it. */
void llmos_lock(Lock *lock);
void llmos_unlock(Lock *lock);

typedef struct {
    PyObject_HEAD
    long long id, sender, to, sent_at_ms;
    PyObject *tag, *body, *data, *correlation_id; /* str, a JSON-shaped value, bytes, str */
} Message;

typedef struct {
    PyObject_HEAD
    PyObject *sender, *tag, *correlation_id; /* None: any */
    long long sender_pid;                    /* sender as a C integer (no pid matches one that overflows) */
} Match;

typedef struct {
    PyObject_HEAD
    long long owner;
    Py_ssize_t limit;
    Message **ring; /* the queued messages, oldest at `head` */
    Py_ssize_t head, count, capacity;
    PyObject *receivers; /* list of (waiter, match), in arrival order; waiter None: the owner, see `blocked` */
    PyObject *blocked;   /* the owner's Process while it waits in a receive that _core.c registered */
    PyObject *core;      /* the kernel's _lua.Core, which wakes the owner */
    PyObject *owner_state; /* borrowed: the owner's _lua.State while it has one (a Lua process's) */
    char durable;        /* a port's: a message must be stored before Send answers (the kernel's Python side) */
    long long sent;      /* messages the owner sent */
    long long received;  /* messages handed to a receiver or taken out */
} Mailbox;

extern PyTypeObject LockType, MessageType, MatchType, MailboxType;

Message *llmos_make_message(long long id, long long sender, long long to, PyObject *tag, PyObject *body,
                            PyObject *data, PyObject *correlation_id, long long sent_at_ms);
/* A new message (id and time from the core); NULL with an exception set. */
Message *llmos_new_message(PyObject *core, long long sender, long long to, PyObject *tag, PyObject *body,
                           PyObject *data, PyObject *correlation_id);
/* 1: handed to a waiting receiver, 0: queued, -1: refused (an exception is set). Kernel lock held. */
int llmos_deliver(Mailbox *mailbox, Message *msg, int limited);
/* The oldest message `match` (NULL: any) accepts, taken out; NULL if none (no exception). */
Message *llmos_take(Mailbox *mailbox, Match *match);
/* The owner, a Lua process, waits for a message `match` accepts; `proc` is its Process. */
int llmos_block_owner(Mailbox *mailbox, PyObject *proc, Match *match);
/* Wakes the owner `proc` of `mailbox` with `msg` (defined in _core.c). Kernel lock held. */
int llmos_wake(Mailbox *mailbox, PyObject *proc, Message *msg);

int llmos_messaging_init(PyObject *module);

#endif
