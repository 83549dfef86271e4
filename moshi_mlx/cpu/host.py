"""One-step transformer layers run on the host: numpy for the small operations, the compiled
kernels for the quantized products, no MLX graph.

Why: on MLX's CPU backend each quantized product through the kernels is a synchronisation
point (the kernels read evaluated buffers), and every evaluation is a round trip to MLX's
scheduler thread, ~0.1 ms, longer than the norm, the attention or the gating it evaluates. A
one-position step makes four products per layer: the depformer's 4 layers × 32 codebooks
make ~500 such points per TTS frame, an STT step's 16 layers 64. Here the operations between
products cost microseconds, and the products follow each other closely enough for the
kernels' workers to wait for them awake (`spin`).

What it runs: a step of one position (T = 1) of a transformer whose linear layers are all
quantized (4 or 8 bits), with RMS norms, RoPE or no positional embedding, SiLU gating and
cross-attention or none (a LayerNorm before it), over `KVCache`s holding host buffers (float32, or int8 attended by the
kernel) of exactly the attention context (or of any size without one): the temporal
transformers of Moshi, of the STT and of the TTS models, and the depformers of Moshi and of
the TTS (weights per step included). Anything else (float weights; Metal; CPUs without the
kernels) keeps the MLX path, and so do chunks of several positions over the same caches:
`applies` says which.

`embedding_rows` reads the token embeddings of such a step (33 tables for Moshi and the
STT models) on the host too. The numpy pieces (layer_norm, rope, softmax, scaled) also serve
Mimi's encoder transformer, whose chunks run on the host (modules/transformer.py).

The arithmetic is the MLX path's in float32 (the same kernels' products, the same norms, RoPE,
softmax and SiLU, computed by numpy): results agree to float32 rounding (tests/test_cpu_host.py).
Where an input differs in its last place (numpy's LayerNorm before the TTS's cross-attention),
a 4-bit product's 8-bit activations can round to the next step: there the paths agree to ~1e-3.
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import kernels

# The modules layer imports this one, not the other way round: layers, caches and their
# parameters are read by attribute (a layer from modules/transformer.py, a KVCache with
# host buffers from modules/kv_cache.py).


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
    if layer.cfg.cross_attention:  # its keys and values are computed once per source, not per step
        out += [layer.cross_attention.q_proj, layer.cross_attention.out_proj]
    return out


def applies(transformer) -> bool:
    """Whether `step` can run this transformer's one-position steps (see the module docstring).
    Asked for every frame's depformer state: the answer is kept until the first or the last
    linear layer (or its weight) is replaced, as quantizing or loading weights does."""
    cfg = transformer.cfg
    if not (kernels.kernels_available() and mx.default_device() == mx.cpu) or not transformer.layers:
        return False
    if cfg.positional_embedding not in ("none", "rope") or not cfg.causal or cfg.gating != "silu":
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
        if layer.cfg.cross_attention and not ("weight" in layer.norm_cross and "bias" in layer.norm_cross):
            return False  # norm_cross is a LayerNorm with both
    return True


def embedding_rows(tables: list, tokens: np.ndarray) -> list[np.ndarray | None]:
    """The rows of each table for its tokens (tokens [B, len(tables)]) as float32 [B, dim], −1
    giving zeros: tables that are float32 `nn.Embedding`s or 4/8-bit `nn.QuantizedEmbedding`s
    the kernels read (kernels.embedding_rows_host: bitwise MLX's lookups); None for any other.
    A step's 33 lookups through MLX cost ~200 small operations (each a dispatch on MLX's CPU
    backend); here they are row reads."""
    out: list[np.ndarray | None] = [None] * len(tables)
    for k, table in enumerate(tables):
        if isinstance(table, nn.QuantizedEmbedding):
            if kernels.host_products_apply(table.weight, table.scales, table.biases, table.bits, table.group_size):
                out[k] = kernels.embedding_rows_host(table.weight, table.scales, table.biases, table.bits,
                                                     table.group_size, tokens[:, k])
        elif isinstance(table, nn.Embedding) and table.weight.dtype == mx.float32:
            rows = _host(table.weight)[np.maximum(tokens[:, k], 0)]
            out[k] = np.where((tokens[:, k] >= 0)[:, None], rows, np.float32(0))
    return out


def _rms_norm(x: np.ndarray, norm) -> np.ndarray:
    """Kyutai's RMSNorm (modules/transformer.RMSNorm) in float32."""
    return x * (1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(norm.eps))) * _host(norm.alpha)


def layer_norm(x: np.ndarray, norm) -> np.ndarray:
    """nn.LayerNorm (affine) in float32."""
    centred = x - x.mean(axis=-1, keepdims=True)
    inv = 1.0 / np.sqrt(np.mean(centred * centred, axis=-1, keepdims=True) + np.float32(norm.eps))
    return centred * inv * _host(norm.weight) + _host(norm.bias)


def softmax(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in float32 (the host steps' attention, and a host KVCache's)."""
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _cross_attention(layer, x: np.ndarray, kv: tuple[mx.array, mx.array], mask: mx.array | None) -> np.ndarray:
    """The layer's cross-attention for one position x [B, D] over the source's keys and
    values [B, H, S, Dh] (computed once, read in place), mask [B, S] (True = attend)."""
    cross = layer.cross_attention
    B, D = x.shape
    H, Dh = cross.num_heads, cross.head_dim
    q = _linear(layer_norm(x, layer.norm_cross), cross.q_proj).reshape(B, H, 1, Dh)
    keys, values = _host(kv[0]), _host(kv[1])
    scores = np.matmul(q * np.float32(Dh ** -0.5), keys.swapaxes(-1, -2))  # [B, H, 1, S]
    if mask is not None:
        scores = np.where(_host(mask)[:, None, None, :], scores, np.float32(-np.inf))
    h = np.matmul(softmax(scores), values).reshape(B, D)
    return x + scaled(layer, "layer_scale_cross", _linear(h, cross.out_proj))


def _linear(x: np.ndarray, linear) -> np.ndarray:
    y = kernels.quantized_matmul_host(x, linear.weight, linear.scales, linear.biases, linear.bits,
                                      linear.group_size, spin=True)
    if "bias" in linear:
        y += _host(linear.bias)
    return y


def scaled(layer, name: str, h: np.ndarray) -> np.ndarray:
    """h times the layer's LayerScale `name`, if it has one."""
    return h * _host(layer[name].scale) if name in layer else h


def rope_angles(position: int | np.ndarray, head_dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of position · base^(−2i/Dh), in float32 as mx.fast.rope computes them:
    the same for every layer of a step, so made once per step. Positions [T] give [T, Dh/2]."""
    half = head_dim // 2
    inv_freq = np.exp(np.arange(half, dtype=np.float32) * np.float32(-np.log(base) / half))
    theta = np.asarray(position, np.float32)[..., None] * inv_freq
    return np.cos(theta), np.sin(theta)


def rope(x: np.ndarray, angles: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """mx.fast.rope(traditional=True) of x [..., Dh]: pairs (2i, 2i+1) rotated by `angles`
    ([Dh/2] for one position, or [T, Dh/2] for x [..., T, Dh])."""
    cos, sin = angles
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def layer_step(layer, x: np.ndarray, cache, offset: int, angles: tuple[np.ndarray, np.ndarray] | None = None,
               cross_kv: tuple[mx.array, mx.array] | None = None, cross_mask: mx.array | None = None) -> np.ndarray:
    """One position x [B, D] through `layer` (attending to `cache`, which it extends; and
    with cross-attention, to the source's keys and values `cross_kv`)."""
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
    q, k = qkv[:, 0], qkv[:, 1]
    if cfg.positional_embedding == "rope":
        q, k = rope(q, angles), rope(k, angles)
    cache.update_host(k, qkv[:, 2])
    # One position over a ring of `context` slots (or a context-free cache): every written
    # slot is visible, as the MLX path's mask says for a single step.
    h = cache.attend_host(q, Dh ** -0.5).reshape(B, D)
    x = x + scaled(layer, "layer_scale_1", _linear(h, out_proj))
    if cfg.cross_attention:
        x = _cross_attention(layer, x, cross_kv, cross_mask)

    a, b = np.split(_linear(_rms_norm(x, layer.norm2), gating.linear_in), 2, axis=-1)
    with np.errstate(over="ignore"):  # exp(−a) = inf for a ≪ 0 gives silu(a) = −0, as it should
        h = _linear(a / (1.0 + np.exp(-a)) * b, gating.linear_out)
    return x + scaled(layer, "layer_scale_2", h)


def step(transformer, x: mx.array, caches: list, offset: int, cross_kv: list | None = None,
         cross_mask: mx.array | None = None) -> mx.array:
    """x [B, 1, D] at position `offset` through every layer (see `applies`) → [B, 1, D]."""
    B, T, D = x.shape
    h = np.array(x.astype(mx.float32), copy=True).reshape(B, D)
    cfg = transformer.cfg
    angles = rope_angles(offset, D // cfg.num_heads, cfg.max_period) if cfg.positional_embedding == "rope" else None
    for i, (layer, cache) in enumerate(zip(transformer.layers, caches)):
        h = layer_step(layer, h, cache, offset, angles, cross_kv[i] if cross_kv else None, cross_mask)
    return mx.array(h.reshape(B, 1, D)).astype(x.dtype)
