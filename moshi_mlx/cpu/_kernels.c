/*
 * CPU kernels for MLX's CPU backend, where its own ops leave most of the machine idle:
 *
 *   1. quantized matrix × few-rows products (token-by-token decoding of quantized models);
 *   2. one query's attention over an int8 KV cache;
 *   3. SEANet's convolutions (Mimi), with ELU, bias and residual fused (see section 3);
 *   4. residual vector quantization's nearest-codeword searches (Mimi's encoder, section 4);
 *   5. rows of quantized embedding tables, dequantized as MLX does (`embedding_rows`).
 *
 * (1) Token-by-token decoding multiplies one activation row (or a handful: CFG, batches) by
 * every weight matrix. On the CPU backend MLX's quantized matmul is scalar code that
 * decodes ~1.4 G weights/s per core, so a 7B q4 model spends ~2.8 s per step there; the
 * memory holding those weights could be streamed ~10x faster. This kernel decodes MLX's
 * affine format (w = scale · q + bias per group, q packed little-endian in uint32 words,
 * scales/biases in bfloat16 or float32) with AVX2 + FMA and splits the output rows across
 * threads, so it runs at memory speed.
 *
 *   y[m, n] = Σ_g scale[n, g] · (Σ_{i∈g} q[n, i] · x[m, i]) + bias[n, g] · (Σ_{i∈g} x[m, i])
 *
 * For 8-bit weights the arithmetic is MLX's (dequantize, multiply, add) in another summation
 * order: results agree to float32 rounding (tests/test_cpu_kernels.py). 4-bit weights are
 * multiplied by 8-bit activations instead (section 1b), as llama.cpp does: integer dot products
 * do 4x the multiply-adds per instruction, which a batch of rows needs (decoding the nibbles
 * to floats bounded the float version). It adds ~0.5% (rms) of rounding noise to the outputs,
 * which makes 4-bit weights' own error (~8% against the unquantized weights) ~0.2% larger;
 * act8 = 0 keeps float activations (MLX's arithmetic).
 * Only x86-64 with AVX2/FMA is accelerated; elsewhere `available()` is false and callers use
 * MLX's ops.
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
#include <time.h>
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
    /* 4-bit weights × 8-bit activations (section 1b): x quantized by quantize_rows */
    const int8_t *xq;      /* [M][chunks][group / 32][8][32]: see xq_offset */
    const float *xd;       /* [M][G8] per group: the step d (x ≈ d · xq), */
    const float *xr;       /*          7.5 · (Σx − d · Σxq) (see run_rows_q4x8), */
    const float *xs;       /*          Σx; zero beyond G */
    int act8, G8;          /* G8: groups rounded up to a multiple of 8 */
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

/* Rows n0..n1 of y = x · dequant(w)^T. M, BITS and BPG (32-blocks per group) are
   compile-time constants in each instance (see run_job), so the per-row accumulators live in
   registers and the inner loops unroll. Each group's partial sums (ta, tb) are scaled into
   one of two accumulators, even groups into one and odd groups into the other: one chain
   would wait on the FMA latency once per group. */
TARGET static inline __attribute__((always_inline)) void run_rows(const Job *j, const int M, const int BITS,
                                                                  const int BPG) {
    const int K = j->K, G = K / (BPG * 32), row_bytes = K * BITS / 8;
    const __m256i mask = _mm256_set1_epi32(0x0F);
    for (int n = j->n0; n < j->n1; n++) {
        const uint8_t *wr = j->w + (long)n * row_bytes;
        __m256 acc0[MAX_ROWS], acc1[MAX_ROWS];
        for (int m = 0; m < M; m++) acc0[m] = acc1[m] = _mm256_setzero_ps();
        for (int g = 0; g < G; g++) {
            __m256 ta[MAX_ROWS], tb[MAX_ROWS];
            for (int m = 0; m < M; m++) ta[m] = tb[m] = _mm256_setzero_ps();
            for (int b = 0; b < BPG; b++) {
                const int i0 = (g * BPG + b) * 32; /* first element of this 32-block */
                __m256 w0, w1, w2, w3;
                if (BITS == 4) {
                    /* 16 bytes = 32 nibbles; byte i holds elements 2i (low) and 2i+1 (high).
                       Each half is widened to one byte per 32-bit lane straight from memory,
                       then split into nibbles there: 2 shuffles per 32 weights, not 6. */
                    __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(wr + i0 / 2)));
                    __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(wr + i0 / 2 + 8)));
                    w0 = _mm256_cvtepi32_ps(_mm256_and_si256(a, mask));    /* elements 0, 2, …, 14 */
                    w1 = _mm256_cvtepi32_ps(_mm256_and_si256(c, mask));    /* 16, 18, …, 30 */
                    w2 = _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4));      /* 1, 3, …, 15 */
                    w3 = _mm256_cvtepi32_ps(_mm256_srli_epi32(c, 4));      /* 17, 19, …, 31 */
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
            if (g & 1)
                for (int m = 0; m < M; m++) acc1[m] = _mm256_fmadd_ps(_mm256_add_ps(ta[m], tb[m]), scale, acc1[m]);
            else
                for (int m = 0; m < M; m++) acc0[m] = _mm256_fmadd_ps(_mm256_add_ps(ta[m], tb[m]), scale, acc0[m]);
        }
        for (int m = 0; m < M; m++)
            j->y[(long)m * j->N + n] = hsum(_mm256_add_ps(acc0[m], acc1[m]))
                                       + bias_term(j->biases, (long)n * G, j->xsum + (long)m * G, G, j->bf16);
    }
}

/* Rows run in passes of at most 4, each decoding the weights again: with 4 accumulators per
   row, more rows at once spill to the stack (8 rows took 3x as long as two passes of 4); 2 rows
   per pass measured slower than 4 for batches of 8. Every row's arithmetic is the same in any
   pass, so a batch gives each row exactly what it gives alone. */
#define ROWS_PER_PASS 4

/* ---- 1b. 4-bit weights × 8-bit activations --------------------------------------------------

   Each row of x is quantized per weight group g: d = max|x| / 127, xq = round(x / d) in int8
   (x · (127 / max|x|), rounded to even). With w = scale · q + bias (q in 0..15),

     Σ_{i∈g} w_i x_i = scale · Σ q_i x_i + bias · Σ x_i
                     ≈ scale · (d · Σ q_i xq_i + 7.5 · (Σ x_i − d · Σ xq_i)) + bias · Σ x_i

   where the 7.5 term is exact for the mean nibble: the rounding residual r = x − d · xq then
   meets q − 7.5 (at most ±7.5) rather than q (up to 15), halving the added noise. Σ x_i is
   exact float32, so the bias part, often the largest, loses nothing.

   The integer sums Σ q_i xq_i use vpmaddubsw (unsigned q × signed xq, pairs summed in int16:
   |2 · 15 · 127| = 3810, eight of them 30480 < 2^15) then vpmaddwd into int32. Eight groups
   are done at once, one per 32-bit lane: the 16-byte blocks of groups g0..g0+7 are loaded and
   transposed (4 × 8 dwords), so every lane sums its own group and no horizontal sum is needed
   until the row's end. quantize_rows writes xq in the matching order.

   Each (row, output) accumulates its groups in float32 in one fixed order (lane g mod 8, then
   one horizontal sum), whatever the number of rows or threads: a batch gives each row exactly
   what it gets alone. */

static const uint8_t zero_block[16];

/* Where element e (0..31) of block b of group g of row m goes in xq: lane g mod 8 of the 32-byte
   vector (r, h) = (e / 8, e % 2) of block b of chunk g / 8, byte (e % 8) / 2 of the lane,
   matching the transposed weights (dword r of a 16-byte block holds elements 8r..8r+7; its low
   nibbles are the even ones, its high nibbles the odd ones). */
static inline long xq_offset(int m, int chunks, int bpg, int g, int b, int e) {
    return ((((long)m * chunks + g / 8) * bpg + b) * 8 + (e / 8) * 2 + (e & 1)) * 32 + 4 * (g % 8) + (e % 8) / 2;
}

TARGET static inline float hmax(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* x [M, K] → xq, d, 7.5 · residual sum and Σx per group (see above). */
TARGET static void quantize_rows(const float *x, int M, int K, int group, int G8, int8_t *xq, float *xd, float *xr,
                                 float *xs) {
    const int G = K / group, bpg = group / 32, chunks = G8 / 8;
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    /* within each 16-byte half, dwords (r, h): even elements of 8r..8r+7, then odd ones */
    const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15,
                                           0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
    if (G8 > G) {  /* the last chunk's missing groups must read as zeros */
        memset(xq, 0, (size_t)M * G8 * group);
        for (int m = 0; m < M; m++)
            for (int g = G; g < G8; g++) xd[(long)m * G8 + g] = xr[(long)m * G8 + g] = xs[(long)m * G8 + g] = 0.0f;
    }
    for (int m = 0; m < M; m++)
        for (int g = 0; g < G; g++) {
            const float *xg = x + (long)m * K + (long)g * group;
            __m256 amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
            for (int i = 0; i < group; i += 8) {
                const __m256 v = _mm256_loadu_ps(xg + i);
                amax = _mm256_max_ps(amax, _mm256_and_ps(v, abs_mask));
                sum = _mm256_add_ps(sum, v);
            }
            const float a = hmax(amax), d = a / 127.0f;
            const __m256 inv = _mm256_set1_ps(a > 0.0f ? 127.0f / a : 0.0f);
            __m256i qsum = _mm256_setzero_si256();
            for (int b = 0; b < bpg; b++) {
                __m256i q[4];
                for (int k = 0; k < 4; k++) {
                    q[k] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + 32 * b + 8 * k), inv));
                    qsum = _mm256_add_epi32(qsum, q[k]);
                }
                const __m256i bytes = _mm256_permutevar8x32_epi32(
                    _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])), order);
                int32_t dw[8];
                _mm256_storeu_si256((__m256i *)dw, _mm256_shuffle_epi8(bytes, split));
                int8_t *dst = xq + xq_offset(m, chunks, bpg, g, b, 0);
                for (int k = 0; k < 8; k++) memcpy(dst + 32 * k, &dw[k], 4);
            }
            const __m128i q4 = _mm_add_epi32(_mm256_castsi256_si128(qsum), _mm256_extracti128_si256(qsum, 1));
            const int qs = _mm_cvtsi128_si32(q4) + _mm_extract_epi32(q4, 1) + _mm_extract_epi32(q4, 2)
                           + _mm_extract_epi32(q4, 3);
            const float s = hsum(sum);
            xd[(long)m * G8 + g] = d;
            xr[(long)m * G8 + g] = 7.5f * (s - d * (float)qs);
            xs[(long)m * G8 + g] = s;
        }
}

/* Rows n0..n1 of y for the job's M rows, BPG 32-blocks per group (compile-time). The eight
   unpacked weight vectors of a block stay in registers while every row meets them; each row's
   integer and float sums live in small L1 arrays (one load and store per row and chunk): with
   M a compile-time constant the compiler kept them in registers and spilled the weights and
   loop variables instead (see BENCHMARKS.md). The weights are prefetched a few outputs ahead,
   which the hardware prefetcher alone did not do early enough. */
TARGET static inline __attribute__((always_inline)) void run_rows_q4x8(const Job *j, const int ONE_ROW,
                                                                       const int BPG) {
    const int M = ONE_ROW ? 1 : j->M, G = j->K / (32 * BPG), G8 = j->G8, chunks = G8 / 8, row_bytes = j->K / 2;
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const long ahead = (long)row_bytes * (M >= 4 ? 2 : 8);
    __m256 acc[MAX_ROWS];
    __m256i isum[MAX_ROWS];
    for (int n = j->n0; n < j->n1; n++) {
        const uint8_t *wr = j->w + (long)n * row_bytes;
        for (int m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
        for (int c = 0; c < chunks; c++) {
            const int g0 = 8 * c, full = g0 + 8 <= G;
            for (int b = 0; b < BPG; b++) {
                const __m128i *p[8];
                if (full) {  /* the chunk's 8 blocks b are BPG·16 bytes apart */
                    const uint8_t *base = wr + (long)g0 * BPG * 16 + b * 16;
                    if (b == 0)  /* the same chunk of an output ahead */
                        for (int i = 0; i < BPG * 128; i += 64)
                            _mm_prefetch((const char *)(base + ahead + i), _MM_HINT_T0);
                    for (int l = 0; l < 8; l++) p[l] = (const __m128i *)(base + l * BPG * 16);
                } else {
                    for (int l = 0; l < 8; l++)
                        p[l] = (const __m128i *)(g0 + l < G ? wr + (long)(g0 + l) * BPG * 16 + b * 16 : zero_block);
                }
                /* 4 × 8 dword transpose: T[r] lane l = dword r of group g0 + l's block b */
#define PAIR(a, b) _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128(a)), _mm_loadu_si128(b), 1)
                const __m256i L0 = PAIR(p[0], p[4]), L1 = PAIR(p[1], p[5]), L2 = PAIR(p[2], p[6]), L3 = PAIR(p[3], p[7]);
#undef PAIR
                const __m256i t0 = _mm256_unpacklo_epi32(L0, L1), t1 = _mm256_unpackhi_epi32(L0, L1);
                const __m256i t2 = _mm256_unpacklo_epi32(L2, L3), t3 = _mm256_unpackhi_epi32(L2, L3);
                const __m256i T[4] = {_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2),
                                      _mm256_unpacklo_epi64(t1, t3), _mm256_unpackhi_epi64(t1, t3)};
                __m256i W[8];  /* (r, h): low nibbles (even elements), then high (odd) */
                for (int r = 0; r < 4; r++) {
                    W[2 * r] = _mm256_and_si256(T[r], low);
                    W[2 * r + 1] = _mm256_and_si256(_mm256_srli_epi16(T[r], 4), low);
                }
                const int8_t *xm = j->xq + xq_offset(0, chunks, BPG, g0, b, 0);
                const long row_stride = (long)chunks * BPG * 256;  /* xq_offset(m + 1, …) − xq_offset(m, …) */
                for (int m = 0; m < M; m++, xm += row_stride) {
                    __m256i s16 = _mm256_maddubs_epi16(W[0], _mm256_loadu_si256((const __m256i *)xm));
                    for (int k = 1; k < 8; k++)
                        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(W[k], _mm256_loadu_si256((const __m256i *)(xm + 32 * k))));
                    const __m256i s32 = _mm256_madd_epi16(s16, ones);
                    isum[m] = b == 0 ? s32 : _mm256_add_epi32(isum[m], s32);
                }
            }
            __m256 scale, bias;
            if (full) {
                scale = load8(j->scales, (long)n * G + g0, j->bf16);
                bias = load8(j->biases, (long)n * G + g0, j->bf16);
            } else {  /* the last chunk's missing groups: zero weights, zero x */
                float s8[8] = {0}, b8[8] = {0};
                for (int l = 0; g0 + l < G; l++) {
                    s8[l] = scalar_at(j->scales, (long)n * G + g0 + l, j->bf16);
                    b8[l] = scalar_at(j->biases, (long)n * G + g0 + l, j->bf16);
                }
                scale = _mm256_loadu_ps(s8), bias = _mm256_loadu_ps(b8);
            }
            for (int m = 0; m < M; m++) {
                const long o = (long)m * G8 + g0;
                const __m256 t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[m]), _mm256_loadu_ps(j->xd + o),
                                                 _mm256_loadu_ps(j->xr + o));
                acc[m] = _mm256_fmadd_ps(bias, _mm256_loadu_ps(j->xs + o), _mm256_fmadd_ps(scale, t, acc[m]));
            }
        }
        for (int m = 0; m < M; m++) j->y[(long)m * j->N + n] = hsum(acc[m]);
    }
}

TARGET static void run_job_q4x8(const Job *j) {
    const int one = j->M == 1;
    switch (j->group / 32) {
    case 1: if (one) run_rows_q4x8(j, 1, 1); else run_rows_q4x8(j, 0, 1); break;
    case 2: if (one) run_rows_q4x8(j, 1, 2); else run_rows_q4x8(j, 0, 2); break;
    default: if (one) run_rows_q4x8(j, 1, 4); else run_rows_q4x8(j, 0, 4); break;
    }
}

TARGET static void run_job(const Job *j) {
    if (j->act8) {
        run_job_q4x8(j);
        return;
    }
    for (int m0 = 0; m0 < j->M; m0 += ROWS_PER_PASS) {
        Job pass = *j;
        const int G = j->K / j->group;
        pass.x = j->x + (long)m0 * j->K;
        pass.xsum = j->xsum + (long)m0 * G;
        pass.y = j->y + (long)m0 * j->N;
        pass.M = j->M - m0 < ROWS_PER_PASS ? j->M - m0 : ROWS_PER_PASS;
        const int bpg = j->group / 32;
#define ROWS_FOR(B, P) switch (pass.M) { \
        case 1: run_rows(&pass, 1, B, P); break; \
        case 2: run_rows(&pass, 2, B, P); break; \
        case 3: run_rows(&pass, 3, B, P); break; \
        default: run_rows(&pass, 4, B, P); break; }
        if (j->bits == 4) {
            if (bpg == 1) ROWS_FOR(4, 1) else if (bpg == 2) ROWS_FOR(4, 2) else ROWS_FOR(4, 4)
        } else {
            if (bpg == 1) ROWS_FOR(8, 1) else if (bpg == 2) ROWS_FOR(8, 2) else ROWS_FOR(8, 4)
        }
#undef ROWS_FOR
    }
}

static void *thread_main(void *arg) {
    run_job((const Job *)arg);
    return NULL;
}

/* A pool of worker threads, started on first use and kept: a product of a few million weights
   takes 0.1-0.3 ms, and starting and joining a thread per call cost about as much again (the
   TTS's depformer makes ~550 such calls per 80 ms frame). Workers sleep on a condition variable
   between calls, but waking a sleeping thread costs tens of microseconds (more in a virtual
   machine, where it takes an interrupt between cores): as long as a small product itself. So
   a caller that knows the next call follows within microseconds (a layer step run on the
   host, see cpu/host.py) asks the workers to spin for it first (spin_ns); callers between
   MLX operations do not, as a spinning worker would take a core from MLX's own threads. The
   caller spins while it waits for the workers (they run its own call), then sleeps. One
   parallel call at a time (pool_call); a fork waits for the call in progress and the child
   starts with no workers (its copies of the threads do not exist). */
typedef struct {
    void *(*fn)(void *);
    char *jobs;
    size_t size;
    int n;
    long spin_ns; /* how long workers spin for the next call after this one */
} PoolTask;

#define WAIT_SPIN_NS 200000L /* the caller, waiting for workers running its own call */

static pthread_mutex_t pool_call = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_wake = PTHREAD_COND_INITIALIZER;
static pthread_cond_t pool_done = PTHREAD_COND_INITIALIZER;
static PoolTask pool_task;
static unsigned long pool_generation; /* written under pool_mu, read atomically by spinners */
static unsigned long pool_seen_at_start[MAX_THREADS];
static int pool_remaining;            /* workers still running the current call (atomic) */
static int pool_workers; /* started workers, ids 1..pool_workers */

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static inline void cpu_relax(void) { __builtin_ia32_pause(); }

/* Spin until *p != value (returns 1) or spin_ns pass (returns 0). */
static int spin_while_equal_ul(const unsigned long *p, unsigned long value, long spin_ns) {
    long t0 = spin_ns > 0 ? now_ns() : 0;
    for (int i = 0;; i++) {
        if (__atomic_load_n(p, __ATOMIC_ACQUIRE) != value) return 1;
        if (spin_ns <= 0) return 0;
        cpu_relax();
        if ((i & 63) == 63 && now_ns() - t0 > spin_ns) return 0;
    }
}

static int spin_while_positive(const int *p) {
    long t0 = now_ns();
    for (int i = 0;; i++) {
        if (__atomic_load_n(p, __ATOMIC_ACQUIRE) <= 0) return 1;
        cpu_relax();
        if ((i & 63) == 63 && now_ns() - t0 > WAIT_SPIN_NS) return 0;
    }
}

static void *pool_main(void *arg) {
    int id = (int)(intptr_t)arg;
    unsigned long seen = pool_seen_at_start[id];
    long spin_ns = 0;
    for (;;) {
        if (!spin_while_equal_ul(&pool_generation, seen, spin_ns)) {
            pthread_mutex_lock(&pool_mu);
            while (__atomic_load_n(&pool_generation, __ATOMIC_ACQUIRE) == seen)
                pthread_cond_wait(&pool_wake, &pool_mu);
            pthread_mutex_unlock(&pool_mu);
        }
        seen = __atomic_load_n(&pool_generation, __ATOMIC_ACQUIRE);
        PoolTask t = pool_task; /* published before the generation (release/acquire) */
        spin_ns = t.spin_ns;
        if (id < t.n) {
            t.fn(t.jobs + (size_t)id * t.size);
            if (__atomic_sub_fetch(&pool_remaining, 1, __ATOMIC_ACQ_REL) == 0) {
                pthread_mutex_lock(&pool_mu); /* the caller may be between its check and its wait */
                pthread_cond_signal(&pool_done);
                pthread_mutex_unlock(&pool_mu);
            }
        }
    }
    return NULL;
}

static void pool_before_fork(void) { pthread_mutex_lock(&pool_call); }
static void pool_after_fork_parent(void) { pthread_mutex_unlock(&pool_call); }
static void pool_after_fork_child(void) {
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t c = PTHREAD_COND_INITIALIZER;
    pool_mu = m;
    pool_wake = c;
    pool_done = c;
    pool_workers = 0;
    pthread_mutex_unlock(&pool_call);
}

/* Run jobs[0..n) (each `size` bytes): jobs 1… on the pool's workers, job 0 on this thread. If
   the workers cannot be started, all jobs run here, one after the other. */
static void run_parallel(void *(*fn)(void *), void *jobs, size_t size, int n, long spin_ns) {
    if (n <= 1) {
        fn(jobs);
        return;
    }
    pthread_mutex_lock(&pool_call);
    pthread_mutex_lock(&pool_mu);
    while (pool_workers < n - 1) {
        int id = pool_workers + 1;
        pthread_t tid;
        pool_seen_at_start[id] = pool_generation;
        if (pthread_create(&tid, NULL, pool_main, (void *)(intptr_t)id) != 0) break;
        pthread_detach(tid);
        pool_workers++;
    }
    if (pool_workers < n - 1) {
        pthread_mutex_unlock(&pool_mu);
        for (int t = 0; t < n; t++) fn((char *)jobs + (size_t)t * size);
        pthread_mutex_unlock(&pool_call);
        return;
    }
    pool_task = (PoolTask){fn, jobs, size, n, spin_ns};
    __atomic_store_n(&pool_remaining, n - 1, __ATOMIC_RELAXED);
    __atomic_store_n(&pool_generation, pool_generation + 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&pool_wake);
    pthread_mutex_unlock(&pool_mu);
    fn(jobs);
    if (!spin_while_positive(&pool_remaining)) {
        pthread_mutex_lock(&pool_mu);
        while (__atomic_load_n(&pool_remaining, __ATOMIC_ACQUIRE) > 0) pthread_cond_wait(&pool_done, &pool_mu);
        pthread_mutex_unlock(&pool_mu);
    }
    pthread_mutex_unlock(&pool_call);
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

/* ---- 2. attention of one query over an int8 KV cache -------------------------------------
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
        int s = 0;
        /* four slots at a time: each slot's two FMA chains are as below, but four slots' chains
           interleave instead of one slot waiting on its FMA latency */
        for (; s + 4 <= n; s += 4) {
            const int8_t *k = K + (long)s * Dh;
            __m256 a[4], b[4];
            for (int i = 0; i < 4; i++) a[i] = b[i] = _mm256_setzero_ps();
            int d = 0;
            for (; d + 16 <= Dh; d += 16) {
                const __m256 qa = _mm256_loadu_ps(q + d), qb = _mm256_loadu_ps(q + d + 8);
                for (int i = 0; i < 4; i++) {
                    a[i] = _mm256_fmadd_ps(i8_to_ps(k + (long)i * Dh + d), qa, a[i]);
                    b[i] = _mm256_fmadd_ps(i8_to_ps(k + (long)i * Dh + d + 8), qb, b[i]);
                }
            }
            if (d < Dh)
                for (int i = 0; i < 4; i++) a[i] = _mm256_fmadd_ps(i8_to_ps(k + (long)i * Dh + d), _mm256_loadu_ps(q + d), a[i]);
            for (int i = 0; i < 4; i++) {
                p[s + i] = hsum(_mm256_add_ps(a[i], b[i])) * ks[s + i] * j->scale;
                if (p[s + i] > mx) mx = p[s + i];
            }
        }
        for (; s < n; s++) {
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


/* ---- 3. SEANet convolutions: causal, with fused ELU, bias and residual ---------------------

   y[b, t, o] = bias[o] + Σ_{k<K} Σ_{c<Cin} W[o, k, c] · act(in[b, t·S + k·D, c])

   where `in` is the left context `prev` [B, ctx, Cin] followed by the new input x [B, T, Cin]
   (a "valid" convolution: the caller never concatenates them), and act is the identity or
   ELU. `residual_block` chains two of them as SEANet's block does: x + conv_k1(elu(conv_k(
   elu(in)))), the hidden activations never leaving the cache.

   Why: SEANet's convolutions have few channels at high rates (64 channels at 24 kHz).
   OpenBLAS runs such thin products far below its peak, and MLX's single-threaded ELU,
   im2col copies, bias and residual adds cost more than the products. Here each thread
   gathers (and activates) a block of input rows once, in cache, then computes output tiles
   of 6 rows × 16 channels with 12 AVX2 accumulators (12 × 16 with AVX-512), adding bias and
   residual on the way out.

   Every output is summed over (k, c) in an order fixed by K and Cin alone, whatever T, the
   tiling, the threads or the instruction set, so streaming and batch calls agree exactly.

   W comes packed in blocks of 16 output channels: wp[ob][k · Cin + c][16], zero beyond Cout. */

/* Loops over a tile's rows must unroll completely, or its accumulators live on the stack. */
#if defined(__clang__)
#define UNROLL _Pragma("clang loop unroll(full)")
#else
#define UNROLL _Pragma("GCC unroll 16")
#endif

#define CONV_COLS 16
#define CONV_ROWS 6       /* rows per AVX2 tile: 12 accumulators of 8 floats */
#define CONV_ROWS_512 12  /* rows per AVX-512 tile: 12 accumulators of 16 floats */
#define CONV_CHUNK 256    /* reductions per pass: a 16 KB weight chunk, reused from L1 by every row tile */
#define TARGET512 __attribute__((target("avx512f,fma")))

/* MOSHI_MLX_AVX512=0 keeps the AVX2 tiles (same results; for comparisons). */
static int cpu_has_avx512(void) {
    static int has = -1;
    if (has < 0) {
        const char *env = getenv("MOSHI_MLX_AVX512");
        __builtin_cpu_init();
        has = __builtin_cpu_supports("avx512f") && !(env && env[0] == '0');
    }
    return has;
}

typedef struct { /* one convolution */
    const float *wp, *bias; /* packed weight, bias [Cout] or NULL */
    int Cin, Cout, K, S, D;
} Conv;

/* exp(x) for x in [−87, 0]: 2^n · p(r), r = x − n·ln 2, p the degree-7 Taylor polynomial
   (relative error < 3e-9): the same formula as activations._exp. */
TARGET static inline __m256 exp8(__m256 x) {
    const __m256 magic = _mm256_set1_ps(12582912.0f);
    const __m256 t = _mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.4426950408889634f)), magic);
    const __m256 n = _mm256_sub_ps(t, magic);
    __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693145751953125f)));
    r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(1.428606765330187e-06f)));
    __m256 p = _mm256_set1_ps((float)(1.0 / 5040));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps((float)(1.0 / 720)));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps((float)(1.0 / 120)));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps((float)(1.0 / 24)));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps((float)(1.0 / 6)));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i bits = _mm256_slli_epi32(_mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(0x4B400000 - 127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

/* y = ELU(x) = max(x, 0) + exp(min(x, 0)) − 1 over n floats (in place is fine), or a copy. */
TARGET static void activate(const float *x, float *y, long n, int act) {
    if (!act) {
        memmove(y, x, sizeof(float) * n);
        return;
    }
    const __m256 zero = _mm256_setzero_ps(), lo = _mm256_set1_ps(-87.0f), one = _mm256_set1_ps(1.0f);
    for (long i = 0; i < n; i += 8) {
        float tmp[8] = {0};
        const int full = i + 8 <= n;
        if (!full) memcpy(tmp, x + i, sizeof(float) * (n - i));
        const __m256 v = _mm256_loadu_ps(full ? x + i : tmp);
        const __m256 e = exp8(_mm256_max_ps(_mm256_min_ps(v, zero), lo));
        const __m256 r = _mm256_add_ps(_mm256_max_ps(v, zero), _mm256_sub_ps(e, one));
        if (full) {
            _mm256_storeu_ps(y + i, r);
        } else {
            _mm256_storeu_ps(tmp, r);
            memcpy(y + i, tmp, sizeof(float) * (n - i));
        }
    }
}

/* Rows [r0, r0 + n) of one batch item's input (context then x), activated, into buf. */
static void gather_rows(const float *prev, int ctx, const float *x, int C, long r0, long n, int act, float *buf) {
    if (r0 < ctx) {
        const long from_prev = n < ctx - r0 ? n : ctx - r0;
        activate(prev + r0 * C, buf, from_prev * C, act);
        buf += from_prev * C, r0 += from_prev, n -= from_prev;
    }
    if (n > 0) activate(x + (r0 - ctx) * C, buf, n * C, act);
}

TARGET static inline __m256 load_cols(const float *p, int ncols, int half) {
    if (ncols == CONV_COLS) return _mm256_loadu_ps(p + 8 * half);
    float tmp[CONV_COLS] = {0};
    memcpy(tmp, p, sizeof(float) * ncols);
    return _mm256_loadu_ps(tmp + 8 * half);
}

/* One pass of one tile: M (a compile-time constant per instance) output rows × 16 columns,
   over taps [k0, k1) and input channels [c0, c1). xr[m] points at output row m's first
   input row. Later passes add to the partial sums stored in y by earlier ones; the last
   pass adds bias and residual. */
#define TILE_PARAMS const Conv *g, const float *const *xr, const float *wp, const float *bias16, \
    const float *const *rr, float *const *yr, int ncols, int k0, int k1, int c0, int c1, int first, int last
#define TILE_ARGS g, xr, wp, bias16, rr, yr, ncols, k0, k1, c0, c1, first, last

TARGET static inline __attribute__((always_inline)) void conv_tile(TILE_PARAMS, const int M) {
    __m256 a0[CONV_ROWS], a1[CONV_ROWS];
    UNROLL
    for (int m = 0; m < M; m++) a0[m] = a1[m] = _mm256_setzero_ps();
    const int Cin = g->Cin;
    const long DC = (long)g->D * Cin;
    for (int k = k0; k < k1; k++) {
        const float *w = wp + ((long)k * Cin) * CONV_COLS;
        const long off = k * DC;
        for (int c = c0; c < c1; c++) {
            const __m256 w0 = _mm256_loadu_ps(w + CONV_COLS * c), w1 = _mm256_loadu_ps(w + CONV_COLS * c + 8);
            UNROLL
            for (int m = 0; m < M; m++) {
                const __m256 xb = _mm256_broadcast_ss(xr[m] + off + c);
                a0[m] = _mm256_fmadd_ps(xb, w0, a0[m]);
                a1[m] = _mm256_fmadd_ps(xb, w1, a1[m]);
            }
        }
    }
    UNROLL
    for (int m = 0; m < M; m++) {
        __m256 v0 = a0[m], v1 = a1[m];
        if (!first) {
            v0 = _mm256_add_ps(v0, load_cols(yr[m], ncols, 0));
            v1 = _mm256_add_ps(v1, load_cols(yr[m], ncols, 1));
        }
        if (last) {
            v0 = _mm256_add_ps(v0, _mm256_loadu_ps(bias16));
            v1 = _mm256_add_ps(v1, _mm256_loadu_ps(bias16 + 8));
            if (rr[m]) {
                v0 = _mm256_add_ps(v0, load_cols(rr[m], ncols, 0));
                v1 = _mm256_add_ps(v1, load_cols(rr[m], ncols, 1));
            }
        }
        if (ncols == CONV_COLS) {
            _mm256_storeu_ps(yr[m], v0);
            _mm256_storeu_ps(yr[m] + 8, v1);
        } else {
            float tmp[CONV_COLS];
            _mm256_storeu_ps(tmp, v0);
            _mm256_storeu_ps(tmp + 8, v1);
            memcpy(yr[m], tmp, sizeof(float) * ncols);
        }
    }
}

/* The same pass with AVX-512: 12 rows × 16 columns, one register per row. Each output lane
   sees the same sequence of FMAs as in conv_tile, so the results are bit-identical. */
TARGET512 static inline __attribute__((always_inline)) void conv_tile512(TILE_PARAMS, const int M) {
    __m512 a[CONV_ROWS_512];
    UNROLL
    for (int m = 0; m < M; m++) a[m] = _mm512_setzero_ps();
    const int Cin = g->Cin;
    const long DC = (long)g->D * Cin;
    for (int k = k0; k < k1; k++) {
        const float *w = wp + ((long)k * Cin) * CONV_COLS;
        const long off = k * DC;
        for (int c = c0; c < c1; c++) {
            const __m512 w0 = _mm512_loadu_ps(w + CONV_COLS * c);
            UNROLL
            for (int m = 0; m < M; m++) a[m] = _mm512_fmadd_ps(_mm512_set1_ps(xr[m][off + c]), w0, a[m]);
        }
    }
    const __mmask16 mask = (__mmask16)((1u << ncols) - 1);
    UNROLL
    for (int m = 0; m < M; m++) {
        __m512 v = a[m];
        if (!first) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, yr[m]));
        if (last) {
            v = _mm512_add_ps(v, _mm512_loadu_ps(bias16));
            if (rr[m]) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, rr[m]));
        }
        _mm512_mask_storeu_ps(yr[m], mask, v);
    }
}

/* One instance per row count, so that each tile's accumulators stay in registers. */
TARGET static void tile_dispatch(TILE_PARAMS, int M) {
    switch (M) {
    case 1: conv_tile(TILE_ARGS, 1); break;
    case 2: conv_tile(TILE_ARGS, 2); break;
    case 3: conv_tile(TILE_ARGS, 3); break;
    case 4: conv_tile(TILE_ARGS, 4); break;
    case 5: conv_tile(TILE_ARGS, 5); break;
    default: conv_tile(TILE_ARGS, 6); break;
    }
}

TARGET512 static void tile512_dispatch(TILE_PARAMS, int M) {
    switch (M) {
    case 1: conv_tile512(TILE_ARGS, 1); break;
    case 2: conv_tile512(TILE_ARGS, 2); break;
    case 3: conv_tile512(TILE_ARGS, 3); break;
    case 4: conv_tile512(TILE_ARGS, 4); break;
    case 5: conv_tile512(TILE_ARGS, 5); break;
    case 6: conv_tile512(TILE_ARGS, 6); break;
    case 7: conv_tile512(TILE_ARGS, 7); break;
    case 8: conv_tile512(TILE_ARGS, 8); break;
    case 9: conv_tile512(TILE_ARGS, 9); break;
    case 10: conv_tile512(TILE_ARGS, 10); break;
    case 11: conv_tile512(TILE_ARGS, 11); break;
    default: conv_tile512(TILE_ARGS, 12); break;
    }
}

/* The passes over the reduction (k, c), from a state of all zeros: whole taps when a tap
   has at most CONV_CHUNK channels, else CONV_CHUNK channels of one tap at a time. */
static int next_pass(const Conv *g, int *k0, int *k1, int *c0, int *c1) {
    const int Cin = g->Cin, K = g->K;
    if (*k1 >= K && *c1 >= Cin) return 0;
    if (Cin <= CONV_CHUNK) {
        *k0 = *k1;
        *k1 = *k0 + CONV_CHUNK / Cin < K ? *k0 + CONV_CHUNK / Cin : K;
        *c0 = 0, *c1 = Cin;
    } else if (*k1 > 0 && *c1 < Cin) {
        *c0 = *c1;
        *c1 = *c0 + CONV_CHUNK < Cin ? *c0 + CONV_CHUNK : Cin;
    } else {
        *k0 = *k1, *k1 = *k0 + 1;
        *c0 = 0, *c1 = CONV_CHUNK;
    }
    return 1;
}

/* n output rows, channel blocks [ob0, ob1): src[m] is output row m's first input row (its
   first tap; the next taps follow, D rows apart), y and res (or NULL) their rows with a
   stride of Cout. */
TARGET static void conv_rows(const Conv *g, const float *const *src, int n, float *y, const float *res, int ob0,
                             int ob1, int avx512) {
    const int Cin = g->Cin, Cout = g->Cout;
    const long KC = (long)g->K * Cin;
    const int rows_per_tile = avx512 ? CONV_ROWS_512 : CONV_ROWS;
    for (int ob = ob0; ob < ob1; ob++) {
        const int col = ob * CONV_COLS, ncols = Cout - col < CONV_COLS ? Cout - col : CONV_COLS;
        float bias16[CONV_COLS] = {0};
        if (g->bias) memcpy(bias16, g->bias + col, sizeof(float) * ncols);
        const float *wp = g->wp + ob * KC * CONV_COLS;
        int k0 = 0, k1 = 0, c0 = 0, c1 = 0;
        for (int first = 1; next_pass(g, &k0, &k1, &c0, &c1); first = 0) {
            const int last = k1 >= g->K && c1 >= Cin;
            for (int t = 0; t < n; t += rows_per_tile) {
                const int M = n - t < rows_per_tile ? n - t : rows_per_tile;
                const float *xr[CONV_ROWS_512], *rr[CONV_ROWS_512];
                float *yr[CONV_ROWS_512];
                for (int m = 0; m < M; m++) {
                    xr[m] = src[t + m];
                    rr[m] = res ? res + (long)(t + m) * Cout + col : NULL;
                    yr[m] = y + (long)(t + m) * Cout + col;
                }
                if (avx512) tile512_dispatch(TILE_ARGS, M);
                else tile_dispatch(TILE_ARGS, M);
            }
        }
    }
}

typedef struct {
    const float *prev, *x; /* [B, ctx, C], [B, T, C] */
    float *y;              /* [B, T_out, Cout] of the last convolution */
    Conv conv[2];          /* one convolution, or a residual block's two */
    int stages, ctx, T, T_out, act, block_rows, avx512;
    long r0, r1; /* flat output rows [r0, r1) over (b, t) */
    int ob0, ob1; /* output channel blocks [ob0, ob1) (one convolution only) */
    int failed;
} ConvJob;

/* A block gathers the input rows of up to block_rows output rows, of one batch item or of
   several: streaming steps have few rows per item (2 in Mimi's transformer), and a block per
   item would stream the weights from memory once per item. */
TARGET static void conv_job(ConvJob *j) {
    const Conv *g = &j->conv[0];
    const int span = (g->K - 1) * g->D + 1, C = g->Cin;
    const int hidden = j->stages == 2 ? g->Cout : 0;
    const long capacity = (long)(j->block_rows - 1) * g->S + span;  /* input rows in buf */
    float *buf = malloc(sizeof(float) * ((size_t)capacity * C + (size_t)j->block_rows * hidden));
    const float **rows = malloc(sizeof(float *) * 2 * (size_t)j->block_rows);
    if (!buf || !rows) {
        free(buf), free(rows);
        j->failed = 1;
        return;
    }
    float *hbuf = buf + (size_t)capacity * C;
    const float **hrows = rows + j->block_rows;
    for (int m = 0; m < j->block_rows; m++) hrows[m] = hbuf + (long)m * hidden;
    const int Cout = j->conv[j->stages - 1].Cout;
    for (long r = j->r0; r < j->r1;) {
        const long first = r;
        long used = 0;  /* input rows gathered */
        int n = 0;      /* output rows */
        while (r < j->r1 && n < j->block_rows) {
            const long b = r / j->T_out;
            const int t0 = (int)(r % j->T_out);
            long t1 = t0 + (j->block_rows - n);
            if (t1 > j->T_out) t1 = j->T_out;
            if (t1 - t0 > j->r1 - r) t1 = t0 + (j->r1 - r);
            const long fit = (capacity - used - span) / g->S + 1;  /* rows whose inputs still fit */
            if (fit < 1) break;
            if (t1 - t0 > fit) t1 = t0 + fit;
            const long need = (t1 - t0 - 1) * g->S + span;
            gather_rows(j->prev ? j->prev + b * j->ctx * C : NULL, j->ctx, j->x + b * j->T * C, C, (long)t0 * g->S,
                        need, j->act, buf + used * C);
            for (long t = t0; t < t1; t++) rows[n + t - t0] = buf + (used + (t - t0) * g->S) * C;
            used += need, n += (int)(t1 - t0), r += t1 - t0;
        }
        float *y = j->y + first * Cout;
        if (j->stages == 1) {
            conv_rows(g, rows, n, y, NULL, j->ob0, j->ob1, j->avx512);
        } else { /* x + conv_k1(elu(conv(elu(in)))): output row (b, t)'s residual is x row (b, t) (T_out = T) */
            const Conv *g2 = &j->conv[1];
            conv_rows(g, rows, n, hbuf, NULL, 0, (hidden + CONV_COLS - 1) / CONV_COLS, j->avx512);
            activate(hbuf, hbuf, (long)n * hidden, 1);
            conv_rows(g2, hrows, n, y, j->x + first * C, 0, (g2->Cout + CONV_COLS - 1) / CONV_COLS, j->avx512);
        }
    }
    free(buf), free(rows);
}

static void *conv_thread_main(void *arg) {
    conv_job((ConvJob *)arg);
    return NULL;
}


/* ---- 4. Residual vector quantization: each row's nearest codeword -------------------------

   For each row r of x [M, D] and each codebook i in turn: code = argmin_j ‖r − c_ij‖², then
   r −= c_i[code]. The distances are computed directly, Σ (r − c)², not as ‖c‖² − 2 r·c, which
   cancels in float32 when r sits close to codewords; ties go to the lowest index, as torch's
   argmin does. Why: Mimi's 32 codebooks of 2048 × 256 floats are 64 MB read per frame, as 32
   sequential searches; through MLX each is ~15 small operations. Here a codebook is read once
   for all rows (memory-bound), its codes split among the threads; a row's distances are the
   same whatever the number of rows or threads, so a batch gives each row what it gets alone. */
typedef struct {
    const float *cb; /* [bins, D]: one codebook */
    const float *r;  /* [M, D] residuals */
    float *best_d;   /* [M] */
    int *best_j;     /* [M] */
    int M, D, j0, j1;
} NearestJob;

TARGET static inline float squared_distance(const float *a, const float *b, int D) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (int k = 0; k < D; k += 16) {
        const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k));
        const __m256 d1 = _mm256_sub_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8));
        s0 = _mm256_fmadd_ps(d0, d0, s0);
        s1 = _mm256_fmadd_ps(d1, d1, s1);
    }
    return hsum(_mm256_add_ps(s0, s1));
}

/* squared_distance of four rows to one code, each summed exactly as squared_distance sums it:
   the code's vectors are loaded once for the four (loads bounded the one-row loop). */
TARGET static inline void squared_distances4(const float *r, long stride, const float *b, int D, float *out) {
    __m256 s0[4], s1[4];
    for (int i = 0; i < 4; i++) s0[i] = s1[i] = _mm256_setzero_ps();
    for (int k = 0; k < D; k += 16) {
        const __m256 b0 = _mm256_loadu_ps(b + k), b1 = _mm256_loadu_ps(b + k + 8);
        for (int i = 0; i < 4; i++) {
            const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(r + i * stride + k), b0);
            const __m256 d1 = _mm256_sub_ps(_mm256_loadu_ps(r + i * stride + k + 8), b1);
            s0[i] = _mm256_fmadd_ps(d0, d0, s0[i]);
            s1[i] = _mm256_fmadd_ps(d1, d1, s1[i]);
        }
    }
    for (int i = 0; i < 4; i++) out[i] = hsum(_mm256_add_ps(s0[i], s1[i]));
}

TARGET static void *nearest_thread_main(void *arg) {
    const NearestJob *j = arg;
    const int M4 = j->M - j->M % 4;
    for (int m = 0; m < j->M; m++) j->best_d[m] = INFINITY, j->best_j[m] = j->j0;
    for (int c = j->j0; c < j->j1; c++) {
        const float *code = j->cb + (long)c * j->D;
        for (int m = 0; m < M4; m += 4) {
            float d[4];
            squared_distances4(j->r + (long)m * j->D, j->D, code, j->D, d);
            for (int i = 0; i < 4; i++)
                if (d[i] < j->best_d[m + i]) j->best_d[m + i] = d[i], j->best_j[m + i] = c;
        }
        for (int m = M4; m < j->M; m++) {
            const float d = squared_distance(j->r + (long)m * j->D, code, j->D);
            if (d < j->best_d[m]) j->best_d[m] = d, j->best_j[m] = c;
        }
    }
    return NULL;
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

/* quantized_matmul(x, w, scales, biases, out, M, N, K, bits, group, bf16, threads[, spin_us[, act8]])
   act8 (default 1): 4-bit weights multiply 8-bit activations (section 1b); 0: float ones. */
static PyObject *quantized_matmul(PyObject *self, PyObject *args) {
    PyObject *ox, *ow, *os, *ob, *oy;
    int M, N, K, bits, group, bf16, threads, spin_us = 0, act8 = 1;
    if (!PyArg_ParseTuple(args, "OOOOOiiiiiii|ii", &ox, &ow, &os, &ob, &oy, &M, &N, &K, &bits, &group, &bf16,
                          &threads, &spin_us, &act8))
        return NULL;
#if !HAVE_KERNEL
    PyErr_SetString(PyExc_RuntimeError, "quantized_matmul: not available on this platform");
    return NULL;
#else
    if (M < 1 || M > MAX_ROWS || (bits != 4 && bits != 8) || group % 32 || group > 128 || K % group || N < 1) {
        PyErr_SetString(PyExc_ValueError, "quantized_matmul: unsupported shape, bits or group size");
        return NULL;
    }
    act8 = act8 && bits == 4;
    const long G = K / group, G8 = (G + 7) / 8 * 8, esize = bf16 ? 2 : 4;
    PyObject *objs[5] = {ox, ow, os, ob, oy};
    const char *names[5] = {"x", "w", "scales", "biases", "out"};
    const Py_ssize_t sizes[5] = {(Py_ssize_t)M * K * 4, (Py_ssize_t)N * K * bits / 8, N * G * esize, N * G * esize,
                                 (Py_ssize_t)M * N * 4};
    Py_buffer b[5];
    if (get_buffers("quantized_matmul", objs, names, sizes, 5, b) < 0) return NULL;
    PyObject *result = NULL;
    const float *x = b[0].buf;
    /* float activations: x permuted and its group sums; 8-bit: xq and its per-group floats */
    const size_t floats = act8 ? 3 * (size_t)M * G8 : (size_t)M * K + (size_t)M * G;
    float *xp = PyMem_RawMalloc(sizeof(float) * floats + (act8 ? (size_t)M * G8 * group : 0));
    if (!xp) { PyErr_NoMemory(); goto done; }
    float *xsum = xp + (size_t)M * K;
    int8_t *xq = (int8_t *)(xp + floats);
    float *xd = xp, *xr = xp + (size_t)M * G8, *xs = xp + 2 * (size_t)M * G8;  /* act8 only */
    if (act8) {
        quantize_rows(x, M, K, group, (int)G8, xq, xd, xr, xs);
    } else {
        for (int m = 0; m < M; m++) {
            if (bits == 4) permute_x(x + (long)m * K, xp + (long)m * K, K);
            else memcpy(xp + (long)m * K, x + (long)m * K, sizeof(float) * K);
            for (long g = 0; g < G; g++) {
                float s = 0.0f;
                for (int i = 0; i < group; i++) s += x[(long)m * K + g * group + i];
                xsum[m * G + g] = s;
            }
        }
    }
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    while (threads > 1 && N / threads < 64) threads--;
    Job jobs[MAX_THREADS];
    for (int t = 0; t < threads; t++) {
        jobs[t] = (Job){xp, xsum, b[1].buf, b[2].buf, b[3].buf, b[4].buf, M, N, K, bits, group, bf16,
                        (int)((long)N * t / threads), (int)((long)N * (t + 1) / threads)};
        if (act8) jobs[t].act8 = 1, jobs[t].G8 = (int)G8, jobs[t].xq = xq, jobs[t].xd = xd, jobs[t].xr = xr, jobs[t].xs = xs;
    }
    Py_BEGIN_ALLOW_THREADS
    run_parallel(thread_main, jobs, sizeof(Job), threads, 1000L * spin_us);
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
    int BH, S, n, Dh, threads, spin_us = 0;
    float scale;
    if (!PyArg_ParseTuple(args, "OOOOOOiiiifi|i", &oq, &okq, &oks, &ovq, &ovs, &oy, &BH, &S, &n, &Dh, &scale,
                          &threads, &spin_us))
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
    run_parallel(attn_thread_main, jobs, sizeof(AttnJob), threads, 1000L * spin_us);
    Py_END_ALLOW_THREADS
    int failed = 0;
    for (int t = 0; t < threads; t++) failed |= jobs[t].failed;
    if (failed) PyErr_NoMemory();
    else result = Py_NewRef(Py_None);
    release_buffers(b, 6);
    return result;
#endif
}

#if HAVE_KERNEL
/* Thread count and jobs for n_rows output rows (or, with few rows, the output channel
   blocks of a single convolution), then run them. Returns -1 when out of memory. */
static int run_conv(ConvJob proto, long rows, long flops, int threads) {
    const int avx512 = cpu_has_avx512();
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    /* Starting a thread costs ~20-50 µs: small products stay on this one. */
    while (threads > 1 && (double)flops / threads < 4e5) threads--;
    const int blocks = (proto.conv[0].Cout + CONV_COLS - 1) / CONV_COLS;
    const int split_rows = proto.stages == 2 || rows >= (long)threads * 4 * CONV_ROWS;
    if (!split_rows && blocks < threads) threads = blocks;
    ConvJob jobs[MAX_THREADS];
    for (int t = 0; t < threads; t++) {
        jobs[t] = proto;
        jobs[t].avx512 = avx512;
        jobs[t].r0 = split_rows ? rows * t / threads : 0;
        jobs[t].r1 = split_rows ? rows * (t + 1) / threads : rows;
        jobs[t].ob0 = split_rows ? 0 : blocks * t / threads;
        jobs[t].ob1 = split_rows ? blocks : blocks * (t + 1) / threads;
    }
    Py_BEGIN_ALLOW_THREADS
    run_parallel(conv_thread_main, jobs, sizeof(ConvJob), threads, 0);
    Py_END_ALLOW_THREADS
    int failed = 0;
    for (int t = 0; t < threads; t++) failed |= jobs[t].failed;
    return failed ? -1 : 0;
}

/* Rows per block: the gathered input within ~128 KB (L2), and at least 48 rows, so that
   each pass over the weights serves many rows (deep layers: few rows, big weights). */
static int block_rows_for(int Cin, int span, int S, int extra_per_row) {
    int rows = ((32768 - span * Cin) / (S * Cin + extra_per_row));
    if (rows < 8 * CONV_ROWS) rows = 8 * CONV_ROWS;
    return rows - rows % CONV_ROWS_512; /* whole tiles of either width */
}
#endif

/* conv1d(prev, x, wp, bias, out, B, ctx, T, T_out, Cin, Cout, K, S, D, act, threads):
   prev [B, ctx, Cin] (None when ctx is 0), x [B, T, Cin], bias [Cout] or None, out
   [B, T_out, Cout]; act 1 applies ELU to the input. */
static PyObject *conv1d(PyObject *self, PyObject *args) {
    PyObject *oprev, *ox, *ow, *obias, *oy;
    int B, ctx, T, T_out, Cin, Cout, K, S, D, act, threads;
    if (!PyArg_ParseTuple(args, "OOOOOiiiiiiiiiii", &oprev, &ox, &ow, &obias, &oy, &B, &ctx, &T, &T_out, &Cin,
                          &Cout, &K, &S, &D, &act, &threads))
        return NULL;
#if !HAVE_KERNEL
    PyErr_SetString(PyExc_RuntimeError, "conv1d: not available on this platform");
    return NULL;
#else
    const int span = (K - 1) * D + 1;
    if (B < 1 || T < 1 || T_out < 1 || ctx < 0 || Cin < 1 || Cout < 1 || K < 1 || S < 1 || D < 1
        || (act != 0 && act != 1) || (long)(T_out - 1) * S + span > (long)ctx + T || (ctx > 0) != (oprev != Py_None)) {
        PyErr_SetString(PyExc_ValueError, "conv1d: unsupported shape (context + input shorter than the output needs, "
                                          "a size < 1, or prev given without context)");
        return NULL;
    }
    const long blocks = (Cout + CONV_COLS - 1) / CONV_COLS;
    PyObject *objs[5];
    const char *names[5];
    Py_ssize_t sizes[5];
    int n = 0;
    if (ctx > 0) objs[n] = oprev, names[n] = "prev", sizes[n++] = (Py_ssize_t)B * ctx * Cin * 4;
    objs[n] = ox, names[n] = "x", sizes[n++] = (Py_ssize_t)B * T * Cin * 4;
    objs[n] = ow, names[n] = "packed weight", sizes[n++] = (Py_ssize_t)blocks * K * Cin * CONV_COLS * 4;
    if (obias != Py_None) objs[n] = obias, names[n] = "bias", sizes[n++] = (Py_ssize_t)Cout * 4;
    objs[n] = oy, names[n] = "out", sizes[n++] = (Py_ssize_t)B * T_out * Cout * 4;
    Py_buffer b[5];
    if (get_buffers("conv1d", objs, names, sizes, n, b) < 0) return NULL;
    const int i0 = ctx > 0;
    ConvJob job = {0};
    job.prev = ctx > 0 ? b[0].buf : NULL;
    job.x = b[i0].buf;
    job.y = b[n - 1].buf;
    job.conv[0] = (Conv){b[i0 + 1].buf, obias != Py_None ? b[i0 + 2].buf : NULL, Cin, Cout, K, S, D};
    job.stages = 1, job.ctx = ctx, job.T = T, job.T_out = T_out, job.act = act;
    job.block_rows = block_rows_for(Cin, span, S, 0);
    const int rc = run_conv(job, (long)B * T_out, 2L * B * T_out * K * Cin * Cout, threads);
    release_buffers(b, n);
    if (rc < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
#endif
}

/* residual_block(prev, x, w1p, b1, w2p, b2, out, B, ctx, T, C, H, K, D, threads):
   out = x + conv2(elu(conv1(elu(prev ‖ x)))), conv1 C → H with kernel K and dilation D
   (ctx = (K − 1)·D), conv2 H → C with kernel 1; biases may be None. */
static PyObject *residual_block(PyObject *self, PyObject *args) {
    PyObject *oprev, *ox, *ow1, *ob1, *ow2, *ob2, *oy;
    int B, ctx, T, C, H, K, D, threads;
    if (!PyArg_ParseTuple(args, "OOOOOOOiiiiiiii", &oprev, &ox, &ow1, &ob1, &ow2, &ob2, &oy, &B, &ctx, &T, &C, &H,
                          &K, &D, &threads))
        return NULL;
#if !HAVE_KERNEL
    PyErr_SetString(PyExc_RuntimeError, "residual_block: not available on this platform");
    return NULL;
#else
    if (B < 1 || T < 1 || C < 1 || H < 1 || K < 1 || D < 1 || ctx != (K - 1) * D || (ctx > 0) != (oprev != Py_None)) {
        PyErr_SetString(PyExc_ValueError, "residual_block: unsupported shape (the context must be (K - 1) * D "
                                          "rows, given as prev when not empty)");
        return NULL;
    }
    PyObject *objs[7];
    const char *names[7];
    Py_ssize_t sizes[7];
    int n = 0;
    if (ctx > 0) objs[n] = oprev, names[n] = "prev", sizes[n++] = (Py_ssize_t)B * ctx * C * 4;
    objs[n] = ox, names[n] = "x", sizes[n++] = (Py_ssize_t)B * T * C * 4;
    const int iw1 = n;
    objs[n] = ow1, names[n] = "packed weight 1", sizes[n++] = (Py_ssize_t)((H + CONV_COLS - 1) / CONV_COLS) * K * C * CONV_COLS * 4;
    const int ib1 = ob1 != Py_None ? n : -1;
    if (ib1 >= 0) objs[n] = ob1, names[n] = "bias 1", sizes[n++] = (Py_ssize_t)H * 4;
    const int iw2 = n;
    objs[n] = ow2, names[n] = "packed weight 2", sizes[n++] = (Py_ssize_t)((C + CONV_COLS - 1) / CONV_COLS) * H * CONV_COLS * 4;
    const int ib2 = ob2 != Py_None ? n : -1;
    if (ib2 >= 0) objs[n] = ob2, names[n] = "bias 2", sizes[n++] = (Py_ssize_t)C * 4;
    objs[n] = oy, names[n] = "out", sizes[n++] = (Py_ssize_t)B * T * C * 4;
    Py_buffer b[7];
    if (get_buffers("residual_block", objs, names, sizes, n, b) < 0) return NULL;
    ConvJob job = {0};
    job.prev = ctx > 0 ? b[0].buf : NULL;
    job.x = b[ctx > 0].buf;
    job.y = b[n - 1].buf;
    job.conv[0] = (Conv){b[iw1].buf, ib1 >= 0 ? b[ib1].buf : NULL, C, H, K, 1, D};
    job.conv[1] = (Conv){b[iw2].buf, ib2 >= 0 ? b[ib2].buf : NULL, H, C, 1, 1, 1};
    job.stages = 2, job.ctx = ctx, job.T = T, job.T_out = T, job.act = 1;
    job.block_rows = block_rows_for(C, ctx + 1, 1, H);
    const int rc = run_conv(job, (long)B * T, 2L * B * T * (K * C * H + H * C), threads);
    release_buffers(b, n);
    if (rc < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
#endif
}

/* nearest_codes(x, codebooks, out, M, n, n_q, bins, D, threads, spin_us): out [M, n] int32, the
   codes of the first n of the n_q residual quantization levels in codebooks (section 4) */
static PyObject *nearest_codes(PyObject *self, PyObject *args) {
    PyObject *ox, *ocb, *oy;
    int M, n, n_q, bins, D, threads, spin_us;
    if (!PyArg_ParseTuple(args, "OOOiiiiiii", &ox, &ocb, &oy, &M, &n, &n_q, &bins, &D, &threads, &spin_us))
        return NULL;
#if !HAVE_KERNEL
    PyErr_SetString(PyExc_RuntimeError, "nearest_codes: not available on this platform");
    return NULL;
#else
    if (M < 1 || n < 1 || n > n_q || bins < 1 || D < 16 || D % 16) {
        PyErr_SetString(PyExc_ValueError, "nearest_codes: unsupported shape (D must be a multiple of 16)");
        return NULL;
    }
    PyObject *objs[3] = {ox, ocb, oy};
    const char *names[3] = {"x", "codebooks", "out"};
    const Py_ssize_t sizes[3] = {(Py_ssize_t)M * D * 4, (Py_ssize_t)n_q * bins * D * 4, (Py_ssize_t)M * n * 4};
    Py_buffer b[3];
    if (get_buffers("nearest_codes", objs, names, sizes, 3, b) < 0) return NULL;
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    while (threads > 1 && bins / threads < 256) threads--;
    float *r = PyMem_RawMalloc(sizeof(float) * (size_t)M * (D + threads));
    int *best_j = PyMem_RawMalloc(sizeof(int) * (size_t)M * threads);
    if (!r || !best_j) {
        PyMem_RawFree(r);
        PyMem_RawFree(best_j);
        release_buffers(b, 3);
        return PyErr_NoMemory();
    }
    float *best_d = r + (size_t)M * D;
    memcpy(r, b[0].buf, sizeof(float) * (size_t)M * D);
    const float *codebooks = b[1].buf;
    int32_t *out = b[2].buf;
    NearestJob jobs[MAX_THREADS];
    Py_BEGIN_ALLOW_THREADS
    for (int i = 0; i < n; i++) {
        const float *cb = codebooks + (long)i * bins * D;
        for (int t = 0; t < threads; t++)
            jobs[t] = (NearestJob){cb, r, best_d + (long)t * M, best_j + (long)t * M, M, D,
                                   (int)((long)bins * t / threads), (int)((long)bins * (t + 1) / threads)};
        /* the workers wait awake between levels: the next search follows within microseconds */
        run_parallel(nearest_thread_main, jobs, sizeof(NearestJob), threads, i + 1 < n ? 1000L * spin_us : 0);
        for (int m = 0; m < M; m++) {
            int t_best = 0; /* thread t holds codes below thread t + 1's: the first of equals wins */
            for (int t = 1; t < threads; t++)
                if (jobs[t].best_d[m] < jobs[t_best].best_d[m]) t_best = t;
            const int code = jobs[t_best].best_j[m];
            out[(long)m * n + i] = code;
            float *row = r + (long)m * D;
            const float *c = cb + (long)code * D;
            for (int k = 0; k < D; k++) row[k] -= c[k];
        }
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(r);
    PyMem_RawFree(best_j);
    release_buffers(b, 3);
    Py_RETURN_NONE;
#endif
}

/* embedding_rows(weight, scales, biases, tokens, out, rows, vocab, dim, bits, group, bf16):
   the rows of a 4/8-bit quantized embedding table [vocab, dim] for tokens [rows] (int32; −1
   gives zeros) into out [rows, dim], as MLX dequantizes them: scale · q + bias, each
   operation rounded to bfloat16 when the scales are bfloat16 (MLX computes in their dtype).
   Why: a step reads 33 tables' rows; in numpy that is ~20 passes over the rows of all tables
   (nibbles, widening, the bfloat16 rounding), several ms for a batch. */
#if HAVE_KERNEL
static inline float round_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    u = (u + (0x7FFFu + ((u >> 16) & 1u))) & 0xFFFF0000u;
    memcpy(&x, &u, 4);
    return x;
}

/* the products and sums are MLX's separate operations: never fused into an FMA */
__attribute__((optimize("fp-contract=off"))) static void dequantize_row(const uint8_t *w, const void *scales,
                                                                         const void *biases, long g0, int dim,
                                                                         int bits, int group, int bf16, float *y) {
    for (int g = 0; g < dim / group; g++) {
        const float s = scalar_at(scales, g0 + g, bf16), b = scalar_at(biases, g0 + g, bf16);
        float *yg = y + (long)g * group;
        if (bits == 4) {
            const uint8_t *wg = w + (long)g * group / 2;
            for (int i = 0; i < group; i++) yg[i] = (float)((wg[i / 2] >> (4 * (i & 1))) & 0xF);
        } else {
            const uint8_t *wg = w + (long)g * group;
            for (int i = 0; i < group; i++) yg[i] = (float)wg[i];
        }
        if (bf16)
            for (int i = 0; i < group; i++) yg[i] = round_bf16(round_bf16(s * yg[i]) + b);
        else
            for (int i = 0; i < group; i++) yg[i] = s * yg[i] + b;
    }
}
#endif

static PyObject *embedding_rows(PyObject *self, PyObject *args) {
    PyObject *ow, *os, *ob, *ot, *oy;
    int rows, vocab, dim, bits, group, bf16;
    if (!PyArg_ParseTuple(args, "OOOOOiiiiii", &ow, &os, &ob, &ot, &oy, &rows, &vocab, &dim, &bits, &group, &bf16))
        return NULL;
#if !HAVE_KERNEL
    PyErr_SetString(PyExc_RuntimeError, "embedding_rows: not available on this platform");
    return NULL;
#else
    if (rows < 1 || vocab < 1 || (bits != 4 && bits != 8) || group < 1 || dim % group || (dim * bits) % 32) {
        PyErr_SetString(PyExc_ValueError, "embedding_rows: unsupported shape");
        return NULL;
    }
    const int scale_bytes = bf16 ? 2 : 4;
    PyObject *objs[5] = {ow, os, ob, ot, oy};
    const char *names[5] = {"weight", "scales", "biases", "tokens", "out"};
    const Py_ssize_t sizes[5] = {(Py_ssize_t)vocab * dim * bits / 8, (Py_ssize_t)vocab * (dim / group) * scale_bytes,
                                 (Py_ssize_t)vocab * (dim / group) * scale_bytes, (Py_ssize_t)rows * 4,
                                 (Py_ssize_t)rows * dim * 4};
    Py_buffer b[5];
    if (get_buffers("embedding_rows", objs, names, sizes, 5, b) < 0) return NULL;
    const int32_t *tokens = b[3].buf;
    for (int r = 0; r < rows; r++)
        if (tokens[r] >= vocab || tokens[r] < -1) {
            PyErr_Format(PyExc_ValueError, "embedding_rows: token %d outside the table's %d rows", (int)tokens[r],
                         vocab);
            release_buffers(b, 5);
            return NULL;
        }
    float *y = b[4].buf;
    for (int r = 0; r < rows; r++) {
        float *yr = y + (long)r * dim;
        if (tokens[r] < 0) {
            memset(yr, 0, sizeof(float) * dim);
            continue;
        }
        const long t = tokens[r];
        dequantize_row((const uint8_t *)b[0].buf + t * dim * bits / 8, b[1].buf, b[2].buf, t * (dim / group), dim,
                       bits, group, bf16, yr);
    }
    release_buffers(b, 5);
    Py_RETURN_NONE;
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
    {"conv1d", conv1d, METH_VARARGS, "causal convolution of context + input, with optional ELU on the input"},
    {"residual_block", residual_block, METH_VARARGS, "SEANet residual block: x + conv_k1(elu(conv_k(elu(x))))"},
    {"nearest_codes", nearest_codes, METH_VARARGS, "residual vector quantization: each row's nearest codes"},
    {"embedding_rows", embedding_rows, METH_VARARGS, "rows of a 4/8-bit quantized embedding, dequantized as MLX does"},
    {"available", available, METH_NOARGS, "whether this CPU runs the kernel (x86-64 with AVX2 and FMA)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) {
#if HAVE_KERNEL
    pthread_atfork(pool_before_fork, pool_after_fork_parent, pool_after_fork_child);
#endif
    return PyModule_Create(&module);
}
