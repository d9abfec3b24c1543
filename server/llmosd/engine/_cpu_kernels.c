/*
 * The engine's CPU kernels (float32): decode attention on the paged cache,
 * RMSNorm, and SiLU-and-multiply. Each replaces a chain of small torch ops
 * whose per-op overhead, not arithmetic, was the cost.
 *
 * Decode attention: with torch alone, a batched decode step first gathers
 * every sequence's cache blocks into one padded tensor and then runs
 * scaled_dot_product_attention on it: the keys and values are read three
 * times and written once, and SDPA's CPU kernel spends most of its time on
 * per-head overhead, as each sequence has a single query. Here a task reads
 * one sequence's keys and values once, block by block where they lie (a
 * position's keys for all KV heads sit side by side), for all its query
 * heads: the scores, a softmax, then the weighted sum of the values. Tasks
 * run in parallel.
 *
 * Every result row depends on its own input row (its own sequence) only, and
 * sums run in a fixed order, so a sequence gets the same tokens alone or in
 * any batch.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* AVX2 where the CPU has it, chosen when the module loads; SSE2 otherwise. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif

/* Eight floats; GCC and Clang map it to one AVX register or two SSE ones. */
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
#define W 8

static inline v8 load(const float *p)
{
    v8 x;
    memcpy(&x, p, sizeof x);
    return x;
}

static inline void store(float *p, v8 x)
{
    memcpy(p, &x, sizeof x);
}

static inline v8 splat(float f)
{
    return (v8){0} + f; /* a scalar operand is broadcast: one instruction */
}

/* e^x for x <= 0 (softmax scores less their maximum), to about 2 ulp: x = n ln2 + r with
 * |r| <= ln2/2, e^r by its degree-6 Taylor polynomial, 2^n put straight into the exponent bits.
 * Below -87 the result is 0, as the float would underflow. */
static inline v8 exp_nonpositive(v8 x)
{
    v8 n, r, p;
    v8i bits;
    x = (v8)((v8i)(x < splat(-87.0f)) & (v8i)splat(-87.0f)) + (v8)((v8i)(x >= splat(-87.0f)) & (v8i)x);
    n = x * splat(1.44269504088896341f) - splat(0.5f);
    n = __builtin_convertvector(__builtin_convertvector(n, v8i), v8); /* truncation of n - 0.5: round(x/ln2) for x <= 0 */
    r = x - n * splat(0.693359375f) + n * splat(2.12194440e-4f); /* ln2 in two parts, for precision */
    p = splat(1.0f / 720) * r + splat(1.0f / 120);
    p = p * r + splat(1.0f / 24);
    p = p * r + splat(1.0f / 6);
    p = p * r + splat(0.5f);
    p = p * r + splat(1.0f);
    p = p * r + splat(1.0f);
    bits = (__builtin_convertvector(n, v8i) + 127) << 23;
    return (v8)((v8i)(p * (v8)bits) & (v8i)(x > splat(-87.0f)));
}

static inline float hsum(v8 x)
{
    v4 half = (v4){x[0], x[1], x[2], x[3]} + (v4){x[4], x[5], x[6], x[7]};
    return (half[0] + half[2]) + (half[1] + half[3]);
}

static inline float dot(const float *a, const float *b, Py_ssize_t n)
{
    v8 even = splat(0), odd = splat(0); /* two chains of additions instead of one */
    float sum = 0;
    Py_ssize_t i = 0;
    for (; i + 2 * W <= n; i += 2 * W) {
        even += load(a + i) * load(b + i);
        odd += load(a + i + W) * load(b + i + W);
    }
    for (; i + W <= n; i += W)
        even += load(a + i) * load(b + i);
    for (; i < n; i++)
        sum += a[i] * b[i];
    return sum + hsum(even + odd);
}

static inline v8 pair_sums(v8 a, v8 b) /* AVX's hadd: pairwise sums of a and b, lane by lane */
{
    return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
           __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}

/* q's dot products with the W keys k, k + k_stride, ..., one per lane (dim: whole vectors). Summing
 * the eight accumulators together costs a fraction of eight separate horizontal sums. */
static inline v8 dot_w(const float *q, const float *k, Py_ssize_t k_stride, Py_ssize_t dim)
{
    v8 acc[W] = {{0}};
    for (Py_ssize_t i = 0; i < dim; i += W) {
        v8 x = load(q + i);
        for (int j = 0; j < W; j++)
            acc[j] += x * load(k + j * k_stride + i);
    }
    v8 lo = pair_sums(pair_sums(acc[0], acc[1]), pair_sums(acc[2], acc[3]));
    v8 hi = pair_sums(pair_sums(acc[4], acc[5]), pair_sums(acc[6], acc[7]));
    return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(lo, hi, 4, 5, 6, 7, 12, 13, 14, 15);
}

/* out[0:dim] += sum over t < n of w[t] * v[t * v_stride + 0:dim] */
static inline void add_weighted(float *out, const float *w, const float *v, Py_ssize_t v_stride, Py_ssize_t n,
                                Py_ssize_t dim)
{
    Py_ssize_t i = 0;
    for (; i + W <= dim; i += W) {
        v8 acc = load(out + i);
        for (Py_ssize_t t = 0; t < n; t++)
            acc += splat(w[t]) * load(v + t * v_stride + i);
        store(out + i, acc);
    }
    for (; i < dim; i++)
        for (Py_ssize_t t = 0; t < n; t++)
            out[i] += w[t] * v[t * v_stride + i];
}

typedef struct {
    float *out;             /* [seqs, heads, dim] */
    const float *q;         /* [seqs, heads, dim], rows q_stride apart */
    const float *k_cache;   /* [blocks, block_size, kv_heads, dim] */
    const float *v_cache;
    const int64_t *tables;  /* [seqs, table_stride] block ids */
    const int64_t *lens;    /* [seqs] keys per sequence */
    Py_ssize_t q_stride, table_stride, seqs, heads, kv_heads, dim, block_size;
    float scale;
} Problem;

static inline Py_ssize_t whole_vectors(Py_ssize_t n) /* n rounded up to a multiple of W */
{
    return (n + W - 1) / W * W;
}

/* Where the block holding position `start` of a sequence keeps KV head h0 of its first position;
 * the next position's rows are kv_heads * dim floats on. */
static inline const float *block_rows(const Problem *p, const float *cache, const int64_t *table, Py_ssize_t start,
                                      Py_ssize_t h0)
{
    return cache + (table[start / p->block_size] * p->block_size * p->kv_heads + h0) * p->dim;
}

/* Sequence seq's attention for KV heads [h0, h1), reading its cache a block at a time: the
 * keys of one position for all KV heads lie side by side, so the cache is read in order.
 * scores: room for (h1 - h0) * group rows of lens[seq] floats, each rounded up to W. */
VECTOR_CLONES static void attend(const Problem *p, Py_ssize_t seq, Py_ssize_t h0, Py_ssize_t h1, float *scores)
{
    Py_ssize_t group = p->heads / p->kv_heads, dim = p->dim, len = p->lens[seq], bs = p->block_size;
    Py_ssize_t stride = whole_vectors(len), pos_stride = p->kv_heads * dim; /* floats per cache position */
    Py_ssize_t rows = (h1 - h0) * group;
    const int64_t *table = p->tables + seq * p->table_stride;
    const float *q = p->q + seq * p->q_stride + h0 * group * dim;
    float *out = p->out + (seq * p->heads + h0 * group) * dim;
    for (Py_ssize_t start = 0; start < len; start += bs) {
        const float *k = block_rows(p, p->k_cache, table, start, h0);
        Py_ssize_t n = len - start < bs ? len - start : bs;
        for (Py_ssize_t r = 0; r < rows; r++) {
            const float *qr = q + r * dim, *kr = k + r / group * dim;
            float *s = scores + r * stride + start;
            Py_ssize_t t = 0;
            if (dim % W == 0)
                for (; t + W <= n; t += W)
                    store(s + t, dot_w(qr, kr + t * pos_stride, pos_stride, dim));
            for (; t < n; t++)
                s[t] = dot(qr, kr + t * pos_stride, dim);
        }
    }
    for (Py_ssize_t r = 0; r < rows; r++) {
        float *s = scores + r * stride, top = -INFINITY;
        v8 total = splat(0);
        for (Py_ssize_t t = 0; t < len; t++)
            top = s[t] > top ? s[t] : top;
        for (Py_ssize_t t = len; t < stride; t++)
            s[t] = -INFINITY; /* padding: weight 0 */
        for (Py_ssize_t t = 0; t < stride; t += W) {
            v8 e = exp_nonpositive((load(s + t) - splat(top)) * splat(p->scale));
            store(s + t, e);
            total += e;
        }
        v8 inverse = splat(1 / hsum(total));
        for (Py_ssize_t t = 0; t < stride; t += W)
            store(s + t, load(s + t) * inverse);
        memset(out + r * dim, 0, sizeof(float) * dim);
    }
    /* Each output row is summed over a whole block's values in registers, then stored. */
    for (Py_ssize_t start = 0; start < len; start += bs) {
        const float *v = block_rows(p, p->v_cache, table, start, h0);
        Py_ssize_t n = len - start < bs ? len - start : bs;
        for (Py_ssize_t r = 0; r < rows; r++)
            add_weighted(out + r * dim, scores + r * stride + start, v + r / group * dim, pos_stride, n, dim);
    }
}

/* out = x / sqrt(mean(x^2) + eps) * weight, row by row, as transformers computes it in float32. */
VECTOR_CLONES static void rms_norm_rows(float *out, const float *x, const float *weight, Py_ssize_t rows,
                                        Py_ssize_t dim, Py_ssize_t x_stride, float eps)
{
    for (Py_ssize_t r = 0; r < rows; r++, x += x_stride, out += dim) {
        float inverse = 1 / sqrtf(dot(x, x, dim) / dim + eps);
        Py_ssize_t i = 0;
        for (; i + W <= dim; i += W)
            store(out + i, load(x + i) * splat(inverse) * load(weight + i));
        for (; i < dim; i++)
            out[i] = x[i] * inverse * weight[i];
    }
}

/* silu(g) = g / (1 + e^-g), from e = e^-|g| <= 1: g / (1 + e) for g >= 0, g e / (1 + e) below. */
static inline v8 silu(v8 g)
{
    v8i negative = (v8i)(g < splat(0));
    v8 e = exp_nonpositive((v8)((v8i)g | ((v8i){0} + INT32_MIN))); /* -|g|: the sign bit set */
    v8 numerator = (v8)((negative & (v8i)(g * e)) | (~negative & (v8i)g));
    return numerator / (splat(1) + e);
}

/* out[r] = silu(gate[r]) * up[r], where row r of gate_up is gate then up, `inter` floats each. */
VECTOR_CLONES static void silu_mul_rows(float *out, const float *gate_up, Py_ssize_t rows, Py_ssize_t inter)
{
    for (Py_ssize_t r = 0; r < rows; r++, gate_up += 2 * inter, out += inter) {
        Py_ssize_t i = 0;
        for (; i + W <= inter; i += W)
            store(out + i, silu(load(gate_up + i)) * load(gate_up + inter + i));
        for (; i < inter; i++) {
            float g = gate_up[i];
            out[i] = g / (1 + expf(-g)) * gate_up[inter + i];
        }
    }
}

static PyObject *rms_norm(PyObject *self, PyObject *args)
{
    unsigned long long out, x, weight;
    Py_ssize_t rows, dim, x_stride;
    float eps;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKnnnf", &out, &x, &weight, &rows, &dim, &x_stride, &eps))
        return NULL;
    rms_norm_rows((float *)(uintptr_t)out, (const float *)(uintptr_t)x, (const float *)(uintptr_t)weight, rows, dim,
                  x_stride, eps);
    Py_RETURN_NONE;
}

static PyObject *silu_mul(PyObject *self, PyObject *args)
{
    unsigned long long out, gate_up;
    Py_ssize_t rows, inter;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKnn", &out, &gate_up, &rows, &inter))
        return NULL;
    silu_mul_rows((float *)(uintptr_t)out, (const float *)(uintptr_t)gate_up, rows, inter);
    Py_RETURN_NONE;
}

static PyObject *decode(PyObject *self, PyObject *args)
{
    unsigned long long out, q, k_cache, v_cache, tables, lens;
    Problem p;
    int threads, failed = 0;
    Py_ssize_t table_width, chunks, longest = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKnKKnKnnKnnnnfi", &out, &q, &p.q_stride, &k_cache, &v_cache, &p.block_size,
                          &tables, &p.table_stride, &table_width, &lens, &p.seqs, &p.heads, &p.kv_heads, &p.dim,
                          &p.scale, &threads))
        return NULL;
    if (p.kv_heads <= 0 || p.heads % p.kv_heads != 0 || p.dim <= 0 || p.block_size <= 0 || threads <= 0) {
        PyErr_SetString(PyExc_ValueError, "bad attention shape");
        return NULL;
    }
    p.out = (float *)(uintptr_t)out;
    p.q = (const float *)(uintptr_t)q;
    p.k_cache = (const float *)(uintptr_t)k_cache;
    p.v_cache = (const float *)(uintptr_t)v_cache;
    p.tables = (const int64_t *)(uintptr_t)tables;
    p.lens = (const int64_t *)(uintptr_t)lens;
    for (Py_ssize_t s = 0; s < p.seqs; s++) {
        if (p.lens[s] <= 0 || p.lens[s] > table_width * p.block_size) {
            PyErr_SetString(PyExc_ValueError, "a sequence's keys must be at least one and fit its block table");
            return NULL;
        }
        longest = p.lens[s] > longest ? p.lens[s] : longest;
    }
    if (p.seqs == 0)
        Py_RETURN_NONE;
    /* A sequence per task; split by KV heads only when there are fewer sequences than threads. */
    chunks = p.seqs >= threads ? 1 : p.kv_heads;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel num_threads(threads) reduction(|| : failed)
    {
        float *scores = malloc(sizeof(float) * whole_vectors(longest) * p.heads);
        if (scores == NULL)
            failed = 1;
#pragma omp for schedule(dynamic)
        for (Py_ssize_t task = 0; task < p.seqs * chunks; task++) {
            Py_ssize_t c = task % chunks;
            if (scores != NULL)
                attend(&p, task / chunks, c * p.kv_heads / chunks, (c + 1) * p.kv_heads / chunks, scores);
        }
        free(scores);
    }
    Py_END_ALLOW_THREADS
    if (failed)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"decode", decode, METH_VARARGS,
     "decode(out, q, q_stride, k_cache, v_cache, block_size, tables, table_stride, table_width, lens, seqs, heads, "
     "kv_heads, dim, scale, threads): one query per sequence against its cached keys"},
    {"rms_norm", rms_norm, METH_VARARGS, "rms_norm(out, x, weight, rows, dim, x_stride, eps)"},
    {"silu_mul", silu_mul, METH_VARARGS, "silu_mul(out, gate_up, rows, inter)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cpu_kernels",
    "The engine's float32 CPU kernels; arguments are addresses of data the caller checked (see cpu_kernels.py).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__cpu_kernels(void)
{
    return PyModule_Create(&module);
}
