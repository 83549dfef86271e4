"""Only the optional Linux BLAS shim needs compiling; everything else is in pyproject.toml."""
import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux"):
    ext_modules.append(Extension("moshi_mlx._blas_shim", ["moshi_mlx/_blas_shim.c"], libraries=["dl"],
                                 optional=True))
setup(ext_modules=ext_modules)
