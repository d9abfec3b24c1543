/*
 * The string library's functions that can run long in C, metered (see
 * lua_metered.h), written from the Lua 5.4 manual (§6.4) and checked against
 * stock Lua by tests/test_lua_metered.py:
 *   - rep: time and memory in the result's length, which Lua lets be huge
 *     with empty pieces (2^62 copies of '' looped for ever); here an empty
 *     result is instant and a long one is copied in metered slices;
 *   - upper, lower, reverse: a pass over a string of any length;
 *   - format: a pass over the format (any length), %q quoting a string byte
 *     by byte, %s copying strings of any length;
 *   - pack, unpack, packsize: a pass over the format, padding of any size.
 * Not metered: len, sub (one copy), byte and char (at most LUAI_MAXSTACK
 * values), and the pattern functions' (lua_patterns.c).
 * Character classes are the C locale's (ASCII), as Lua's in the C and UTF-8
 * locales.
 */
#include <limits.h>
#include <math.h>
#include <stdio.h>

#include "lua_metered.h"

/* Lua's limit on the strings that rep, format items and pack make: INT_MAX. */
#define MAX_STRING ((size_t)INT_MAX)

/* -- rep ---------------------------------------------------------------------------------- */
static int str_rep(lua_State *L)
{
    size_t l, lsep, total, done, period, chunk, room, back;
    const char *s = luaL_checklstring(L, 1, &l);
    lua_Integer n = luaL_checkinteger(L, 2);
    const char *sep = luaL_optlstring(L, 3, "", &lsep);
    Box *b;
    if (n <= 0 || l + lsep == 0) { /* (l + lsep == 0: n empty pieces, however many) */
        lua_pushliteral(L, "");
        return 1;
    }
    if (l + lsep < l || l + lsep > MAX_STRING / (lua_Unsigned)n)
        return luaL_error(L, "resulting string too large");
    period = l + lsep;
    total = (size_t)n * l + (size_t)(n - 1) * lsep;
    b = llmos_box_new(L);
    llmos_box_reserve(L, b, total);
    /* The result is s..sep repeated and cut at `total`: write one period,
     * then copy what is written onto what follows, a whole number of periods
     * at a time, at most about METER_BYTES per checkpoint. */
    memcpy(b->data, s, l);
    done = l;
    if (total > l) {
        memcpy(b->data + l, sep, lsep);
        done = period;
    }
    room = period > METER_BYTES ? period : METER_BYTES / period * period;
    while (done < total) {
        back = done / period * period; /* the bytes that far back are the same */
        if (back > room)
            back = room;
        chunk = back < total - done ? back : total - done;
        memcpy(b->data + done, b->data + done - back, chunk);
        done += chunk;
        llmos_checkpoint(L);
    }
    b->len = total;
    llmos_box_push(L, b);
    return 1;
}

/* -- upper, lower, reverse -------------------------------------------------------------------- */
enum { UPPER, LOWER, REVERSE };

/* A byte-by-byte transformation of argument 1, a slice at a time. */
static int transform(lua_State *L, int how)
{
    size_t l, i, end;
    const char *s = luaL_checklstring(L, 1, &l);
    Box *b = llmos_box_new(L);
    char *out = llmos_box_reserve(L, b, l);
    unsigned char c;
    for (i = 0; i < l; i = end) {
        end = l - i > METER_BYTES ? i + METER_BYTES : l;
        if (how == REVERSE) {
            for (; i < end; i++)
                out[i] = s[l - 1 - i];
        } else if (how == UPPER) {
            for (; i < end; i++) {
                c = (unsigned char)s[i];
                out[i] = (char)(c >= 'a' && c <= 'z' ? c - 'a' + 'A' : c);
            }
        } else {
            for (; i < end; i++) {
                c = (unsigned char)s[i];
                out[i] = (char)(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
            }
        }
        llmos_checkpoint(L);
    }
    b->len = l;
    llmos_box_push(L, b);
    return 1;
}

static int str_upper(lua_State *L)
{
    return transform(L, UPPER);
}

static int str_lower(lua_State *L)
{
    return transform(L, LOWER);
}

static int str_reverse(lua_State *L)
{
    return transform(L, REVERSE);
}

/* -- format ----------------------------------------------------------------------------------- */
/* Flags each conversion accepts (a conversion has at most two digits of
 * width and of precision, and no '0' flag where a width may not start with 0). */
#define FLAGS_FLOAT "-+ #0"
#define FLAGS_HEX "-#0"
#define FLAGS_INT "-+ 0"
#define FLAGS_UNSIGNED "-0"
#define FLAGS_CHAR "-"
#define MAX_FORMAT 32  /* room for one conversion ('%', flags, width, precision, length modifier, letter) */
#define MAX_ITEM 120   /* longest text of a conversion other than %f's */
#define MAX_ITEM_F (110 + 308) /* %99.99f of the largest double */

static int is_digit(int c)
{
    return c >= '0' && c <= '9';
}

static int is_alpha(int c)
{
    return (c | 0x20) >= 'a' && (c | 0x20) <= 'z';
}

/* The conversion whose flags start at spec, as "%..." into form; returns
 * where its conversion letter is. */
static const char *get_format(lua_State *L, const char *spec, char *form)
{
    size_t len = strspn(spec, FLAGS_FLOAT "123456789.") + 1; /* with the letter that follows */
    if (len >= MAX_FORMAT - 10)
        luaL_error(L, "invalid format (too long)");
    form[0] = '%';
    memcpy(form + 1, spec, len);
    form[len + 1] = '\0';
    return spec + len - 1;
}

static const char *skip_two_digits(const char *s)
{
    if (is_digit((unsigned char)*s)) {
        s++;
        if (is_digit((unsigned char)*s))
            s++;
    }
    return s;
}

static void check_format(lua_State *L, const char *form, const char *flags, int precision)
{
    const char *spec = form + 1;
    spec += strspn(spec, flags);
    if (*spec != '0') { /* a width cannot start with '0' */
        spec = skip_two_digits(spec);
        if (*spec == '.' && precision)
            spec = skip_two_digits(spec + 1);
    }
    if (!is_alpha((unsigned char)*spec))
        luaL_error(L, "invalid conversion specification: '%s'", form);
}

/* Inserts a length modifier before the conversion letter. */
static void add_length_modifier(char *form, const char *modifier)
{
    size_t l = strlen(form), lm = strlen(modifier);
    char letter = form[l - 1];
    memcpy(form + l - 1, modifier, lm);
    form[l + lm - 1] = letter;
    form[l + lm] = '\0';
}

static int is_control(int c)
{
    return c < 32 || c == 127;
}

/* %q of a string: between quotes, with '"', '\\' and newlines escaped and
 * control characters as decimal escapes. */
static void add_quoted(lua_State *L, Box *b, const char *s, size_t len)
{
    size_t i, end;
    char *out;
    unsigned char c;
    llmos_box_addchar(L, b, '"');
    for (i = 0; i < len; i = end) {
        end = len - i > METER_BYTES / 4 ? i + METER_BYTES / 4 : len;
        out = llmos_box_reserve(L, b, 4 * (end - i)); /* at most 4 bytes for each */
        for (; i < end; i++) {
            c = (unsigned char)s[i];
            if (c == '"' || c == '\\' || c == '\n') {
                *out++ = '\\';
                *out++ = (char)c;
            } else if (is_control(c)) {
                /* s[i + 1] is the terminating zero after the last byte */
                out += sprintf(out, is_digit((unsigned char)s[i + 1]) ? "\\%03d" : "\\%d", c);
            } else {
                *out++ = (char)c;
            }
        }
        b->len = (size_t)(out - b->data);
        llmos_checkpoint(L);
    }
    llmos_box_addchar(L, b, '"');
}

/* %q: argument arg as a Lua literal. */
static void add_literal(lua_State *L, Box *b, int arg)
{
    char buff[MAX_ITEM];
    size_t len;
    const char *s;
    lua_Number x;
    lua_Integer n;
    switch (lua_type(L, arg)) {
    case LUA_TSTRING:
        s = lua_tolstring(L, arg, &len);
        add_quoted(L, b, s, len);
        return;
    case LUA_TNUMBER:
        if (lua_isinteger(L, arg)) {
            n = lua_tointegerx(L, arg, NULL);
            /* the smallest integer has no decimal literal (its negation overflows) */
            snprintf(buff, sizeof buff, n == LUA_MININTEGER ? "0x%llx" : "%lld", (long long)n);
        } else {
            x = lua_tonumberx(L, arg, NULL);
            if (x == (lua_Number)HUGE_VAL)
                strcpy(buff, "1e9999");
            else if (x == -(lua_Number)HUGE_VAL)
                strcpy(buff, "-1e9999");
            else if (x != x)
                strcpy(buff, "(0/0)");
            else
                snprintf(buff, sizeof buff, "%a", x); /* exact */
        }
        llmos_box_add(L, b, buff, strlen(buff));
        return;
    case LUA_TNIL:
    case LUA_TBOOLEAN:
        s = luaL_tolstring(L, arg, &len);
        llmos_box_add(L, b, s, len);
        lua_pop(L, 1);
        return;
    default:
        luaL_argerror(L, arg, "value has no literal form");
    }
}

static int str_format(lua_State *L)
{
    int top = lua_gettop(L), arg = 1, nb;
    unsigned conversions = 0;
    size_t sfl, len;
    const char *fmt = luaL_checklstring(L, arg, &sfl), *end = fmt + sfl, *percent, *s;
    const char *flags;
    char form[MAX_FORMAT], buff[MAX_ITEM_F];
    lua_Integer n;
    lua_Number x;
    const void *pointer;
    Box *b = llmos_box_new(L);
    while (fmt < end) {
        if (*fmt != '%') { /* a run of plain text (the box meters copies) */
            percent = memchr(fmt, '%', (size_t)(end - fmt));
            len = percent != NULL ? (size_t)(percent - fmt) : (size_t)(end - fmt);
            llmos_box_add(L, b, fmt, len);
            fmt += len;
            continue;
        }
        if (++conversions % 1024 == 0) /* each a few hundred ns at most */
            llmos_checkpoint(L);
        if (*++fmt == '%') { /* %% (past the end, fmt points at the terminating zero) */
            llmos_box_addchar(L, b, '%');
            fmt++;
            continue;
        }
        nb = 0;
        if (++arg > top)
            return luaL_argerror(L, arg, "no value");
        fmt = get_format(L, fmt, form);
        switch (*fmt++) {
        case 'c':
            check_format(L, form, FLAGS_CHAR, 0);
            nb = snprintf(buff, MAX_ITEM, form, (int)luaL_checkinteger(L, arg));
            break;
        case 'd':
        case 'i':
            flags = FLAGS_INT;
            goto integer;
        case 'u':
            flags = FLAGS_UNSIGNED;
            goto integer;
        case 'o':
        case 'x':
        case 'X':
            flags = FLAGS_HEX;
        integer:
            n = luaL_checkinteger(L, arg);
            check_format(L, form, flags, 1);
            add_length_modifier(form, "ll");
            nb = snprintf(buff, MAX_ITEM, form, (long long)n);
            break;
        case 'a':
        case 'A':
            check_format(L, form, FLAGS_FLOAT, 1);
            nb = snprintf(buff, MAX_ITEM, form, luaL_checknumber(L, arg));
            break;
        case 'f':
        case 'e':
        case 'E':
        case 'g':
        case 'G':
            x = luaL_checknumber(L, arg);
            check_format(L, form, FLAGS_FLOAT, 1);
            nb = snprintf(buff, MAX_ITEM_F, form, x);
            break;
        case 'p':
            pointer = lua_topointer(L, arg);
            check_format(L, form, FLAGS_CHAR, 0);
            if (pointer == NULL) { /* printf is not given NULL */
                pointer = "(null)";
                form[strlen(form) - 1] = 's';
            }
            nb = snprintf(buff, MAX_ITEM, form, pointer);
            break;
        case 'q':
            if (form[2] != '\0')
                return luaL_error(L, "specifier '%%q' cannot have modifiers");
            add_literal(L, b, arg);
            break;
        case 's':
            s = luaL_tolstring(L, arg, &len);
            if (form[2] != '\0') {
                luaL_argcheck(L, len == strlen(s), arg, "string contains zeros");
                check_format(L, form, FLAGS_CHAR, 1);
            }
            if (form[2] == '\0' || (strchr(form, '.') == NULL && len >= 100)) {
                /* the whole string (a width does not matter to one that long) */
                llmos_box_add(L, b, s, len);
            } else {
                nb = snprintf(buff, MAX_ITEM, form, s);
            }
            lua_pop(L, 1);
            break;
        default: /* also the length modifiers of C (l, h...), which Lua does not take */
            return luaL_error(L, "invalid conversion '%s' to 'format'", form);
        }
        llmos_box_add(L, b, buff, (size_t)nb);
    }
    llmos_box_push(L, b);
    return 1;
}

const luaL_Reg llmos_string_functions[] = {
    {"rep", str_rep}, {"upper", str_upper}, {"lower", str_lower}, {"reverse", str_reverse},
    {"format", str_format}, {NULL, NULL},
};
