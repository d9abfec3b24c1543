/*
 * The sandbox of a Lua process, built into the process's own Lua 5.4 state.
 *
 * Before any program code runs, the binding (lua/state.c) opens the base
 * libraries in a fresh state and calls llmos_sandbox_open once. It leaves the
 * program a whitelisted environment only, and wraps what would let a program
 * slip the kernel's control:
 *   - every coroutine carries a count hook that checks in with the kernel
 *     (quantum, limits, kills); once the kernel ends the process the hook
 *     fires on every instruction, and pcall, xpcall, coroutine.resume,
 *     coroutine.close and load re-raise the end instead of catching it;
 *   - coroutine.resume passes a syscall made inside a program's coroutine up
 *     to the kernel, and the answer back down, at any depth;
 *   - no bytecode, string.dump, __gc finalizers, or os beyond the clock;
 *   - the library functions that can run long in C, where no hook fires,
 *     are llmos's metered ones (lua/metered.h), which check in with the
 *     kernel as they go;
 * and it adds `sys`, the syscall interface (see lua/runtime.py for the
 * kernel's side, the "bridge" functions these call).
 *
 * Why C: written in Lua, the sandbox put some forty function prototypes with
 * their closures and upvalues into every state, loaded from bytecode on each
 * spawn, and they were a third of an idle process's memory. C functions cost
 * a state nothing. The per-state context lives in a userdata that every
 * thread of the state reaches through lua_getextraspace.
 *
 * Why one file: the sandbox is one per-state context (Sandbox, below) that
 * every wrapper and `sys` function reads; they are grouped by section in the
 * order a program meets them (hook, wrappers of the base library, sys.*).
 */
#include <stdlib.h>
#include <string.h>

#include "metered.h"

/* -- The per-state context ----------------------------------------------------------------- */
typedef struct {
    lua_State *main_co;  /* the coroutine running the program */
    lua_Integer pid;
    int hook_count;      /* instructions between check-ins in the program's own coroutines */
    int maybe_mail;      /* whether a message may be waiting, as of the last send or receive */
    int collected;       /* the first full collection has run (see step) */
    int dying;           /* the kernel ended the process; the reason is user value DYING_REASON */
    int check, send, try_recv, call; /* registry references of the kernel's bridge functions */
} Sandbox;

enum { DYING_REASON = 1, MEMORY_LIMIT = 2 }; /* the context userdata's user values */

static const char MEMORY_ERROR[] = "not enough memory"; /* Lua's message when an allocation fails */
static char CONTEXT_KEY; /* registry key of the context userdata (its address) */
static char SYSCALL;     /* its address, as light userdata: the first value a syscall yields */

static Sandbox *sandbox_of(lua_State *L)
{
    return *(Sandbox **)((char *)L - LUA_EXTRASPACE);
}

static void push_ref(lua_State *L, int ref)
{
    lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
}

/* Lua's error(value, 2) from a wrapper: a message is prefixed with the
 * program's line that called the wrapper. */
static int raise_at_caller(lua_State *L, int idx)
{
    lua_pushvalue(L, idx);
    if (lua_type(L, -1) == LUA_TSTRING) {
        luaL_where(L, 1);
        lua_insert(L, -2);
        lua_concat(L, 2);
    }
    return lua_error(L);
}

/* User value n of the context, which is there already: pushing it allocates
 * nothing, as the process may be dying because memory ran out. */
static void push_context_value(lua_State *L, int n)
{
    lua_rawgetp(L, LUA_REGISTRYINDEX, &CONTEXT_KEY);
    lua_getiuservalue(L, -1, n);
    lua_remove(L, -2);
}

/* Neither reason allocates: they are strings the context already holds, as
 * the process may be dying because memory ran out. From now on the hook
 * fires on every instruction, of the coroutine that learnt it and of the
 * main one, so that the end is raised again wherever a C function (load's
 * reader, coroutine.close) caught it and the program went on. */
static void set_dying(lua_State *L, Sandbox *sb, int reason)
{
    reason = reason < 0 ? lua_gettop(L) + reason + 1 : reason;
    lua_rawgetp(L, LUA_REGISTRYINDEX, &CONTEXT_KEY);
    lua_pushvalue(L, reason);
    lua_setiuservalue(L, -2, DYING_REASON);
    lua_pop(L, 1);
    sb->dying = 1;
    lua_sethook(L, llmos_sandbox_hook, LUA_MASKCOUNT, 1);
    if (sb->main_co != NULL)
        lua_sethook(sb->main_co, llmos_sandbox_hook, LUA_MASKCOUNT, 1);
}

/* After a pcall or a resume has returned: a process the kernel has ended
 * dies now, whatever the program meant to catch. A memory error counts as
 * such an end. */
static void die_if_dying(lua_State *L, Sandbox *sb, int failed)
{
    if (failed && !sb->dying && lua_type(L, -1) == LUA_TSTRING && strcmp(lua_tostring(L, -1), MEMORY_ERROR) == 0) {
        push_context_value(L, MEMORY_LIMIT);
        set_dying(L, sb, -1);
        lua_pop(L, 1);
    }
    if (sb->dying) {
        push_context_value(L, DYING_REASON);
        lua_error(L);
    }
}

/* -- The hook ------------------------------------------------------------------------------ */
/* Runs every `hook_count` instructions in the program's own coroutines, and
 * in the main one when the kernel interrupts it: the kernel's check preempts
 * the process (parking this thread) if its quantum is spent, and answers the
 * reason if the process is to end. */
void llmos_sandbox_hook(lua_State *L, lua_Debug *ar)
{
    Sandbox *sb = sandbox_of(L);
    (void)ar;
    llmos_interrupted = 0; /* this is the check the signal asked for */
    if (sb->dying) { /* ended already (a memory error too, which the kernel does not know of) */
        push_context_value(L, DYING_REASON);
        lua_error(L);
    }
    push_ref(L, sb->check);
    lua_call(L, 0, 1);
    if (!lua_isnil(L, -1)) {
        set_dying(L, sb, -1);
        lua_error(L);
    }
    lua_pop(L, 1);
    if (L == sb->main_co)
        lua_sethook(L, NULL, 0, 0); /* off until the kernel asks again (lua/preempt.c) */
}

/* -- coroutine ----------------------------------------------------------------------------- */
static int co_create(lua_State *L)
{
    lua_State *co;
    luaL_checktype(L, 1, LUA_TFUNCTION);
    co = lua_newthread(L);
    lua_pushvalue(L, 1);
    lua_xmove(L, co, 1);
    lua_sethook(co, llmos_sandbox_hook, LUA_MASKCOUNT, sandbox_of(L)->hook_count);
    return 1;
}

enum { AS_RESUME, AS_WRAP };

static int finish_resume(lua_State *L, lua_State *co, int status, int nres, lua_KContext as)
{
    Sandbox *sb = sandbox_of(L);
    if (status != LUA_OK && status != LUA_YIELD) {
        lua_xmove(co, L, 1); /* the error */
        die_if_dying(L, sb, 1);
        if (as == AS_WRAP)
            return lua_error(L);
        lua_pushboolean(L, 0);
        lua_insert(L, -2);
        return 2;
    }
    luaL_checkstack(L, nres + 1, "too many results to resume");
    if (as == AS_RESUME)
        lua_pushboolean(L, 1);
    lua_xmove(co, L, nres);
    die_if_dying(L, sb, 0);
    return nres + (as == AS_RESUME);
}

/* Resume the coroutine at index 1 with the values above it. A syscall made
 * inside it (a yield led by &SYSCALL) becomes this coroutine's own yield, so
 * it travels up to the kernel, and this continuation passes the kernel's
 * answer back down. */
static int resume_k(lua_State *L, int status, lua_KContext as)
{
    lua_State *co = lua_tothread(L, 1);
    int nargs = lua_gettop(L) - 1, nres;
    (void)status;
    if (!lua_checkstack(co, nargs))
        return luaL_error(L, "too many arguments to resume");
    lua_xmove(L, co, nargs);
    status = lua_resume(co, L, nargs, &nres);
    if (status == LUA_YIELD && nres > 0 && lua_touserdata(co, -nres) == &SYSCALL) {
        luaL_checkstack(L, nres, "too many syscall arguments");
        lua_xmove(co, L, nres);
        return lua_yieldk(L, nres, as, resume_k);
    }
    return finish_resume(L, co, status, nres, as);
}

static int co_resume(lua_State *L)
{
    if (lua_tothread(L, 1) == NULL)
        return luaL_typeerror(L, 1, "thread");
    return resume_k(L, LUA_OK, AS_RESUME);
}

static int co_wrapped(lua_State *L)
{
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    return resume_k(L, LUA_OK, AS_WRAP);
}

static int co_wrap(lua_State *L)
{
    co_create(L);
    lua_pushcclosure(L, co_wrapped, 1);
    return 1;
}

static int co_yield(lua_State *L)
{
    if (L == sandbox_of(L)->main_co)
        return luaL_error(L, "attempt to yield from outside a coroutine");
    return lua_yield(L, lua_gettop(L));
}

/* coroutine.close runs the coroutine's pending __close handlers, protected,
 * and answers false and the error if one fails: the end of the process (a
 * memory error too) is raised again, as after pcall. Upvalue 1: the real close. */
static int co_close(lua_State *L)
{
    lua_State *co = lua_tothread(L, 1);
    if (co == NULL)
        return luaL_typeerror(L, 1, "thread");
    if (co == L) /* raised here, Lua's message names the caller's line */
        return luaL_error(L, "cannot close a running coroutine");
    lua_settop(L, 1);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, 1, LUA_MULTRET);
    die_if_dying(L, sandbox_of(L), !lua_toboolean(L, 1));
    return lua_gettop(L);
}

/* -- pcall, xpcall ------------------------------------------------------------------------- */
/* Also the continuation: a protected call may yield (a syscall inside it). */
static int finish_pcall(lua_State *L, int status, lua_KContext extra)
{
    Sandbox *sb = sandbox_of(L);
    if (status != LUA_OK && status != LUA_YIELD) {
        lua_pushboolean(L, 0);
        lua_pushvalue(L, -2);
        die_if_dying(L, sb, 1);
        return 2;
    }
    die_if_dying(L, sb, 0);
    return lua_gettop(L) - (int)extra;
}

static int sb_pcall(lua_State *L)
{
    luaL_checkany(L, 1);
    lua_pushboolean(L, 1); /* the first result if there is no error */
    lua_insert(L, 1);
    return finish_pcall(L, lua_pcallk(L, lua_gettop(L) - 2, LUA_MULTRET, 0, 0, finish_pcall), 0);
}

/* A message handler runs before the stack unwinds, which for an error the
 * kernel's hook raised means with hooks still off: a dying process never
 * runs the program's handler. */
static int message_handler(lua_State *L)
{
    if (sandbox_of(L)->dying)
        return 1;
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, 1);
    return 1;
}

static int sb_xpcall(lua_State *L)
{
    int n = lua_gettop(L);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    lua_pushvalue(L, 2);
    lua_pushcclosure(L, message_handler, 1);
    lua_replace(L, 2);
    lua_pushboolean(L, 1); /* the first result */
    lua_pushvalue(L, 1);   /* the function */
    lua_rotate(L, 3, 2);   /* f, handler, true, f, args... */
    return finish_pcall(L, lua_pcallk(L, n - 2, LUA_MULTRET, 2, 2, finish_pcall), 2);
}

/* -- Guarded base and string functions ----------------------------------------------------- */
/* Finalizers run with hooks off (in the program's GC or when its state is
 * closed), so a __gc that loops could never be stopped: none are allowed.
 * Upvalue 1: the real setmetatable. */
static int sb_setmetatable(lua_State *L)
{
    lua_settop(L, 2);
    if (lua_type(L, 2) == LUA_TTABLE) {
        lua_pushliteral(L, "__gc");
        if (lua_rawget(L, 2) != LUA_TNIL)
            return luaL_error(L, "setmetatable: __gc finalizers are not allowed in the sandbox");
        lua_pop(L, 1);
    }
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, 2, 1);
    return 1;
}

/* load, as Lua's but for text chunks only (binary chunks can break the VM's
 * memory safety), with the program's environment as the default one.
 * Lua's parser runs in C, where no hook fires: it is fed the chunk (a string,
 * or what the reader function returns) LOAD_PIECE bytes at a time, with a
 * checkpoint before each piece. The parser catches errors, the end of the
 * process among them: that end is raised again once it returns. Upvalue 1:
 * the env. */
#define LOAD_PIECE (64 << 10)

typedef struct {
    const char *rest; /* what of the current string the parser has not had yet */
    size_t left;
    int reader;       /* stack index of the reader function; 0 for a string chunk */
} Loading;

enum { LOAD_CHUNK = 1, LOAD_NAME, LOAD_MODE, LOAD_ENV, LOAD_PIECE_SLOT };

static const char *feed_parser(lua_State *L, void *data, size_t *size)
{
    Loading *ld = data;
    const char *piece = ld->rest;
    llmos_checkpoint(L);
    if (ld->left == 0 && ld->reader != 0) {
        /* As Lua's load: nil or an empty string ends the chunk. */
        luaL_checkstack(L, 2, "too many nested functions");
        lua_pushvalue(L, ld->reader);
        lua_call(L, 0, 1);
        if (lua_isnil(L, -1)) {
            lua_pop(L, 1);
            *size = 0;
            return NULL;
        }
        if (!lua_isstring(L, -1))
            luaL_error(L, "reader function must return a string");
        lua_replace(L, LOAD_PIECE_SLOT); /* keeps the piece alive while it is parsed */
        piece = ld->rest = lua_tolstring(L, LOAD_PIECE_SLOT, &ld->left);
    }
    *size = ld->left < LOAD_PIECE ? ld->left : LOAD_PIECE;
    ld->rest += *size;
    ld->left -= *size;
    return *size > 0 ? piece : NULL;
}

static int sb_load(lua_State *L)
{
    Loading ld = {NULL, 0, 0};
    const char *chunk_name;
    int status;
    lua_settop(L, LOAD_ENV);
    if (!lua_isnil(L, LOAD_MODE)
        && (lua_type(L, LOAD_MODE) != LUA_TSTRING || strcmp(lua_tostring(L, LOAD_MODE), "t") != 0)) {
        lua_pushnil(L);
        lua_pushliteral(L, "load: only text chunks are allowed (mode 't')");
        return 2;
    }
    if (lua_isnil(L, LOAD_ENV)) {
        lua_pushvalue(L, lua_upvalueindex(1));
        lua_replace(L, LOAD_ENV);
    }
    ld.rest = lua_tolstring(L, LOAD_CHUNK, &ld.left);
    if (ld.rest != NULL) {
        chunk_name = luaL_optstring(L, LOAD_NAME, ld.rest);
    } else {
        chunk_name = luaL_optstring(L, LOAD_NAME, "=(load)");
        luaL_checktype(L, LOAD_CHUNK, LUA_TFUNCTION);
        ld.reader = LOAD_CHUNK;
    }
    lua_settop(L, LOAD_PIECE_SLOT);
    status = lua_load(L, feed_parser, &ld, chunk_name, "t");
    die_if_dying(L, sandbox_of(L), status != LUA_OK);
    if (status != LUA_OK) {
        lua_pushnil(L);
        lua_insert(L, -2);
        return 2;
    }
    lua_pushvalue(L, LOAD_ENV);
    if (!lua_setupvalue(L, -2, 1))
        lua_pop(L, 1);
    return 1;
}

/* require(name): a module of the userland library, loaded once per process.
 * The kernel finds the source by name (the bridge's "require" op, lua/library.py:
 * the name rules, the directories); load's metered parser compiles it in the
 * program's environment; its value (true if it returns nothing) is kept in a
 * table of the registry, made at the first require, for every later require.
 * A module may make syscalls as it loads (the call may yield). Upvalue 1: the env. */
static char MODULES; /* registry key of the loaded modules' table */
static char LOADING; /* its address: the value of a module while it loads (a cycle is an error) */

static int require_done(lua_State *L, int status, lua_KContext ctx)
{
    (void)ctx; /* the stack: name, modules, the module's value or error */
    if (status != LUA_OK && status != LUA_YIELD) {
        lua_pushvalue(L, 1);
        lua_pushnil(L);
        lua_rawset(L, 2); /* a later require tries again */
        die_if_dying(L, sandbox_of(L), 1);
        return lua_error(L);
    }
    if (lua_isnil(L, 3)) {
        lua_pushboolean(L, 1);
        lua_replace(L, 3);
    }
    lua_pushvalue(L, 1);
    lua_pushvalue(L, 3);
    lua_rawset(L, 2);
    return 1;
}

static int sb_require(lua_State *L)
{
    lua_settop(L, 1);
    if (lua_type(L, 1) != LUA_TSTRING)
        return luaL_error(L, "require: a module name is a string, not a %s", luaL_typename(L, 1));
    if (lua_rawgetp(L, LUA_REGISTRYINDEX, &MODULES) == LUA_TNIL) {
        lua_pop(L, 1);
        lua_createtable(L, 0, 4);
        lua_pushvalue(L, -1);
        lua_rawsetp(L, LUA_REGISTRYINDEX, &MODULES);
    }
    lua_pushvalue(L, 1);
    if (lua_rawget(L, 2) != LUA_TNIL) {
        if (lua_touserdata(L, -1) == &LOADING)
            return luaL_error(L, "require: module '%s' is required again while it loads (a cycle)", lua_tostring(L, 1));
        return 1;
    }
    lua_pop(L, 1);
    push_ref(L, sandbox_of(L)->call);
    lua_pushliteral(L, "require");
    lua_pushvalue(L, 1);
    lua_call(L, 2, 2); /* source and chunk name, or nil and the error */
    if (lua_isnil(L, 3))
        return raise_at_caller(L, 4);
    lua_pushcfunction(L, sb_load);
    lua_insert(L, 3);
    lua_pushliteral(L, "t");
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_call(L, 4, 2); /* the chunk, or nil and the syntax error */
    if (lua_isnil(L, 3))
        return lua_error(L);
    lua_pop(L, 1);
    lua_pushvalue(L, 1);
    lua_pushlightuserdata(L, &LOADING);
    lua_rawset(L, 2);
    lua_pushvalue(L, 1); /* the chunk's argument, as Lua's require gives */
    return require_done(L, lua_pcallk(L, 1, 1, 0, 0, require_done), 0);
}

/* Upvalue 1: the real collectgarbage. Programs may not change how their
 * state collects (the kernel chose generational mode for idle processes). */
static int sb_collectgarbage(lua_State *L)
{
    const char *opt;
    lua_settop(L, 1);
    if (!lua_isnil(L, 1)) {
        opt = lua_type(L, 1) == LUA_TSTRING ? lua_tostring(L, 1) : "";
        if (strcmp(opt, "collect") != 0 && strcmp(opt, "count") != 0 && strcmp(opt, "step") != 0)
            return luaL_error(L, "collectgarbage: only 'collect', 'count' and 'step' are allowed");
    }
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, 1, LUA_MULTRET);
    return lua_gettop(L);
}

/* print and sys.log: one line to the process's log. */
static int sb_log(lua_State *L)
{
    int n = lua_gettop(L), i;
    luaL_checkstack(L, 2 * n + 2, "too many values to log");
    push_ref(L, sandbox_of(L)->call);
    lua_pushliteral(L, "log");
    for (i = 1; i <= n; i++) {
        if (i > 1)
            lua_pushliteral(L, "\t");
        luaL_tolstring(L, i, NULL);
    }
    lua_concat(L, n > 0 ? 2 * n - 1 : 0);
    lua_call(L, 2, 0);
    return 0;
}

/* -- sys ----------------------------------------------------------------------------------- */
/* Bridge functions answer (value, ...) or (nil, error text) and never raise,
 * so a program only ever sees plain Lua values. */

/* The bridge's answer at base..top as the syscall's results: value, ... or
 * the error raised at the program's line. */
static int check_result(lua_State *L, int base)
{
    int n = lua_gettop(L) - base + 1;
    if (n >= 2) {
        if (!lua_isnil(L, base + 1))
            return raise_at_caller(L, base + 1);
        lua_remove(L, base + 1);
        n--;
    }
    if (n < 1) {
        lua_pushnil(L);
        n = 1;
    }
    return n;
}

/* Options of a C fast path: nil or a table whose keys are all among `known` (NULL-terminated);
 * a misspelt option must not pass silently (checks.known_options words the same refusal for the
 * syscalls the bridge answers). */
static unsigned check_options(lua_State *L, int idx, const char *fname, const char *const known[])
{
    int t = lua_type(L, idx), i;
    unsigned seen = 0; /* bit i: known[i] is given */
    const char *key;
    if (t == LUA_TNIL)
        return 0;
    if (t != LUA_TTABLE)
        luaL_error(L, "%s: expected a table of options", fname);
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
        lua_pop(L, 1);
        key = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
        for (i = 0; key != NULL && known[i] != NULL && strcmp(key, known[i]) != 0; i++)
            ;
        if (key == NULL || known[i] == NULL) {
            int bad = lua_gettop(L);
            luaL_where(L, 2); /* the caller's position, as the bridge's refusals have */
            lua_pushfstring(L, "%s: unknown option(s) ", fname);
            luaL_tolstring(L, bad, NULL);
            lua_pushstring(L, " (known:");
            for (i = 0; known[i] != NULL; i++)
                lua_pushfstring(L, "%s %s", i > 0 ? "," : "", known[i]);
            lua_pushstring(L, ")");
            lua_concat(L, lua_gettop(L) - bad);
            lua_error(L);
        }
        seen |= 1u << i;
    }
    return seen;
}

/* sys.send's and sys.recv's option keys: the syscall table's (llmos_sandbox_set_layout). */
static const char *const NO_OPTIONS[] = {NULL};
static const char *const *send_options = NO_OPTIONS, *const *recv_options = NO_OPTIONS;
static unsigned recv_ack_options; /* the bits of ack and lease_ms: a receive the kernel's Python side answers */

static unsigned option_bit(const char *const known[], const char *key)
{
    unsigned i;
    for (i = 0; known[i] != NULL; i++)
        if (strcmp(known[i], key) == 0)
            return 1u << i;
    return 0;
}

static void push_option(lua_State *L, int idx, const char *name)
{
    if (lua_type(L, idx) == LUA_TTABLE)
        lua_getfield(L, idx, name);
    else
        lua_pushnil(L);
}

static int is_zero(lua_State *L, int idx)
{
    return lua_type(L, idx) == LUA_TNUMBER && lua_tonumber(L, idx) == 0;
}

static int sys_self(lua_State *L)
{
    lua_pushinteger(L, sandbox_of(L)->pid);
    return 1;
}

/* A syscall that never blocks: one trip through the bridge's dispatcher,
 * which checks the arguments (option tables included).
 * Upvalues: the operation's name, and for sys.fs.* the file operation. */
static int sys_direct(lua_State *L)
{
    int nargs = lua_gettop(L) + 1;
    luaL_checkstack(L, 3, "too many arguments");
    push_ref(L, sandbox_of(L)->call);
    lua_insert(L, 1);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 2);
    if (lua_type(L, lua_upvalueindex(2)) == LUA_TSTRING) {
        lua_pushvalue(L, lua_upvalueindex(2));
        lua_insert(L, 3);
        nargs++;
    }
    lua_call(L, nargs, LUA_MULTRET);
    return check_result(L, 1);
}

static int sys_send(lua_State *L)
{
    Sandbox *sb = sandbox_of(L);
    lua_settop(L, 3); /* to, body, opts */
    check_options(L, 3, "sys.send", send_options);
    push_ref(L, sb->send);
    lua_pushvalue(L, 1);
    lua_pushvalue(L, 2);
    push_option(L, 3, "tag");
    push_option(L, 3, "data");
    push_option(L, 3, "correlation_id");
    push_option(L, 3, "notify_undelivered");
    push_option(L, 3, "idempotency_key");
    lua_call(L, 7, 2); /* message id and the sender's mailbox length, or nil and the error */
    if (lua_isnil(L, -2))
        return raise_at_caller(L, -1);
    sb->maybe_mail = lua_tonumber(L, -1) > 0;
    lua_pop(L, 1);
    return 1;
}

/* A blocking syscall: yield &SYSCALL, the syscall's name and copies of the
 * values first..last to the kernel, whose answer comes to k (without k, it is
 * what the yielding function returns). */
static int yield_syscall(lua_State *L, const char *name, int first, int last, lua_KContext ctx, lua_KFunction k)
{
    int i;
    luaL_checkstack(L, last - first + 3, "too many arguments");
    lua_pushlightuserdata(L, &SYSCALL);
    lua_pushstring(L, name);
    for (i = first; i <= last; i++)
        lua_pushvalue(L, i);
    return lua_yieldk(L, last - first + 3, ctx, k);
}

/* sys.recv's upvalues: the names of a message's fields, then timeout_ms,
 * the one option that is not among them. A key pushed from an upvalue costs
 * no lookup in the state's string table, which every C string key
 * (lua_getfield, lua_setfield) does. */
static const char *const RECV_KEYS[] = {"id", "from", "to", "tag", "body", "data", "correlation_id", "sent_at_ms",
                                        "timeout_ms", "ack", "lease_ms"};
enum {
    KEY_FROM = 2,
    KEY_TAG = 4,
    KEY_CORRELATION_ID = 7,
    MESSAGE_FIELDS = 8,
    KEY_TIMEOUT_MS = 9,
    KEY_ACK = 10,
    KEY_LEASE_MS = 11,
    RECV_KEY_COUNT = 11
};

/* opts[key] (metamethods included, as lua_getfield), for the key in upvalue `key`; nil without opts. */
static void push_recv_option(lua_State *L, int opts, int key)
{
    if (lua_type(L, opts) == LUA_TTABLE) {
        lua_pushvalue(L, lua_upvalueindex(key));
        lua_gettable(L, opts);
    } else {
        lua_pushnil(L);
    }
}

/* A received message (id, from, to, tag, body, data, correlation_id,
 * sent_at_ms, mailbox length) at base.. as a table; nil for a timeout. */
static int as_message(lua_State *L, int base)
{
    int i;
    lua_settop(L, base + MESSAGE_FIELDS);
    if (lua_isnil(L, base)) {
        if (!lua_isnil(L, base + 1))
            return raise_at_caller(L, base + 1); /* nil, error text */
        lua_pushnil(L);
        return 1;
    }
    sandbox_of(L)->maybe_mail = lua_tonumber(L, base + MESSAGE_FIELDS) > 0;
    lua_createtable(L, 0, MESSAGE_FIELDS);
    for (i = 0; i < MESSAGE_FIELDS; i++) {
        lua_pushvalue(L, lua_upvalueindex(i + 1));
        lua_pushvalue(L, base + i);
        lua_rawset(L, -3);
    }
    return 1;
}

enum { RECV_ANSWER = 6 }; /* where sys.recv's answer lies: after opts and its four fields */

static int recv_k(lua_State *L, int status, lua_KContext ctx)
{
    (void)status;
    (void)ctx;
    return as_message(L, RECV_ANSWER);
}

static int syscall_k(lua_State *L, int status, lua_KContext nargs);

static int sys_recv(lua_State *L)
{
    Sandbox *sb = sandbox_of(L);
    int i, zero_timeout;
    unsigned given;
    lua_settop(L, 1);
    given = check_options(L, 1, "sys.recv", recv_options);
    push_recv_option(L, 1, KEY_FROM);
    push_recv_option(L, 1, KEY_TAG);
    push_recv_option(L, 1, KEY_CORRELATION_ID);
    push_recv_option(L, 1, KEY_TIMEOUT_MS);
    if (given & recv_ack_options) { /* acknowledged delivery (kernel/acks.py): the kernel leases the message */
        push_recv_option(L, 1, KEY_ACK);
        push_recv_option(L, 1, KEY_LEASE_MS);
        if (!(lua_type(L, 6) == LUA_TBOOLEAN && !lua_toboolean(L, 6) && lua_isnil(L, 7)))
            return yield_syscall(L, "recv", 2, 7, 7, syscall_k);
        lua_settop(L, 5); /* ack = false, and nothing else: a receive without ack */
    }
    zero_timeout = is_zero(L, 5);
    /* The common case, a message already waiting, costs no trip through the
     * scheduler; when none can be waiting the kernel takes one that arrives
     * meanwhile. */
    if (sb->maybe_mail || zero_timeout) {
        push_ref(L, sb->try_recv);
        for (i = 2; i <= 5; i++)
            lua_pushvalue(L, i);
        lua_call(L, 4, 9);
        if (lua_type(L, RECV_ANSWER) == LUA_TBOOLEAN && !lua_toboolean(L, RECV_ANSWER))
            return raise_at_caller(L, RECV_ANSWER + 1); /* false, error text */
        if (!lua_isnil(L, RECV_ANSWER) || zero_timeout)
            return as_message(L, RECV_ANSWER);
        lua_settop(L, 5);
    }
    return yield_syscall(L, "recv", 2, 5, 0, recv_k);
}

/* A blocking syscall's answer follows the `nargs` arguments it was made with. */
static int syscall_k(lua_State *L, int status, lua_KContext nargs)
{
    (void)status;
    return check_result(L, (int)nargs + 1);
}

/* sys.wait, sys.sleep, sys.infer: yield to the kernel. Upvalue 1: the syscall's name. */
static int sys_blocking(lua_State *L)
{
    int n = lua_gettop(L);
    return yield_syscall(L, lua_tostring(L, lua_upvalueindex(1)), 1, n, n, syscall_k);
}

static int sys_exit(lua_State *L)
{
    lua_settop(L, 1);
    return yield_syscall(L, "exit", 1, 1, 0, NULL); /* never resumed */
}

/* A free lock costs no trip through the scheduler. */
static int sys_lock_acquire(lua_State *L)
{
    lua_settop(L, 2); /* name, opts */
    push_ref(L, sandbox_of(L)->call);
    lua_pushliteral(L, "lock_acquire_now");
    lua_pushvalue(L, 1);
    lua_pushvalue(L, 2);
    lua_call(L, 3, 2); /* the lock's state, or nil and an error */
    if (!lua_isnil(L, 4))
        return raise_at_caller(L, 4);
    if (!lua_isnil(L, 3)) {
        lua_settop(L, 3);
        return 1;
    }
    push_option(L, 2, "timeout_ms");
    if (is_zero(L, 5)) {
        lua_pushnil(L);
        return 1;
    }
    lua_settop(L, 2);
    return yield_syscall(L, "lock_acquire", 1, 2, 2, syscall_k);
}

/* -- Building the sandbox ------------------------------------------------------------------ */
static void set_function(lua_State *L, const char *name, lua_CFunction f)
{
    lua_pushcfunction(L, f);
    lua_setfield(L, -2, name);
}

/* t[name] = a C closure of f over the value at the top (which it pops). */
static void set_closure(lua_State *L, int t, const char *name, lua_CFunction f, int nup)
{
    lua_pushcclosure(L, f, nup);
    lua_setfield(L, t, name);
}

/* The `sys` table's layout: api/table.py's lua_layout(), which lua/runtime.py gives the
 * binding once, before any state is made (llmos_sandbox_set_layout). */
static const llmos_SysEntry *sys_layout;
static size_t sys_layout_count;
static lua_CFunction *sys_c_functions; /* per entry: the LLMOS_SYS_C entries' functions */
typedef struct {
    size_t table, name, op, file_op;
} SysLengths;
static SysLengths *sys_lengths; /* per entry: its texts' lengths */

static void push_recv(lua_State *L)
{
    int i;
    for (i = 0; i < RECV_KEY_COUNT; i++)
        lua_pushstring(L, RECV_KEYS[i]);
    lua_pushcclosure(L, sys_recv, RECV_KEY_COUNT);
}

/* The sandbox's own syscall functions, by their path in sys (recv, a closure, is NULL here). */
static const struct {
    const char *table, *name;
    lua_CFunction f;
} C_FUNCTIONS[] = {
    {NULL, "self", sys_self}, {NULL, "log", sb_log},   {NULL, "send", sys_send},
    {NULL, "recv", NULL},     {NULL, "exit", sys_exit}, {"lock", "acquire", sys_lock_acquire},
};

static int same_text(const char *a, const char *b)
{
    return a == b || (a != NULL && b != NULL && strcmp(a, b) == 0);
}

static int read_templates_once(void);

/* Also reads the libraries' templates (below), before any state is made. */
int llmos_sandbox_set_layout(const llmos_SysEntry *entries, size_t n, size_t *unknown)
{
    size_t i, k, count = sizeof C_FUNCTIONS / sizeof C_FUNCTIONS[0];
    int status = read_templates_once();
    lua_CFunction *functions;
    SysLengths *lengths;
    if (status < 0)
        return status;
    functions = calloc(n > 0 ? n : 1, sizeof *functions);
    lengths = calloc(n > 0 ? n : 1, sizeof *lengths);
    if (functions == NULL || lengths == NULL) {
        free(functions);
        free(lengths);
        return -1;
    }
    for (i = 0; i < n; i++) {
        lengths[i].table = entries[i].table != NULL ? strlen(entries[i].table) : 0;
        lengths[i].name = strlen(entries[i].name);
        lengths[i].op = entries[i].op != NULL ? strlen(entries[i].op) : 0;
        lengths[i].file_op = entries[i].file_op != NULL ? strlen(entries[i].file_op) : 0;
        if (entries[i].how != LLMOS_SYS_C)
            continue;
        for (k = 0; k < count; k++)
            if (same_text(C_FUNCTIONS[k].table, entries[i].table) && strcmp(C_FUNCTIONS[k].name, entries[i].name) == 0)
                break;
        if (k == count) {
            free(functions);
            free(lengths);
            *unknown = i;
            return -2;
        }
        functions[i] = C_FUNCTIONS[k].f;
        if (entries[i].table == NULL && strcmp(entries[i].name, "send") == 0 && entries[i].options != NULL)
            send_options = entries[i].options;
        if (entries[i].table == NULL && strcmp(entries[i].name, "recv") == 0 && entries[i].options != NULL) {
            recv_options = entries[i].options;
            recv_ack_options = option_bit(recv_options, "ack") | option_bit(recv_options, "lease_ms");
        }
    }
    sys_c_functions = functions;
    sys_lengths = lengths;
    sys_layout = entries;
    sys_layout_count = n;
    return 0;
}

/* Keys and ops by their lengths, measured once (lua_setfield and lua_pushstring measure a C
 * string and look it up in Lua's string cache every time). */
static void push_sys(lua_State *L)
{
    size_t i;
    int sys;
    lua_createtable(L, 0, (int)sys_layout_count);
    sys = lua_gettop(L);
    for (i = 0; i < sys_layout_count; i++) {
        const llmos_SysEntry *e = &sys_layout[i];
        const SysLengths *len = &sys_lengths[i];
        if (e->table == NULL) {
            lua_pushvalue(L, sys);
        } else {
            lua_pushlstring(L, e->table, len->table);
            if (lua_rawget(L, sys) != LUA_TTABLE) {
                lua_pop(L, 1);
                lua_createtable(L, 0, 8);
                lua_pushlstring(L, e->table, len->table);
                lua_pushvalue(L, -2);
                lua_rawset(L, sys);
            }
        }
        lua_pushlstring(L, e->name, len->name);
        if (e->how == LLMOS_SYS_C) {
            if (sys_c_functions[i] != NULL)
                lua_pushcfunction(L, sys_c_functions[i]);
            else
                push_recv(L);
        } else if (e->how == LLMOS_SYS_CALL) {
            lua_pushlstring(L, e->op, len->op);
            if (e->file_op != NULL)
                lua_pushlstring(L, e->file_op, len->file_op);
            lua_pushcclosure(L, sys_direct, e->file_op != NULL ? 2 : 1);
        } else {
            lua_pushlstring(L, e->op, len->op);
            lua_pushcclosure(L, sys_blocking, 1);
        }
        lua_rawset(L, -3);
        lua_pop(L, 1);
    }
}

/* The string library, made safe in place (the state is the program's alone):
 * no dump, and a string metatable the program can neither reach nor change. */
static void secure_string(lua_State *L, int string_lib)
{
    lua_pushnil(L);
    lua_setfield(L, string_lib, "dump");
    lua_pushliteral(L, "");
    lua_getmetatable(L, -1);
    lua_pushvalue(L, string_lib);
    lua_setfield(L, -2, "__index");
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "__metatable");
    lua_pop(L, 2);
}

/* The metered library (lua/metered.h) in place of Lua's functions that can
 * run long in C, in the libraries at `g` (before the program's environment
 * copies them). */
static void install_metered(lua_State *L, int g)
{
    static const struct {
        const char *lib; /* NULL: the globals */
        const luaL_Reg *functions;
    } metered[] = {
        {"string", llmos_pattern_functions}, {"string", llmos_string_functions}, {"table", llmos_table_functions},
        {"utf8", llmos_utf8_functions},      {"os", llmos_os_functions},         {NULL, llmos_base_functions},
    };
    const luaL_Reg *f;
    size_t i;
    for (i = 0; i < sizeof metered / sizeof metered[0]; i++) {
        if (metered[i].lib != NULL)
            lua_getfield(L, g, metered[i].lib);
        else
            lua_pushvalue(L, g);
        for (f = metered[i].functions; f->name != NULL; f++) {
            lua_pushcfunction(L, f->func);
            lua_setfield(L, -2, f->name);
        }
        lua_pop(L, 1);
    }
}

/* -- The libraries' templates ---------------------------------------------------------------
 * Opening Lua's libraries in every new state, then copying what the program keeps, was most of
 * a spawn's state build: hundreds of fields set by C-string keys, each looked up in Lua's string
 * cache, for globals the program never sees. The library functions are C functions without
 * upvalues, so their addresses are read once, from a template state opened and made safe as a
 * process's was (read_templates), and each new state's tables are made from them directly, in
 * the template's order. math is opened in each state: math.random keeps its state in upvalues. */
enum { NOT_A_LIBRARY, LIB_MATH, LIB_STRING, LIB_TABLE, LIB_UTF8 };

typedef struct {
    const char *name; /* a lasting copy */
    size_t len;
    lua_CFunction f;  /* NULL: the library `lib`, or the text `text` */
    int lib;
    const char *text;
    size_t text_len;
} TemplateField;

typedef struct {
    TemplateField *fields;
    int count;
} Template;

static Template base_kept, os_kept, co_kept, string_lib, string_meta, table_lib, utf8_lib;
static lua_CFunction base_setmetatable, base_collectgarbage, co_close_original; /* the wrappers' upvalues */

static void push_template(lua_State *L, const Template *t, int extra);

/* A library the program keeps whole; string's is also the metatable's __index for strings. */
static void push_library(lua_State *L, int lib)
{
    if (lib == LIB_MATH) {
        lua_pushcfunction(L, luaopen_math);
        lua_call(L, 0, 1);
    } else if (lib == LIB_STRING) {
        push_template(L, &string_lib, 0);
        push_template(L, &string_meta, 2);
        lua_pushvalue(L, -2);
        lua_setfield(L, -2, "__index");
        lua_pushboolean(L, 0);
        lua_setfield(L, -2, "__metatable"); /* getmetatable("") is false: no program changes it */
        lua_pushliteral(L, "");
        lua_insert(L, -2);
        lua_setmetatable(L, -2);
        lua_pop(L, 1);
    } else {
        push_template(L, lib == LIB_TABLE ? &table_lib : &utf8_lib, 0);
    }
}

/* A new table of the template's fields, with room for `extra` more. */
static void push_template(lua_State *L, const Template *t, int extra)
{
    const TemplateField *field;
    lua_createtable(L, 0, t->count + extra);
    for (field = t->fields; field < t->fields + t->count; field++) {
        lua_pushlstring(L, field->name, field->len);
        if (field->f != NULL)
            lua_pushcfunction(L, field->f);
        else if (field->lib != NOT_A_LIBRARY)
            push_library(L, field->lib);
        else
            lua_pushlstring(L, field->text, field->text_len);
        lua_rawset(L, -3);
    }
}

void *llmos_allocate_unlimited(void *ud, void *ptr, size_t osize, size_t nsize)
{
    (void)ud;
    (void)osize;
    if (nsize == 0) {
        free(ptr);
        return NULL;
    }
    return realloc(ptr, nsize);
}

/* Reading the templates: once, from llmos_sandbox_set_layout, before any state is made. */
static const char *lasting_text(lua_State *T, const char *text, size_t len)
{
    char *copy = malloc(len + 1);
    if (copy == NULL)
        luaL_error(T, "not enough memory");
    memcpy(copy, text, len);
    copy[len] = '\0';
    return copy;
}

static int library_named(const char *name)
{
    static const char *const names[] = {"math", "string", "table", "utf8"};
    int i;
    for (i = 0; i < 4; i++)
        if (strcmp(name, names[i]) == 0)
            return LIB_MATH + i;
    return NOT_A_LIBRARY;
}

/* Key and value at the top of T (popped) as the next field of `out`. */
static void read_field(lua_State *T, Template *out)
{
    TemplateField *field = &out->fields[out->count];
    const char *text;
    size_t len;
    if (lua_type(T, -2) != LUA_TSTRING)
        luaL_error(T, "a library has a field not named by a string");
    text = lua_tolstring(T, -2, &len);
    field->name = lasting_text(T, text, len);
    field->len = len;
    if (lua_type(T, -1) == LUA_TFUNCTION && lua_tocfunction(T, -1) != NULL) {
        if (lua_getupvalue(T, -1, 1) != NULL)
            luaL_error(T, "library function %s has upvalues: it cannot be shared", field->name);
        field->f = lua_tocfunction(T, -1);
    } else if (lua_type(T, -1) == LUA_TSTRING) {
        text = lua_tolstring(T, -1, &len);
        field->text = lasting_text(T, text, len);
        field->text_len = len;
    } else if (lua_type(T, -1) != LUA_TTABLE || (field->lib = library_named(field->name)) == NOT_A_LIBRARY) {
        luaL_error(T, "library field %s is neither a C function, a text nor a library", field->name);
    }
    out->count++;
    lua_pop(T, 2);
}

/* The fields of the table at `t` named in `names` (NULL: all of them, in its order, but a
 * metatable's __index and __metatable, which push_library sets) as `out`. */
static void read_template(lua_State *T, int t, const char *const *names, Template *out)
{
    int n = 0;
    if (names != NULL) {
        while (names[n] != NULL)
            n++;
    } else {
        lua_pushnil(T);
        while (lua_next(T, t) != 0) {
            lua_pop(T, 1);
            n++;
        }
    }
    out->count = 0;
    out->fields = calloc(n > 0 ? (size_t)n : 1, sizeof *out->fields);
    if (out->fields == NULL)
        luaL_error(T, "not enough memory");
    if (names != NULL) {
        for (; *names != NULL; names++) {
            lua_pushstring(T, *names);
            lua_getfield(T, t, *names);
            read_field(T, out);
        }
        return;
    }
    lua_pushnil(T);
    while (lua_next(T, t) != 0) {
        const char *key = lua_type(T, -2) == LUA_TSTRING ? lua_tostring(T, -2) : "";
        if (strcmp(key, "__index") == 0 || strcmp(key, "__metatable") == 0) {
            lua_pop(T, 1);
            continue;
        }
        lua_pushvalue(T, -2);
        lua_insert(T, -2);
        read_field(T, out);
    }
}

/* Runs protected in the template state: opens the libraries a process keeps, makes them what a
 * process sees (the metered functions, a safe string library), and reads the templates. */
static int read_templates(lua_State *T)
{
    static const luaL_Reg libraries[] = {
        {"_G", luaopen_base},       {"coroutine", luaopen_coroutine}, {"table", luaopen_table},
        {"string", luaopen_string}, {"math", luaopen_math},           {"utf8", luaopen_utf8},
        {"os", luaopen_os},         {NULL, NULL},
    };
    static const char *const kept[] = {"assert", "error", "ipairs", "next", "pairs", "rawequal", "rawget",
                                       "rawlen", "rawset", "select", "tonumber", "tostring", "type",
                                       "getmetatable", "_VERSION", "math", "string", "table", "utf8", NULL};
    static const char *const os_names[] = {"clock", "time", "date", "difftime", NULL};
    static const char *const co_names[] = {"status", "running", "isyieldable", NULL};
    const luaL_Reg *library;
    int g;
    for (library = libraries; library->name != NULL; library++) {
        luaL_requiref(T, library->name, library->func, 1);
        lua_pop(T, 1);
    }
    lua_rawgeti(T, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
    g = lua_gettop(T);
    install_metered(T, g);
    lua_getfield(T, g, "string");
    secure_string(T, lua_gettop(T));
    read_template(T, lua_gettop(T), NULL, &string_lib);
    lua_pushliteral(T, "");
    lua_getmetatable(T, -1);
    read_template(T, lua_gettop(T), NULL, &string_meta);
    lua_pop(T, 3);
    lua_getfield(T, g, "table");
    read_template(T, lua_gettop(T), NULL, &table_lib);
    lua_getfield(T, g, "utf8");
    read_template(T, lua_gettop(T), NULL, &utf8_lib);
    lua_getfield(T, g, "os");
    read_template(T, lua_gettop(T), os_names, &os_kept);
    lua_getfield(T, g, "coroutine");
    read_template(T, lua_gettop(T), co_names, &co_kept);
    lua_getfield(T, -1, "close");
    co_close_original = lua_tocfunction(T, -1);
    lua_getfield(T, g, "setmetatable");
    base_setmetatable = lua_tocfunction(T, -1);
    lua_getfield(T, g, "collectgarbage");
    base_collectgarbage = lua_tocfunction(T, -1);
    read_template(T, g, kept, &base_kept);
    if (co_close_original == NULL || base_setmetatable == NULL || base_collectgarbage == NULL)
        luaL_error(T, "a wrapped library function is not a C function");
    return 0;
}

/* 0, -1 (out of memory) or -3 (Lua's libraries are not what the templates need). */
static int read_templates_once(void)
{
    lua_State *T;
    int status;
    if (string_lib.fields != NULL)
        return 0;
    T = lua_newstate(llmos_allocate_unlimited, NULL);
    if (T == NULL)
        return -1;
    lua_pushcfunction(T, read_templates);
    status = lua_pcall(T, 0, 0, 0);
    lua_close(T);
    return status == LUA_OK ? 0 : status == LUA_ERRMEM ? -1 : -3;
}

/* The program's environment; leaves it on the stack. */
static void push_env(lua_State *L)
{
    int env;
    push_template(L, &base_kept, 16);
    env = lua_gettop(L);
    lua_pushvalue(L, env);
    lua_setfield(L, env, "_G");

    push_template(L, &os_kept, 0);
    lua_setfield(L, env, "os");

    push_template(L, &co_kept, 5);
    set_function(L, "create", co_create);
    set_function(L, "resume", co_resume);
    set_function(L, "wrap", co_wrap);
    set_function(L, "yield", co_yield);
    lua_pushcfunction(L, co_close_original);
    set_closure(L, lua_gettop(L) - 1, "close", co_close, 1);
    lua_setfield(L, env, "coroutine");

    lua_pushcfunction(L, sb_pcall);
    lua_setfield(L, env, "pcall");
    lua_pushcfunction(L, sb_xpcall);
    lua_setfield(L, env, "xpcall");
    lua_pushcfunction(L, sb_log);
    lua_setfield(L, env, "print");
    lua_pushcfunction(L, base_setmetatable);
    set_closure(L, env, "setmetatable", sb_setmetatable, 1);
    lua_pushcfunction(L, base_collectgarbage);
    set_closure(L, env, "collectgarbage", sb_collectgarbage, 1);
    lua_pushvalue(L, env);
    set_closure(L, env, "load", sb_load, 1);
    lua_pushvalue(L, env);
    set_closure(L, env, "require", sb_require, 1);
    push_sys(L);
    lua_setfield(L, env, "sys");
}

/* The kernel's side: resume the program with a syscall's answer. Returns
 *   "sys", name, ...          the program made a blocking syscall
 *   "done", value             the program returned
 *   "error", message, reason  the program failed (reason nil) or was ended (reason: why) */
static int step(lua_State *L)
{
    Sandbox *sb = sandbox_of(L);
    lua_State *co = sb->main_co;
    int nargs = lua_gettop(L), nres, status;
    if (!lua_checkstack(co, nargs))
        return luaL_error(L, "too many values to resume the program with");
    lua_xmove(L, co, nargs);
    status = lua_resume(co, L, nargs, &nres);
    luaL_checkstack(L, nres + 3, "too many syscall arguments");
    if (sb->dying && (status == LUA_OK || status == LUA_YIELD)) {
        /* Ended, but a C function caught the end and the program returned
         * or yielded before its next instruction: it ends all the same. */
        lua_pop(co, nres);
        lua_pushliteral(L, "error");
        push_context_value(L, DYING_REASON);
        lua_pushvalue(L, -1);
        return 3;
    }
    if (status == LUA_OK) {
        lua_pushliteral(L, "done");
        if (nres > 0) {
            lua_pop(co, nres - 1);
            lua_xmove(co, L, 1);
        } else {
            lua_pushnil(L);
        }
        return 2;
    }
    if (status == LUA_YIELD) {
        if (nres > 0 && lua_touserdata(co, -nres) == &SYSCALL) {
            if (!sb->collected) {
                /* The first time the program blocks, free what building the
                 * sandbox and starting the program left behind: a blocked
                 * process should cost only its live data, as thousands may sit
                 * in recv. A program that ends without blocking never pays for
                 * it. Entering generational mode is itself a full collection. */
                sb->collected = 1;
                lua_gc(L, LUA_GCGEN, 0, 0);
            }
            lua_pushliteral(L, "sys");
            lua_xmove(co, L, nres);
            lua_remove(L, -nres); /* &SYSCALL */
            return nres;
        }
        lua_pop(co, nres);
        lua_pushliteral(L, "error");
        lua_pushliteral(L, "attempt to yield from outside a coroutine");
        return 2;
    }
    lua_pushliteral(L, "error");
    lua_xmove(co, L, 1);
    if (sb->dying)
        push_context_value(L, DYING_REASON);
    else
        lua_pushnil(L);
    return 3;
}

/* step, main_state = open(check, send, try_recv, call, pid, source, chunk_name, args,
 *                         hook_count)
 * main_state is the address of the program's coroutine, which runs without a
 * hook until lua/preempt.c installs one. */
static int sandbox_open(lua_State *L)
{
    enum { CHECK = 1, SEND, TRY_RECV, CALL, PID, SOURCE, CHUNK_NAME, ARGS, HOOK_COUNT, CONTEXT };
    Sandbox *sb;
    lua_State *main_thread, *co;
    size_t source_len;
    const char *source = luaL_checklstring(L, SOURCE, &source_len);
    const char *chunk_name = luaL_checkstring(L, CHUNK_NAME);
    int env;

    lua_settop(L, HOOK_COUNT);
    sb = lua_newuserdatauv(L, sizeof(Sandbox), 2);
    memset(sb, 0, sizeof *sb);
    sb->pid = lua_tointegerx(L, PID, NULL);
    sb->hook_count = (int)lua_tointegerx(L, HOOK_COUNT, NULL);
    sb->maybe_mail = 1;
    lua_pushliteral(L, "memory_limit");
    lua_setiuservalue(L, CONTEXT, MEMORY_LIMIT);
    lua_pushvalue(L, CONTEXT);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &CONTEXT_KEY);
    lua_pushvalue(L, CHECK);
    sb->check = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushvalue(L, SEND);
    sb->send = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushvalue(L, TRY_RECV);
    sb->try_recv = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushvalue(L, CALL);
    sb->call = luaL_ref(L, LUA_REGISTRYINDEX);
    /* Threads created from now on copy the main thread's extra space. */
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
    main_thread = lua_tothread(L, -1);
    lua_pop(L, 1);
    *(Sandbox **)((char *)main_thread - LUA_EXTRASPACE) = sb;
    *(Sandbox **)((char *)L - LUA_EXTRASPACE) = sb;

    push_env(L);
    env = lua_gettop(L);
    lua_pushvalue(L, ARGS);
    lua_setfield(L, env, "args");

    if (luaL_loadbufferx(L, source, source_len, chunk_name, "t") != LUA_OK)
        return lua_error(L);
    lua_pushvalue(L, env);
    lua_setupvalue(L, -2, 1); /* the chunk's _ENV */
    co = sb->main_co = lua_newthread(L);
    lua_pushvalue(L, -1);
    luaL_ref(L, LUA_REGISTRYINDEX); /* keeps the coroutine alive */
    lua_pop(L, 1);
    lua_xmove(L, co, 1); /* the program */

    lua_pushcfunction(L, step);
    lua_pushinteger(L, (lua_Integer)(intptr_t)co);
    return 2;
}

/* Checks that this module and the state agree on the registry's index before
 * anything relies on it. */
int llmos_sandbox_open(lua_State *L)
{
    if (lua_version(L) != 504)
        return luaL_error(L, "the llmos sandbox needs Lua 5.4 (this is %f)", lua_version(L));
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
    if (lua_type(L, -1) != LUA_TTHREAD)
        return luaL_error(L, "the llmos sandbox was built for another LUAI_MAXSTACK than this Lua's");
    lua_pop(L, 1);
    return sandbox_open(L);
}
