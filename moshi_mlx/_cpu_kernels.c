/*
 * Quantized matrix × few-rows products for MLX's CPU backend.
 *
 * Token-by-token decoding multiplies one activation row (or a handful: CFG, batches) by
 * every weight matrix. On the CPU backend MLX's quantized matmul is scalar code that
 * decodes ~1.4 G weights/s per core, so a 7B q4 model spends ~2.8 s per step there; the
 * memory holding those weights could be streamed ~10x faster. This kernel decodes MLX's
 * affine format (w = scale · q + bias per group, q packed little-endian in uint32 words,
 * scales/biases in bfloat16 or float32) with AVX2 + FMA and splits the output rows across
 * threads, so it runs at memory speed.
 *
 *   y[m, n] = Σ_g scale[n, g] · (Σ_{i∈g} q[n, i] · x[m, i]) + bias[n, g] · (Σ_{i∈g} x[m, i])
 *
 * The arithmetic is MLX's (dequantize, multiply, add) in another summation order: results
 * agree to float32 rounding (tests/test_cpu_kernels.py). Only x86-64 with AVX2/FMA is
 * accelerated; elsewhere `available()` is false and callers use mx.quantized_matmul.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(_WIN32)
#define HAVE_KERNEL 1
#include <immintrin.h>
#include <pthread.h>
#else
#define HAVE_KERNEL 0
#endif

#define MAX_ROWS 8
#define MAX_THREADS 16

#if HAVE_KERNEL

typedef struct {
    const float *x;        /* [M, K], rows permuted for 4-bit (see permute_x) */
    const float *xsum;     /* [M, K / group] sums of x over each group */
    const uint8_t *w;      /* [N, K · bits / 8] */
    const void *scales;    /* [N, K / group] */
    const void *biases;    /* [N, K / group] */
    float *y;              /* [M, N] */
    int M, N, K, bits, group, bf16, n0, n1;
} Job;

#define TARGET __attribute__((target("avx2,fma")))

static inline float scalar_at(const void *p, long i, int bf16) {
    if (!bf16) return ((const float *)p)[i];
    uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

TARGET static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

TARGET static inline __m256 u8_to_ps(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }

TARGET static inline __m256 load8(const void *p, long i, int bf16) {
    if (!bf16) return _mm256_loadu_ps((const float *)p + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* Σ_g biases[g] · xsum[g]: the bias half of the affine dequantization, for one row. */
TARGET static inline float bias_term(const void *biases, long off, const float *xsum, int G, int bf16) {
    __m256 acc = _mm256_setzero_ps();
    int g = 0;
    for (; g + 8 <= G; g += 8) acc = _mm256_fmadd_ps(load8(biases, off + g, bf16), _mm256_loadu_ps(xsum + g), acc);
    float s = hsum(acc);
    for (; g < G; g++) s += scalar_at(biases, off + g, bf16) * xsum[g];
    return s;
}

/* Rows n0..n1 of y = x · dequant(w)^T. M is a compile-time constant in each instance (see
   run_job), so the per-row accumulators live in registers. Two partial sums per row halve
   the FMA dependency chains. */
TARGET static inline __attribute__((always_inline)) void run_rows(const Job *j, const int M) {
    const int K = j->K, G = K / j->group, row_bytes = K * j->bits / 8;
    const int blocks_per_group = j->group / 32;
    for (int n = j->n0; n < j->n1; n++) {
        const uint8_t *wr = j->w + (long)n * row_bytes;
        __m256 acc[MAX_ROWS];
        for (int m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
        for (int g = 0; g < G; g++) {
            __m256 ta[MAX_ROWS], tb[MAX_ROWS];
            for (int m = 0; m < M; m++) ta[m] = tb[m] = _mm256_setzero_ps();
            for (int b = 0; b < blocks_per_group; b++) {
                const int i0 = g * j->group + b * 32; /* first element of this 32-block */
                __m256 w0, w1, w2, w3;
                if (j->bits == 4) {
                    /* 16 bytes = 32 nibbles; byte i holds elements 2i (low) and 2i+1 (high). */
                    __m128i v = _mm_loadu_si128((const __m128i *)(wr + i0 / 2));
                    __m128i lo = _mm_and_si128(v, _mm_set1_epi8(0x0F));
                    __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x0F));
                    w0 = u8_to_ps(lo);                     /* elements 0, 2, …, 14 */
                    w1 = u8_to_ps(_mm_srli_si128(lo, 8));  /* 16, 18, …, 30 */
                    w2 = u8_to_ps(hi);                     /* 1, 3, …, 15 */
                    w3 = u8_to_ps(_mm_srli_si128(hi, 8));  /* 17, 19, …, 31 */
                } else { /* 8 bits: byte i is element i */
                    const uint8_t *p = wr + i0;
                    w0 = u8_to_ps(_mm_loadl_epi64((const __m128i *)p));
                    w1 = u8_to_ps(_mm_loadl_epi64((const __m128i *)(p + 8)));
                    w2 = u8_to_ps(_mm_loadl_epi64((const __m128i *)(p + 16)));
                    w3 = u8_to_ps(_mm_loadl_epi64((const __m128i *)(p + 24)));
                }
                for (int m = 0; m < M; m++) {
                    const float *xm = j->x + (long)m * K + i0;
                    ta[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), ta[m]);
                    tb[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), tb[m]);
                    ta[m] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xm + 16), ta[m]);
                    tb[m] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xm + 24), tb[m]);
                }
            }
            const __m256 scale = _mm256_set1_ps(scalar_at(j->scales, (long)n * G + g, j->bf16));
            for (int m = 0; m < M; m++) acc[m] = _mm256_fmadd_ps(_mm256_add_ps(ta[m], tb[m]), scale, acc[m]);
        }
        for (int m = 0; m < M; m++)
            j->y[(long)m * j->N + n] = hsum(acc[m]) + bias_term(j->biases, (long)n * G, j->xsum + (long)m * G, G,
                                                                 j->bf16);
    }
}

TARGET static void run_job(const Job *j) {
    switch (j->M) {
    case 1: run_rows(j, 1); break;
    case 2: run_rows(j, 2); break;
    case 3: run_rows(j, 3); break;
    case 4: run_rows(j, 4); break;
    case 5: run_rows(j, 5); break;
    case 6: run_rows(j, 6); break;
    case 7: run_rows(j, 7); break;
    default: run_rows(j, 8); break;
    }
}

static void *thread_main(void *arg) {
    run_job((const Job *)arg);
    return NULL;
}

/* Run jobs[0..n) (each `size` bytes), jobs 1… on their own threads and job 0 on this one.
   A thread that cannot start has its job run here instead. */
static void run_parallel(void *(*fn)(void *), void *jobs, size_t size, int n) {
    pthread_t tids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 1; t < n; t++) started[t] = pthread_create(&tids[t], NULL, fn, (char *)jobs + t * size) == 0;
    fn(jobs);
    for (int t = 1; t < n; t++) {
        if (started[t]) pthread_join(tids[t], NULL);
        else fn((char *)jobs + t * size);
    }
}

/* 4-bit blocks hold even elements in low nibbles and odd ones in high nibbles: reorder each
   32-block of x the same way (0, 2, …, 14 | 16, …, 30 | 1, …, 15 | 17, …, 31). */
static void permute_x(const float *x, float *xp, int K) {
    for (int i0 = 0; i0 < K; i0 += 32)
        for (int k = 0; k < 8; k++) {
            xp[i0 + k] = x[i0 + 2 * k];
            xp[i0 + 8 + k] = x[i0 + 16 + 2 * k];
            xp[i0 + 16 + k] = x[i0 + 2 * k + 1];
            xp[i0 + 24 + k] = x[i0 + 17 + 2 * k];
        }
}

/* ---- attention of one query over an int8 KV cache ----------------------------------------
   Keys and values are stored as int8 with one float scale per (head, slot) vector:
   k ≈ kq · ks. out = softmax(scale · q·K^T) · V over the first n slots of each head. */

typedef struct {
    const float *q;      /* [BH, Dh] */
    const int8_t *kq;    /* [BH, S, Dh] */
    const float *ks;     /* [BH, S] */
    const int8_t *vq;
    const float *vs;
    float *out;          /* [BH, Dh] */
    int S, n, Dh, h0, h1;
    float scale;
    int failed; /* scratch allocation failed */
} AttnJob;

TARGET static inline __m256 i8_to_ps(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

TARGET static void run_attn(const AttnJob *j) {
    const int Dh = j->Dh, n = j->n, blocks = Dh / 8;
    float *p = malloc(sizeof(float) * (size_t)n);
    if (!p) { ((AttnJob *)j)->failed = 1; return; }
    for (int h = j->h0; h < j->h1; h++) {
        const float *q = j->q + (long)h * Dh;
        const int8_t *K = j->kq + (long)h * j->S * Dh, *V = j->vq + (long)h * j->S * Dh;
        const float *ks = j->ks + (long)h * j->S, *vs = j->vs + (long)h * j->S;
        float mx = -INFINITY;
        for (int s = 0; s < n; s++) {
            const int8_t *k = K + (long)s * Dh;
            __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
            int d = 0;
            for (; d + 16 <= Dh; d += 16) {
                a = _mm256_fmadd_ps(i8_to_ps(k + d), _mm256_loadu_ps(q + d), a);
                b = _mm256_fmadd_ps(i8_to_ps(k + d + 8), _mm256_loadu_ps(q + d + 8), b);
            }
            if (d < Dh) a = _mm256_fmadd_ps(i8_to_ps(k + d), _mm256_loadu_ps(q + d), a);
            p[s] = hsum(_mm256_add_ps(a, b)) * ks[s] * j->scale;
            if (p[s] > mx) mx = p[s];
        }
        float total = 0.0f;
        for (int s = 0; s < n; s++) total += (p[s] = expf(p[s] - mx));
        __m256 acc[32];
        for (int c = 0; c < blocks; c++) acc[c] = _mm256_setzero_ps();
        for (int s = 0; s < n; s++) {
            const __m256 w = _mm256_set1_ps(p[s] * vs[s]);
            const int8_t *v = V + (long)s * Dh;
            for (int c = 0; c < blocks; c++) acc[c] = _mm256_fmadd_ps(w, i8_to_ps(v + 8 * c), acc[c]);
        }
        const __m256 inv = _mm256_set1_ps(1.0f / total);
        for (int c = 0; c < blocks; c++) _mm256_storeu_ps(j->out + (long)h * Dh + 8 * c, _mm256_mul_ps(acc[c], inv));
    }
    free(p);
}

static void *attn_thread_main(void *arg) {
    run_attn((const AttnJob *)arg);
    return NULL;
}

static int cpu_ok(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

#endif /* HAVE_KERNEL */

static void release_buffers(Py_buffer *b, int n) {
    for (int i = 0; i < n; i++) PyBuffer_Release(&b[i]);
}

/* Acquire n C-contiguous buffers of the given byte sizes (the last one writable: the output).
   On failure nothing stays acquired and a Python error names `fn` and the argument. */
static int get_buffers(const char *fn, PyObject *const *objs, const char *const *names, const Py_ssize_t *sizes,
                       int n, Py_buffer *b) {
    for (int i = 0; i < n; i++) {
        const int writable = i == n - 1;
        if (PyObject_GetBuffer(objs[i], &b[i], writable ? (PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) : PyBUF_C_CONTIGUOUS) < 0) {
            PyErr_Format(PyExc_TypeError, "%s: %s must be a C-contiguous%s buffer", fn, names[i],
                         writable ? " writable" : "");
            release_buffers(b, i);
            return -1;
        }
        if (!PyBuffer_IsContiguous(&b[i], 'C') || b[i].len != sizes[i]) {
            PyErr_Format(PyExc_ValueError, "%s: buffer sizes do not match the shapes: %s has %zd bytes%s, expected %zd",
                         fn, names[i], b[i].len, PyBuffer_IsContiguous(&b[i], 'C') ? "" : " (not C-contiguous)",
                         sizes[i]);
            release_buffers(b, i + 1);
            return -1;
        }
    }
    return 0;
}

/* quantized_matmul(x, w, scales, biases, out, M, N, K, bits, group, bf16, threads) */
static PyObject *quantized_matmul(PyObject *self, PyObject *args) {
    PyObject *ox, *ow, *os, *ob, *oy;
    int M, N, K, bits, group, bf16, threads;
    if (!PyArg_ParseTuple(args, "OOOOOiiiiiii", &ox, &ow, &os, &ob, &oy, &M, &N, &K, &bits, &group, &bf16,
                          &threads))
        return NULL;
#if !HAVE_KERNEL
    PyErr_SetString(PyExc_RuntimeError, "quantized_matmul: not available on this platform");
    return NULL;
#else
    if (M < 1 || M > MAX_ROWS || (bits != 4 && bits != 8) || group % 32 || K % group || N < 1) {
        PyErr_SetString(PyExc_ValueError, "quantized_matmul: unsupported shape, bits or group size");
        return NULL;
    }
    const long G = K / group, esize = bf16 ? 2 : 4;
    PyObject *objs[5] = {ox, ow, os, ob, oy};
    const char *names[5] = {"x", "w", "scales", "biases", "out"};
    const Py_ssize_t sizes[5] = {(Py_ssize_t)M * K * 4, (Py_ssize_t)N * K * bits / 8, N * G * esize, N * G * esize,
                                 (Py_ssize_t)M * N * 4};
    Py_buffer b[5];
    if (get_buffers("quantized_matmul", objs, names, sizes, 5, b) < 0) return NULL;
    PyObject *result = NULL;
    float *xp = PyMem_RawMalloc(sizeof(float) * ((size_t)M * K + (size_t)M * G));
    if (!xp) { PyErr_NoMemory(); goto done; }
    float *xsum = xp + (size_t)M * K;
    const float *x = b[0].buf;
    for (int m = 0; m < M; m++) {
        if (bits == 4) permute_x(x + (long)m * K, xp + (long)m * K, K);
        else memcpy(xp + (long)m * K, x + (long)m * K, sizeof(float) * K);
        for (long g = 0; g < G; g++) {
            float s = 0.0f;
            for (int i = 0; i < group; i++) s += x[(long)m * K + g * group + i];
            xsum[m * G + g] = s;
        }
    }
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    while (threads > 1 && N / threads < 64) threads--;
    Job jobs[MAX_THREADS];
    for (int t = 0; t < threads; t++)
        jobs[t] = (Job){xp, xsum, b[1].buf, b[2].buf, b[3].buf, b[4].buf, M, N, K, bits, group, bf16,
                        (int)((long)N * t / threads), (int)((long)N * (t + 1) / threads)};
    Py_BEGIN_ALLOW_THREADS
    run_parallel(thread_main, jobs, sizeof(Job), threads);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(xp);
    result = Py_NewRef(Py_None);
done:
    release_buffers(b, 5);
    return result;
#endif
}

/* attend_int8(q, kq, ks, vq, vs, out, BH, S, n, Dh, scale, threads) */
static PyObject *attend_int8(PyObject *self, PyObject *args) {
    PyObject *oq, *okq, *oks, *ovq, *ovs, *oy;
    int BH, S, n, Dh, threads;
    float scale;
    if (!PyArg_ParseTuple(args, "OOOOOOiiiifi", &oq, &okq, &oks, &ovq, &ovs, &oy, &BH, &S, &n, &Dh, &scale,
                          &threads))
        return NULL;
#if !HAVE_KERNEL
    PyErr_SetString(PyExc_RuntimeError, "attend_int8: not available on this platform");
    return NULL;
#else
    if (BH < 1 || n < 1 || n > S || Dh < 8 || Dh % 8 || Dh > 256) {
        PyErr_SetString(PyExc_ValueError, "attend_int8: unsupported shape");
        return NULL;
    }
    PyObject *objs[6] = {oq, okq, oks, ovq, ovs, oy};
    const char *names[6] = {"q", "kq", "ks", "vq", "vs", "out"};
    const Py_ssize_t sizes[6] = {(Py_ssize_t)BH * Dh * 4, (Py_ssize_t)BH * S * Dh, (Py_ssize_t)BH * S * 4,
                                 (Py_ssize_t)BH * S * Dh, (Py_ssize_t)BH * S * 4, (Py_ssize_t)BH * Dh * 4};
    Py_buffer b[6];
    if (get_buffers("attend_int8", objs, names, sizes, 6, b) < 0) return NULL;
    PyObject *result = NULL;
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > BH) threads = BH;
    float *out = b[5].buf;
    AttnJob jobs[MAX_THREADS];
    for (int t = 0; t < threads; t++)
        jobs[t] = (AttnJob){b[0].buf, b[1].buf, b[2].buf, b[3].buf, b[4].buf, out, S, n, Dh, BH * t / threads,
                            BH * (t + 1) / threads, scale, 0};
    Py_BEGIN_ALLOW_THREADS
    run_parallel(attn_thread_main, jobs, sizeof(AttnJob), threads);
    Py_END_ALLOW_THREADS
    int failed = 0;
    for (int t = 0; t < threads; t++) failed |= jobs[t].failed;
    if (failed) PyErr_NoMemory();
    else result = Py_NewRef(Py_None);
    release_buffers(b, 6);
    return result;
#endif
}

static PyObject *available(PyObject *self, PyObject *noargs) {
#if HAVE_KERNEL
    return PyBool_FromLong(cpu_ok());
#else
    Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"quantized_matmul", quantized_matmul, METH_VARARGS, "y = x · dequantize(w)^T for up to 8 rows of x"},
    {"attend_int8", attend_int8, METH_VARARGS, "one query's attention over an int8 KV cache, per head"},
    {"available", available, METH_NOARGS, "whether this CPU runs the kernel (x86-64 with AVX2 and FMA)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__cpu_kernels(void) { return PyModule_Create(&module); }
