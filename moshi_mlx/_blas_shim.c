/*
 * cblas_sgemm for MLX's CPU backend that sends matrix-vector products to cblas_sgemv.
 *
 * MLX calls cblas_sgemm for every matmul, including the one-row products of token-by-token
 * decoding (x [1, K] @ W^T). OpenBLAS runs those through its GEMM kernels at ~17 GB/s on a
 * 2-core x86 machine, but its GEMV kernels stream the weights at ~38 GB/s: decoding is
 * memory-bound, so that is ~2x faster. Loaded with RTLD_GLOBAL before MLX (see _blas.py),
 * this definition of cblas_sgemm is the one MLX's reference resolves to; everything that
 * is not a matrix-vector product goes to OpenBLAS's own cblas_sgemm unchanged.
 *
 * Built as a (trivial) Python extension so that pip compiles it; Linux only.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>

enum { RowMajor = 101, ColMajor = 102, NoTrans = 111, Trans = 112 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float, float *, int);

static sgemm_fn real_sgemm = NULL;
static sgemv_fn real_sgemv = NULL;
static long gemv_calls = 0;

/* Called once through ctypes with the path of the BLAS to forward to. Returns 0 on success. */
int moshi_blas_shim_init(const char *path) {
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) return 1;
    real_sgemm = (sgemm_fn)dlsym(h, "cblas_sgemm");
    real_sgemv = (sgemv_fn)dlsym(h, "cblas_sgemv");
    return (real_sgemm && real_sgemv) ? 0 : 2;
}

long moshi_blas_shim_gemv_calls(void) { return gemv_calls; }

void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc) {
    if (order == RowMajor && M == 1 && N > 1 && K > 1) {
        /* C[1, N] = alpha · a[1, K] · op(B)[K, N] + beta · C  ⇔  c = alpha · op(B)^T a + beta · c */
        int inc_a = (ta == NoTrans) ? 1 : lda; /* A is [1, K] row-major, or stored as [K, 1] */
        if (tb == Trans) /* B stored [N, K]: op(B)^T = B */
            real_sgemv(RowMajor, NoTrans, N, K, alpha, B, ldb, A, inc_a, beta, C, 1);
        else /* B stored [K, N]: op(B)^T = B^T */
            real_sgemv(RowMajor, Trans, K, N, alpha, B, ldb, A, inc_a, beta, C, 1);
        gemv_calls++;
        return;
    }
    real_sgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_blas_shim", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__blas_shim(void) { return PyModule_Create(&module); }
