/*
 * Asynchronous preemption of Lua processes.
 *
 * A Lua count hook makes Lua 5.4 trap on every instruction, which slows a
 * CPU-bound program down more than twofold. Instead, a process's main
 * coroutine runs with no hook at all, and when the scheduler wants the CPU
 * back it sends a signal to the worker thread; the handler installs a count
 * hook of 1 on the lua_State that thread is running, exactly as the
 * standalone `lua` interpreter does on Ctrl-C. lua_sethook is documented to
 * be callable from a signal handler; because the handler runs on the thread
 * that owns the state, nothing else touches the state meanwhile. The hook
 * (the sandbox's, in _sandbox.c) then parks or ends the process and switches
 * itself off.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>

#define LUA_MASKCOUNT (1 << 3)

typedef void (*lua_Hook)(void *L, void *ar);
typedef void (*lua_sethook_fn)(void *L, lua_Hook func, int mask, int count);

static lua_sethook_fn sethook;
static lua_Hook debug_hook;
static __thread void *volatile running_state; /* the lua_State this thread runs, or NULL */

static void on_signal(int sig)
{
    void *L = running_state;
    (void)sig;
    if (L != NULL)
        sethook(L, debug_hook, LUA_MASKCOUNT, 1);
}

static PyObject *setup(PyObject *self, PyObject *args)
{
    const char *library;
    unsigned long long hook;
    int sig;
    void *handle;
    struct sigaction action;
    (void)self;
    if (!PyArg_ParseTuple(args, "sKi", &library, &hook, &sig))
        return NULL;
    handle = dlopen(library, RTLD_NOW | RTLD_NOLOAD);
    if (handle == NULL)
        return PyErr_Format(PyExc_OSError, "cannot find the loaded Lua library %s: %s", library, dlerror());
    sethook = (lua_sethook_fn)dlsym(handle, "lua_sethook");
    if (sethook == NULL)
        return PyErr_Format(PyExc_OSError, "%s exports no lua_sethook", library);
    debug_hook = (lua_Hook)(uintptr_t)hook;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_signal;
    action.sa_flags = SA_RESTART;
    sigemptyset(&action.sa_mask);
    if (sigaction(sig, &action, NULL) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *set_running(PyObject *self, PyObject *arg)
{
    unsigned long long L = PyLong_AsUnsignedLongLong(arg);
    (void)self;
    if (L == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    running_state = (void *)(uintptr_t)L;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"setup", setup, METH_VARARGS,
     "setup(lua_library_path, hook_address, signal): install the signal handler"},
    {"set_running", set_running, METH_O,
     "set_running(lua_state_address): the state this thread now runs (0: none)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_preempt", "Asynchronous preemption of Lua processes.", -1, methods,
};

PyMODINIT_FUNC PyInit__preempt(void)
{
    return PyModule_Create(&module);
}
