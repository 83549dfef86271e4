"""The optional compiled CPU kernels (`_cpu_kernels.c`) and the threads they may use.

The kernels speed up MLX's CPU backend where its own ops are slow (see the C file): few-row
quantized matmuls, single-query attention over int8 KV caches, and SEANet's convolutions.
They are built on x86-64 with AVX2/FMA; everywhere else (Apple silicon, Metal) callers use
MLX's ops. MOSHI_MLX_CPU_KERNELS=0 turns them off.
"""
from __future__ import annotations

import os

import mlx.core as mx

_KERNELS = None


def cpu_kernels():
    """The compiled kernels module if it is built, this CPU runs it and it is not turned
    off; else None."""
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = False
        if os.environ.get("MOSHI_MLX_CPU_KERNELS", "1").lower() not in ("0", "off", "no", "false"):
            try:
                from . import _cpu_kernels
            except ImportError:
                pass
            else:
                _KERNELS = _cpu_kernels if _cpu_kernels.available() else False
    return _KERNELS or None


def kernels_apply(x: mx.array) -> bool:
    """Whether a float32 computation on x runs on the CPU backend with the kernels built."""
    return x.dtype == mx.float32 and mx.default_device() == mx.cpu and cpu_kernels() is not None


def cpu_threads() -> int:
    """Cores this process may use (the affinity mask, not the host's count, in containers)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1
