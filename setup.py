"""Optional C extensions (everything else is in pyproject.toml), for MLX's CPU backend on
x86-64 Linux only: the CPU kernels (quantized matmul, int8-KV attention, SEANet
convolutions) and the BLAS shim. Both are optional: without a compiler, or on any other
platform (macOS uses Accelerate and Metal), the package works on MLX's own ops."""
import platform
import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64"):
    ext_modules = [
        Extension("moshi_mlx.cpu._kernels", ["moshi_mlx/cpu/_kernels.c"], optional=True),
        Extension("moshi_mlx.cpu._blas_shim", ["moshi_mlx/cpu/_blas_shim.c"], libraries=["dl"], optional=True),
    ]
setup(ext_modules=ext_modules)
