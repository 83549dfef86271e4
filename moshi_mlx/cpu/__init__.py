"""The CPU wing: speed-ups for MLX's CPU backend on x86-64 Linux, each with an MLX fallback.

- `blas.py`: loads an optimized BLAS (OpenBLAS) for MLX's CPU backend, and the gemv shim
  (`_blas_shim.c`); it runs when `moshi_mlx` is imported, before anything imports mlx.core,
  which is why this package imports nothing at import time.
- `kernels.py`: the facade over the compiled kernels (`_kernels.c`); every call returns an
  `mx.array`, or None for "use MLX's own op", so Metal runs plain MLX.
- `host.py`: one-position steps of quantized depformer-shaped transformers on the host
  (numpy + the kernels, no MLX evaluation between products); `applies()` says when.
"""
