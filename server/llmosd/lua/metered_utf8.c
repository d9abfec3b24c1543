/*
 * The utf8 library's functions that can run long in C, metered (see
 * lua/metered.h), written from the Lua 5.4 manual (§6.5) and checked against
 * stock Lua by tests/test_lua_metered.py:
 *   - len, offset: a walk over a range of a string of any length;
 *   - codes: its iterator skips continuation bytes, as many as the string
 *     has when the program calls it with a position of its choosing;
 *   - char: up to LUAI_MAXSTACK (a million) arguments, encoded one by one
 *     (about 40 ms for a million in Lua's).
 * Not metered: codepoint (at most LUAI_MAXSTACK values, each a few ns),
 * charpattern.
 */
#include "metered.h"

#define MAX_UNICODE 0x10FFFFu
#define MAX_UTF 0x7FFFFFFFu /* the largest code the lax decoding accepts */
#define INVALID "invalid UTF-8 code"
#define IS_CONTINUATION(c) (((c) & 0xC0) == 0x80)
#define CHARACTERS_PER_CHECK (METER_BYTES / 4)

typedef unsigned int Code;

/* A position (negative: from the end) as an index from 1; 0 if before the start. */
static lua_Integer position(lua_Integer pos, size_t len)
{
    if (pos >= 0)
        return pos;
    if (0u - (size_t)pos > len)
        return 0;
    return (lua_Integer)len + pos + 1;
}

/* Decodes the sequence at s (the string goes on with its terminating zero):
 * where the next one starts, or NULL if it is not valid (in strict mode,
 * surrogates and codes above MAX_UNICODE are not). */
static const char *decode(const char *s, Code *value, int strict)
{
    static const Code smallest[] = {~(Code)0, 0x80, 0x800, 0x10000u, 0x200000u, 0x4000000u};
    unsigned c = (unsigned char)s[0], next;
    Code code = 0;
    int count = 0; /* continuation bytes */
    if (c < 0x80) {
        code = c;
    } else {
        for (; c & 0x40; c <<= 1) { /* each 1 bit after the first asks for one more byte */
            next = (unsigned char)s[++count];
            if (!IS_CONTINUATION(next))
                return NULL;
            code = (code << 6) | (next & 0x3F);
        }
        code |= (Code)(c & 0x7F) << (count * 5);
        if (count > 5 || code > MAX_UTF || code < smallest[count])
            return NULL; /* too long, or an overlong form */
        s += count;
    }
    if (strict && (code > MAX_UNICODE || (code >= 0xD800u && code <= 0xDFFFu)))
        return NULL;
    if (value != NULL)
        *value = code;
    return s + 1;
}

/* utf8.len(s [, i [, j [, lax]]]) */
static int utf8_len(lua_State *L)
{
    lua_Integer n = 0;
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len), *next;
    lua_Integer posi = position(luaL_optinteger(L, 2, 1), len);
    lua_Integer posj = position(luaL_optinteger(L, 3, -1), len);
    int lax = lua_toboolean(L, 4);
    luaL_argcheck(L, 1 <= posi && --posi <= (lua_Integer)len, 2, "initial position out of bounds");
    luaL_argcheck(L, --posj < (lua_Integer)len, 3, "final position out of bounds");
    while (posi <= posj) {
        next = decode(s + posi, NULL, !lax);
        if (next == NULL) {
            lua_pushnil(L);
            lua_pushinteger(L, posi + 1);
            return 2;
        }
        posi = next - s;
        if (++n % CHARACTERS_PER_CHECK == 0)
            llmos_checkpoint(L);
    }
    lua_pushinteger(L, n);
    return 1;
}

/* utf8.offset(s, n [, i]) */
static int utf8_offset(lua_State *L)
{
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    lua_Integer n = luaL_checkinteger(L, 2);
    lua_Integer posi = n >= 0 ? 1 : (lua_Integer)len + 1;
    unsigned long steps = 0;
    posi = position(luaL_optinteger(L, 3, posi), len);
    luaL_argcheck(L, 1 <= posi && --posi <= (lua_Integer)len, 3, "position out of bounds");
    if (n == 0) { /* the start of the character at posi */
        while (posi > 0 && IS_CONTINUATION(s[posi])) {
            posi--;
            if (++steps % METER_BYTES == 0)
                llmos_checkpoint(L);
        }
    } else {
        if (IS_CONTINUATION(s[posi]))
            return luaL_error(L, "initial position is a continuation byte");
        if (n < 0) {
            while (n < 0 && posi > 0) { /* back to the start of the previous character */
                do {
                    posi--;
                    if (++steps % METER_BYTES == 0)
                        llmos_checkpoint(L);
                } while (posi > 0 && IS_CONTINUATION(s[posi]));
                n++;
            }
        } else {
            n--; /* the first character is where we are */
            while (n > 0 && posi < (lua_Integer)len) {
                do { /* on to the start of the next one (the terminating zero stops it) */
                    posi++;
                    if (++steps % METER_BYTES == 0)
                        llmos_checkpoint(L);
                } while (IS_CONTINUATION(s[posi]));
                n--;
            }
        }
    }
    if (n == 0)
        lua_pushinteger(L, posi + 1);
    else
        lua_pushnil(L); /* no such character */
    return 1;
}

/* The iterator of utf8.codes: (s, position of the previous character) ->
 * position, code of the next one. */
static int next_code(lua_State *L, int strict)
{
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len), *next;
    lua_Unsigned n = (lua_Unsigned)lua_tointegerx(L, 2, NULL);
    Code code;
    if (n < len) {
        while (IS_CONTINUATION(s[n])) { /* the terminating zero stops it */
            n++;
            if (n % METER_BYTES == 0)
                llmos_checkpoint(L);
        }
    }
    if (n >= len) /* also a negative position */
        return 0;
    next = decode(s + n, &code, strict);
    if (next == NULL || IS_CONTINUATION(*next))
        return luaL_error(L, INVALID);
    lua_pushinteger(L, (lua_Integer)n + 1);
    lua_pushinteger(L, code);
    return 2;
}

static int next_code_strict(lua_State *L)
{
    return next_code(L, 1);
}

static int next_code_lax(lua_State *L)
{
    return next_code(L, 0);
}

/* utf8.codes(s [, lax]) */
static int utf8_codes(lua_State *L)
{
    int lax = lua_toboolean(L, 2);
    const char *s = luaL_checkstring(L, 1);
    luaL_argcheck(L, !IS_CONTINUATION(*s), 1, INVALID);
    lua_pushcfunction(L, lax ? next_code_lax : next_code_strict);
    lua_pushvalue(L, 1);
    lua_pushinteger(L, 0);
    return 3;
}

/* utf8.char(...): each code as UTF-8, up to 6 bytes (codes up to MAX_UTF, as Lua's). */
static int utf8_char(lua_State *L)
{
    int n = lua_gettop(L), i, len, first_max;
    lua_Unsigned code;
    char bytes[8];
    Box box, *b = &box;
    llmos_box_init(L, b);
    for (i = 1; i <= n; i++) {
        code = (lua_Unsigned)luaL_checkinteger(L, i);
        luaL_argcheck(L, code <= MAX_UTF, i, "value out of range");
        if (code < 0x80) {
            bytes[7] = (char)code;
            len = 1;
        } else { /* continuation bytes from the end, then the first byte with what is left */
            len = 0;
            first_max = 0x3F; /* what fits in the first byte, one bit less for each continuation byte */
            do {
                bytes[7 - len++] = (char)(0x80 | (code & 0x3F));
                code >>= 6;
                first_max >>= 1;
            } while (code > (lua_Unsigned)first_max);
            bytes[7 - len++] = (char)((~first_max << 1) | (int)code);
        }
        llmos_box_add(L, b, bytes + 8 - len, (size_t)len);
        if (i % CHARACTERS_PER_CHECK == 0)
            llmos_checkpoint(L);
    }
    llmos_box_push(L, b);
    return 1;
}

const luaL_Reg llmos_utf8_functions[] = {
    {"len", utf8_len}, {"offset", utf8_offset}, {"codes", utf8_codes}, {"char", utf8_char}, {NULL, NULL},
};
