/*
 * Asynchronous preemption of Lua processes (part of the llmosd._kernel module).
 *
 * A Lua count hook makes Lua 5.4 trap on every instruction, which slows a
 * CPU-bound program down more than twofold. Instead, a process's main
 * coroutine runs with no hook at all, and when the scheduler wants the CPU
 * back it sends a signal to the worker thread; the handler installs a count
 * hook of 1 on the lua_State that thread is running, exactly as the
 * standalone `lua` interpreter does on Ctrl-C. lua_sethook is documented to
 * be callable from a signal handler; because the handler runs on the thread
 * that owns the state, nothing else touches the state meanwhile. The hook
 * (the sandbox's) then parks or ends the process and switches itself off.
 *
 * No hook fires while the program is inside a C function (a library
 * function over a long string or table), so the handler also raises a flag
 * of the thread's, which such functions test every slice of their work
 * (llmos_checkpoint, lua/metered.h): when it is raised they run the hook's
 * check themselves, which may park the thread there or end the process.
 */
#include <signal.h>
#include <string.h>

#include "lua_api.h"

static __thread lua_State *volatile running_state; /* the coroutine this thread runs, or NULL */
__thread volatile sig_atomic_t llmos_interrupted;

static void on_signal(int sig)
{
    lua_State *L = running_state;
    (void)sig;
    llmos_interrupted = 1;
    if (L != NULL)
        lua_sethook(L, llmos_sandbox_hook, LUA_MASKCOUNT, 1);
}

/* The check is the hook's own, run from the C function on whichever of the
 * program's coroutines called it. A flag raised for the process that ran
 * before on this thread only costs one check. */
void llmos_checkpoint_now(lua_State *L)
{
    llmos_interrupted = 0;
    luaL_checkstack(L, 4, "checkpoint");
    llmos_sandbox_hook(L, NULL);
}

int llmos_preempt_setup(int sig)
{
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_signal;
    action.sa_flags = SA_RESTART;
    sigemptyset(&action.sa_mask);
    return sigaction(sig, &action, NULL);
}

void llmos_preempt_set_running(lua_State *L)
{
    running_state = L;
}
