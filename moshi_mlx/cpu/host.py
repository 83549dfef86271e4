"""One-step transformer layers run on the host: numpy for the small operations, the compiled
kernels for the quantized products, no MLX graph.

Why: on MLX's CPU backend each quantized product through the kernels is a synchronisation
point (the kernels read evaluated buffers), and every evaluation is a round trip to MLX's
scheduler thread, ~0.1 ms, longer than the norm, the attention over a few slots or the gating
it evaluates. The depformer makes four products per layer, four layers per codebook, up to 32
codebooks per frame: ~500 such points per TTS frame. Here the same step costs microseconds
between products, and the products follow each other closely enough for the kernels' workers
to wait for them awake (`spin`).

What it runs: a step of one position (T = 1) of a transformer whose linear layers are all
quantized (4 or 8 bits), with RMS norms, no positional embedding, no attention context and
no cross-attention, over a `KVCache` holding host buffers: the depformer's shape (Moshi's and
the TTS's, weights per step included). Anything else, or no kernels (Metal, other CPUs), keeps
the MLX path: `applies` says which.

The arithmetic is the MLX path's in float32 (dequantized products in the kernels' order,
the same norms, softmax and SiLU, computed by numpy): results agree to float32 rounding
(tests/test_cpu_host.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import kernels

if TYPE_CHECKING:  # the modules layer imports this one, not the other way round
    from ..modules.kv_cache import KVCache


def _host(a: mx.array) -> np.ndarray:
    """A read-only view of an evaluated MLX array's buffer (no copy)."""
    return np.asarray(memoryview(a))


def _quantized(linear) -> bool:
    return (isinstance(linear, nn.QuantizedLinear)
            and kernels.host_products_apply(linear.weight, linear.scales, linear.biases, linear.bits,
                                            linear.group_size))


def _linears(layer) -> list:
    attn = layer.self_attn
    out = list(attn.in_projs) + list(attn.out_projs) if layer.cfg.weights_per_step else [attn.in_proj, attn.out_proj]
    gating = layer.gating if isinstance(layer.gating, list) else [layer.gating]
    for g in gating:
        out += [g.linear_in, g.linear_out]
    return out


def applies(transformer) -> bool:
    """Whether `step` can run this transformer's one-position steps (see the module docstring).
    Asked for every frame's depformer state: the answer is kept until the first or the last
    linear layer (or its weight) is replaced, as quantizing or loading weights does."""
    cfg = transformer.cfg
    if not (kernels.kernels_available() and mx.default_device() == mx.cpu) or not transformer.layers:
        return False
    if (cfg.positional_embedding != "none" or cfg.context is not None or cfg.cross_attention or not cfg.causal
            or cfg.gating != "silu"):
        return False
    first, last = _linears(transformer.layers[0])[0], _linears(transformer.layers[-1])[-1]
    key = (id(first), id(first.weight), id(last), id(last.weight))
    cached = getattr(transformer, "_host_steps", None)
    if cached is None or cached[0] != key:
        cached = (key, _structure_applies(transformer))
        object.__setattr__(transformer, "_host_steps", cached)  # not a parameter
    return cached[1]


def _structure_applies(transformer) -> bool:
    for layer in transformer.layers:
        norms = (layer.norm1, layer.norm2)
        if not all("alpha" in n and hasattr(n, "eps") and n.alpha.dtype == mx.float32 for n in norms):  # RMSNorm
            return False  # another norm, or a bfloat16 model (its MLX path computes in bfloat16)
        if not all(_quantized(lin) for lin in _linears(layer)):
            return False
    return True


def _rms_norm(x: np.ndarray, norm) -> np.ndarray:
    """Kyutai's RMSNorm (modules/transformer.RMSNorm) in float32."""
    return x * (1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(norm.eps))) * _host(norm.alpha)


def _linear(x: np.ndarray, linear) -> np.ndarray:
    y = kernels.quantized_matmul_host(x, linear.weight, linear.scales, linear.biases, linear.bits,
                                      linear.group_size, spin=True)
    if "bias" in linear:
        y += _host(linear.bias)
    return y


def _scaled(layer, name: str, h: np.ndarray) -> np.ndarray:
    return h * _host(layer[name].scale) if name in layer else h


def _softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def layer_step(layer, x: np.ndarray, cache: "KVCache", offset: int) -> np.ndarray:
    """One position x [B, D] through `layer` (attending to `cache`, which it extends)."""
    cfg = layer.cfg
    B, D = x.shape
    H = cfg.num_heads
    Dh = D // H
    ws = cfg.weight_set(offset) if cfg.weights_per_step else None
    attn = layer.self_attn
    in_proj = attn.in_proj if ws is None else attn.in_projs[ws]
    out_proj = attn.out_proj if ws is None else attn.out_projs[ws]
    gating = layer.gating if ws is None else layer.gating[ws]

    qkv = _linear(_rms_norm(x, layer.norm1), in_proj).reshape(B, 3, H, Dh)
    cache.update_host(qkv[:, 1], qkv[:, 2])
    keys, values = cache.host_view()  # [B, H, n, Dh]: every written slot is visible (no context)
    scores = np.einsum("bhd,bhnd->bhn", qkv[:, 0] * np.float32(Dh ** -0.5), keys)
    h = np.einsum("bhn,bhnd->bhd", _softmax(scores), values).reshape(B, D)
    x = x + _scaled(layer, "layer_scale_1", _linear(h, out_proj))

    a, b = np.split(_linear(_rms_norm(x, layer.norm2), gating.linear_in), 2, axis=-1)
    with np.errstate(over="ignore"):  # exp(−a) = inf for a ≪ 0 gives silu(a) = −0, as it should
        h = _linear(a / (1.0 + np.exp(-a)) * b, gating.linear_out)
    return x + _scaled(layer, "layer_scale_2", h)


def step(transformer, x: mx.array, caches: list, offset: int) -> mx.array:
    """x [B, 1, D] at position `offset` through every layer (see `applies`) → [B, 1, D]."""
    B, T, D = x.shape
    h = np.array(x.astype(mx.float32), copy=True).reshape(B, D)
    for layer, cache in zip(transformer.layers, caches):
        h = layer_step(layer, h, cache, offset)
    return mx.array(h.reshape(B, 1, D)).astype(x.dtype)
