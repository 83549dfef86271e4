"""Causal, streamable 1-D convolutions with explicit state.

Layout is MLX's channels-last: activations are [B, T, C].

Batch and streaming share one code path: a batch call is a streaming step from a fresh
state, exactly as in Kyutai's `moshi.modules.conv` (0.2.13), whose batch mode also starts
from a zero (or replicated) left context and requires T to be a multiple of the stride.

Both layers end in one function, `valid_conv`, which computes `conv(act(context ‖ x)) +
bias`, act being the identity or ELU (SEANet's ELUs are fused into the convolution after
them; `residual_step` fuses a whole residual block). On the CPU backend these run the
compiled kernels (`moshi_mlx/cpu`: threaded, tiled in cache, 2-20x faster than MLX's ops
for SEANet's thin layers); elsewhere an im2col GEMM in MLX.
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..cpu import kernels as cpu
from .activations import elu


@dataclass
class ConvWeight:
    """A [C_out, K, C_in] convolution weight in the layouts its implementations read,
    derived from a parameter once (and again when the parameter is replaced, e.g. by
    `load_weights`: `source` is compared by identity)."""

    source: mx.array
    weight: mx.array  # [C_out, K, C_in]
    packed: np.ndarray | None = None  # the CPU kernel's [ceil(C_out/16), K·C_in, 16], made on first use

    @property
    def kernel_size(self) -> int:
        return self.weight.shape[1]

    def packed_for_kernel(self) -> np.ndarray:
        if self.packed is None:
            self.packed = cpu.pack_conv_weight(self.weight)
        return self.packed


def _rowwise_weight(linear: nn.Linear) -> ConvWeight:
    prepared = getattr(linear, "_as_conv", None)
    if prepared is None or prepared.source is not linear.weight:
        prepared = ConvWeight(linear.weight, linear.weight[:, None, :])
        object.__setattr__(linear, "_as_conv", prepared)  # not a parameter
    return prepared


def rowwise_linear_host(linear: nn.Linear, x: np.ndarray) -> np.ndarray:
    """rowwise_linear on a host buffer x [..., K] (float32), where the CPU kernels run."""
    prepared = _rowwise_weight(linear)
    rows = np.ascontiguousarray(x, np.float32).reshape(1, -1, x.shape[-1])
    bias = _evaluated_bias(linear)
    y = cpu.conv1d_host(None, rows, prepared.packed_for_kernel, bias, linear.weight.shape[0], 1, 1, 1, False)
    return y.reshape(*x.shape[:-1], -1)


def rowwise_linear(linear: nn.Linear, x: mx.array) -> mx.array:
    """linear(x) with each row of x computed as if alone. BLAS picks its kernels, and so its
    summation order, by the number of rows; the CPU kernel of SEANet's convolutions sums in
    one order whatever the rows, and a linear layer is a convolution of width 1. Mimi's
    encoder runs its transformer and its RVQ input projections this way (its convolutions
    and RVQ searches already are), so that streams encoded as one batch get bitwise the
    codes each gets alone. The kernel's weight layout is made on first use (and again if
    the weight is replaced). Where the kernel does not run (Metal, other CPUs), the plain
    product."""
    prepared = _rowwise_weight(linear)
    y = cpu.conv1d(None, x, prepared.packed_for_kernel, linear.bias if "bias" in linear else None,
                   linear.weight.shape[0], 1, 1, 1, False)
    return linear(x) if y is None else y


def valid_conv(previous: mx.array | None, x: mx.array, w: ConvWeight, stride: int = 1, dilation: int = 1,
               bias: mx.array | None = None, elu_input: bool = False) -> mx.array:
    """conv(act(previous ‖ x)) + bias without padding, act = ELU if elu_input else identity.

    previous [B, ctx, C_in] (None when ctx = 0) and x [B, T, C_in] → [B, T_out, C_out] with
    T_out = (ctx + T − span) // stride + 1, span = (K − 1)·dilation + 1.
    """
    K, S, D = w.kernel_size, stride, dilation
    c_out = w.weight.shape[0]
    y = cpu.conv1d(previous, x, w.packed_for_kernel, bias, c_out, K, S, D, elu_input)
    if y is not None:
        return y
    B, T, C = x.shape
    ctx = 0 if previous is None else previous.shape[1]
    T_out = (ctx + T - (K - 1) * D - 1) // S + 1
    x = x if previous is None else mx.concatenate([previous, x], axis=1)
    if elu_input:
        x = elu(x)
    T_in = x.shape[1]
    if K == 1:
        cols = x[:, ::S] if S > 1 else x
    elif D == 1 and K % S == 0 and T_in == (T_out - 1 + K // S) * S:
        # Kernel spans whole stride blocks: window t is blocks t … t + K/S − 1.
        blocks = x.reshape(B, T_in // S, S * C)
        m = K // S
        cols = mx.concatenate([blocks[:, j:j + T_out] for j in range(m)], axis=-1) if m > 1 else blocks
    else:
        cols = mx.concatenate([x[:, j * D: j * D + (T_out - 1) * S + 1: S] for j in range(K)], axis=-1)
    y = cols @ w.weight.reshape(c_out, -1).T
    return y + bias if bias is not None else y


@dataclass
class ConvState:
    """The last `k_eff - stride` input samples, not yet consumed by a full window."""

    previous: mx.array  # [B, k_eff - stride, C_in]


def _context(x: mx.array, state: ConvState | None, context: int, replicate: bool
             ) -> tuple[mx.array | None, ConvState | None]:
    """The left context to put before x (fresh: zeros, or copies of x[:, :1] when
    `replicate`), and the state for the next step."""
    if context <= 0:
        return None, state
    if state is not None:  # (a host step's state holds a numpy array)
        previous = state.previous if isinstance(state.previous, mx.array) else mx.array(state.previous)
    elif replicate:
        previous = mx.broadcast_to(x[:, :1], (x.shape[0], context, x.shape[2]))
    else:
        previous = mx.zeros((x.shape[0], context, x.shape[2]), dtype=x.dtype)
    T = x.shape[1]
    after = x[:, T - context:] if T >= context else mx.concatenate([previous[:, T:], x], axis=1)
    return previous, ConvState(after)


def _context_host(x: np.ndarray, state: ConvState | None, context: int, replicate: bool
                  ) -> tuple[np.ndarray | None, ConvState | None]:
    """_context for a host step (numpy buffers): the state keeps a copy of the last rows, not
    a view that would keep the whole input alive."""
    if context <= 0:
        return None, state
    B, T, C = x.shape
    if state is not None:
        previous = np.ascontiguousarray(state.previous, np.float32)  # (an MLX step's state: an MLX array)
    elif replicate:
        previous = np.ascontiguousarray(np.broadcast_to(x[:, :1], (B, context, C)))
    else:
        previous = np.zeros((B, context, C), np.float32)
    after = x[:, T - context:] if T >= context else np.concatenate([previous[:, T:], x], axis=1)
    return previous, ConvState(np.array(after, np.float32, order="C"))


class StreamingConv1d(nn.Module):
    """Causal Conv1d. Left context: zeros (`pad_mode="constant"`) or copies of the first
    sample (`"replicate"`, used by Mimi's stride-2 downsampling)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True, pad_mode: str = "constant"):
        super().__init__()
        if pad_mode not in ("constant", "replicate"):
            raise ValueError(f"pad_mode must be 'constant' or 'replicate', got {pad_mode!r}")
        self.stride, self.dilation, self.groups, self.pad_mode = stride, dilation, groups, pad_mode
        self.kernel_size = kernel_size
        scale = (1.0 / (in_channels // groups * kernel_size)) ** 0.5
        self.weight = mx.random.uniform(-scale, scale, (out_channels, kernel_size, in_channels // groups))
        if bias:
            self.bias = mx.zeros((out_channels,))
        self._prepared: ConvWeight | None = None

    @property
    def context(self) -> int:
        """Input samples carried from one step to the next."""
        return (self.kernel_size - 1) * self.dilation + 1 - self.stride

    def _conv_weight(self) -> ConvWeight:
        if self._prepared is None or self._prepared.source is not self.weight:
            self._prepared = ConvWeight(self.weight, self.weight)
        return self._prepared

    def step(self, x: mx.array, state: ConvState | None = None, elu_input: bool = False
             ) -> tuple[mx.array, ConvState | None]:
        """Streaming: x [B, T, C_in] after `state` (None = fresh) → (y, next state). The
        concatenation of all steps equals one batch call on the concatenated input."""
        T = x.shape[1]
        if T == 0 or T % self.stride:
            raise ValueError(f"conv input length {T} must be a positive multiple of the stride {self.stride}")
        # The state keeps raw inputs; with elu_input the context is activated again with the
        # rest (the same values: ELU is elementwise).
        previous, state = _context(x, state, self.context, self.pad_mode == "replicate")
        bias = self.bias if "bias" in self else None
        if self.groups != 1:
            x = x if previous is None else mx.concatenate([previous, x], axis=1)
            y = mx.conv1d(elu(x) if elu_input else x, self.weight, stride=self.stride, dilation=self.dilation,
                          groups=self.groups)
            return (y + bias if bias is not None else y), state
        return valid_conv(previous, x, self._conv_weight(), self.stride, self.dilation, bias, elu_input), state

    def step_host(self, x: np.ndarray, state: ConvState | None = None, elu_input: bool = False
                  ) -> tuple[np.ndarray, ConvState | None]:
        """`step` on host buffers through the CPU kernel (groups 1 only; see seanet.py)."""
        T = x.shape[1]
        if T == 0 or T % self.stride:
            raise ValueError(f"conv input length {T} must be a positive multiple of the stride {self.stride}")
        previous, state = _context_host(x, state, self.context, self.pad_mode == "replicate")
        w = self._conv_weight()
        bias = _evaluated_bias(self)
        return cpu.conv1d_host(previous, x, w.packed_for_kernel, bias, w.weight.shape[0], self.kernel_size,
                               self.stride, self.dilation, elu_input), state

    def __call__(self, x: mx.array, elu_input: bool = False) -> mx.array:
        """Batch: x [B, T, C_in] → conv(elu(x) if elu_input else x), [B, T / stride, C_out]."""
        return self.step(x, None, elu_input)[0]


def _evaluated_bias(conv) -> mx.array | None:
    """A convolution's bias, evaluated (the kernels read its buffer)."""
    if "bias" not in conv:
        return None
    mx.eval(conv.bias)  # costs nothing once evaluated
    return conv.bias


def residual_step(conv1: StreamingConv1d, conv2: StreamingConv1d, x: mx.array, state: ConvState | None
                  ) -> tuple[mx.array, ConvState | None]:
    """One streaming step of SEANet's residual block, x + conv2(elu(conv1(elu(x)))), where
    conv2 has kernel 1 (so it carries no state: `state` is conv1's). On the CPU backend one
    kernel call, whose hidden activations never leave the cache; elsewhere the two
    convolutions."""
    assert conv2.kernel_size == 1 and conv2.stride == 1, "SEANet's residual blocks end in a 1x1 convolution"
    if conv1.groups == conv2.groups == 1 and conv1.stride == 1:
        previous, next_state = _context(x, state, conv1.context, conv1.pad_mode == "replicate")
        w1, w2 = conv1._conv_weight(), conv2._conv_weight()
        y = cpu.residual_block(previous, x, w1.packed_for_kernel, conv1.bias if "bias" in conv1 else None,
                               w2.packed_for_kernel, conv2.bias if "bias" in conv2 else None,
                               w1.weight.shape[0], conv1.kernel_size, conv1.dilation)
        if y is not None:
            return y, next_state
    h, state = conv1.step(x, state, elu_input=True)
    return x + conv2.step(h, None, elu_input=True)[0], state


def residual_step_host(conv1: StreamingConv1d, conv2: StreamingConv1d, x: np.ndarray, state: ConvState | None
                       ) -> tuple[np.ndarray, ConvState | None]:
    """residual_step on host buffers (one kernel call; see seanet.py)."""
    previous, next_state = _context_host(x, state, conv1.context, conv1.pad_mode == "replicate")
    w1, w2 = conv1._conv_weight(), conv2._conv_weight()
    y = cpu.residual_block_host(previous, x, w1.packed_for_kernel, _evaluated_bias(conv1), w2.packed_for_kernel,
                                _evaluated_bias(conv2), w1.weight.shape[0], conv1.kernel_size, conv1.dilation)
    return y, next_state


class StreamingConvTranspose1d(nn.Module):
    """Causal ConvTranspose1d, trimmed on the right by kernel − stride (trim_right_ratio 1).

    Computed in polyphase form: output sample u·stride + s is Σ_j x[u − j] · W[:, j·stride + s]
    for j < m = ceil(kernel / stride), i.e. a causal convolution with m taps over the input
    frames and stride × C_out output channels. This is one GEMM (or the CPU kernel) with no
    overlap-add, and its streaming state is simply the last m − 1 input frames. Weight
    layout (the checkpoints'): [C_in, K, C_out], or [C, K] when depthwise (groups == C_in ==
    C_out, Mimi's upsampler).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 groups: int = 1, bias: bool = True):
        super().__init__()
        if groups not in (1, in_channels) or (groups > 1 and in_channels != out_channels):
            raise ValueError("only groups=1 or depthwise (groups == in == out channels) are supported")
        self.stride, self.kernel_size, self.groups = stride, kernel_size, groups
        self.out_channels = out_channels
        self.taps = -(-kernel_size // stride)  # m: input frames each output block depends on
        scale = (1.0 / (in_channels * kernel_size)) ** 0.5
        shape = (in_channels, kernel_size) if groups > 1 else (in_channels, kernel_size, out_channels)
        self.weight = mx.random.uniform(-scale, scale, shape)
        if bias:
            self.bias = mx.zeros((out_channels,))
        self._prepared: ConvWeight | None = None  # groups = 1
        self._taps: tuple[mx.array, mx.array] | None = None  # depthwise: (source weight, polyphase taps)
        self._phase_bias: tuple[mx.array, mx.array] | None = None  # (source bias, bias per (phase, channel))

    def _polyphase(self) -> mx.array:
        """[C_in, K(, C_out)] → per tap i (input frame u − m + 1 + i) and phase s: the weight
        W[:, (m − 1 − i)·stride + s], zero beyond K. Shape [m, stride, C_in(, C_out)]."""
        m, S = self.taps, self.stride
        w = self.weight
        pad = [(0, 0), (0, m * S - self.kernel_size)] + ([(0, 0)] if w.ndim == 3 else [])
        w = mx.pad(w, pad) if m * S != self.kernel_size else w
        w = w.reshape(w.shape[0], m, S, *w.shape[2:])[:, ::-1]  # taps oldest first
        return w.transpose(1, 2, 0, *range(3, w.ndim))

    def _conv_weight(self) -> ConvWeight:
        if self._prepared is None or self._prepared.source is not self.weight:
            p = self._polyphase()  # [m, S, C_in, C_out]
            m, S, c_in, c_out = p.shape
            w = mx.contiguous(p.transpose(1, 3, 0, 2).reshape(S * c_out, m, c_in))
            mx.eval(w)
            self._prepared = ConvWeight(self.weight, w)
        return self._prepared

    def step(self, x: mx.array, state: ConvState | None = None, elu_input: bool = False
             ) -> tuple[mx.array, ConvState | None]:
        """Streaming: x [B, T, C_in] after `state` (None = fresh) → (y [B, T · stride, C_out],
        next state)."""
        B, T, _ = x.shape
        S, m = self.stride, self.taps
        previous, state = _context(x, state, m - 1, replicate=False)
        bias = self.bias if "bias" in self else None
        if self.groups > 1:
            x = x if previous is None else mx.concatenate([previous, x], axis=1)
            if elu_input:
                x = elu(x)
            if self._taps is None or self._taps[0] is not self.weight:
                self._taps = (self.weight, mx.contiguous(self._polyphase()))  # [m, S, C]
            p = self._taps[1]
            y = x[:, 0:T, None, :] * p[0]
            for i in range(1, m):
                y = y + x[:, i:i + T, None, :] * p[i]  # [B, T, S, C]
            y = y.reshape(B, T * S, -1)
            return (y + bias if bias is not None else y), state
        if bias is not None:
            bias = self._bias_per_phase()
        y = valid_conv(previous, x, self._conv_weight(), 1, 1, bias, elu_input)
        return y.reshape(B, T * S, self.out_channels), state

    def _bias_per_phase(self) -> mx.array:
        """One bias per output (phase, channel), made and evaluated once per parameter."""
        if self._phase_bias is None or self._phase_bias[0] is not self.bias:
            self._phase_bias = (self.bias, mx.tile(self.bias, self.stride))
            mx.eval(self._phase_bias[1])
        return self._phase_bias[1]

    def step_host(self, x: np.ndarray, state: ConvState | None = None, elu_input: bool = False
                  ) -> tuple[np.ndarray, ConvState | None]:
        """`step` on host buffers through the CPU kernel (groups 1 only; see seanet.py)."""
        B, T, _ = x.shape
        S, m = self.stride, self.taps
        previous, state = _context_host(x, state, m - 1, replicate=False)
        bias = self._bias_per_phase() if "bias" in self else None
        w = self._conv_weight()
        y = cpu.conv1d_host(previous, x, w.packed_for_kernel, bias, w.weight.shape[0], m, 1, 1, elu_input)
        return y.reshape(B, T * S, self.out_channels), state

    def __call__(self, x: mx.array, elu_input: bool = False) -> mx.array:
        """Batch: x [B, T, C_in] → [B, T · stride, C_out]."""
        return self.step(x, None, elu_input)[0]
