"""Use an optimized BLAS for MLX's CPU backend on Linux.

The Linux `mlx-cpu` wheel links a bundled reference (netlib) BLAS: a 1024² matmul runs at
~7 GFLOP/s on a 2-core x86 machine, and convolutions (im2col + GEMM) crawl with it. If an
optimized BLAS such as Debian's OpenBLAS (`libopenblas0`) is loaded into the process with
RTLD_GLOBAL *before* `mlx.core` is first imported, the dynamic linker resolves MLX's
`cblas_*`/`sgemm_` symbols to it instead (~190–240 GFLOP/s here). Results are the same
floating-point operations, just faster; tests check codes and audio stay equal.

Opt out with MOSHI_MLX_BLAS=0, or point MOSHI_MLX_BLAS at a specific shared library.
macOS needs none of this: MLX uses Accelerate (CPU) and Metal there.

When the small compiled shim (_blas_shim.c, built by pip on Linux) is available, it is loaded
globally instead and forwards MLX's cblas_sgemm to that BLAS, except matrix-vector products,
which go to cblas_sgemv (~2x the memory bandwidth: token-by-token decoding is bound by it).
MOSHI_MLX_BLAS_SHIM=0 turns the shim off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from dataclasses import dataclass

# Searched in order; the first one that loads wins.
_CANDIDATES = (
    "libopenblas.so.0",
    "libopenblas.so",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)


@dataclass
class BlasStatus:
    loaded: str | None  # path or soname of the BLAS that was preloaded
    reason: str  # one line for --verbose


STATUS = BlasStatus(None, "not attempted")


def preload_blas() -> BlasStatus:
    """Load an optimized BLAS globally if we are on Linux and MLX is not imported yet."""
    global STATUS
    if STATUS.loaded is not None:
        return STATUS
    setting = os.environ.get("MOSHI_MLX_BLAS", "1")
    if not sys.platform.startswith("linux"):
        STATUS = BlasStatus(None, "not Linux: MLX uses Accelerate/Metal")
    elif setting.lower() in ("0", "off", "no", "false"):
        STATUS = BlasStatus(None, "disabled by MOSHI_MLX_BLAS=0: using the BLAS bundled with mlx-cpu")
    elif "mlx.core" in sys.modules:
        STATUS = BlasStatus(None, "mlx.core was imported before moshi_mlx: optimized BLAS not loaded "
                                  "(import moshi_mlx first, or LD_PRELOAD libopenblas.so.0)")
    else:
        if setting.lower() in ("1", "on", "yes", "true"):
            candidates = _CANDIDATES
            found = ctypes.util.find_library("openblas")
            if found and found not in candidates:
                candidates = (found,) + candidates
        else:  # an explicit library path
            candidates = (setting,)
        for name in candidates:
            # The shim must be the first global definition of cblas_sgemm, so it goes first and
            # opens the BLAS privately; without it, the BLAS itself is loaded globally.
            if _load_shim(name):
                STATUS = BlasStatus(name, f"optimized BLAS loaded: {name} (matrix-vector products via gemv)")
                break
            try:
                ctypes.CDLL(name, mode=os.RTLD_GLOBAL)
            except OSError:
                continue
            STATUS = BlasStatus(name, f"optimized BLAS loaded: {name}")
            break
        else:
            STATUS = BlasStatus(None, "no optimized BLAS found (install Debian/Ubuntu's libopenblas0 "
                                      "for ~10-30x faster CPU inference); using mlx-cpu's reference BLAS")
    return STATUS


def _load_shim(name: str) -> bool:
    """Load the gemv shim globally, forwarding to the BLAS `name` (see the module docstring)."""
    if os.environ.get("MOSHI_MLX_BLAS_SHIM", "1").lower() in ("0", "off", "no", "false"):
        return False
    try:
        import importlib.util

        spec = importlib.util.find_spec("moshi_mlx._blas_shim")
        if spec is None or not spec.origin:
            return False
        shim = ctypes.CDLL(spec.origin, mode=os.RTLD_GLOBAL)
        return shim.moshi_blas_shim_init(name.encode()) == 0
    except (OSError, AttributeError):
        return False


def gemv_calls() -> int:
    """Matrix-vector products the shim has sent to gemv so far (0 without the shim)."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("moshi_mlx._blas_shim")
        return int(ctypes.CDLL(spec.origin).moshi_blas_shim_gemv_calls()) if spec and spec.origin else 0
    except (OSError, AttributeError):
        return 0
