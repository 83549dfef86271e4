"""The facade over the compiled CPU kernels (`_kernels.c`): few-row quantized matmuls, one
query's attention over an int8 KV cache, SEANet's convolutions, residual quantization's
nearest-code searches.

They are built on x86-64 Linux only and run on MLX's CPU backend only. Each compute
function returns an `mx.array`, or None for "use MLX's own op": model code keeps one line
per call site, and on Metal (or any machine without the kernels) it runs plain MLX.

MOSHI_MLX_CPU_KERNELS=0 turns the kernels off. The quantized product multiplies 4-bit weights
by 8-bit activations (rounded per weight group, as llama.cpp does: 2-3x faster; ~0.5% of noise
on the outputs makes 4-bit weights' own error ~0.2% larger; `_kernels.c`, section 1b);
MOSHI_MLX_INT8_ACTIVATIONS=0 keeps float activations, MLX's own arithmetic.
"""
from __future__ import annotations

import os

import mlx.core as mx
import numpy as np

_KERNELS = None
_OFF = ("0", "off", "no", "false")
INT8_ACTIVATIONS = os.environ.get("MOSHI_MLX_INT8_ACTIVATIONS", "1").lower() not in _OFF
CONV_COLS = 16  # output channels per packed weight block (CONV_COLS in _kernels.c)
QMATMUL_MAX_ROWS = 8  # rows of x the quantized-matmul kernel takes (MAX_ROWS in _kernels.c)


def _module():
    """The compiled module if it is built, this CPU runs it and it is not turned off."""
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = False
        if os.environ.get("MOSHI_MLX_CPU_KERNELS", "1").lower() not in _OFF:
            try:
                from . import _kernels as k
            except ImportError:
                pass
            else:
                _KERNELS = k if k.available() else False
    return _KERNELS or None


def kernels_available() -> bool:
    return _module() is not None


def describe() -> str:
    """One line for `moshi-mlx -v`."""
    if kernels_available():
        state = "on (4-bit products with %s activations)" % ("8-bit" if INT8_ACTIVATIONS else "float")
    else:
        state = "off (not built, not x86-64 with AVX2/FMA, or MOSHI_MLX_CPU_KERNELS=0)"
    return f"CPU kernels (quantized matmul, int8-KV attention, SEANet convolutions, RVQ searches) {state}"


def threads() -> int:
    """Cores this process may use (the affinity mask, not the host's count, in containers)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _applies(x: mx.array) -> bool:
    """float32 on the CPU backend with the kernels built: the only case they handle."""
    return x.dtype == mx.float32 and mx.default_device() == mx.cpu and _module() is not None


def _evaluated(arrays: list) -> list:
    """The arrays evaluated and C-contiguous, as the kernels read MLX's buffers in place: a
    synchronisation point. Evaluating an array that already is costs nothing, while wrapping
    it in mx.contiguous would make a new one to evaluate (a round trip to MLX's scheduler
    thread, ~0.1 ms), so that is done only for arrays that are not contiguous."""
    mx.eval(*(a for a in arrays if isinstance(a, mx.array)))
    out = []
    for a in arrays:
        if isinstance(a, mx.array) and not memoryview(a).c_contiguous:
            a = mx.contiguous(a)
            mx.eval(a)
        out.append(a)
    return out


def _run_host(fn, arrays: list, out_shape: tuple[int, ...], *sizes, after_threads: tuple = ()) -> np.ndarray:
    """Run a kernel on evaluated inputs (numpy arrays, evaluated MLX arrays, or None) into a
    new float32 numpy array; its optional arguments after the thread count in `after_threads`."""
    out = np.empty(out_shape, np.float32)
    fn(*arrays, out, *sizes, threads(), *after_threads)
    return out


def _run(fn, arrays: list, out_shape: tuple[int, ...], *sizes, after_threads: tuple = ()) -> mx.array:
    """_run_host on any inputs, into a new MLX array."""
    return mx.array(_run_host(fn, _evaluated(arrays), out_shape, *sizes, after_threads=after_threads))


# -- quantized matmul ---------------------------------------------------------------------------

def quantized_matmul(x: mx.array, weight: mx.array, scales: mx.array, biases: mx.array, bits: int,
                     group_size: int) -> mx.array | None:
    """x [..., K] · dequantize(weight)ᵀ → [..., N] for 1-8 rows of x (token-by-token
    decoding), or None."""
    rows = x.size // max(1, x.shape[-1])
    if not (_applies(x) and bits in (4, 8) and group_size in (32, 64, 128) and 1 <= rows <= QMATMUL_MAX_ROWS
            and scales.dtype in (mx.bfloat16, mx.float32) and biases.dtype == scales.dtype):
        return None
    N, K = weight.shape[0], x.shape[-1]
    y = _run(_module().quantized_matmul, [x.reshape(rows, K), weight, scales, biases], (rows, N),
             rows, N, K, bits, group_size, int(scales.dtype == mx.bfloat16),
             after_threads=(0, int(INT8_ACTIVATIONS)))  # no spin; 8-bit activations or not
    return y.reshape(*x.shape[:-1], N)


def quantized_matmul_host(x: np.ndarray, weight: mx.array, scales: mx.array, biases: mx.array, bits: int,
                          group_size: int, spin: bool = False) -> np.ndarray:
    """The same product for x [rows, K] float32 in host memory, any number of rows (in
    passes of QMATMUL_MAX_ROWS: each row's arithmetic is the same in any pass), into host
    memory: no MLX evaluation (the weights are parameters, already evaluated). spin: the
    caller makes its next product within microseconds (see cpu/host.py), so the kernel's
    worker threads wait for it awake. Only where `host_products_apply`."""
    rows, K = x.shape
    N = weight.shape[0]
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty((rows, N), np.float32)
    bf16 = int(scales.dtype == mx.bfloat16)
    spin_us = SPIN_US if spin else 0
    for r in range(0, rows, QMATMUL_MAX_ROWS):
        n = min(QMATMUL_MAX_ROWS, rows - r)
        _module().quantized_matmul(x[r:r + n], weight, scales, biases, out[r:r + n], n, N, K, bits, group_size,
                                   bf16, threads(), spin_us, int(INT8_ACTIVATIONS))
    return out


SPIN_US = 200  # how long the kernel's workers wait awake for a host step's next product


def host_products_apply(weight: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int) -> bool:
    """Whether quantized_matmul_host can run this quantized weight."""
    return (mx.default_device() == mx.cpu and _module() is not None and bits in (4, 8) and group_size in (32, 64, 128)
            and scales.dtype in (mx.bfloat16, mx.float32) and biases.dtype == scales.dtype)


def embedding_rows_host(weight: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int,
                        tokens: np.ndarray) -> np.ndarray:
    """Rows of a 4/8-bit quantized embedding table for tokens [rows] (−1: zeros) as float32
    [rows, dim], bitwise what MLX's lookup gives (its bfloat16 roundings included). Only where
    `host_products_apply` (the parameters evaluated)."""
    vocab = weight.shape[0]
    dim = weight.shape[1] * 32 // bits
    tokens = np.ascontiguousarray(tokens, np.int32)
    out = np.empty((len(tokens), dim), np.float32)
    _module().embedding_rows(weight, scales, biases, tokens, out, len(tokens), vocab, dim, bits, group_size,
                             int(scales.dtype == mx.bfloat16))
    return out


# -- attention over an int8 KV cache ------------------------------------------------------------

def attend_int8(q: mx.array, keys: mx.array, key_scales: mx.array, values: mx.array, value_scales: mx.array,
                valid: int, scale: float) -> mx.array | None:
    """One query step q [B, H, 1, Dh] over the first `valid` slots of int8 keys/values
    [B, H, slots, Dh] (scales [B, H, slots, 1]), or None."""
    B, H, T, Dh = q.shape
    if T != 1 or Dh % 8 or Dh > 256 or mx.default_device() != mx.cpu or _module() is None:
        return None
    q2 = q.astype(mx.float32).reshape(B * H, Dh)
    out = _run(_module().attend_int8, [q2, keys, key_scales, values, value_scales], (B * H, Dh),
               B * H, keys.shape[2], valid, Dh, scale)
    return out.reshape(B, H, 1, Dh).astype(q.dtype)


def attend_int8_host(q: np.ndarray, keys: np.ndarray, key_scales: np.ndarray, values: np.ndarray,
                     value_scales: np.ndarray, valid: int, scale: float) -> np.ndarray:
    """attend_int8 over host buffers: q [B·H, Dh], caches [B, H, slots, Dh] → [B·H, Dh]. A host
    step's next product follows within microseconds: the workers wait for it awake."""
    BH, Dh = q.shape
    out = np.empty((BH, Dh), np.float32)
    _module().attend_int8(np.ascontiguousarray(q, np.float32), keys, key_scales, values, value_scales, out, BH,
                          keys.shape[2], valid, Dh, scale, threads(), SPIN_US)
    return out


# -- residual vector quantization ----------------------------------------------------------------

NEAREST_MAX_ROWS = 64  # rows per call: their residuals stay in the cache while a codebook streams by


def nearest_codes(x: mx.array, codebooks: mx.array, n: int) -> mx.array | None:
    """x [..., D] → the codes [..., n] (int32) of residual quantization with the first n
    codebooks [n_q, bins, D]: each level's exactly nearest codeword (lowest index on ties),
    subtracted before the next level; or None."""
    D = x.shape[-1]
    if not (_applies(x) and codebooks.dtype == mx.float32 and D % 16 == 0 and x.size > 0):
        return None
    rows = x.size // D
    x2, cb = _evaluated([x, codebooks])
    x2 = np.array(x2, np.float32).reshape(rows, D)
    out = np.empty((rows, n), np.int32)
    for r in range(0, rows, NEAREST_MAX_ROWS):
        k = min(NEAREST_MAX_ROWS, rows - r)
        _module().nearest_codes(x2[r:r + k], cb, out[r:r + k], k, n, cb.shape[0], cb.shape[1], D, threads(),
                                SPIN_US)
    return mx.array(out.reshape(*x.shape[:-1], n))


# -- SEANet's convolutions -----------------------------------------------------------------------

def pack_conv_weight(weight: mx.array) -> np.ndarray:
    """[C_out, K, C_in] → the kernels' layout [ceil(C_out/16), K·C_in, 16] (zero-padded)."""
    c_out = weight.shape[0]
    m = np.array(weight.astype(mx.float32)).reshape(c_out, -1).T  # [K·C_in, C_out]
    blocks = -(-c_out // CONV_COLS)
    p = np.zeros((m.shape[0], blocks * CONV_COLS), np.float32)
    p[:, :c_out] = m
    return np.ascontiguousarray(p.reshape(m.shape[0], blocks, CONV_COLS).transpose(1, 0, 2))


def host_convolutions_apply(x: mx.array) -> bool:
    """Whether SEANet's layers can run on host buffers (conv1d_host, residual_block_host)."""
    return _applies(x)


def conv1d(previous: mx.array | None, x: mx.array, packed, bias: mx.array | None, c_out: int, kernel_size: int,
           stride: int, dilation: int, elu_input: bool) -> mx.array | None:
    """conv(act(previous ‖ x)) + bias without padding (see modules/conv.valid_conv), or
    None. `packed` is a callable returning `pack_conv_weight(weight)` (made on first use)."""
    if not _applies(x):
        return None
    return mx.array(conv1d_host(*_evaluated([previous, x]), packed, *_evaluated([bias]), c_out, kernel_size, stride,
                                dilation, elu_input))


def conv1d_host(previous: np.ndarray | None, x: np.ndarray, packed, bias: mx.array | None, c_out: int,
                kernel_size: int, stride: int, dilation: int, elu_input: bool) -> np.ndarray:
    """conv1d on host buffers (float32, C-contiguous; bias evaluated), into a numpy array:
    no MLX evaluation or copy. Only where `host_convolutions_apply`."""
    B, T, C = x.shape
    ctx = 0 if previous is None else previous.shape[1]
    T_out = (ctx + T - (kernel_size - 1) * dilation - 1) // stride + 1
    return _run_host(_module().conv1d, [previous, x, packed(), bias], (B, T_out, c_out),
                     B, ctx, T, T_out, C, c_out, kernel_size, stride, dilation, int(elu_input))


def residual_block(previous: mx.array | None, x: mx.array, packed1, bias1: mx.array | None, packed2,
                   bias2: mx.array | None, hidden: int, kernel_size: int, dilation: int) -> mx.array | None:
    """SEANet's x + conv2(elu(conv1(elu(previous ‖ x)))) with conv2 of kernel 1, in one
    pass whose hidden activations never leave the cache; or None."""
    if not _applies(x) or x.shape[1] == 0:
        return None
    previous, x, bias1, bias2 = _evaluated([previous, x, bias1, bias2])
    return mx.array(residual_block_host(previous, x, packed1, bias1, packed2, bias2, hidden, kernel_size, dilation))


def residual_block_host(previous: np.ndarray | None, x: np.ndarray, packed1, bias1: mx.array | None, packed2,
                        bias2: mx.array | None, hidden: int, kernel_size: int, dilation: int) -> np.ndarray:
    """residual_block on host buffers, as conv1d_host."""
    B, T, C = x.shape
    ctx = 0 if previous is None else previous.shape[1]
    return _run_host(_module().residual_block, [previous, x, packed1(), bias1, packed2(), bias2], (B, T, C),
                     B, ctx, T, C, hidden, kernel_size, dilation)
