/*
 * The table library's functions that can run long in C, metered (see
 * lua/metered.h), written from the Lua 5.4 manual (§6.6) and checked against
 * stock Lua by tests/test_lua_metered.py. They go through lua_geti/lua_seti,
 * as Lua's do, so that metamethods apply; a metamethod that is a Lua function
 * is interrupted by the hook, but the number of elements is the caller's to
 * choose (a __len answering 2^62, an __index chain):
 *   - concat, insert, remove, move, unpack: a loop over a range of elements;
 *   - sort: Lua's algorithm (a quicksort whose pivot is the median of three,
 *     randomized on large ranges), so that it calls the order function in the
 *     same sequence and raises "invalid order function for sorting" where Lua
 *     does, metered by comparison;
 *   - pack: up to LUAI_MAXSTACK (a million) values stored one by one.
 * Each loop checks in every ELEMENTS_PER_CHECK elements (or comparisons).
 */
#include <limits.h>
#include <time.h>

#include "metered.h"

#define ELEMENTS_PER_CHECK 1024 /* each may run a chain of __index/__newindex tables */

enum { TAB_R = 1, TAB_W = 2, TAB_L = 4, TAB_RW = TAB_R | TAB_W };

/* Counts one element; checks in every ELEMENTS_PER_CHECK. */
static inline void count_element(lua_State *L, unsigned *countdown)
{
    if (--*countdown == 0) {
        *countdown = ELEMENTS_PER_CHECK;
        llmos_checkpoint(L);
    }
}

static int has_metamethod(lua_State *L, const char *key, int n)
{
    lua_pushstring(L, key);
    return lua_rawget(L, -n) != LUA_TNIL;
}

/* Argument arg must be a table, or have the metamethods for what `what` needs. */
static void check_table(lua_State *L, int arg, int what)
{
    int n = 1; /* what to pop: the metatable and the metamethods looked up */
    if (lua_type(L, arg) == LUA_TTABLE)
        return;
    if (lua_getmetatable(L, arg) && (!(what & TAB_R) || has_metamethod(L, "__index", ++n))
        && (!(what & TAB_W) || has_metamethod(L, "__newindex", ++n))
        && (!(what & TAB_L) || has_metamethod(L, "__len", ++n)))
        lua_pop(L, n);
    else
        luaL_checktype(L, arg, LUA_TTABLE); /* raises */
}

static lua_Integer checked_length(lua_State *L, int arg, int what)
{
    check_table(L, arg, what | TAB_L);
    return luaL_len(L, arg);
}

/* -- insert, remove --------------------------------------------------------------------------- */
static int tab_insert(lua_State *L)
{
    lua_Integer pos, i, e = checked_length(L, 1, TAB_RW);
    unsigned countdown = ELEMENTS_PER_CHECK;
    e = (lua_Integer)((lua_Unsigned)e + 1u); /* the first empty place (wrapping as Lua's) */
    switch (lua_gettop(L)) {
    case 2:
        pos = e;
        break;
    case 3:
        pos = luaL_checkinteger(L, 2);
        /* pos in [1, e] */
        luaL_argcheck(L, (lua_Unsigned)pos - 1u < (lua_Unsigned)e, 2, "position out of bounds");
        for (i = e; i > pos; i--) { /* t[i] = t[i - 1] */
            lua_geti(L, 1, i - 1);
            lua_seti(L, 1, i);
            count_element(L, &countdown);
        }
        break;
    default:
        return luaL_error(L, "wrong number of arguments to 'insert'");
    }
    lua_seti(L, 1, pos);
    return 0;
}

static int tab_remove(lua_State *L)
{
    lua_Integer size = checked_length(L, 1, TAB_RW);
    lua_Integer pos = luaL_optinteger(L, 2, size);
    unsigned countdown = ELEMENTS_PER_CHECK;
    if (pos != size) /* pos in [1, size + 1] */
        luaL_argcheck(L, (lua_Unsigned)pos - 1u <= (lua_Unsigned)size, 2, "position out of bounds");
    lua_geti(L, 1, pos);
    for (; pos < size; pos++) { /* t[pos] = t[pos + 1] */
        lua_geti(L, 1, pos + 1);
        lua_seti(L, 1, pos);
        count_element(L, &countdown);
    }
    lua_pushnil(L);
    lua_seti(L, 1, pos);
    return 1;
}

/* -- move ------------------------------------------------------------------------------------- */
static int tab_move(lua_State *L)
{
    lua_Integer f = luaL_checkinteger(L, 2);
    lua_Integer e = luaL_checkinteger(L, 3);
    lua_Integer t = luaL_checkinteger(L, 4);
    lua_Integer n, i;
    int tt = !lua_isnoneornil(L, 5) ? 5 : 1; /* the destination */
    unsigned countdown = ELEMENTS_PER_CHECK;
    check_table(L, 1, TAB_R);
    check_table(L, tt, TAB_W);
    if (e >= f) {
        luaL_argcheck(L, f > 0 || e < LUA_MAXINTEGER + f, 3, "too many elements to move");
        n = e - f + 1;
        luaL_argcheck(L, t <= LUA_MAXINTEGER - n + 1, 4, "destination wrap around");
        if (t > e || t <= f || (tt != 1 && !lua_compare(L, 1, tt, LUA_OPEQ))) {
            for (i = 0; i < n; i++) {
                lua_geti(L, 1, f + i);
                lua_seti(L, tt, t + i);
                count_element(L, &countdown);
            }
        } else { /* overlapping, moving up: from the end */
            for (i = n - 1; i >= 0; i--) {
                lua_geti(L, 1, f + i);
                lua_seti(L, tt, t + i);
                count_element(L, &countdown);
            }
        }
    }
    lua_pushvalue(L, tt);
    return 1;
}

/* -- concat, unpack ----------------------------------------------------------------------------- */
static void add_field(lua_State *L, Box *b, lua_Integer i)
{
    size_t len;
    const char *s;
    lua_geti(L, 1, i);
    if (!lua_isstring(L, -1))
        luaL_error(L, "invalid value (%s) at index %I in table for 'concat'", luaL_typename(L, -1), i);
    s = lua_tolstring(L, -1, &len);
    llmos_box_add(L, b, s, len);
    lua_pop(L, 1);
}

static int tab_concat(lua_State *L)
{
    lua_Integer last = checked_length(L, 1, TAB_R), i;
    size_t lsep;
    const char *sep = luaL_optlstring(L, 2, "", &lsep);
    unsigned countdown = ELEMENTS_PER_CHECK;
    Box box, *b;
    i = luaL_optinteger(L, 3, 1);
    last = luaL_optinteger(L, 4, last);
    b = &box;
    llmos_box_init(L, b);
    for (; i < last; i++) {
        add_field(L, b, i);
        llmos_box_add(L, b, sep, lsep);
        count_element(L, &countdown);
    }
    if (i == last) /* the range was not empty */
        add_field(L, b, i);
    llmos_box_push(L, b);
    return 1;
}

static int tab_unpack(lua_State *L)
{
    lua_Unsigned n;
    lua_Integer i = luaL_optinteger(L, 2, 1);
    lua_Integer e = lua_isnoneornil(L, 3) ? luaL_len(L, 1) : luaL_checkinteger(L, 3);
    unsigned countdown = ELEMENTS_PER_CHECK;
    if (i > e)
        return 0;
    n = (lua_Unsigned)e - (lua_Unsigned)i; /* one less than the count, without overflow */
    if (n >= (unsigned)INT_MAX || !lua_checkstack(L, (int)(++n)))
        return luaL_error(L, "too many results to unpack");
    for (; i < e; i++) { /* up to e - 1, so that i cannot overflow */
        lua_geti(L, 1, i);
        count_element(L, &countdown);
    }
    lua_geti(L, 1, e);
    return (int)n;
}

static int tab_pack(lua_State *L)
{
    int i, n = lua_gettop(L);
    unsigned countdown = ELEMENTS_PER_CHECK;
    lua_createtable(L, n, 1);
    lua_insert(L, 1);
    for (i = n; i >= 1; i--) { /* from the end: the arguments are popped as they are stored */
        lua_seti(L, 1, i);
        count_element(L, &countdown);
    }
    lua_pushinteger(L, n);
    lua_setfield(L, 1, "n");
    return 1;
}

/* -- sort ----------------------------------------------------------------------------------------- */
typedef unsigned int Index;

#define RANDOMIZE_ABOVE 100u /* ranges this long or longer get a random pivot, against crafted worst cases */

typedef struct {
    lua_State *L;
    unsigned countdown;
} Sorting;

/* A seed from the clock, as Lua's: ranges that partition badly get a new one. */
static unsigned random_seed(void)
{
    clock_t c = clock();
    time_t t = time(NULL);
    return (unsigned)c * 2654435761u + (unsigned)t + (unsigned)((unsigned long long)t >> 32);
}

/* t[i] = the value at the top, t[j] = the one below; pops both. */
static void set2(lua_State *L, Index i, Index j)
{
    lua_seti(L, 1, i);
    lua_seti(L, 1, j);
}

/* Whether the value at a is less than the one at b (negative indices), by the order function or '<'. */
static int less(Sorting *s, int a, int b)
{
    lua_State *L = s->L;
    int res;
    count_element(L, &s->countdown);
    if (lua_isnil(L, 2))
        return lua_compare(L, a, b, LUA_OPLT);
    lua_pushvalue(L, 2);
    lua_pushvalue(L, a - 1); /* the indices moved with the push */
    lua_pushvalue(L, b - 2);
    lua_call(L, 2, 1);
    res = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return res;
}

/* Partitions lo..up around the pivot P (at the top of the stack, also in
 * t[up - 1]), and pops it; returns P's final place. An order function that is not a
 * strict order could run the scans out of the range: that raises. */
static Index partition(Sorting *s, Index lo, Index up)
{
    lua_State *L = s->L;
    Index i = lo, j = up - 1;
    for (;;) {
        /* up from lo while t[i] < P */
        while (lua_geti(L, 1, ++i), less(s, -1, -2)) {
            if (i == up - 1) /* t[i] < P, but t[up - 1] is P */
                luaL_error(L, "invalid order function for sorting");
            lua_pop(L, 1);
        }
        /* down from up - 1 while P < t[j] */
        while (lua_geti(L, 1, --j), less(s, -3, -1)) {
            if (j < i) /* below i, where t[j] < P */
                luaL_error(L, "invalid order function for sorting");
            lua_pop(L, 1);
        }
        if (j < i) { /* crossed: P goes to i */
            lua_pop(L, 1);
            set2(L, up - 1, i);
            return i;
        }
        set2(L, i, j);
    }
}

static Index choose_pivot(Index lo, Index up, unsigned seed)
{
    Index quarter = (up - lo) / 4;
    return seed % (quarter * 2) + (lo + quarter);
}

static void sort_range(Sorting *s, Index lo, Index up, unsigned seed)
{
    lua_State *L = s->L;
    Index p, smaller;
    while (lo < up) { /* the larger part is sorted by this loop, the smaller one by recursion */
        /* t[lo] <= t[up] */
        lua_geti(L, 1, lo);
        lua_geti(L, 1, up);
        if (less(s, -1, -2))
            set2(L, lo, up);
        else
            lua_pop(L, 2);
        if (up - lo == 1)
            break;
        p = up - lo < RANDOMIZE_ABOVE || seed == 0 ? (lo + up) / 2 : choose_pivot(lo, up, seed);
        /* t[lo] <= t[p] <= t[up] */
        lua_geti(L, 1, p);
        lua_geti(L, 1, lo);
        if (less(s, -2, -1)) {
            set2(L, p, lo);
        } else {
            lua_pop(L, 1);
            lua_geti(L, 1, up);
            if (less(s, -1, -2))
                set2(L, p, up);
            else
                lua_pop(L, 2);
        }
        if (up - lo == 2)
            break;
        lua_geti(L, 1, p); /* the pivot, kept on the stack and moved to up - 1 */
        lua_pushvalue(L, -1);
        lua_geti(L, 1, up - 1);
        set2(L, p, up - 1);
        p = partition(s, lo, up); /* which takes the pivot off the stack */
        if (p - lo < up - p) {
            sort_range(s, lo, p - 1, seed);
            smaller = p - lo;
            lo = p + 1;
        } else {
            sort_range(s, p + 1, up, seed);
            smaller = up - p;
            up = p - 1;
        }
        if ((up - lo) / 128 > smaller) /* badly unbalanced: a new random pivot */
            seed = random_seed();
    }
}

static int tab_sort(lua_State *L)
{
    lua_Integer n = checked_length(L, 1, TAB_RW);
    Sorting s;
    if (n > 1) {
        luaL_argcheck(L, n < INT_MAX, 1, "array too big");
        if (!lua_isnoneornil(L, 2))
            luaL_checktype(L, 2, LUA_TFUNCTION);
        lua_settop(L, 2);
        s.L = L;
        s.countdown = ELEMENTS_PER_CHECK;
        sort_range(&s, 1, (Index)n, 0);
    }
    return 0;
}

const luaL_Reg llmos_table_functions[] = {
    {"concat", tab_concat}, {"insert", tab_insert}, {"remove", tab_remove}, {"move", tab_move},
    {"sort", tab_sort},     {"unpack", tab_unpack}, {"pack", tab_pack},     {NULL, NULL},
};
