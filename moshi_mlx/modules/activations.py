"""ELU, exact (erf) GELU and softmax that run fast on MLX's CPU backend.

MLX's CPU `exp`/`erf` are scalar (~15-30 ns per element here, 10x slower than PyTorch's
vectorised versions) and dominate Mimi's run time at 24 kHz (and its attention: MLX's CPU
`scaled_dot_product_attention` spends 3/4 of its time in `exp`). These versions use only
multiply-adds, compiled into one fused kernel; they match the exact functions to float32
precision (checked in tests/test_modules.py), so this is not the tanh approximation.
"""
from __future__ import annotations

import mlx.core as mx

_LOG2E = 1.4426950408889634
_LN2_HI, _LN2_LO = 0.693145751953125, 1.428606765330187e-06  # ln 2 split for exact n·ln2
_MAGIC = 12582912.0  # 1.5 · 2^23: adding it rounds a float32 to an integer held in its low bits
_MAGIC_BITS = 0x4B400000


def _exp(x: mx.array) -> mx.array:
    """exp(x) for float32 x in [−87, 88]: 2^n · p(r) with r = x − n·ln2 ∈ [−ln2/2, ln2/2],
    p a degree-7 Taylor polynomial (error < 3e-9) and 2^n written into the exponent bits."""
    t = x * _LOG2E + _MAGIC
    n = t - _MAGIC
    r = x - n * _LN2_HI - n * _LN2_LO
    p = 1.0 + r * (1.0 + r * (0.5 + r * (1 / 6 + r * (1 / 24 + r * (1 / 120 + r * (1 / 720 + r * (1 / 5040)))))))
    two_n = mx.view((mx.view(t, mx.int32) - (_MAGIC_BITS - 127)) << 23, mx.float32)
    return p * two_n


@mx.compile
def elu(x: mx.array) -> mx.array:
    # max/min arithmetic instead of `where` (2-3x slower on MLX's CPU backend).
    return mx.maximum(x, 0.0) + (_exp(mx.clip(x, -87.0, 0.0)) - 1.0)


# erf(x) ≈ x·P(x²)/Q(x²) for |x| < 1.5: the rational approximation Eigen/XLA use for float32
# erf. Past that, its float32 evaluation loses ~6 ulps of 1 (erf(3.4) = 0.99999815 instead of
# 0.9999985) through rounding in the Horner sums, so the tail uses erf = 1 − erfc with
# erfc(z) = t·exp(−z² + S(t)), t = 1/(1 + z/2) (Numerical Recipes' erfcc, relative error
# < 1.2e-7 of erfc, so absolute error < 1e-8 there).
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)
_ERFC_S = (0.17087277, -0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806, 0.09678418,
           0.37409196, 1.00002368, -1.26551223)
_ERF_SPLIT = 1.5


def _erf(x: mx.array) -> mx.array:
    xc = mx.clip(x, -_ERF_SPLIT, _ERF_SPLIT)
    x2 = xc * xc
    p = _ERF_P[0]
    for c in _ERF_P[1:]:
        p = p * x2 + c
    q = _ERF_Q[0]
    for c in _ERF_Q[1:]:
        q = q * x2 + c
    z = mx.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    s = _ERFC_S[0]
    for c in _ERFC_S[1:]:
        s = s * t + c
    erfc = t * _exp(mx.maximum(s - z * z, -87.0))
    return mx.where(z < _ERF_SPLIT, xc * p / q, mx.where(x < 0, erfc - 1.0, 1.0 - erfc))


@mx.compile
def gelu(x: mx.array) -> mx.array:
    """Exact GELU: x · Φ(x) = x/2 · (1 + erf(x/√2))."""
    return 0.5 * x * (1.0 + _erf(x * 0.7071067811865476))


@mx.compile
def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis. Entries more than 87 below the row's maximum (masked
    ones, at −inf) get weight ≤ e^−87 ≈ 1.6e-38 instead of 0: invisible next to the
    maximum's weight of 1. A row must have at least one finite entry."""
    e = _exp(mx.maximum(x - mx.max(x, axis=-1, keepdims=True), -87.0))
    return e / mx.sum(e, axis=-1, keepdims=True)
