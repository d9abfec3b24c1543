/*
 * string.find, string.match, string.gmatch and string.gsub on a pattern
 * matcher of llmos's own, written from the Lua 5.4 manual (§6.4.1), which
 * counts its steps and calls llmos_checkpoint every STEPS_PER_CHECK of them.
 *
 * Lua's matcher backtracks by recursion, and its worst case is polynomial in
 * the subject's length (exponential in the pattern's repetition items): no
 * guard on the shapes of patterns can tell the costly calls from ordinary
 * work on megabytes of text. Measuring the work as it is done can: a
 * process in a pathological match is preempted and killed as one in a Lua
 * loop would be, and every other match runs to its end.
 *
 * The matcher backtracks with an explicit stack instead of recursion: one
 * frame per pending choice (an optional item, a repetition) or capture
 * boundary, where Lua's matcher has one call of its match function. Its
 * limits are therefore Lua's: 200 nested calls ("pattern too complex") and
 * 32 captures; it tries alternatives in the same order, and so finds the same
 * matches and raises the same errors at the same point. Character classes
 * are those of the C locale (ASCII), as Lua's are in the C and UTF-8 locales.
 *
 * Why one file: the four functions share one matcher (its explicit stack,
 * captures and class tests), which is most of the file.
 */
#include <stdint.h>

#include "metered.h"

#define MAX_CAPTURES 32   /* Lua's LUA_MAXCAPTURES */
#define MAX_CALLS 200     /* Lua's MAXCCALLS: how deep its match function may recurse */
#define CAP_UNFINISHED (-1)
#define CAP_POSITION (-2)
#define ESC '%'
#define STEPS_PER_CHECK 4096 /* a few µs of matching */

/* -- Character classes (the C locale's) --------------------------------------------------- */
enum {
    K_ALPHA = 1 << 0, K_CNTRL = 1 << 1, K_DIGIT = 1 << 2, K_GRAPH = 1 << 3, K_LOWER = 1 << 4,
    K_PUNCT = 1 << 5, K_SPACE = 1 << 6, K_UPPER = 1 << 7, K_ALNUM = 1 << 8, K_XDIGIT = 1 << 9,
    K_ZERO = 1 << 10, /* %z, which Lua 5.4 still accepts for the byte 0 */
};

#define IS_LOWER(c) ((c) >= 'a' && (c) <= 'z')
#define IS_UPPER(c) ((c) >= 'A' && (c) <= 'Z')
#define IS_DIGIT(c) ((c) >= '0' && (c) <= '9')
#define IS_GRAPH(c) ((c) > 32 && (c) < 127)
#define KINDS(c)                                                                                       \
    ((IS_LOWER(c) ? K_LOWER | K_ALPHA | K_ALNUM : 0) | (IS_UPPER(c) ? K_UPPER | K_ALPHA | K_ALNUM : 0) \
     | (IS_DIGIT(c) ? K_DIGIT | K_ALNUM | K_XDIGIT : 0)                                              \
     | (((c) >= 'a' && (c) <= 'f') || ((c) >= 'A' && (c) <= 'F') ? K_XDIGIT : 0)                      \
     | ((c) < 32 || (c) == 127 ? K_CNTRL : 0) | (IS_GRAPH(c) ? K_GRAPH : 0)                          \
     | (IS_GRAPH(c) && !IS_LOWER(c) && !IS_UPPER(c) && !IS_DIGIT(c) ? K_PUNCT : 0)                   \
     | ((c) == ' ' || ((c) >= '\t' && (c) <= '\r') ? K_SPACE : 0) | ((c) == 0 ? K_ZERO : 0))
#define K4(c) KINDS(c), KINDS(c + 1), KINDS(c + 2), KINDS(c + 3)
#define K16(c) K4(c), K4(c + 4), K4(c + 8), K4(c + 12)
#define K64(c) K16(c), K16(c + 16), K16(c + 32), K16(c + 48)

static const unsigned short KIND[256] = {K64(0), K64(64), K64(128), K64(192)};

/* Whether byte c is in class %cl (cl any byte: a letter that names no class stands for itself). */
static int in_class(int c, int cl)
{
    int kind;
    switch (cl | 0x20) { /* folds only letters onto the lower-case ones */
    case 'a': kind = K_ALPHA; break;
    case 'c': kind = K_CNTRL; break;
    case 'd': kind = K_DIGIT; break;
    case 'g': kind = K_GRAPH; break;
    case 'l': kind = K_LOWER; break;
    case 'p': kind = K_PUNCT; break;
    case 's': kind = K_SPACE; break;
    case 'u': kind = K_UPPER; break;
    case 'w': kind = K_ALNUM; break;
    case 'x': kind = K_XDIGIT; break;
    case 'z': kind = K_ZERO; break;
    default: return cl == c;
    }
    return ((KIND[c] & kind) != 0) != IS_UPPER(cl);
}

/* Whether c is in the set [...] from `set` (its '[') to `close` (its ']'). */
static int in_set(int c, const char *set, const char *close)
{
    int found = 1, lo;
    const char *p = set + 1;
    if (*p == '^') {
        found = 0;
        p++;
    }
    for (; p < close; p++) {
        if (*p == ESC) {
            p++;
            if (in_class(c, (unsigned char)*p))
                return found;
        } else if (p[1] == '-' && p + 2 < close) {
            lo = (unsigned char)*p;
            p += 2;
            if (lo <= c && c <= (unsigned char)*p)
                return found;
        } else if ((unsigned char)*p == c) {
            return found;
        }
    }
    return !found;
}

/* -- The matcher -------------------------------------------------------------------------- */
typedef struct {
    const char *init;
    ptrdiff_t len; /* or CAP_UNFINISHED, CAP_POSITION */
} Capture;

typedef struct {
    const char *src_init, *src_end, *p_end;
    lua_State *L;
    int level;    /* captures opened */
    int steps;    /* left until the next checkpoint */
    Capture capture[MAX_CAPTURES];
} Matcher;

static void matcher_init(Matcher *m, lua_State *L, const char *s, size_t ls, const char *p, size_t lp)
{
    m->L = L;
    m->src_init = s;
    m->src_end = s + ls;
    m->p_end = p + lp;
    m->level = 0;
    m->steps = STEPS_PER_CHECK;
}

static void recharge(Matcher *m)
{
    m->steps = STEPS_PER_CHECK;
    llmos_checkpoint(m->L);
}

/* Counts `n` steps of work. */
static inline void meter(Matcher *m, int n)
{
    m->steps -= n;
    if (m->steps <= 0)
        recharge(m);
}

/* Work on `n` bytes (a copy, a comparison) as steps. */
static inline void meter_bytes(Matcher *m, size_t n)
{
    meter(m, n >= (size_t)STEPS_PER_CHECK << 6 ? STEPS_PER_CHECK : (int)(n >> 6));
}

/* Where the single-character class at p (a byte, '.', %x or a set) ends. */
static const char *class_end(Matcher *m, const char *p)
{
    switch (*p++) {
    case ESC:
        if (p == m->p_end)
            luaL_error(m->L, "malformed pattern (ends with '%%')");
        return p + 1;
    case '[':
        if (*p == '^')
            p++;
        do { /* the first character after '[' (or '[^') is in the set even if it is ']' */
            if (p == m->p_end)
                luaL_error(m->L, "malformed pattern (missing ']')");
            if (*p++ == ESC && p < m->p_end)
                p++;
        } while (*p != ']');
        return p + 1;
    default:
        return p;
    }
}

/* Whether the byte at s (before the subject's end) is in the class from p to ep. */
static inline int single_match(const Matcher *m, const char *s, const char *p, const char *ep)
{
    int c;
    if (s >= m->src_end)
        return 0;
    c = (unsigned char)*s;
    switch (*p) {
    case '.': return 1;
    case ESC: return in_class(c, (unsigned char)p[1]);
    case '[': return in_set(c, p, ep - 1);
    default: return (unsigned char)*p == c;
    }
}

/* %bxy at s: where the balanced run ends, or NULL. */
static const char *match_balance(Matcher *m, const char *s, const char *p)
{
    int open, close, depth = 1;
    if (p >= m->p_end - 1)
        luaL_error(m->L, "malformed pattern (missing arguments to '%%b')");
    if (s >= m->src_end || *s != *p)
        return NULL;
    open = *p;
    close = p[1];
    while (++s < m->src_end) {
        if (--m->steps <= 0)
            recharge(m);
        if (*s == close) {
            if (--depth == 0)
                return s + 1;
        } else if (*s == open) {
            depth++;
        }
    }
    return NULL;
}

/* %1-%9 at s: where the repeated capture ends, or NULL. */
static const char *match_back_reference(Matcher *m, const char *s, int digit)
{
    int l = digit - '1';
    size_t len;
    if (l < 0 || l >= m->level || m->capture[l].len == CAP_UNFINISHED)
        luaL_error(m->L, "invalid capture index %%%d", l + 1);
    len = (size_t)m->capture[l].len; /* a position capture's is huge: it never matches */
    if ((size_t)(m->src_end - s) < len)
        return NULL;
    meter_bytes(m, len);
    return memcmp(m->capture[l].init, s, len) == 0 ? s + len : NULL;
}

/* A frame stands for one of the recursive calls of Lua's matcher: what to
 * undo, or the next alternative to try, when the match after it fails. */
enum { OPENED, CLOSED, OPTIONAL, GREEDY, LAZY };

typedef struct {
    int kind;
    int capture;          /* OPENED, CLOSED: which */
    const char *s;        /* OPTIONAL: where the item was; GREEDY: after the repetitions that must be; LAZY: the position tried */
    const char *p, *ep;   /* the item and its suffix */
    size_t count;         /* GREEDY: repetitions tried now */
} Frame;

#define PUSH(frame_kind)                                          \
    do {                                                          \
        if (depth == MAX_CALLS - 1)                               \
            luaL_error(m->L, "pattern too complex");              \
        f = &frames[depth++];                                     \
        f->kind = (frame_kind);                                   \
    } while (0)

/* The end of the match of pattern p (up to m->p_end) at s, or NULL; the
 * captures are left in m. */
static const char *do_match(Matcher *m, const char *s, const char *p)
{
    Frame frames[MAX_CALLS - 1], *f;
    int depth = 0, l;
    const char *ep;
    size_t count;
    for (;;) {
        if (--m->steps <= 0)
            recharge(m);
        if (p == m->p_end)
            return s;
        switch (*p) {
        case '(':
            if (m->level >= MAX_CAPTURES)
                luaL_error(m->L, "too many captures");
            m->capture[m->level].init = s;
            m->capture[m->level].len = p[1] == ')' ? CAP_POSITION : CAP_UNFINISHED;
            p += p[1] == ')' ? 2 : 1;
            m->level++;
            PUSH(OPENED);
            continue;
        case ')':
            for (l = m->level - 1; l >= 0 && m->capture[l].len != CAP_UNFINISHED; l--)
                ;
            if (l < 0)
                luaL_error(m->L, "invalid pattern capture");
            m->capture[l].len = s - m->capture[l].init;
            PUSH(CLOSED);
            f->capture = l;
            p++;
            continue;
        case '$':
            if (p + 1 == m->p_end) {
                if (s == m->src_end)
                    return s;
                goto fail;
            }
            goto single;
        case ESC:
            switch (p[1]) {
            case 'b':
                s = match_balance(m, s, p + 2);
                if (s == NULL)
                    goto fail;
                p += 4;
                continue;
            case 'f': {
                int before, at;
                p += 2;
                if (*p != '[')
                    luaL_error(m->L, "missing '[' after '%%f' in pattern");
                ep = class_end(m, p);
                before = s == m->src_init ? 0 : (unsigned char)s[-1];
                at = s < m->src_end ? (unsigned char)*s : 0;
                if (in_set(before, p, ep - 1) || !in_set(at, p, ep - 1))
                    goto fail;
                p = ep;
                continue;
            }
            case '0': case '1': case '2': case '3': case '4':
            case '5': case '6': case '7': case '8': case '9':
                s = match_back_reference(m, s, (unsigned char)p[1]);
                if (s == NULL)
                    goto fail;
                p += 2;
                continue;
            default:
                goto single;
            }
        default:
        single:
            ep = class_end(m, p);
            if (!single_match(m, s, p, ep)) {
                if (*ep == '*' || *ep == '?' || *ep == '-') { /* zero repetitions will do */
                    p = ep + 1;
                    continue;
                }
                goto fail;
            }
            switch (*ep) {
            case '?':
                PUSH(OPTIONAL);
                f->s = s;
                f->ep = ep;
                s++;
                p = ep + 1;
                continue;
            case '+':
                s++; /* one is there; then as '*' */
                /* fall through */
            case '*':
                for (count = 0; single_match(m, s + count, p, ep); count++)
                    if (--m->steps <= 0)
                        recharge(m);
                PUSH(GREEDY);
                f->s = s;
                f->ep = ep;
                f->count = count;
                s += count;
                p = ep + 1;
                continue;
            case '-':
                PUSH(LAZY);
                f->s = s;
                f->p = p;
                f->ep = ep;
                p = ep + 1;
                continue;
            default:
                s++;
                p = ep;
                continue;
            }
        }
    fail: /* back to the latest choice, undoing the captures on the way */
        for (;;) {
            if (--m->steps <= 0)
                recharge(m);
            if (depth == 0)
                return NULL;
            f = &frames[depth - 1];
            if (f->kind == OPENED) {
                m->level--;
            } else if (f->kind == CLOSED) {
                m->capture[f->capture].len = CAP_UNFINISHED;
            } else if (f->kind == OPTIONAL) {
                s = f->s;
                p = f->ep + 1;
                depth--;
                break;
            } else if (f->kind == GREEDY) {
                if (f->count > 0) {
                    s = f->s + --f->count;
                    p = f->ep + 1;
                    break;
                }
            } else if (single_match(m, f->s, f->p, f->ep)) { /* LAZY: one more repetition */
                s = ++f->s;
                p = f->ep + 1;
                break;
            }
            depth--;
        }
    }
}

/* -- Captures ----------------------------------------------------------------------------- */
/* Pushes capture i (the whole match s..e if there are none and i is 0). */
static void push_capture(Matcher *m, int i, const char *s, const char *e)
{
    if (i >= m->level) {
        if (i != 0)
            luaL_error(m->L, "invalid capture index %%%d", i + 1);
        lua_pushlstring(m->L, s, (size_t)(e - s));
        return;
    }
    if (m->capture[i].len == CAP_UNFINISHED)
        luaL_error(m->L, "unfinished capture");
    if (m->capture[i].len == CAP_POSITION)
        lua_pushinteger(m->L, (m->capture[i].init - m->src_init) + 1);
    else
        lua_pushlstring(m->L, m->capture[i].init, (size_t)m->capture[i].len);
}

/* Pushes the captures (or the whole match s..e, unless s is NULL); returns how many. */
static int push_captures(Matcher *m, const char *s, const char *e)
{
    int i, n = m->level == 0 && s != NULL ? 1 : m->level;
    luaL_checkstack(m->L, n, "too many captures");
    for (i = 0; i < n; i++)
        push_capture(m, i, s, e);
    return n;
}

/* -- find, match ---------------------------------------------------------------------------- */
/* A string position (negative: from the end) as an index from 1, clamped below. */
static size_t start_position(lua_Integer pos, size_t len)
{
    if (pos > 0)
        return (size_t)pos;
    if (pos == 0 || pos < -(lua_Integer)len)
        return 1;
    return len + (size_t)pos + 1;
}

static const unsigned char IS_SPECIAL[256] = {
    ['^'] = 1, ['$'] = 1, ['*'] = 1, ['+'] = 1, ['?'] = 1, ['.'] = 1, ['('] = 1, ['['] = 1, ['%'] = 1, ['-'] = 1,
};

static int has_specials(lua_State *L, const char *p, size_t lp)
{
    size_t i;
    for (i = 0; i < lp; i++) {
        if (IS_SPECIAL[(unsigned char)p[i]])
            return 1;
        if ((i + 1) % METER_BYTES == 0)
            llmos_checkpoint(L);
    }
    return 0;
}

/* The first place of p (lp bytes) in s (ls bytes), as Lua's plain find: the
 * first byte by memchr, then the rest compared. */
static const char *find_plain(lua_State *L, const char *s, size_t ls, const char *p, size_t lp)
{
    const char *last, *at;
    size_t span, work = 0;
    if (lp == 0)
        return s;
    if (lp > ls)
        return NULL;
    last = s + (ls - lp);
    while (s <= last) {
        span = (size_t)(last - s) + 1;
        if (span > METER_BYTES)
            span = METER_BYTES;
        at = memchr(s, p[0], span);
        work += at == NULL ? span : (size_t)(at - s) + lp;
        if (work >= METER_BYTES) {
            work = 0;
            llmos_checkpoint(L);
        }
        if (at == NULL) {
            s += span;
        } else {
            if (memcmp(at + 1, p + 1, lp - 1) == 0)
                return at;
            s = at + 1;
        }
    }
    return NULL;
}

static int find_or_match(lua_State *L, int find)
{
    size_t ls, lp;
    const char *s = luaL_checklstring(L, 1, &ls);
    const char *p = luaL_checklstring(L, 2, &lp);
    size_t init = start_position(luaL_optinteger(L, 3, 1), ls) - 1;
    const char *s1, *e;
    Matcher m;
    int anchor;
    if (init > ls) { /* starts after the end */
        lua_pushnil(L);
        return 1;
    }
    if (find && (lua_toboolean(L, 4) || !has_specials(L, p, lp))) {
        e = find_plain(L, s + init, ls - init, p, lp);
        if (e != NULL) {
            lua_pushinteger(L, (e - s) + 1);
            lua_pushinteger(L, (lua_Integer)((size_t)(e - s) + lp));
            return 2;
        }
    } else {
        s1 = s + init;
        anchor = *p == '^';
        if (anchor) {
            p++;
            lp--;
        }
        matcher_init(&m, L, s, ls, p, lp);
        do {
            m.level = 0;
            if ((e = do_match(&m, s1, p)) != NULL) {
                if (!find)
                    return push_captures(&m, s1, e);
                lua_pushinteger(L, (s1 - s) + 1);
                lua_pushinteger(L, e - s);
                return push_captures(&m, NULL, NULL) + 2;
            }
        } while (s1++ < m.src_end && !anchor);
    }
    lua_pushnil(L);
    return 1;
}

static int str_find(lua_State *L)
{
    return find_or_match(L, 1);
}

static int str_match(lua_State *L)
{
    return find_or_match(L, 0);
}

/* -- gmatch --------------------------------------------------------------------------------- */
typedef struct {
    const char *src;       /* where the next search starts */
    const char *lastmatch; /* where the last match ended (an empty match there is skipped) */
} Gmatch;

/* Upvalues: the subject, the pattern, the Gmatch. */
static int gmatch_next(lua_State *L)
{
    size_t ls, lp;
    const char *s = lua_tolstring(L, lua_upvalueindex(1), &ls);
    const char *p = lua_tolstring(L, lua_upvalueindex(2), &lp);
    Gmatch *g = lua_touserdata(L, lua_upvalueindex(3));
    const char *src, *e;
    Matcher m;
    matcher_init(&m, L, s, ls, p, lp);
    for (src = g->src; src <= m.src_end; src++) {
        m.level = 0;
        if ((e = do_match(&m, src, p)) != NULL && e != g->lastmatch) {
            g->src = g->lastmatch = e;
            return push_captures(&m, src, e);
        }
    }
    g->src = src;
    return 0;
}

static int str_gmatch(lua_State *L)
{
    size_t ls;
    const char *s = luaL_checklstring(L, 1, &ls);
    size_t init;
    Gmatch *g;
    luaL_checkstring(L, 2);
    init = start_position(luaL_optinteger(L, 3, 1), ls) - 1;
    if (init > ls)
        init = ls + 1; /* nothing to find, and no pointer beyond that */
    lua_settop(L, 2);
    g = lua_newuserdatauv(L, sizeof(Gmatch), 0);
    g->src = s + init;
    g->lastmatch = NULL;
    lua_pushcclosure(L, gmatch_next, 3);
    return 1;
}

/* -- gsub ------------------------------------------------------------------------------------- */
/* Appends the replacement string (argument 3) for the match s..e: %0-%9 are
 * captures, %% a '%'. */
static void add_replacement_string(Matcher *m, Box *b, const char *s, const char *e)
{
    lua_State *L = m->L;
    size_t l;
    const char *r = lua_tolstring(L, 3, &l), *esc;
    while ((esc = memchr(r, ESC, l)) != NULL) {
        llmos_box_add(L, b, r, (size_t)(esc - r));
        esc++; /* the character after the '%' (the string's terminating zero after a final '%') */
        if (*esc == ESC) {
            llmos_box_addchar(L, b, ESC);
        } else if (*esc == '0') {
            llmos_box_add(L, b, s, (size_t)(e - s));
        } else if (IS_DIGIT(*esc)) {
            size_t len;
            const char *text;
            push_capture(m, *esc - '1', s, e);
            text = lua_tolstring(L, -1, &len); /* a position capture as its number */
            llmos_box_add(L, b, text, len);
            lua_pop(L, 1);
        } else {
            luaL_error(L, "invalid use of '%c' in replacement string", ESC);
        }
        l -= (size_t)(esc + 1 - r);
        r = esc + 1;
    }
    llmos_box_add(L, b, r, l);
}

/* Appends the replacement of the match s..e (of replacement type `tr`);
 * whether it changed anything. */
static int add_replacement(Matcher *m, Box *b, const char *s, const char *e, int tr)
{
    lua_State *L = m->L;
    size_t len;
    const char *text;
    if (tr == LUA_TFUNCTION) {
        int n;
        lua_pushvalue(L, 3);
        n = push_captures(m, s, e);
        lua_call(L, n, 1);
    } else if (tr == LUA_TTABLE) {
        push_capture(m, 0, s, e);
        lua_gettable(L, 3);
    } else {
        add_replacement_string(m, b, s, e);
        return 1;
    }
    if (!lua_toboolean(L, -1)) { /* nil or false: keep the match */
        lua_pop(L, 1);
        llmos_box_add(L, b, s, (size_t)(e - s));
        return 0;
    }
    if (!lua_isstring(L, -1))
        return luaL_error(L, "invalid replacement value (a %s)", luaL_typename(L, -1));
    text = lua_tolstring(L, -1, &len);
    llmos_box_add(L, b, text, len);
    lua_pop(L, 1);
    return 1;
}

static int str_gsub(lua_State *L)
{
    size_t srcl, lp;
    const char *src = luaL_checklstring(L, 1, &srcl);
    const char *p = luaL_checklstring(L, 2, &lp);
    const char *lastmatch = NULL, *kept, *e;
    int tr = lua_type(L, 3);
    lua_Integer max_s = luaL_optinteger(L, 4, (lua_Integer)srcl + 1);
    int anchor = *p == '^', changed = 0;
    lua_Integer n = 0;
    Matcher m;
    Box box, *b;
    if (!(tr == LUA_TNUMBER || tr == LUA_TSTRING || tr == LUA_TFUNCTION || tr == LUA_TTABLE))
        luaL_typeerror(L, 3, "string/function/table");
    lua_settop(L, 4);
    b = &box;
    llmos_box_init(L, b);
    if (anchor) {
        p++;
        lp--;
    }
    matcher_init(&m, L, src, srcl, p, lp);
    kept = src; /* the text since the last match, copied at the next one */
    while (n < max_s) {
        m.level = 0;
        if ((e = do_match(&m, src, p)) != NULL && e != lastmatch) {
            n++;
            llmos_box_add(L, b, kept, (size_t)(src - kept));
            changed = add_replacement(&m, b, src, e, tr) | changed;
            src = lastmatch = kept = e;
        } else if (src < m.src_end) {
            src++;
        } else {
            break;
        }
        if (anchor)
            break;
    }
    if (!changed) {
        lua_pushvalue(L, 1);
    } else {
        llmos_box_add(L, b, kept, (size_t)(m.src_end - kept));
        llmos_box_push(L, b);
    }
    lua_pushinteger(L, n);
    return 2;
}

const luaL_Reg llmos_pattern_functions[] = {
    {"find", str_find}, {"match", str_match}, {"gmatch", str_gmatch}, {"gsub", str_gsub}, {NULL, NULL},
};
