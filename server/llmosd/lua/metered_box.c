/*
 * Box: the growable, Lua-owned byte buffer of the metered library (see
 * lua/metered.h). Lua's own luaL_Buffer is not used: its layout depends on
 * how Lua was configured (LUAL_BUFFERSIZE), which lupa does not tell.
 */
#include "metered.h"

static char HOLDER_METATABLE; /* registry key (its address) of the holders' metatable */

/* The userdata that owns a box's memory once it outgrows its initial bytes. */
typedef struct {
    char *data;
    size_t size;
} Holder;

static void *reallocate(lua_State *L, void *block, size_t old_size, size_t new_size)
{
    void *ud;
    lua_Alloc allocate = lua_getallocf(L, &ud);
    return allocate(ud, block, old_size, new_size);
}

static int holder_gc(lua_State *L)
{
    Holder *holder = lua_touserdata(L, 1);
    if (holder->data != NULL)
        reallocate(L, holder->data, holder->size, 0);
    holder->data = NULL;
    holder->size = 0;
    return 0;
}

void llmos_box_init(lua_State *L, Box *box)
{
    box->data = box->initial;
    box->len = box->unmetered = 0;
    box->size = BOX_INITIAL;
    lua_pushnil(L); /* the holder's place */
    box->slot = lua_gettop(L);
}

static Holder *new_holder(lua_State *L, int slot)
{
    Holder *holder = lua_newuserdatauv(L, sizeof(Holder), 0);
    holder->data = NULL;
    holder->size = 0;
    if (lua_rawgetp(L, LUA_REGISTRYINDEX, &HOLDER_METATABLE) == LUA_TNIL) { /* the state's first */
        lua_pop(L, 1);
        lua_createtable(L, 0, 1);
        lua_pushcfunction(L, holder_gc);
        lua_setfield(L, -2, "__gc");
        lua_pushvalue(L, -1);
        lua_rawsetp(L, LUA_REGISTRYINDEX, &HOLDER_METATABLE);
    }
    lua_setmetatable(L, -2);
    lua_replace(L, slot);
    return holder;
}

char *llmos_box_reserve(lua_State *L, Box *box, size_t n)
{
    size_t size;
    char *data;
    Holder *holder;
    if (box->size - box->len >= n)
        return box->data + box->len;
    if ((size_t)-1 - n < box->len)
        luaL_error(L, "buffer too large");
    size = box->size / 2 * 3;
    if (size < box->len + n)
        size = box->len + n;
    if (box->data == box->initial) {
        holder = new_holder(L, box->slot);
        data = reallocate(L, NULL, 0, size);
        if (data != NULL)
            memcpy(data, box->initial, box->len);
    } else {
        holder = lua_touserdata(L, box->slot);
        data = reallocate(L, holder->data, holder->size, size);
    }
    if (data == NULL) {
        lua_pushliteral(L, "not enough memory"); /* as Lua's buffers (the string exists already) */
        lua_error(L);
    }
    holder->data = box->data = data;
    holder->size = box->size = size;
    return data + box->len;
}

void llmos_box_add(lua_State *L, Box *box, const char *s, size_t n)
{
    size_t piece;
    llmos_box_reserve(L, box, n);
    while (n > 0) {
        piece = METER_BYTES - box->unmetered;
        if (piece > n)
            piece = n;
        memcpy(box->data + box->len, s, piece);
        box->len += piece;
        box->unmetered += piece;
        s += piece;
        n -= piece;
        if (box->unmetered == METER_BYTES) {
            box->unmetered = 0;
            llmos_checkpoint(L);
        }
    }
}

void llmos_box_push(lua_State *L, Box *box)
{
    Holder *holder;
    lua_pushlstring(L, box->data, box->len);
    if (box->data != box->initial) {
        holder = lua_touserdata(L, box->slot);
        reallocate(L, holder->data, holder->size, 0);
        holder->data = NULL;
        holder->size = 0;
    }
    box->data = box->initial;
    box->len = 0;
    box->size = BOX_INITIAL;
}
