/*
 * ProcessFields: the fields of a Process (kernel/process.py subclasses this
 * type) that the C side reads and writes on every message and hand-off
 * between Lua processes (lua/fast_paths.c), as a C struct: C reaches them
 * directly, Python as ordinary attributes. Also `untrack`, which takes ended
 * processes' records out of the cycle collector's sight (below).
 */
#include "messaging.h"

#include <structmember.h>

static PyObject *S_RUNNABLE, *S_empty, *no_values;
static long long default_weight; /* kernel/process.py's DEFAULT_WEIGHT, read on the first process */

static int read_default_weight(void)
{
    PyObject *module = PyImport_ImportModule("llmosd.kernel.process");
    PyObject *weight = module != NULL ? PyObject_GetAttrString(module, "DEFAULT_WEIGHT") : NULL;
    Py_XDECREF(module);
    if (weight == NULL)
        return -1;
    default_weight = PyLong_AsLongLong(weight);
    Py_DECREF(weight);
    if (default_weight > 0)
        return 0;
    if (!PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "kernel.process.DEFAULT_WEIGHT must be a positive integer");
    return -1;
}

long long llmos_default_weight(void)
{
    return default_weight;
}

static PyObject *ProcessFields_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    ProcessFields *self;
    (void)args; /* the subclass's __init__ takes them */
    (void)kwds;
    if (default_weight == 0 && read_default_weight() < 0)
        return NULL;
    self = (ProcessFields *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->state = Py_NewRef(S_RUNNABLE);
    self->blocked_on = Py_NewRef(Py_None);
    self->blocked_syscall = Py_NewRef(S_empty);
    self->resume_value = Py_NewRef(no_values);
    self->kill_reason = Py_NewRef(Py_None);
    self->mailbox = Py_NewRef(Py_None);
    self->namespace = Py_NewRef(S_empty);
    self->vruntime = 0.0;
    self->weight = default_weight;
    return (PyObject *)self;
}

static int ProcessFields_traverse(ProcessFields *self, visitproc visit, void *arg)
{
    Py_VISIT(self->state);
    Py_VISIT(self->blocked_on);
    Py_VISIT(self->blocked_syscall);
    Py_VISIT(self->resume_value);
    Py_VISIT(self->kill_reason);
    Py_VISIT(self->mailbox);
    Py_VISIT(self->namespace);
    return 0;
}

static int ProcessFields_clear(ProcessFields *self)
{
    Py_CLEAR(self->state);
    Py_CLEAR(self->blocked_on);
    Py_CLEAR(self->blocked_syscall);
    Py_CLEAR(self->resume_value);
    Py_CLEAR(self->kill_reason);
    Py_CLEAR(self->mailbox);
    Py_CLEAR(self->namespace);
    return 0;
}

static void ProcessFields_dealloc(ProcessFields *self)
{
    PyObject_GC_UnTrack(self);
    ProcessFields_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef ProcessFields_members[] = {
    {"state", T_OBJECT_EX, offsetof(ProcessFields, state), 0, "RUNNABLE, RUNNING, BLOCKED or an end state"},
    {"blocked_on", T_OBJECT_EX, offsetof(ProcessFields, blocked_on), 0,
     "the blocking syscall, shown while BLOCKED (None otherwise)"},
    {"blocked_syscall", T_OBJECT_EX, offsetof(ProcessFields, blocked_syscall), 0,
     "the last blocking syscall, whose answer the next resume carries"},
    {"resume_value", T_OBJECT_EX, offsetof(ProcessFields, resume_value), 0, "what the next resume answers"},
    {"kill_reason", T_OBJECT_EX, offsetof(ProcessFields, kill_reason), 0,
     "set when the kernel wants the process gone; honoured at the next check"},
    {"mailbox", T_OBJECT_EX, offsetof(ProcessFields, mailbox), 0, "its Mailbox"},
    {"namespace", T_OBJECT_EX, offsetof(ProcessFields, namespace), 0,
     "its namespace, interned (the kernel sets it): the C send compares two by pointer"},
    {"vruntime", T_DOUBLE, offsetof(ProcessFields, vruntime), 0,
     "ns on a CPU, scaled by DEFAULT_WEIGHT / weight (lua/fast_paths.c's charge)"},
    {"weight", T_LONGLONG, offsetof(ProcessFields, weight), 0, "its share of CPU within its priority level"},
    {NULL, 0, 0, 0, NULL},
};

PyTypeObject ProcessFieldsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "llmosd._kernel.ProcessFields",
    .tp_doc = "The fields of a Process that the C side reads and writes (see kernel/process.c).",
    .tp_basicsize = sizeof(ProcessFields),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = ProcessFields_new,
    .tp_traverse = (traverseproc)ProcessFields_traverse,
    .tp_clear = (inquiry)ProcessFields_clear,
    .tp_dealloc = (destructor)ProcessFields_dealloc,
    .tp_members = ProcessFields_members,
};

/* -- Ended processes' records -------------------------------------------------------------------
 * The kernel keeps the records of the newest ended processes (100,000 by default) for Wait and
 * GetProcess. Every full pass of Python's cycle collector visited each of them and its log's list:
 * in a server at that steady state, about 3 us of every spawn, with the GIL held. A record holds
 * only values (numbers, text, dicts of counters, a JSON-like result, its log's (time, line)
 * tuples), none of which refers back to it, so it can never be part of a reference cycle, which
 * is all the collector looks for. */
static PyObject *untrack(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t i;
    (void)self;
    for (i = 0; i < nargs; i++)
        if (PyObject_IS_GC(args[i]) && PyObject_GC_IsTracked(args[i]))
            PyObject_GC_UnTrack(args[i]);
    Py_RETURN_NONE;
}

static PyMethodDef process_functions[] = {
    {"untrack", (PyCFunction)(void (*)(void))untrack, METH_FASTCALL,
     "untrack(*objects): the cycle collector no longer visits them; only for objects that can never be part of "
     "a reference cycle (an ended process's record and its log, see kernel/process.c)"},
    {NULL, NULL, 0, NULL},
};

int llmos_process_init(PyObject *module)
{
    S_RUNNABLE = PyUnicode_InternFromString("RUNNABLE");
    S_empty = PyUnicode_InternFromString("");
    no_values = PyTuple_New(0);
    if (S_RUNNABLE == NULL || S_empty == NULL || no_values == NULL || PyType_Ready(&ProcessFieldsType) < 0
        || PyModule_AddFunctions(module, process_functions) < 0)
        return -1;
    return PyModule_AddObjectRef(module, "ProcessFields", (PyObject *)&ProcessFieldsType);
}
