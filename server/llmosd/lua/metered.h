/*
 * The metered library: llmos's own versions of the Lua 5.4 library functions
 * that can run long in C, where no count hook fires (lua/metered_patterns.c,
 * lua/metered_strings.c, lua/metered_tables.c, lua/metered_utf8.c, lua/metered_base_os.c, and load in
 * lua/sandbox.c). Each file says why each of its functions is metered, and why
 * the rest of its library is not. Each
 * behaves as Lua 5.4's (results and error messages; the differential tests
 * compare them with stock Lua), and calls llmos_checkpoint (lua_api.h) every
 * slice of its work, so that a kill, a CPU or wall-time limit or the end of
 * the quantum takes effect within a fraction of a millisecond whatever the
 * function is doing. A checkpoint may raise (the process ends) or park the
 * thread (another process takes the CPU): whatever such a function holds
 * meanwhile is on its C stack or owned by the Lua state (a Box), never
 * malloc's, so that the raise leaks nothing.
 *
 * Not metered, and why: functions whose work is bounded by a constant (the
 * rest of math, os.clock/time/difftime, coroutine, and base but tonumber and
 * load; what they call back is Lua code, which the hook interrupts) or by the
 * Lua stack (LUAI_MAXSTACK, one million values) at a few ns a value
 * (string.byte, utf8.codepoint, select, math.max/min: a few ms), and single
 * copies of a string (string.sub, lua_pushlstring of a result), which the VM
 * itself does in one instruction (`..`) and which the memory limit bounds.
 */
#ifndef LLMOS_LUA_METERED_H
#define LLMOS_LUA_METERED_H

#include <string.h>

#include "lua_api.h"

/* Bytes a C function may copy or scan between two checkpoints (tens of µs). */
#define METER_BYTES (256 << 10)

/* -- Box: a growable byte buffer owned by the Lua state ------------------------------------ */
/* A Box lives on its function's C stack and starts in its own INITIAL bytes,
 * so that short results cost no allocation. Longer ones move to memory
 * allocated with the state's own allocator (counted against the memory limit,
 * failing as Lua does with "not enough memory") and held by a userdata in a
 * stack slot the box reserves when it is made; the userdata's __gc frees the
 * memory if an error or a kill leaves it to the collector. It grows by half,
 * as Lua's luaL_Buffer does. Copies into it are metered: a checkpoint every
 * METER_BYTES copied. */
#define BOX_INITIAL 1024

typedef struct {
    char *data;        /* `initial`, or the held memory */
    size_t len, size;
    size_t unmetered;  /* bytes copied since the last checkpoint */
    int slot;          /* the stack slot of the userdata that holds the memory */
    char initial[BOX_INITIAL];
} Box;

/* Makes an empty box, reserving a stack slot (pushes one value). */
void llmos_box_init(lua_State *L, Box *box);
/* Room for `n` more bytes, which the caller writes at the returned address and then counts in box->len. */
char *llmos_box_reserve(lua_State *L, Box *box, size_t n);
/* Appends n bytes, with a checkpoint every METER_BYTES of them. */
void llmos_box_add(lua_State *L, Box *box, const char *s, size_t n);
/* Pushes the contents as a string and frees the box's memory at once. */
void llmos_box_push(lua_State *L, Box *box);

static inline void llmos_box_addchar(lua_State *L, Box *box, char c)
{
    if (box->len == box->size)
        llmos_box_reserve(L, box, 1);
    box->data[box->len++] = c;
}

/* -- What each file installs -------------------------------------------------------------- */
/* Each list ends with {NULL, NULL}; the sandbox sets them into the library
 * tables in place of Lua's functions of those names. */
extern const luaL_Reg llmos_pattern_functions[]; /* string.find, match, gmatch, gsub */
extern const luaL_Reg llmos_string_functions[];  /* string.rep, char, upper, lower, reverse, format, pack... */
extern const luaL_Reg llmos_table_functions[];   /* table.concat, insert, remove, move, sort, unpack, pack */
extern const luaL_Reg llmos_utf8_functions[];    /* utf8.len, offset, codes, char */
extern const luaL_Reg llmos_os_functions[];      /* os.date */
extern const luaL_Reg llmos_base_functions[];    /* tonumber */

#endif
