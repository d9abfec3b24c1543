/*
 * Base and os functions that can run long in C, metered (see lua/metered.h),
 * written from the Lua 5.4 manual (§6.1, §6.9) and checked against stock Lua
 * by tests/test_lua_metered.py:
 *   - tonumber with a base: a pass over a numeral of any length;
 *   - os.date: a strftime call for each conversion of a format of any length.
 * Not metered: tonumber without a base, a conversion Lua's VM also does in
 * one instruction (`s + 0`), linear at about a nanosecond a byte; load's
 * parsing is fed in metered pieces by the sandbox (lua/sandbox.c).
 */
#include <time.h>

#include "metered.h"

#define CONVERSIONS_PER_CHECK 256 /* strftime takes up to a µs */

/* -- tonumber --------------------------------------------------------------------------------- */
static int is_space(int c)
{
    return c == ' ' || (c >= '\t' && c <= '\r');
}

static int is_alnum(int c)
{
    return (c >= '0' && c <= '9') || ((c | 0x20) >= 'a' && (c | 0x20) <= 'z');
}

typedef struct {
    lua_State *L;
    size_t steps;
} Scan;

static inline void step(Scan *scan)
{
    if (++scan->steps % METER_BYTES == 0)
        llmos_checkpoint(scan->L);
}

static const char *skip_spaces(Scan *scan, const char *s)
{
    for (; is_space((unsigned char)*s); s++)
        step(scan);
    return s;
}

/* The integer numeral in `base` at s (spaces around it allowed); where it
 * ends, or NULL if there is none. Digits beyond the range wrap around, as
 * Lua's do. */
static const char *parse_integer(lua_State *L, const char *s, int base, lua_Integer *out)
{
    Scan scan = {L, 0};
    lua_Unsigned n = 0;
    int negative = 0, digit, c;
    s = skip_spaces(&scan, s);
    if (*s == '-') {
        s++;
        negative = 1;
    } else if (*s == '+') {
        s++;
    }
    if (!is_alnum((unsigned char)*s))
        return NULL;
    do {
        c = (unsigned char)*s;
        digit = c >= '0' && c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10;
        if (digit >= base)
            return NULL;
        n = n * (lua_Unsigned)base + (lua_Unsigned)digit;
        s++;
        step(&scan);
    } while (is_alnum((unsigned char)*s));
    s = skip_spaces(&scan, s);
    *out = (lua_Integer)(negative ? 0u - n : n);
    return s;
}

static int base_tonumber(lua_State *L)
{
    size_t l;
    const char *s;
    lua_Integer n = 0, base;
    if (lua_isnoneornil(L, 2)) {
        if (lua_type(L, 1) == LUA_TNUMBER) {
            lua_settop(L, 1);
            return 1;
        }
        s = lua_tolstring(L, 1, &l);
        if (s != NULL && lua_stringtonumber(L, s) == l + 1)
            return 1;
        luaL_checkany(L, 1); /* a missing argument is an error, a non-numeral is not */
    } else {
        base = luaL_checkinteger(L, 2);
        luaL_checktype(L, 1, LUA_TSTRING); /* numbers are not numerals in a base */
        s = lua_tolstring(L, 1, &l);
        luaL_argcheck(L, 2 <= base && base <= 36, 2, "base out of range");
        if (parse_integer(L, s, (int)base, &n) == s + l) {
            lua_pushinteger(L, n);
            return 1;
        }
    }
    lua_pushnil(L);
    return 1;
}

/* -- os.date ---------------------------------------------------------------------------------- */
/* The conversions of C99's strftime, by length ('|' separates the lengths). */
#define STRFTIME_OPTIONS "aAbBcCdDeFgGhHIjmMnprRStTuUVwWxXyYzZ%||EcECExEXEyEYOdOeOHOIOmOMOSOuOUOVOwOWOy"
#define MAX_CONVERSION_TEXT 250

/* The conversion at conv (after its '%') into out ("%" + it); returns what follows. */
static const char *check_option(lua_State *L, const char *conv, ptrdiff_t convlen, char *out)
{
    const char *option = STRFTIME_OPTIONS;
    int oplen = 1;
    for (; *option != '\0' && oplen <= convlen; option += oplen) {
        if (*option == '|') {
            oplen++;
        } else if (memcmp(conv, option, (size_t)oplen) == 0) {
            memcpy(out, conv, (size_t)oplen);
            out[oplen] = '\0';
            return conv + oplen;
        }
    }
    luaL_argerror(L, 1, lua_pushfstring(L, "invalid conversion specifier '%%%s'", conv));
    return conv;
}

static void set_field(lua_State *L, const char *key, int value, int delta)
{
    lua_pushinteger(L, (lua_Integer)value + delta);
    lua_setfield(L, -2, key);
}

static void set_all_fields(lua_State *L, const struct tm *stm)
{
    set_field(L, "year", stm->tm_year, 1900);
    set_field(L, "month", stm->tm_mon, 1);
    set_field(L, "day", stm->tm_mday, 0);
    set_field(L, "hour", stm->tm_hour, 0);
    set_field(L, "min", stm->tm_min, 0);
    set_field(L, "sec", stm->tm_sec, 0);
    set_field(L, "yday", stm->tm_yday, 1);
    set_field(L, "wday", stm->tm_wday, 1);
    if (stm->tm_isdst >= 0) { /* else unknown */
        lua_pushboolean(L, stm->tm_isdst);
        lua_setfield(L, -2, "isdst");
    }
}

static time_t check_time(lua_State *L, int arg)
{
    lua_Integer t = luaL_checkinteger(L, arg);
    luaL_argcheck(L, (time_t)t == t, arg, "time out-of-bounds");
    return (time_t)t;
}

static int os_date(lua_State *L)
{
    size_t slen, run;
    const char *s = luaL_optlstring(L, 1, "%c", &slen), *se = s + slen, *percent;
    time_t t = lua_isnoneornil(L, 2) ? time(NULL) : check_time(L, 2);
    struct tm tmr, *stm;
    char conversion[4] = "%", text[MAX_CONVERSION_TEXT];
    unsigned conversions = 0;
    Box box, *b;
    if (*s == '!') { /* UTC */
        stm = gmtime_r(&t, &tmr);
        s++;
    } else {
        stm = localtime_r(&t, &tmr);
    }
    if (stm == NULL)
        return luaL_error(L, "date result cannot be represented in this installation");
    if (strcmp(s, "*t") == 0) {
        lua_createtable(L, 0, 9);
        set_all_fields(L, stm);
        return 1;
    }
    b = &box;
    llmos_box_init(L, b);
    while (s < se) {
        if (*s != '%') {
            percent = memchr(s, '%', (size_t)(se - s));
            run = percent != NULL ? (size_t)(percent - s) : (size_t)(se - s);
            llmos_box_add(L, b, s, run);
            s += run;
            continue;
        }
        s = check_option(L, s + 1, se - s - 1, conversion + 1);
        llmos_box_add(L, b, text, strftime(text, sizeof text, conversion, stm));
        if (++conversions % CONVERSIONS_PER_CHECK == 0)
            llmos_checkpoint(L);
    }
    llmos_box_push(L, b);
    return 1;
}

const luaL_Reg llmos_base_functions[] = {
    {"tonumber", base_tonumber}, {NULL, NULL},
};

const luaL_Reg llmos_os_functions[] = {
    {"date", os_date}, {NULL, NULL},
};
