"""The Linux BLAS set-up: an optimized BLAS (and the gemv shim) must not change results."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

CODE = """
import moshi_mlx, moshi_mlx._blas as b, mlx.core as mx, numpy as np
rng = np.random.default_rng(0)
out = {}
# gemv: 1-4 rows, or up to 8 for small matrices; GEMM: one output column, or more rows
for m, n, k in [(1, 300, 200), (2, 300, 200), (1, 1, 64), (7, 33, 65), (9, 33, 65), (6, 1100, 1000)]:
    x, w = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)
    out[f"{m}x{n}x{k}"] = np.array(mx.array(x) @ mx.array(w).T)
    out[f"{m}x{n}x{k}t"] = np.array(mx.array(x) @ mx.array(w.T.copy()))
np.savez(__import__("sys").argv[1], status=b.STATUS.reason, gemv=b.gemv_calls(), **out)
"""


def run(tmp_path, name, env):
    import os

    path = tmp_path / f"{name}.npz"
    subprocess.run([sys.executable, "-c", CODE, str(path)], check=True, env={**os.environ, **env}, cwd=tmp_path)
    return np.load(path)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS preload only exists on Linux")
def test_optimized_blas_and_gemv_shim_give_the_same_products(tmp_path):
    ref = run(tmp_path, "bundled", {"MOSHI_MLX_BLAS": "0"})
    blas = run(tmp_path, "openblas", {"MOSHI_MLX_BLAS_SHIM": "0"})
    shim = run(tmp_path, "shim", {})
    assert "optimized BLAS loaded" in str(blas["status"]), blas["status"]
    assert "gemv" in str(shim["status"]), shim["status"]
    assert int(shim["gemv"]) == 2 * (1 + 2 + 7), "products with 1, 2 and 7 rows (small matrix) go to gemv"
    assert int(blas["gemv"]) == 0
    for key in ref.files:
        if key in ("status", "gemv"):
            continue
        x = ref[key].astype(np.float64)
        for other in (blas, shim):
            # float32 summation order differs between kernels: errors scale with the magnitudes
            np.testing.assert_allclose(other[key], x, rtol=1e-5, atol=1e-6 * np.abs(x).max(), err_msg=key)
