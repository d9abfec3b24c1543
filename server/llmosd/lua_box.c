/*
 * Box: the growable, Lua-owned byte buffer of the metered library (see
 * lua_metered.h). Lua's own luaL_Buffer is not used: its layout depends on
 * how Lua was configured (LUAL_BUFFERSIZE), which lupa does not tell.
 */
#include "lua_metered.h"

static char BOX_METATABLE; /* registry key (its address) of the boxes' metatable */

static void *reallocate(lua_State *L, void *block, size_t old_size, size_t new_size)
{
    void *ud;
    lua_Alloc allocate = lua_getallocf(L, &ud);
    return allocate(ud, block, old_size, new_size);
}

static int box_gc(lua_State *L)
{
    Box *box = lua_touserdata(L, 1);
    if (box->data != NULL)
        reallocate(L, box->data, box->size, 0);
    box->data = NULL;
    box->size = box->len = 0;
    return 0;
}

Box *llmos_box_new(lua_State *L)
{
    Box *box = lua_newuserdatauv(L, sizeof(Box), 0);
    box->data = NULL;
    box->len = box->size = box->unmetered = 0;
    if (lua_rawgetp(L, LUA_REGISTRYINDEX, &BOX_METATABLE) == LUA_TNIL) { /* the state's first box */
        lua_pop(L, 1);
        lua_createtable(L, 0, 1);
        lua_pushcfunction(L, box_gc);
        lua_setfield(L, -2, "__gc");
        lua_pushvalue(L, -1);
        lua_rawsetp(L, LUA_REGISTRYINDEX, &BOX_METATABLE);
    }
    lua_setmetatable(L, -2);
    return box;
}

char *llmos_box_reserve(lua_State *L, Box *box, size_t n)
{
    size_t size;
    char *data;
    if (box->size - box->len >= n)
        return box->data + box->len;
    if ((size_t)-1 - n < box->len)
        luaL_error(L, "buffer too large");
    size = box->size / 2 * 3;
    if (size < box->len + n)
        size = box->len + n;
    if (size < 64)
        size = 64;
    data = reallocate(L, box->data, box->size, size);
    if (data == NULL) {
        lua_pushliteral(L, "not enough memory"); /* as Lua's buffers: the string exists already */
        lua_error(L);
    }
    box->data = data;
    box->size = size;
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
    lua_pushlstring(L, box->data != NULL ? box->data : "", box->len);
    if (box->data != NULL)
        reallocate(L, box->data, box->size, 0);
    box->data = NULL;
    box->size = box->len = 0;
}
