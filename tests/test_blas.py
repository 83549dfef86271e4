"""The Linux BLAS set-up: an optimized BLAS (and the gemv shim) must not change results, and a
BLAS that cannot be used must leave MLX on its bundled one, never crash it."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS preload only exists on Linux")

CODE = """
import moshi_mlx, moshi_mlx.cpu.blas as b, mlx.core as mx, numpy as np
rng = np.random.default_rng(0)
out = {}
# gemv: 1-4 rows, or up to 8 for small matrices; GEMM: one output column, or more rows
for m, n, k in [(1, 300, 200), (2, 300, 200), (1, 1, 64), (7, 33, 65), (9, 33, 65), (6, 1100, 1000)]:
    x, w = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)
    out[f"{m}x{n}x{k}"] = np.array(mx.array(x) @ mx.array(w).T)
    out[f"{m}x{n}x{k}t"] = np.array(mx.array(x) @ mx.array(w.T.copy()))
np.savez(__import__("sys").argv[1], status=b.STATUS.reason, gemv=b.gemv_calls(), **out)
"""

# One small product (it goes through the shim's gemv path when the shim is on) and one GEMM,
# then what the BLAS set-up says about itself.
MATMUL = """
import json, numpy as np, mlx.core as mx, moshi_mlx.cpu.blas as b
a = mx.array([[1.0, 2.0], [3.0, 4.0]])
x = np.arange(64 * 48, dtype=np.float32).reshape(64, 48) / 1000
ref = x.astype(np.float64) @ x.T.astype(np.float64)
print(json.dumps({"small": (a @ a).tolist(),
                  "gemm_err": float(np.abs(np.array(mx.array(x) @ mx.array(x).T) - ref).max() / np.abs(ref).max()),
                  "loaded": b.STATUS.loaded, "path": b.STATUS.path, "shim": b.STATUS.shim,
                  "reason": b.STATUS.reason, "gemv": b.gemv_calls()}))
"""


def run(tmp_path, name, env):
    path = tmp_path / f"{name}.npz"
    subprocess.run([sys.executable, "-c", CODE, str(path)], check=True, env={**os.environ, **env}, cwd=tmp_path)
    return np.load(path)


def run_matmul(tmp_path, env, prelude="import moshi_mlx\n"):
    """Runs MATMUL in a fresh interpreter after `prelude`; (its json result, its stderr). It must
    exit 0: before the fix, a BLAS that failed to load left the shim global with nothing to forward
    to, and this died of SIGSEGV (exit -11)."""
    import json

    env = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    p = subprocess.run([sys.executable, "-c", prelude + MATMUL], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stderr}"
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["small"] == [[7.0, 10.0], [15.0, 22.0]]
    assert out["gemm_err"] < 1e-6, out  # relative to the largest entry: float32 rounding only
    return out, p.stderr


def test_optimized_blas_and_gemv_shim_give_the_same_products(tmp_path):
    ref = run(tmp_path, "bundled", {"MOSHI_MLX_BLAS": "0"})
    blas = run(tmp_path, "openblas", {"MOSHI_MLX_BLAS_SHIM": "0"})
    shim = run(tmp_path, "shim", {})
    if str(blas["status"]).startswith("no optimized BLAS found"):
        pytest.skip(f"no OpenBLAS on this machine: {blas['status']}")
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


@pytest.mark.parametrize("setting, why", [
    ("/nonexistent/libopenblas.so.0", "No such file or directory"),
    ("libm.so.6", "not a BLAS (no cblas_sgemm, cblas_sgemv)"),  # loads, but is no BLAS
])
@pytest.mark.parametrize("shim", ["1", "0"])
def test_unusable_blas_setting_warns_and_falls_back_to_the_bundled_blas(tmp_path, setting, why, shim):
    out, stderr = run_matmul(tmp_path, {"MOSHI_MLX_BLAS": setting, "MOSHI_MLX_BLAS_SHIM": shim})
    assert out["loaded"] is None and not out["shim"] and out["gemv"] == 0, out
    assert setting in out["reason"] and why in out["reason"] and "bundled reference BLAS" in out["reason"], out
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, stderr
    assert warnings[0].startswith(f"warning: MOSHI_MLX_BLAS={setting}: cannot load ") and why in warnings[0]
    assert warnings[0].endswith("; using mlx-cpu's bundled reference BLAS"), warnings[0]


# The default search with other candidates: MOSHI_MLX_BLAS=0 at import keeps the first search from
# loading anything, then the search runs again (before mlx.core is imported) over `candidates`.
SEARCH = """
import ctypes.util, os
os.environ["MOSHI_MLX_BLAS"] = "0"
import moshi_mlx.cpu.blas as b
os.environ["MOSHI_MLX_BLAS"] = "1"
b._CANDIDATES = {candidates!r}
ctypes.util.find_library = lambda name: None
b.preload_blas()
"""


def test_no_openblas_installed_says_to_install_it(tmp_path):
    prelude = SEARCH.format(candidates=("libopenblas-not-installed.so.0", str(tmp_path / "libopenblas.so.0")))
    out, stderr = run_matmul(tmp_path, {}, prelude)
    assert out["loaded"] is None and out["gemv"] == 0, out
    assert out["reason"].startswith("no optimized BLAS found (install Debian/Ubuntu's libopenblas0"), out
    assert "warning" not in stderr, stderr


def test_installed_but_unusable_openblas_is_not_called_missing(tmp_path):
    broken = tmp_path / "libopenblas.so.0"
    broken.write_text("not an ELF file\n")
    prelude = SEARCH.format(candidates=("libopenblas-not-installed.so.0", str(broken), "libm.so.6"))
    out, _ = run_matmul(tmp_path, {}, prelude)
    assert out["loaded"] is None and out["gemv"] == 0, out
    assert "install Debian" not in out["reason"] and "libopenblas0" not in out["reason"], out
    assert out["reason"].startswith("OpenBLAS is installed but could not be used"), out
    assert str(broken) in out["reason"] and "libm.so.6: not a BLAS" in out["reason"], out
    assert "libopenblas-not-installed" not in out["reason"], "candidates that are absent are not failures"


def test_default_search_loads_openblas_with_the_shim(tmp_path):
    out, stderr = run_matmul(tmp_path, {"MOSHI_MLX_BLAS": None, "MOSHI_MLX_BLAS_SHIM": None})
    if out["loaded"] is None:
        pytest.skip(f"no OpenBLAS on this machine: {out['reason']}")
    assert out["shim"] and out["gemv"] == 2 and "via gemv" in out["reason"] and os.path.exists(out["path"]), out
    assert "warning" not in stderr, stderr


def test_ld_preloaded_blas_is_used_and_reported_as_bypassing_the_shim(tmp_path):
    default, _ = run_matmul(tmp_path, {"MOSHI_MLX_BLAS": None})
    if default["path"] is None:
        pytest.skip(f"no OpenBLAS on this machine: {default['reason']}")
    preload = default["path"]
    for setting in ("1", "0"):  # LD_PRELOAD wins whatever MOSHI_MLX_BLAS says
        out, _ = run_matmul(tmp_path, {"LD_PRELOAD": preload, "MOSHI_MLX_BLAS": setting})
        assert out["path"] == preload and not out["shim"] and out["gemv"] == 0, out
        assert "LD_PRELOAD" in out["reason"] and preload in out["reason"] and "bypassed" in out["reason"], out


def test_global_shim_that_was_never_initialised_forwards_to_the_bundled_blas(tmp_path):
    """Defence in depth: whatever makes the shim global without a BLAS behind it, its
    cblas_sgemm finds MLX's own (bundled) cblas_sgemm instead of calling through NULL."""
    prelude = ("import ctypes, importlib.util, os\n"
               "spec = importlib.util.find_spec('moshi_mlx.cpu._blas_shim')\n"
               "ctypes.CDLL(spec.origin, mode=os.RTLD_GLOBAL)\n")
    try:
        import importlib.util

        if importlib.util.find_spec("moshi_mlx.cpu._blas_shim") is None:
            pytest.skip("the shim is not built")
    except ImportError:
        pytest.skip("the shim is not built")
    out, _ = run_matmul(tmp_path, {"MOSHI_MLX_BLAS": "0"}, prelude)
    assert out["gemv"] == 0, out


def test_verbose_line_names_the_blas_in_use(tmp_path):
    """`moshi-mlx -v` prints STATUS.reason before running the subcommand (whose failure here is
    irrelevant)."""
    code = "import sys; from moshi_mlx.cli import main; main(['-v', 'decode', 'missing.npz', 'out.wav'])"
    for env, expect in (({"MOSHI_MLX_BLAS": "libm.so.6"}, "MOSHI_MLX_BLAS=libm.so.6 could not be used"),
                        ({"MOSHI_MLX_BLAS": "0"}, "disabled by MOSHI_MLX_BLAS=0")):
        p = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
        lines = [line for line in p.stderr.splitlines() if line.startswith("mlx ")]
        assert lines and expect in lines[0], p.stderr
