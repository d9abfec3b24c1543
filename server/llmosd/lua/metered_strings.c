/*
 * The string library's functions that can run long in C, metered (see
 * lua/metered.h), written from the Lua 5.4 manual (§6.4) and checked against
 * stock Lua by tests/test_lua_metered.py:
 *   - rep: time and memory in the result's length, which Lua lets be huge
 *     with empty pieces (2^62 copies of '' looped for ever); here an empty
 *     result is instant and a long one is copied in metered slices;
 *   - upper, lower, reverse: a pass over a string of any length;
 *   - format: a pass over the format (any length), %q quoting a string byte
 *     by byte, %s copying strings of any length;
 *   - pack, unpack, packsize: a pass over the format, padding of any size;
 *   - char: up to LUAI_MAXSTACK (a million) arguments, checked one by one.
 * Not metered: len, sub (one copy), byte (at most LUAI_MAXSTACK values, each
 * a few ns), and the pattern functions' (lua/metered_patterns.c).
 * Character classes are the C locale's (ASCII), as Lua's in the C and UTF-8
 * locales.
 *
 * Why one file: the string library's metered functions, each short, share
 * the metered buffer and the format/pack option parsers.
 */
#include <limits.h>
#include <math.h>
#include <stdio.h>

#include "metered.h"

/* Lua's limit on the strings that rep, format items and pack make: INT_MAX. */
#define MAX_STRING ((size_t)INT_MAX)

/* -- rep ---------------------------------------------------------------------------------- */
static int str_rep(lua_State *L)
{
    size_t l, lsep, total, done, period, chunk, room, back;
    const char *s = luaL_checklstring(L, 1, &l);
    lua_Integer n = luaL_checkinteger(L, 2);
    const char *sep = luaL_optlstring(L, 3, "", &lsep);
    Box box, *b;
    if (n <= 0 || l + lsep == 0) { /* (l + lsep == 0: n empty pieces, however many) */
        lua_pushliteral(L, "");
        return 1;
    }
    if (l + lsep < l || l + lsep > MAX_STRING / (lua_Unsigned)n)
        return luaL_error(L, "resulting string too large");
    period = l + lsep;
    total = (size_t)n * l + (size_t)(n - 1) * lsep;
    b = &box;
    llmos_box_init(L, b);
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
    Box box, *b = &box;
    llmos_box_init(L, b);
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

/* -- char ----------------------------------------------------------------------------------- */
static int str_char(lua_State *L)
{
    int n = lua_gettop(L), i;
    lua_Unsigned c;
    Box box, *b = &box;
    char *out;
    llmos_box_init(L, b);
    out = llmos_box_reserve(L, b, (size_t)n);
    for (i = 1; i <= n; i++) {
        c = (lua_Unsigned)luaL_checkinteger(L, i);
        luaL_argcheck(L, c <= (lua_Unsigned)UCHAR_MAX, i, "value out of range");
        out[i - 1] = (char)c;
        if (i % (METER_BYTES / 4) == 0)
            llmos_checkpoint(L);
    }
    b->len = (size_t)n;
    llmos_box_push(L, b);
    return 1;
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
    Box box, *b = &box;
    llmos_box_init(L, b);
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

/* -- pack, unpack, packsize ------------------------------------------------------------------ */
/* The formats of §6.4.2: a pass over the format, with fixed-size strings padded
 * to any size; each option and each METER_BYTES of padding counts. */
#define MAX_INT_SIZE 16                  /* the largest size of i[n] and s[n] */
#define INT_SIZE ((int)sizeof(lua_Integer))
#define OPTIONS_PER_CHECK 4096
#define NATIVE_LITTLE 1                  /* x86-64 and arm64 as Linux runs them */
#define NATIVE_MAX_ALIGN 8               /* the strictest alignment of a C scalar */

typedef enum { K_INT, K_UINT, K_FLOAT, K_NUMBER, K_DOUBLE, K_CHAR, K_STRING, K_ZSTR, K_PADDING, K_PADDALIGN, K_NOP } Kind;

typedef struct {
    lua_State *L;
    int little;    /* byte order */
    int max_align;
    unsigned options; /* read so far, for the checkpoints */
} Header;

static void header_init(lua_State *L, Header *h)
{
    h->L = L;
    h->little = NATIVE_LITTLE;
    h->max_align = 1;
    h->options = 0;
}

/* A decimal number at *fmt (the default if there is none), kept below INT_MAX. */
static int read_number(const char **fmt, int otherwise)
{
    int a = 0;
    if (!is_digit((unsigned char)**fmt))
        return otherwise;
    do {
        a = a * 10 + (*((*fmt)++) - '0');
    } while (is_digit((unsigned char)**fmt) && a <= ((int)MAX_STRING - 9) / 10);
    return a;
}

static int read_size(Header *h, const char **fmt, int otherwise)
{
    int size = read_number(fmt, otherwise);
    if (size > MAX_INT_SIZE || size <= 0)
        return luaL_error(h->L, "integral size (%d) out of limits [1,%d]", size, MAX_INT_SIZE);
    return size;
}

/* The option at *fmt and its size; advances *fmt past it. */
static Kind read_option(Header *h, const char **fmt, int *size)
{
    int option = *((*fmt)++);
    *size = 0;
    switch (option) {
    case 'b': *size = 1; return K_INT;
    case 'B': *size = 1; return K_UINT;
    case 'h': *size = (int)sizeof(short); return K_INT;
    case 'H': *size = (int)sizeof(short); return K_UINT;
    case 'l': *size = (int)sizeof(long); return K_INT;
    case 'L': *size = (int)sizeof(long); return K_UINT;
    case 'j': *size = INT_SIZE; return K_INT;
    case 'J': *size = INT_SIZE; return K_UINT;
    case 'T': *size = (int)sizeof(size_t); return K_UINT;
    case 'f': *size = (int)sizeof(float); return K_FLOAT;
    case 'n': *size = (int)sizeof(lua_Number); return K_NUMBER;
    case 'd': *size = (int)sizeof(double); return K_DOUBLE;
    case 'i': *size = read_size(h, fmt, (int)sizeof(int)); return K_INT;
    case 'I': *size = read_size(h, fmt, (int)sizeof(int)); return K_UINT;
    case 's': *size = read_size(h, fmt, (int)sizeof(size_t)); return K_STRING;
    case 'c':
        *size = read_number(fmt, -1);
        if (*size == -1)
            luaL_error(h->L, "missing size for format option 'c'");
        return K_CHAR;
    case 'z': return K_ZSTR;
    case 'x': *size = 1; return K_PADDING;
    case 'X': return K_PADDALIGN;
    case ' ': break;
    case '<': h->little = 1; break;
    case '>': h->little = 0; break;
    case '=': h->little = NATIVE_LITTLE; break;
    case '!': h->max_align = read_size(h, fmt, NATIVE_MAX_ALIGN); break;
    default: luaL_error(h->L, "invalid format option '%c'", option);
    }
    return K_NOP;
}

/* The next option, its size, and the padding that aligns it at `total`. */
static Kind read_item(Header *h, size_t total, const char **fmt, int *size, int *padding)
{
    Kind kind = read_option(h, fmt, size);
    int align = *size; /* as a rule, alignment follows size */
    if (++h->options % OPTIONS_PER_CHECK == 0)
        llmos_checkpoint(h->L);
    if (kind == K_PADDALIGN && (**fmt == '\0' || read_option(h, fmt, &align) == K_CHAR || align == 0))
        luaL_argerror(h->L, 1, "invalid next option for option 'X'");
    if (align <= 1 || kind == K_CHAR) {
        *padding = 0;
    } else {
        if (align > h->max_align)
            align = h->max_align;
        if ((align & (align - 1)) != 0)
            luaL_argerror(h->L, 1, "format asks for alignment not power of 2");
        *padding = (align - (int)(total & (size_t)(align - 1))) & (align - 1);
    }
    return kind;
}

/* n as `size` bytes (sign-extended beyond lua_Integer's if negative). */
static void pack_int(lua_State *L, Box *b, lua_Unsigned n, int little, int size, int negative)
{
    char *out = llmos_box_reserve(L, b, (size_t)size);
    int i;
    for (i = 0; i < size; i++) {
        out[little ? i : size - 1 - i] = (char)(i < INT_SIZE ? n & 0xFF : negative ? 0xFF : 0);
        n = i < INT_SIZE ? n >> 8 : n;
    }
    b->len += (size_t)size;
}

static void copy_with_order(char *dest, const char *src, int size, int little)
{
    int i;
    for (i = 0; i < size; i++)
        dest[i] = src[little == NATIVE_LITTLE ? i : size - 1 - i];
}

/* n zero bytes. */
static void add_zeros(lua_State *L, Box *b, size_t n)
{
    size_t piece;
    llmos_box_reserve(L, b, n);
    while (n > 0) {
        piece = n < METER_BYTES ? n : METER_BYTES;
        memset(b->data + b->len, 0, piece);
        b->len += piece;
        n -= piece;
        llmos_checkpoint(L);
    }
}

static int str_pack(lua_State *L)
{
    Header h;
    const char *fmt = luaL_checkstring(L, 1), *s;
    int arg = 1, size, padding;
    size_t total = 0, len;
    lua_Integer n;
    Box box, *b;
    header_init(L, &h);
    lua_pushnil(L); /* the arguments end here */
    b = &box;
    llmos_box_init(L, b);
    while (*fmt != '\0') {
        Kind kind = read_item(&h, total, &fmt, &size, &padding);
        total += (size_t)padding + (size_t)size;
        add_zeros(L, b, (size_t)padding);
        arg++;
        switch (kind) {
        case K_INT:
            n = luaL_checkinteger(L, arg);
            if (size < INT_SIZE) {
                lua_Integer limit = (lua_Integer)1 << (size * 8 - 1);
                luaL_argcheck(L, -limit <= n && n < limit, arg, "integer overflow");
            }
            pack_int(L, b, (lua_Unsigned)n, h.little, size, n < 0);
            break;
        case K_UINT:
            n = luaL_checkinteger(L, arg);
            if (size < INT_SIZE)
                luaL_argcheck(L, (lua_Unsigned)n < ((lua_Unsigned)1 << (size * 8)), arg, "unsigned overflow");
            pack_int(L, b, (lua_Unsigned)n, h.little, size, 0);
            break;
        case K_FLOAT: {
            float f = (float)luaL_checknumber(L, arg);
            copy_with_order(llmos_box_reserve(L, b, sizeof f), (const char *)&f, (int)sizeof f, h.little);
            b->len += sizeof f;
            break;
        }
        case K_NUMBER:
        case K_DOUBLE: {
            double f = (double)luaL_checknumber(L, arg);
            copy_with_order(llmos_box_reserve(L, b, sizeof f), (const char *)&f, (int)sizeof f, h.little);
            b->len += sizeof f;
            break;
        }
        case K_CHAR:
            s = luaL_checklstring(L, arg, &len);
            luaL_argcheck(L, len <= (size_t)size, arg, "string longer than given size");
            llmos_box_add(L, b, s, len);
            add_zeros(L, b, (size_t)size - len);
            break;
        case K_STRING:
            s = luaL_checklstring(L, arg, &len);
            luaL_argcheck(L, size >= (int)sizeof(size_t) || len < ((size_t)1 << (size * 8)), arg,
                          "string length does not fit in given size");
            pack_int(L, b, (lua_Unsigned)len, h.little, size, 0);
            llmos_box_add(L, b, s, len);
            total += len;
            break;
        case K_ZSTR:
            s = luaL_checklstring(L, arg, &len);
            luaL_argcheck(L, memchr(s, '\0', len) == NULL, arg, "string contains zeros");
            llmos_box_add(L, b, s, len);
            llmos_box_addchar(L, b, '\0');
            total += len + 1;
            break;
        case K_PADDING:
            llmos_box_addchar(L, b, '\0');
            /* fall through */
        case K_PADDALIGN:
        case K_NOP:
            arg--; /* took no argument */
            break;
        }
    }
    llmos_box_push(L, b);
    return 1;
}

static int str_packsize(lua_State *L)
{
    Header h;
    const char *fmt = luaL_checkstring(L, 1);
    size_t total = 0;
    int size, padding;
    header_init(L, &h);
    while (*fmt != '\0') {
        Kind kind = read_item(&h, total, &fmt, &size, &padding);
        luaL_argcheck(L, kind != K_STRING && kind != K_ZSTR, 1, "variable-length format");
        size += padding;
        luaL_argcheck(L, total <= MAX_STRING - (size_t)size, 1, "format result too large");
        total += (size_t)size;
    }
    lua_pushinteger(L, (lua_Integer)total);
    return 1;
}

/* The integer of `size` bytes at str; an error if it does not fit in a lua_Integer. */
static lua_Integer unpack_int(lua_State *L, const char *str, int little, int size, int is_signed)
{
    lua_Unsigned res = 0, mask;
    int i, limit = size <= INT_SIZE ? size : INT_SIZE, extra;
    for (i = limit - 1; i >= 0; i--) {
        res <<= 8;
        res |= (lua_Unsigned)(unsigned char)str[little ? i : size - 1 - i];
    }
    if (size < INT_SIZE) {
        if (is_signed) {
            mask = (lua_Unsigned)1 << (size * 8 - 1);
            res = (res ^ mask) - mask; /* sign extension */
        }
    } else if (size > INT_SIZE) { /* the bytes beyond must only extend the sign */
        extra = !is_signed || (lua_Integer)res >= 0 ? 0 : 0xFF;
        for (i = limit; i < size; i++)
            if ((unsigned char)str[little ? i : size - 1 - i] != extra)
                luaL_error(L, "%d-byte integer does not fit into Lua Integer", size);
    }
    return (lua_Integer)res;
}

static int str_unpack(lua_State *L)
{
    Header h;
    const char *fmt = luaL_checkstring(L, 1);
    size_t ld, pos, len;
    const char *data = luaL_checklstring(L, 2, &ld), *zero;
    lua_Integer init = luaL_optinteger(L, 3, 1);
    int n = 0, size, padding;
    /* the initial position, from the end if negative */
    pos = (init > 0 ? (size_t)init : init == 0 || init < -(lua_Integer)ld ? 1 : ld + (size_t)init + 1) - 1;
    luaL_argcheck(L, pos <= ld, 3, "initial position out of string");
    header_init(L, &h);
    while (*fmt != '\0') {
        Kind kind = read_item(&h, pos, &fmt, &size, &padding);
        luaL_argcheck(L, (size_t)padding + (size_t)size <= ld - pos, 2, "data string too short");
        pos += (size_t)padding;
        luaL_checkstack(L, 2, "too many results"); /* the item and the next position */
        n++;
        switch (kind) {
        case K_INT:
        case K_UINT:
            lua_pushinteger(L, unpack_int(L, data + pos, h.little, size, kind == K_INT));
            break;
        case K_FLOAT: {
            float f;
            copy_with_order((char *)&f, data + pos, (int)sizeof f, h.little);
            lua_pushnumber(L, (lua_Number)f);
            break;
        }
        case K_NUMBER:
        case K_DOUBLE: {
            double f;
            copy_with_order((char *)&f, data + pos, (int)sizeof f, h.little);
            lua_pushnumber(L, (lua_Number)f);
            break;
        }
        case K_CHAR:
            lua_pushlstring(L, data + pos, (size_t)size);
            break;
        case K_STRING: {
            lua_Unsigned slen = (lua_Unsigned)unpack_int(L, data + pos, h.little, size, 0);
            luaL_argcheck(L, slen <= ld - pos - (size_t)size, 2, "data string too short");
            lua_pushlstring(L, data + pos + size, (size_t)slen);
            pos += (size_t)slen;
            break;
        }
        case K_ZSTR:
            /* the terminating zero of data ends the search at worst */
            for (len = 0; (zero = memchr(data + pos + len, '\0', METER_BYTES)) == NULL; len += METER_BYTES)
                llmos_checkpoint(L);
            len = (size_t)(zero - (data + pos));
            luaL_argcheck(L, pos + len < ld, 2, "unfinished string for format 'z'");
            lua_pushlstring(L, data + pos, len);
            pos += len + 1;
            break;
        case K_PADDALIGN:
        case K_PADDING:
        case K_NOP:
            n--; /* gave no result */
            break;
        }
        pos += (size_t)size;
    }
    lua_pushinteger(L, (lua_Integer)pos + 1);
    return n + 1;
}

const luaL_Reg llmos_string_functions[] = {
    {"rep", str_rep}, {"char", str_char}, {"upper", str_upper}, {"lower", str_lower}, {"reverse", str_reverse},
    {"format", str_format}, {"pack", str_pack}, {"packsize", str_packsize}, {"unpack", str_unpack}, {NULL, NULL},
};
