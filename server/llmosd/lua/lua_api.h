/*
 * The part of the Lua 5.4 C API that llmos's C modules use, as in lua.h and
 * lauxlib.h. Lupa ships no headers; the symbols are those of lupa's own
 * extension, which native.py makes global before loading ours. What this
 * file assumes of how that Lua was configured (version 5.4, the registry
 * index, which follows from LUAI_MAXSTACK, the registry's slots, the size of
 * integers and of a state's extra space, the type tags) is checked by
 * native.py when the module is imported, and the registry index again when a
 * state is built (see llmos_sandbox_open).
 */
#ifndef LLMOS_LUA_API_H
#define LLMOS_LUA_API_H

#include <signal.h>
#include <stddef.h>
#include <stdint.h>

typedef struct lua_State lua_State;
typedef struct lua_Debug lua_Debug;
typedef long long lua_Integer;
typedef unsigned long long lua_Unsigned;
typedef double lua_Number;
typedef intptr_t lua_KContext;
typedef int (*lua_CFunction)(lua_State *L);
typedef int (*lua_KFunction)(lua_State *L, int status, lua_KContext ctx);
typedef void (*lua_Hook)(lua_State *L, lua_Debug *ar);
typedef void *(*lua_Alloc)(void *ud, void *ptr, size_t osize, size_t nsize);
typedef const char *(*lua_Reader)(lua_State *L, void *ud, size_t *size);
typedef struct luaL_Reg {
    const char *name;
    lua_CFunction func;
} luaL_Reg;

#define LUA_REGISTRYINDEX (-1000000 - 1000) /* -LUAI_MAXSTACK - 1000 */
#define lua_upvalueindex(i) (LUA_REGISTRYINDEX - (i))
#define LUA_RIDX_MAINTHREAD 1
#define LUA_RIDX_GLOBALS 2
#define LUA_MULTRET (-1)
#define LUA_MAXINTEGER INT64_MAX
#define LUA_MININTEGER INT64_MIN
#define LUA_OPEQ 0
#define LUA_OPLT 1
#define LUA_OK 0
#define LUA_YIELD 1
#define LUA_ERRRUN 2
#define LUA_ERRMEM 4
#define LUA_TNONE (-1)
#define LUA_TNIL 0
#define LUA_TBOOLEAN 1
#define LUA_TNUMBER 3
#define LUA_TSTRING 4
#define LUA_TTABLE 5
#define LUA_TFUNCTION 6
#define LUA_TTHREAD 8
#define LUA_MASKCOUNT (1 << 3)
#define LUA_GCSTOP 0
#define LUA_GCRESTART 1
#define LUA_GCGEN 10
#define LUA_EXTRASPACE (sizeof(void *))

lua_State *lua_newstate(lua_Alloc f, void *ud);
void lua_close(lua_State *L);
lua_Alloc lua_getallocf(lua_State *L, void **ud);
lua_Number lua_version(lua_State *L);
int lua_absindex(lua_State *L, int idx);
int lua_gettop(lua_State *L);
void lua_settop(lua_State *L, int idx);
void lua_pushvalue(lua_State *L, int idx);
void lua_rotate(lua_State *L, int idx, int n);
void lua_copy(lua_State *L, int from, int to);
int lua_checkstack(lua_State *L, int n);
void lua_xmove(lua_State *from, lua_State *to, int n);
int lua_type(lua_State *L, int idx);
int lua_toboolean(lua_State *L, int idx);
const char *lua_tolstring(lua_State *L, int idx, size_t *len);
lua_Number lua_tonumberx(lua_State *L, int idx, int *isnum);
lua_Integer lua_tointegerx(lua_State *L, int idx, int *isnum);
lua_State *lua_tothread(lua_State *L, int idx);
int lua_isinteger(lua_State *L, int idx);
int lua_isstring(lua_State *L, int idx);
const char *lua_typename(lua_State *L, int tp);
const void *lua_topointer(lua_State *L, int idx);
size_t lua_stringtonumber(lua_State *L, const char *s);
int lua_compare(lua_State *L, int idx1, int idx2, int op);
void *lua_touserdata(lua_State *L, int idx);
lua_CFunction lua_tocfunction(lua_State *L, int idx);
const char *lua_getupvalue(lua_State *L, int funcindex, int n);
void lua_pushnil(lua_State *L);
void lua_pushinteger(lua_State *L, lua_Integer n);
void lua_pushnumber(lua_State *L, lua_Number n);
const char *lua_pushlstring(lua_State *L, const char *s, size_t len);
const char *lua_pushstring(lua_State *L, const char *s);
const char *lua_pushfstring(lua_State *L, const char *fmt, ...);
void lua_pushboolean(lua_State *L, int b);
void lua_pushcclosure(lua_State *L, lua_CFunction fn, int n);
void lua_pushlightuserdata(lua_State *L, void *p);
int lua_getfield(lua_State *L, int idx, const char *k);
int lua_gettable(lua_State *L, int idx);
int lua_geti(lua_State *L, int idx, lua_Integer n);
int lua_rawget(lua_State *L, int idx);
int lua_rawgeti(lua_State *L, int idx, lua_Integer n);
int lua_rawgetp(lua_State *L, int idx, const void *p);
void lua_createtable(lua_State *L, int narr, int nrec);
void *lua_newuserdatauv(lua_State *L, size_t size, int nuvalue);
int lua_getmetatable(lua_State *L, int idx);
int lua_getiuservalue(lua_State *L, int idx, int n);
void lua_setfield(lua_State *L, int idx, const char *k);
void lua_seti(lua_State *L, int idx, lua_Integer n);
int lua_setmetatable(lua_State *L, int objindex);
void lua_rawset(lua_State *L, int idx);
void lua_rawseti(lua_State *L, int idx, lua_Integer n);
void lua_rawsetp(lua_State *L, int idx, const void *p);
int lua_setiuservalue(lua_State *L, int idx, int n);
const char *lua_setupvalue(lua_State *L, int funcindex, int n);
void lua_callk(lua_State *L, int nargs, int nresults, lua_KContext ctx, lua_KFunction k);
int lua_pcallk(lua_State *L, int nargs, int nresults, int errfunc, lua_KContext ctx, lua_KFunction k);
int lua_resume(lua_State *L, lua_State *from, int narg, int *nres);
int lua_yieldk(lua_State *L, int nresults, lua_KContext ctx, lua_KFunction k);
int lua_error(lua_State *L);
int lua_load(lua_State *L, lua_Reader reader, void *data, const char *chunkname, const char *mode);
int lua_next(lua_State *L, int idx);
void lua_concat(lua_State *L, int n);
int lua_gc(lua_State *L, int what, ...);
void lua_sethook(lua_State *L, lua_Hook func, int mask, int count);
lua_State *lua_newthread(lua_State *L);
int luaL_ref(lua_State *L, int t);
void luaL_checktype(lua_State *L, int arg, int t);
void luaL_checkany(lua_State *L, int arg);
void luaL_checkstack(lua_State *L, int sz, const char *msg);
const char *luaL_checklstring(lua_State *L, int arg, size_t *len);
const char *luaL_optlstring(lua_State *L, int arg, const char *def, size_t *len);
lua_Integer luaL_checkinteger(lua_State *L, int arg);
lua_Integer luaL_optinteger(lua_State *L, int arg, lua_Integer def);
lua_Number luaL_checknumber(lua_State *L, int arg);
lua_Integer luaL_len(lua_State *L, int idx);
int luaL_argerror(lua_State *L, int arg, const char *extramsg);
int luaL_typeerror(lua_State *L, int arg, const char *tname);
void luaL_where(lua_State *L, int lvl);
int luaL_error(lua_State *L, const char *fmt, ...);
const char *luaL_tolstring(lua_State *L, int idx, size_t *len);
int luaL_loadbufferx(lua_State *L, const char *buff, size_t sz, const char *name, const char *mode);
void luaL_requiref(lua_State *L, const char *modname, lua_CFunction openf, int glb);
int luaopen_base(lua_State *L);
int luaopen_coroutine(lua_State *L);
int luaopen_table(lua_State *L);
int luaopen_string(lua_State *L);
int luaopen_math(lua_State *L);
int luaopen_utf8(lua_State *L);
int luaopen_os(lua_State *L);

#define lua_pop(L, n) lua_settop(L, -(n)-1)
#define lua_pushcfunction(L, f) lua_pushcclosure(L, (f), 0)
#define lua_pushliteral(L, s) lua_pushstring(L, "" s)
#define lua_tostring(L, i) lua_tolstring(L, (i), NULL)
#define lua_tonumber(L, i) lua_tonumberx(L, (i), NULL)
#define lua_isnil(L, n) (lua_type(L, (n)) == LUA_TNIL)
#define lua_insert(L, idx) lua_rotate(L, (idx), 1)
#define lua_remove(L, idx) (lua_rotate(L, (idx), -1), lua_pop(L, 1))
#define lua_replace(L, idx) (lua_copy(L, -1, (idx)), lua_pop(L, 1))
#define lua_call(L, n, r) lua_callk(L, (n), (r), 0, NULL)
#define lua_pcall(L, n, r, f) lua_pcallk(L, (n), (r), (f), 0, NULL)
#define lua_yield(L, n) lua_yieldk(L, (n), 0, NULL)
#define luaL_checkstring(L, n) luaL_checklstring(L, (n), NULL)
#define luaL_optstring(L, n, d) luaL_optlstring(L, (n), (d), NULL)
#define luaL_typename(L, i) lua_typename(L, lua_type(L, (i)))
#define luaL_argcheck(L, cond, arg, extramsg) ((void)((cond) || luaL_argerror(L, (arg), (extramsg))))
#define lua_isnoneornil(L, n) (lua_type(L, (n)) <= 0)

/* -- What the sandbox (lua/sandbox.c) offers the binding (lua/state.c) --------------------------- */
/* Builds the sandbox into a state whose base libraries are open:
 *   step, main_state = llmos_sandbox_open(check, send, try_recv, call, pid, source,
 *                                         chunk_name, args, hook_count)
 * The four bridge functions answer (value, ...) or (nil, error text) and never raise. */
int llmos_sandbox_open(lua_State *L);

/* One function of the `sys` table (api/table.py's lua_layout): where it goes (the sub-table of
 * sys, or NULL, and the name there) and how it is made: the sandbox's own function of that
 * path, a call of the bridge's `call` with `op` (and `file_op`), or a yield of syscall `op`; the
 * option keys a sandbox function refuses any other of (the table's, never a list of C's own). */
enum { LLMOS_SYS_C, LLMOS_SYS_CALL, LLMOS_SYS_YIELD };
typedef struct {
    const char *table, *name;
    int how;
    const char *op, *file_op;
    const char *const *options; /* LLMOS_SYS_C: the option keys it takes (NULL-terminated), or NULL */
} llmos_SysEntry;
/* Set once, before any state is made; the entries must live for ever. 0; -1 out of memory;
 * -2 when the sandbox has no function for LLMOS_SYS_C entry *unknown. */
int llmos_sandbox_set_layout(const llmos_SysEntry *entries, size_t n, size_t *unknown);
/* A lua_Alloc without a limit (malloc's): for the states the kernel makes for itself (templates,
 * syntax checks), never for a process's. */
void *llmos_allocate_unlimited(void *ud, void *ptr, size_t osize, size_t nsize);
/* The count hook: on the program's own coroutines always, on its main one
 * when lua/preempt.c installs it from its signal handler. */
void llmos_sandbox_hook(lua_State *L, lua_Debug *ar);

/* -- What preemption (lua/preempt.c) offers the binding ------------------------------------- */
/* Install the handler of `sig` (0, or -1 with errno set). */
int llmos_preempt_setup(int sig);
/* The coroutine this thread runs from now on, which the signal interrupts (NULL: none). */
void llmos_preempt_set_running(lua_State *L);
/* Raised by the signal on the thread it interrupts; cleared by the check that follows. */
extern __thread volatile sig_atomic_t llmos_interrupted;
/* The hook's check, run from a C function of the program's (on any of its coroutines). */
void llmos_checkpoint_now(lua_State *L);
/* Called by C functions every slice of their work (well under a millisecond
 * of it): the kernel's check, if the signal asked for one. */
static inline void llmos_checkpoint(lua_State *L)
{
    if (llmos_interrupted)
        llmos_checkpoint_now(L);
}

#endif
