"""Optional C extensions (everything else is in pyproject.toml): the Linux BLAS shim and the
CPU kernels (quantized matmul, int8-KV attention, SEANet convolutions). Both are optional:
without a compiler the package still works, on MLX's own ops."""
import sys

from setuptools import Extension, setup

ext_modules = [Extension("moshi_mlx._cpu_kernels", ["moshi_mlx/_cpu_kernels.c"], optional=True)]
if sys.platform.startswith("linux"):
    ext_modules.append(Extension("moshi_mlx._blas_shim", ["moshi_mlx/_blas_shim.c"], libraries=["dl"],
                                 optional=True))
setup(ext_modules=ext_modules)
