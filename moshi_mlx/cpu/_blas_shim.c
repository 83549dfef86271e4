/*
 * cblas_sgemm for MLX's CPU backend that sends matrix-vector products to cblas_sgemv.
 *
 * MLX calls cblas_sgemm for every matmul, including the one-row products of token-by-token
 * decoding (x [1, K] @ W^T). OpenBLAS runs those through its GEMM kernels at ~17 GB/s on a
 * 2-core x86 machine, but its GEMV kernels stream the weights at ~38 GB/s: decoding is
 * memory-bound, so that is ~2x faster. Loaded with RTLD_GLOBAL before MLX (see blas.py),
 * this definition of cblas_sgemm is the one MLX's reference resolves to; everything that
 * is not a matrix-vector product goes to OpenBLAS's own cblas_sgemm unchanged.
 *
 * Built as a (trivial) Python extension so that pip compiles it; x86-64 Linux only.
 *
 * blas.py makes the shim global only after moshi_blas_shim_init succeeded. Should it be global
 * without a BLAS to forward to anyway (loaded by other means, or init failed), cblas_sgemm does
 * not crash: it forwards every product to the first other cblas_sgemm found among the loaded
 * libraries (mlx-cpu's bundled BLAS, a dependency of libmlx.so), or aborts with a message.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <link.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Products with few rows go to gemv, one row at a time (measured on a 2-core x86 machine
   with OpenBLAS; OpenBLAS's GEMM is 2-6x slower than its GEMV for these shapes):
   up to 4 rows always win, and up to 8 when the matrix is small enough (≤ 4 MB) to stay
   in cache between rows. */
#define DEFAULT_GEMV_MAX_ROWS 4
#define SMALL_MATRIX_GEMV_MAX_ROWS 8
#define SMALL_MATRIX_FLOATS (1L << 20)

enum { RowMajor = 101, ColMajor = 102, NoTrans = 111, Trans = 112 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float, float *, int);

static sgemm_fn real_sgemm = NULL;
static sgemv_fn real_sgemv = NULL;
static long gemv_calls = 0;

/* The shim's cblas_sgemm (exported below as an alias). Its address is compared through this
   static name: within the shim, `cblas_sgemm` could resolve to an earlier global definition. */
static void shim_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                       const float *B, int ldb, float beta, float *C, int ldc);

/* Called once through ctypes with the path of the BLAS to forward to. Returns 0 on success. */
int moshi_blas_shim_init(const char *path) {
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) return 1;
    sgemm_fn gemm = (sgemm_fn)dlsym(h, "cblas_sgemm");
    sgemv_fn gemv = (sgemv_fn)dlsym(h, "cblas_sgemv");
    if (!gemm || !gemv || gemm == shim_sgemm) { /* not a BLAS, or this shim itself */
        dlclose(h);
        return 2;
    }
    real_sgemv = gemv;
    real_sgemm = gemm;
    return 0;
}

long moshi_blas_shim_gemv_calls(void) { return gemv_calls; }

static int use_gemv(int M, int N, int K) {
    if (M < 1 || N < 2 || K < 2) return 0;
    return M <= DEFAULT_GEMV_MAX_ROWS || (M <= SMALL_MATRIX_GEMV_MAX_ROWS && (long)N * K <= SMALL_MATRIX_FLOATS);
}

/* The loaded libraries' file names, collected first: dlopen is not called under dl_iterate_phdr's lock. */
#define MAX_OBJECTS 4096
struct names { int n; char *name[MAX_OBJECTS]; };

static int collect_name(struct dl_phdr_info *info, size_t size, void *data) {
    struct names *names = data;
    (void)size;
    if (info->dlpi_name && info->dlpi_name[0] && names->n < MAX_OBJECTS) names->name[names->n++] = strdup(info->dlpi_name);
    return 0;
}

/* Another definition of cblas_sgemm than this one: a lookup through each loaded library's handle
   searches that library and its dependencies, which the shim is not part of. */
static sgemm_fn other_sgemm(void) {
    static struct names names;
    sgemm_fn found = NULL;
    names.n = 0;
    dl_iterate_phdr(collect_name, &names);
    for (int i = 0; i < names.n; i++) {
        if (!found && names.name[i]) {
            void *h = dlopen(names.name[i], RTLD_LAZY | RTLD_NOLOAD);
            if (h) {
                sgemm_fn f = (sgemm_fn)dlsym(h, "cblas_sgemm");
                if (f && f != shim_sgemm) found = f;
                dlclose(h);
            }
        }
        free(names.name[i]);
    }
    return found;
}

static sgemm_fn fallback_sgemm(void) {
    static sgemm_fn fallback = NULL;
    sgemm_fn f = __atomic_load_n(&fallback, __ATOMIC_ACQUIRE);
    if (f) return f;
    f = other_sgemm();
    if (!f) {
        fprintf(stderr, "moshi_mlx._blas_shim: cblas_sgemm called before moshi_blas_shim_init succeeded, "
                        "and no other cblas_sgemm is loaded\n");
        abort();
    }
    __atomic_store_n(&fallback, f, __ATOMIC_RELEASE);
    return f;
}

static void shim_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                       const float *B, int ldb, float beta, float *C, int ldc) {
    if (!real_sgemm || !real_sgemv) { /* never initialised: see the top of the file */
        fallback_sgemm()(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    if (order == RowMajor && use_gemv(M, N, K)) {
        /* Row m: C[m, :] = alpha · a_m · op(B) + beta · C[m, :]  ⇔  c_m = alpha · op(B)^T a_m + beta · c_m.
           A is [M, K] row-major (a_m = A + m·lda, unit stride) or stored as [K, M] (a_m = A + m,
           stride lda). After the first row the weights are hot in cache for small layers, and
           for large ones M passes at gemv speed still beat one small-M GEMM pass. */
        for (int m = 0; m < M; m++) {
            const float *a = (ta == NoTrans) ? A + (long)m * lda : A + m;
            int inc_a = (ta == NoTrans) ? 1 : lda;
            if (tb == Trans) /* B stored [N, K]: op(B)^T = B */
                real_sgemv(RowMajor, NoTrans, N, K, alpha, B, ldb, a, inc_a, beta, C + (long)m * ldc, 1);
            else /* B stored [K, N]: op(B)^T = B^T */
                real_sgemv(RowMajor, Trans, K, N, alpha, B, ldb, a, inc_a, beta, C + (long)m * ldc, 1);
        }
        gemv_calls += M;
        return;
    }
    real_sgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc) __attribute__((alias("shim_sgemm")));

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_blas_shim", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__blas_shim(void) { return PyModule_Create(&module); }
