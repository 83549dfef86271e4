"""Use an optimized BLAS for MLX's CPU backend on Linux.

The Linux `mlx-cpu` wheel links a bundled reference (netlib) BLAS: a 1024² matmul runs at
~7 GFLOP/s on a 2-core x86 machine, and convolutions (im2col + GEMM) crawl with it. If an
optimized BLAS such as Debian's OpenBLAS (`libopenblas0`) is loaded into the process with
RTLD_GLOBAL *before* `mlx.core` is first imported, the dynamic linker resolves MLX's
`cblas_*`/`sgemm_` symbols to it instead (~190–240 GFLOP/s here). Results are the same
floating-point operations, just faster; tests check codes and audio stay equal.

Opt out with MOSHI_MLX_BLAS=0, or point MOSHI_MLX_BLAS at a specific shared library (if it
cannot be used, a one-line warning goes to stderr and the bundled BLAS is used).
macOS needs none of this: MLX uses Accelerate (CPU) and Metal there.

When the small compiled shim (_blas_shim.c, built by pip on x86-64 Linux) is available, it is loaded
globally instead and forwards MLX's cblas_sgemm to that BLAS, except matrix-vector products,
which go to cblas_sgemv (~2x the memory bandwidth: token-by-token decoding is bound by it).
MOSHI_MLX_BLAS_SHIM=0 turns the shim off.

Nothing is made global before it is known to work: a candidate BLAS is first opened privately
(RTLD_LOCAL) and must export cblas_sgemm and cblas_sgemv, and the shim is opened privately,
initialised, and only then promoted to RTLD_GLOBAL. (A global shim whose initialisation failed
would be what MLX's matmuls call, with nothing to forward to.)

If a BLAS already defines cblas_sgemm in the process's global scope before moshi_mlx is
imported (the user ran with LD_PRELOAD=libopenblas.so.0), the dynamic linker resolves MLX's
symbols to it first: nothing is loaded on top, and the status says the shim is bypassed.
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
_REQUIRED = ("cblas_sgemm", "cblas_sgemv")
_OFF = ("0", "off", "no", "false")
_ON = ("1", "on", "yes", "true")
_BUNDLED = "using mlx-cpu's bundled reference BLAS"


@dataclass
class BlasStatus:
    loaded: str | None  # path or soname of the optimized BLAS MLX's symbols resolve to
    reason: str  # one line for --verbose
    shim: bool = False  # whether matrix-vector products go through the gemv shim
    path: str | None = None  # the file `loaded` was opened from, where it can be told


STATUS = BlasStatus(None, "not attempted")
_SHIM: ctypes.CDLL | None = None  # the shim's handle once it is global


def preload_blas() -> BlasStatus:
    """Load an optimized BLAS globally if we are on Linux and MLX is not imported yet."""
    global STATUS
    if STATUS.loaded is not None:
        return STATUS
    setting = os.environ.get("MOSHI_MLX_BLAS", "1")
    if not sys.platform.startswith("linux"):
        STATUS = BlasStatus(None, "not Linux: MLX uses Accelerate/Metal")
        return STATUS
    already = _global_definition("cblas_sgemm")
    if already is not None:
        # LD_PRELOAD (or a library linked into the executable): it precedes anything we could
        # load, so MLX uses it whatever MOSHI_MLX_BLAS says, and a shim loaded now would never
        # be called.
        STATUS = BlasStatus(already, f"BLAS already loaded before moshi_mlx (LD_PRELOAD?): {already}; "
                                     "MLX uses it directly, the gemv shim is bypassed", path=already)
        return STATUS
    if setting.lower() in _OFF:
        STATUS = BlasStatus(None, f"disabled by MOSHI_MLX_BLAS={setting}: {_BUNDLED}")
        return STATUS
    if "mlx.core" in sys.modules:
        STATUS = BlasStatus(None, "mlx.core was imported before moshi_mlx: optimized BLAS not loaded "
                                  "(import moshi_mlx first, or LD_PRELOAD libopenblas.so.0)")
        return STATUS

    explicit = setting.lower() not in _ON
    if explicit:
        candidates: tuple[str, ...] = (setting,)
    else:
        candidates = _CANDIDATES
        found = ctypes.util.find_library("openblas")
        if found and found not in candidates:
            candidates = (found,) + candidates
    failures: list[str] = []  # candidates that exist but cannot be used
    for name in candidates:
        error, path = _probe(name)
        if error is not None:
            if explicit or not _is_missing(error):  # a default candidate that is absent is no failure
                failures.append(error if error.startswith(name) else f"{name}: {error}")
            continue
        # The shim must be the first global definition of cblas_sgemm, so it goes first and
        # opens the BLAS privately; without it, the BLAS itself is made global.
        if _load_shim(name):
            STATUS = BlasStatus(name, f"optimized BLAS loaded: {name} (matrix-vector products via gemv)",
                                shim=True, path=path)
            return STATUS
        try:
            ctypes.CDLL(name, mode=os.RTLD_GLOBAL)
        except OSError as e:  # it loaded privately a moment ago: not expected
            failures.append(f"{name}: {_one_line(e)}")
            continue
        STATUS = BlasStatus(name, f"optimized BLAS loaded: {name}", path=path)
        return STATUS

    if explicit:
        why = "; ".join(failures)
        print(f"warning: MOSHI_MLX_BLAS={setting}: cannot load {why}; {_BUNDLED}", file=sys.stderr)
        STATUS = BlasStatus(None, f"MOSHI_MLX_BLAS={setting} could not be used ({why}); {_BUNDLED}")
    elif failures:
        STATUS = BlasStatus(None, f"OpenBLAS is installed but could not be used ({'; '.join(failures)}); "
                                  f"{_BUNDLED}")
    else:
        STATUS = BlasStatus(None, "no optimized BLAS found (install Debian/Ubuntu's libopenblas0 "
                                  f"for ~10-30x faster CPU inference); {_BUNDLED}")
    return STATUS


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _is_missing(error: str) -> bool:
    return "No such file or directory" in error


def _probe(name: str) -> tuple[str | None, str | None]:
    """Open `name` privately (RTLD_LOCAL: nothing resolves to it yet).

    Returns (None, its file) if it is a usable BLAS, else (why not, None)."""
    try:
        lib = ctypes.CDLL(name)
    except OSError as e:
        return _one_line(e), None
    missing = [s for s in _REQUIRED if not hasattr(lib, s)]
    if missing:
        return f"not a BLAS (no {', '.join(missing)})", None
    return None, _file_defining(lib, "cblas_sgemm")


def _load_shim(name: str) -> bool:
    """Make the gemv shim global, forwarding to the BLAS `name` (see the module docstring).

    The shim is opened privately first and initialised; only when it has found `name`'s
    cblas_sgemm and cblas_sgemv is the same handle promoted to global (RTLD_NOLOAD)."""
    global _SHIM
    if os.environ.get("MOSHI_MLX_BLAS_SHIM", "1").lower() in _OFF:
        return False
    try:
        import importlib.util

        spec = importlib.util.find_spec("moshi_mlx.cpu._blas_shim")
        if spec is None or not spec.origin:
            return False
        shim = ctypes.CDLL(spec.origin, mode=os.RTLD_LOCAL)
        if shim.moshi_blas_shim_init(name.encode()) != 0:
            return False
        _SHIM = ctypes.CDLL(spec.origin, mode=os.RTLD_GLOBAL | os.RTLD_NOLOAD | os.RTLD_NOW)
        return True
    except (OSError, AttributeError):
        return False


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def _file_defining(lib: ctypes.CDLL, symbol: str) -> str | None:
    """The file from which `lib`'s lookup of `symbol` comes (dladdr), or None."""
    try:
        address = ctypes.cast(getattr(lib, symbol), ctypes.c_void_p).value
        dladdr = ctypes.CDLL(None).dladdr
    except (OSError, AttributeError):
        return None
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    info = _DlInfo()
    if dladdr(address, ctypes.byref(info)) and info.dli_fname:
        return os.fsdecode(info.dli_fname)
    return None


def _global_definition(symbol: str) -> str | None:
    """The file that defines `symbol` in the global scope (executable, LD_PRELOAD, RTLD_GLOBAL
    libraries), or None. Python extension modules (numpy's BLAS, mlx) are private: not seen."""
    try:
        process = ctypes.CDLL(None)
        getattr(process, symbol)
    except (OSError, AttributeError):
        return None
    return _file_defining(process, symbol) or "an already loaded library"


def gemv_calls() -> int:
    """Matrix-vector products the shim has sent to gemv so far (0 without the shim)."""
    return int(_SHIM.moshi_blas_shim_gemv_calls()) if _SHIM is not None else 0
