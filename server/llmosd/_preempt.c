/*
 * Asynchronous preemption of Lua processes (part of the llmosd._lua module).
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
 */
#include <signal.h>
#include <string.h>

#include "lua_api.h"

static __thread lua_State *volatile running_state; /* the coroutine this thread runs, or NULL */

static void on_signal(int sig)
{
    lua_State *L = running_state;
    (void)sig;
    if (L != NULL)
        lua_sethook(L, llmos_sandbox_hook, LUA_MASKCOUNT, 1);
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
