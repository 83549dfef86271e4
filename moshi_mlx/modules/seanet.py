"""SEANet convolutional encoder/decoder (Kyutai's `moshi.modules.seanet`, causal, no norm).

Layer indices follow the checkpoints: `layers.{i}` here is `encoder.model.{i}` in Kyutai's
files and `encoder.layers.{i}` in transformers', with parameterless ELUs keeping their slots.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..cpu import kernels as cpu
from .activations import elu
from .conv import ConvState, StreamingConv1d, StreamingConvTranspose1d, residual_step, residual_step_host

# One entry per layer (None for stateless ELUs, or before the first step).
SEANetState = list


@dataclass
class SEANetConfig:
    channels: int = 1
    dimension: int = 512
    n_filters: int = 64
    n_residual_layers: int = 1
    ratios: tuple[int, ...] = (8, 6, 5, 4)  # decoder order; the encoder uses them reversed
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3
    dilation_base: int = 2
    compress: int = 2
    pad_mode: str = "constant"


class ELU(nn.Module):
    def __call__(self, x: mx.array) -> mx.array:
        return elu(x)


def _run(layers: list[nn.Module], x: mx.array, state: SEANetState) -> mx.array:
    """Stream x through `layers` (updating `state` in place), each ELU fused into the
    convolution after it (one pass over memory instead of two; see conv.valid_conv)."""
    elu_pending = False
    for i, layer in enumerate(layers):
        if isinstance(layer, ELU):
            if elu_pending:
                x = elu(x)
            elu_pending = True
        elif isinstance(layer, (StreamingConv1d, StreamingConvTranspose1d)):
            x, state[i] = layer.step(x, state[i], elu_input=elu_pending)
            elu_pending = False
        else:
            x = elu(x) if elu_pending else x
            x, state[i] = layer.step(x, state[i])
            elu_pending = False
    return elu(x) if elu_pending else x


def _run_host(layers: list[nn.Module], x: np.ndarray, state: SEANetState) -> np.ndarray:
    """_run on host buffers, every layer a kernel call (see _Sequential.step)."""
    elu_pending = False
    for i, layer in enumerate(layers):
        if isinstance(layer, ELU):
            elu_pending = True
        elif isinstance(layer, ResidualBlock):
            x, state[i] = residual_step_host(layer.block[1], layer.block[3], x, state[i])
        else:
            x, state[i] = layer.step_host(x, state[i], elu_input=elu_pending)
            elu_pending = False
    return x


def _host_structure(layers: list[nn.Module]) -> bool:
    """Whether _run_host can run these layers: convolutions of groups 1, residual blocks
    of two such with a 1x1 second one, and every ELU fused into the convolution after it."""
    elu_pending = False
    for layer in layers:
        if isinstance(layer, ELU):
            if elu_pending:
                return False
            elu_pending = True
        elif isinstance(layer, ResidualBlock):
            conv1, conv2 = layer.block[1], layer.block[3]
            if elu_pending or conv1.groups != 1 or conv1.stride != 1 or conv2.groups != 1 or conv2.kernel_size != 1:
                return False
        elif isinstance(layer, (StreamingConv1d, StreamingConvTranspose1d)) and layer.groups == 1:
            elu_pending = False
        else:
            return False
    return not elu_pending


class ResidualBlock(nn.Module):
    """x + conv_k1(elu(conv_k3(elu(x)))) with a true (identity) skip."""

    def __init__(self, dim: int, kernel_size: int, dilation: int, compress: int, pad_mode: str):
        super().__init__()
        hidden = dim // compress
        self.block = [
            ELU(),
            StreamingConv1d(dim, hidden, kernel_size, dilation=dilation, pad_mode=pad_mode),
            ELU(),
            StreamingConv1d(hidden, dim, 1, pad_mode=pad_mode),
        ]

    def __call__(self, x: mx.array) -> mx.array:
        return self.step(x, None)[0]

    def step(self, x: mx.array, state: ConvState | None) -> tuple[mx.array, ConvState | None]:
        # block = [ELU, conv, ELU, conv]: both ELUs and the skip are fused (conv.residual_step).
        return residual_step(self.block[1], self.block[3], x, state)


def _residual_stage(cfg: SEANetConfig, dim: int) -> list[nn.Module]:
    return [ResidualBlock(dim, cfg.residual_kernel_size, cfg.dilation_base ** j, cfg.compress, cfg.pad_mode)
            for j in range(cfg.n_residual_layers)]


class _Sequential(nn.Module):
    def __init__(self, layers: list[nn.Module], chunk: int):
        super().__init__()
        self.layers = layers
        # Causal convolutions stream exactly, so long inputs run as a stream of chunks: the
        # same result as one pass, with memory bounded by the chunk. 64 frames (2.56 s): on
        # the CPU backend, 16 were 25% slower (big deep-layer weights re-read per chunk) and
        # 128 only 1-5% faster for 100 MB more memory (`moshi-mlx bench mimi`).
        self.chunk = chunk

    def init_state(self) -> SEANetState:
        return [None] * len(self.layers)

    def __call__(self, x: mx.array) -> mx.array:
        """Batch: the same as streaming the whole input from a fresh state."""
        return self.step(x, self.init_state())[0]

    def step(self, x: mx.array, state: SEANetState) -> tuple[mx.array, SEANetState]:
        """Streaming: x after `state` → (y, state); `state` is updated in place.

        With the CPU kernels, the layers run on host buffers (numpy) from the input to the
        output: each kernel call on MLX arrays would evaluate its input and copy its output
        into a new MLX array (63 MB per call for 16 frames of 8 streams at 24 kHz). The same
        kernels compute the same values either way."""
        if self._host_applies(x):
            xh = np.array(x, np.float32)
            outs = [_run_host(self.layers, np.ascontiguousarray(xh[:, i:i + self.chunk]), state)
                    for i in range(0, x.shape[1], self.chunk)]
            return mx.array(outs[0] if len(outs) == 1 else np.concatenate(outs, axis=1)), state
        outs = [_run(self.layers, x[:, i:i + self.chunk], state) for i in range(0, x.shape[1], self.chunk)]
        return (outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)), state

    def _host_applies(self, x: mx.array) -> bool:
        if not cpu.host_convolutions_apply(x):
            return False
        if getattr(self, "_host_ok", None) is None:
            object.__setattr__(self, "_host_ok", _host_structure(self.layers))  # not a parameter
        return self._host_ok


class SEANetEncoder(_Sequential):
    """[B, T, channels] → [B, T / prod(ratios), dimension]."""

    def __init__(self, cfg: SEANetConfig):
        mult = 1
        layers: list[nn.Module] = [StreamingConv1d(cfg.channels, cfg.n_filters, cfg.kernel_size, pad_mode=cfg.pad_mode)]
        for ratio in reversed(cfg.ratios):
            dim = mult * cfg.n_filters
            layers += _residual_stage(cfg, dim)
            layers += [ELU(), StreamingConv1d(dim, 2 * dim, 2 * ratio, stride=ratio, pad_mode=cfg.pad_mode)]
            mult *= 2
        layers += [ELU(), StreamingConv1d(mult * cfg.n_filters, cfg.dimension, cfg.last_kernel_size, pad_mode=cfg.pad_mode)]
        super().__init__(layers, chunk=64 * math.prod(cfg.ratios))


class SEANetDecoder(_Sequential):
    """[B, T, dimension] → [B, T · prod(ratios), channels]."""

    def __init__(self, cfg: SEANetConfig):
        mult = 2 ** len(cfg.ratios)
        layers: list[nn.Module] = [StreamingConv1d(cfg.dimension, mult * cfg.n_filters, cfg.kernel_size, pad_mode=cfg.pad_mode)]
        for ratio in cfg.ratios:
            dim = mult * cfg.n_filters
            layers += [ELU(), StreamingConvTranspose1d(dim, dim // 2, 2 * ratio, stride=ratio)]
            layers += _residual_stage(cfg, dim // 2)
            mult //= 2
        layers += [ELU(), StreamingConv1d(cfg.n_filters, cfg.channels, cfg.last_kernel_size, pad_mode=cfg.pad_mode)]
        super().__init__(layers, chunk=64)
