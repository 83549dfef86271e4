"""Streaming transformer shared by Mimi and the Moshi LM (Kyutai's StreamingTransformer).

Activations are [B, T, D]. Attention uses a fused `in_proj` ([3·D, D], Kyutai's layout),
RoPE with interleaved pairs (Kyutai's convention; transformers-format weights are permuted
back at load time, see checkpoints/), a causal mask limited to `context` steps, and in
streaming mode a rotating KV cache of `context` entries that never runs out.
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..cpu import host as cpu_host
from ..cpu import kernels as cpu
from .activations import gelu, softmax
from .conv import rowwise_linear, rowwise_linear_host
from .kv_cache import KVCache


@dataclass
class TransformerConfig:
    d_model: int
    num_heads: int
    num_layers: int
    dim_feedforward: int
    context: int | None = None  # attention span in steps (query t sees t − context + 1 … t)
    causal: bool = True
    max_period: float = 10_000.0  # RoPE θ / sinusoid period
    positional_embedding: str = "rope"  # "rope", "sin", "sin_rope" or "none"
    norm: str = "layer_norm"  # "layer_norm" (bias, eps 1e-5), "rms_norm" (1e-5), "rms_norm_f32" (1e-8)
    gating: str = "none"  # "none": linear2(gelu(linear1 x)); "silu": SiLU-gated linear_in/out
    layer_scale: float | None = None  # initial value; None = no layer scale
    bias_ff: bool = False
    bias_attn: bool = False
    # Depformer: step t of each frame uses weight set schedule[t] (attention and FF);
    # 0 = shared weights.
    weights_per_step: int = 0
    weights_per_step_schedule: list[int] | None = None
    # Each layer also attends (no mask, no positions) to a conditioning source (the TTS's
    # speaker embeddings), after self-attention, with its own LayerNorm and layer scale.
    cross_attention: bool = False
    # Each row's products computed as if alone, in one summation order whatever the batch
    # (see rowwise_linear): Mimi's encoder, so that streams encoded together get bitwise the
    # codes each gets alone.
    rowwise_products: bool = False

    @property
    def num_weight_sets(self) -> int:
        if not self.weights_per_step:
            return 1
        if self.weights_per_step_schedule:
            return max(self.weights_per_step_schedule) + 1
        return self.weights_per_step

    def weight_set(self, step: int) -> int:
        """Weight set used at (in-frame) step `step`."""
        if not self.weights_per_step:
            return 0
        return self.weights_per_step_schedule[step] if self.weights_per_step_schedule else step

    @property
    def gating_hidden(self) -> int:
        """Kyutai's ActivationGating hidden size for this dim_feedforward."""
        if self.dim_feedforward == 4 * self.d_model:
            return 21 * self.d_model // 8
        return 2 * self.dim_feedforward // 3


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.scale = mx.full((dim,), init)

    def __call__(self, x: mx.array) -> mx.array:
        return x * self.scale


class RMSNorm(nn.Module):
    """Kyutai's RMSNorm (weight named `alpha`); `rms_norm_f32` computes in float32, eps 1e-8."""

    def __init__(self, dim: int, eps: float, float32: bool):
        super().__init__()
        self.eps, self.float32 = eps, float32
        self.alpha = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        if not self.float32:
            return mx.fast.rms_norm(x, self.alpha.astype(x.dtype), self.eps)
        y = mx.fast.rms_norm(x.astype(mx.float32), self.alpha.astype(mx.float32), self.eps)
        return y.astype(x.dtype)


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "layer_norm":
        return nn.LayerNorm(dim, eps=1e-5)
    if kind == "rms_norm":
        return RMSNorm(dim, 1e-5, float32=False)
    if kind == "rms_norm_f32":
        return RMSNorm(dim, 1e-8, float32=True)
    raise ValueError(f"unknown norm {kind!r} (expected 'layer_norm', 'rms_norm' or 'rms_norm_f32')")


def sin_embedding(positions: np.ndarray, dim: int, max_period: float) -> mx.array:
    """Kyutai's create_sin_embedding: [cos(p·f), sin(p·f)], f = max_period^(−i/(dim/2 − 1))."""
    half = dim // 2
    phase = mx.array(positions, mx.float32)[:, None] / (max_period ** (mx.arange(half, dtype=mx.float32)
                                                                        / (half - 1)))
    return mx.concatenate([mx.cos(phase), mx.sin(phase)], axis=-1)


def _visible(pos_q: np.ndarray, pos_k: np.ndarray, context: int | None,
             ring_step: int | None = None) -> np.ndarray | None:
    """Boolean [Tq, Tk] mask: key visible if written, not in the future, within the context
    (None: all visible).

    ring_step=r: what Kyutai's ring of `context` entries shows when it is fed r steps per
    call (written before attending): the i-th query of a call (i = pos mod r) sees only
    context − (r − 1 − i) keys. Calls of several r-step chunks then give the same result
    as one call per chunk."""
    delta = pos_q[:, None] - pos_k[None, :]
    ok = (pos_k[None, :] >= 0) & (delta >= 0)
    if context is not None:
        window = context if ring_step is None else context - (ring_step - 1 - pos_q % ring_step)[:, None]
        ok &= delta < window
    return None if ok.all() else ok


def _attention_mask(pos_q: np.ndarray, pos_k: np.ndarray, context: int | None,
                    ring_step: int | None = None) -> mx.array | None:
    """_visible as an MLX array."""
    ok = _visible(pos_q, pos_k, context, ring_step)
    return None if ok is None else mx.array(ok)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None) -> mx.array:
    """softmax(scale · q·kᵀ, masked) · v for q [B, H, Tq, Dh], k/v [B, H, Tk, Dh] and a
    boolean mask [Tq, Tk] (or one broadcasting to [B, H, Tq, Tk]; True = visible).

    On the CPU backend, written out with the polynomial softmax: 3x faster than MLX's fused
    kernel there, whose scalar `exp` dominates (Mimi's 128-query chunks: 1.6 vs 5.2 ms per
    layer). Elsewhere (Metal) the fused kernel.
    """
    if mx.default_device() != mx.cpu or q.dtype != mx.float32:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    scores = (q * scale) @ k.swapaxes(-1, -2)
    if mask is not None:
        scores = mx.where(mask, scores, -mx.inf)
    return softmax(scores) @ v


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.num_heads = cfg.num_heads
        self.head_dim = d // cfg.num_heads
        if cfg.weights_per_step:
            self.in_projs = [nn.Linear(d, 3 * d, bias=cfg.bias_attn) for _ in range(cfg.num_weight_sets)]
            self.out_projs = [nn.Linear(d, d, bias=cfg.bias_attn) for _ in range(cfg.num_weight_sets)]
        else:
            self.in_proj = nn.Linear(d, 3 * d, bias=cfg.bias_attn)
            self.out_proj = nn.Linear(d, d, bias=cfg.bias_attn)

    def _project(self, x: mx.array, offset: int, which: str) -> mx.array:
        if not self.cfg.weights_per_step:
            linear = getattr(self, which)
            return rowwise_linear(linear, x) if self.cfg.rowwise_products else linear(x)
        mods = getattr(self, which + "s")
        ys = [mods[self.cfg.weight_set(offset + t)](x[:, t:t + 1]) for t in range(x.shape[1])]
        return ys[0] if len(ys) == 1 else mx.concatenate(ys, axis=1)

    def __call__(self, x: mx.array, cache: KVCache | None, offset: int, mask: mx.array | None = None) -> mx.array:
        """x [B, T, D]; `offset` is the absolute position of x[:, 0]. With a cache, `mask`
        is the step's mask over the cache slots (computed once per step for all layers)."""
        B, T, D = x.shape
        qkv = self._project(x, offset, "in_proj").reshape(B, T, 3, self.num_heads, self.head_dim)
        qkv = qkv.transpose(2, 0, 3, 1, 4)
        if self.cfg.positional_embedding in ("rope", "sin_rope"):
            # q and k rotated in one call: rope acts on the last axis, positions on axis −2.
            qk = mx.fast.rope(qkv[:2], self.head_dim, traditional=True, base=self.cfg.max_period,
                              scale=1.0, offset=offset)
            q, k = qk[0], qk[1]
        else:
            q, k = qkv[0], qkv[1]
        v = qkv[2]
        scale = self.head_dim ** -0.5
        if cache is not None:
            cache.update(k, v)
            out = cache.attend_one(q, scale) if mask is None else None
            if out is None:
                k, v = cache.fetch()
                out = attention(q, k.astype(q.dtype), v.astype(q.dtype), scale, mask)
        else:
            out = self._batch_attention(q, k, v, np.arange(offset, offset + T), scale)
        return self._project(out.transpose(0, 2, 1, 3).reshape(B, T, D), offset, "out_proj")

    def _batch_attention(self, q, k, v, pos, scale) -> mx.array:
        mask = _attention_mask(pos, pos, self.cfg.context) if self.cfg.causal else None
        return attention(q, k, v, scale, mask)


class CrossAttention(nn.Module):
    """Queries from the sequence, keys and values from a fixed source. Kyutai stores one
    in_proj [3·D, D]; it is split at load time into q_proj and kv_proj, so a step projects
    only its queries: the source's keys and values are computed once (`source_kv`)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d = cfg.d_model
        self.num_heads = cfg.num_heads
        self.head_dim = d // cfg.num_heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.kv_proj = nn.Linear(d, 2 * d, bias=False)
        self.out_proj = nn.Linear(d, d, bias=False)

    def source_kv(self, source: mx.array) -> tuple[mx.array, mx.array]:
        """source [B, S, D] → keys, values [B, H, S, Dh]."""
        B, S, _ = source.shape
        kv = self.kv_proj(source).reshape(B, S, 2, self.num_heads, self.head_dim).transpose(2, 0, 3, 1, 4)
        # contiguous: host steps (cpu/host.py) read them in place, every step
        return mx.contiguous(kv[0]), mx.contiguous(kv[1])

    def __call__(self, x: mx.array, kv: tuple[mx.array, mx.array], mask: mx.array | None = None) -> mx.array:
        """mask [B, S] (True = attend) or None for all of the source."""
        B, T, D = x.shape
        q = self.q_proj(x).reshape(B, T, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        k, v = kv
        mask = None if mask is None else mask[:, None, None, :]
        out = attention(q, k.astype(q.dtype), v.astype(q.dtype), self.head_dim ** -0.5, mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, T, D))


class GatedFeedForward(nn.Module):
    """Kyutai's ActivationGating: linear_out(silu(a) · b) with [a, b] = linear_in(x)."""

    def __init__(self, d: int, hidden: int, bias: bool = False):
        super().__init__()
        self.linear_in = nn.Linear(d, 2 * hidden, bias=bias)
        self.linear_out = nn.Linear(hidden, d, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        a, b = mx.split(self.linear_in(x), 2, axis=-1)
        return self.linear_out(nn.silu(a) * b)


class TransformerLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.self_attn = Attention(cfg)
        self.norm1 = make_norm(cfg.norm, cfg.d_model)
        self.norm2 = make_norm(cfg.norm, cfg.d_model)
        if cfg.gating == "none":
            self.linear1 = nn.Linear(cfg.d_model, cfg.dim_feedforward, bias=cfg.bias_ff)
            self.linear2 = nn.Linear(cfg.dim_feedforward, cfg.d_model, bias=cfg.bias_ff)
        elif cfg.gating == "silu":
            if cfg.weights_per_step:
                self.gating = [GatedFeedForward(cfg.d_model, cfg.gating_hidden, cfg.bias_ff)
                               for _ in range(cfg.num_weight_sets)]
            else:
                self.gating = GatedFeedForward(cfg.d_model, cfg.gating_hidden, cfg.bias_ff)
        else:
            raise ValueError(f"unknown gating {cfg.gating!r} (expected 'none' or 'silu')")
        if cfg.layer_scale is not None:
            self.layer_scale_1 = LayerScale(cfg.d_model, cfg.layer_scale)
            self.layer_scale_2 = LayerScale(cfg.d_model, cfg.layer_scale)
        if cfg.cross_attention:
            self.cross_attention = CrossAttention(cfg)
            self.norm_cross = nn.LayerNorm(cfg.d_model, eps=1e-5)
            if cfg.layer_scale is not None:
                self.layer_scale_cross = LayerScale(cfg.d_model, cfg.layer_scale)

    def _ff(self, x: mx.array, offset: int) -> mx.array:
        if self.cfg.gating == "none":
            # exact (erf) GELU, as in the reference; not the tanh approximation
            if self.cfg.rowwise_products:
                return rowwise_linear(self.linear2, gelu(rowwise_linear(self.linear1, x)))
            return self.linear2(gelu(self.linear1(x)))
        if self.cfg.weights_per_step:
            ys = [self.gating[self.cfg.weight_set(offset + t)](x[:, t:t + 1]) for t in range(x.shape[1])]
            return ys[0] if len(ys) == 1 else mx.concatenate(ys, axis=1)
        return self.gating(x)

    def __call__(self, x: mx.array, cache: KVCache | None, offset: int, mask: mx.array | None = None,
                 cross_kv: tuple[mx.array, mx.array] | None = None, cross_mask: mx.array | None = None) -> mx.array:
        h = self.self_attn(self.norm1(x), cache, offset, mask)
        x = x + (self.layer_scale_1(h) if "layer_scale_1" in self else h)
        if self.cfg.cross_attention:
            if cross_kv is None:
                raise ValueError("this transformer has cross-attention: it needs a conditioning source")
            h = self.cross_attention(self.norm_cross(x), cross_kv, cross_mask)
            x = x + (self.layer_scale_cross(h) if "layer_scale_cross" in self else h)
        h = self._ff(self.norm2(x), offset)
        return x + (self.layer_scale_2(h) if "layer_scale_2" in self else h)


def _host_chunk_layer(layer: TransformerLayer, x: np.ndarray, cache: KVCache, angles, visible: np.ndarray | None
                      ) -> np.ndarray:
    """One layer of `Transformer._host_chunk_step` for x [B, T, D] (numpy)."""
    B, T, D = x.shape
    attn = layer.self_attn
    H, Dh = attn.num_heads, attn.head_dim
    qkv = rowwise_linear_host(attn.in_proj, cpu_host.layer_norm(x, layer.norm1))
    q, k, v = qkv.reshape(B, T, 3, H, Dh).transpose(2, 0, 3, 1, 4)  # [B, H, T, Dh] each
    if angles is not None:
        q, k = cpu_host.rope(q, angles), cpu_host.rope(k, angles)
    cache.update_host_chunk(np.ascontiguousarray(k), np.ascontiguousarray(v))
    n = cache.valid
    # one 2-D product per (item, head), whatever the batch: each item's bits are its own
    scores = np.matmul(q * np.float32(Dh ** -0.5), cache.keys[:, :, :n].swapaxes(-1, -2))  # [B, H, T, n]
    if visible is not None:
        scores = np.where(visible, scores, np.float32(-np.inf))
    h = np.matmul(cpu_host.softmax(scores), cache.values[:, :, :n]).transpose(0, 2, 1, 3).reshape(B, T, D)
    x = x + cpu_host.scaled(layer, "layer_scale_1", rowwise_linear_host(attn.out_proj, h))
    h = rowwise_linear_host(layer.linear1, cpu_host.layer_norm(x, layer.norm2))
    # MLX's fused GELU (exact erf) for the activation: one evaluation, the same function as the MLX path
    h = rowwise_linear_host(layer.linear2, np.array(gelu(mx.array(h))))
    return x + cpu_host.scaled(layer, "layer_scale_2", h)


@dataclass
class TransformerState:
    """A stream's position and its layers' KV caches (made by `Transformer.init_state`)."""

    caches: list[KVCache]
    max_chunk: int  # steps one call may hold; longer inputs are split
    offset: int = 0
    ring_step: int | None = None  # see _attention_mask
    cross_kv: list[tuple[mx.array, mx.array]] | None = None  # per layer, from the conditioning source
    cross_mask: mx.array | None = None  # [B, S]: the source positions each item attends to (None: all)
    host: bool = False  # one-position steps run on the host (cpu/host.py), over host caches
    host_chunks: bool = False  # every step runs on the host (_host_chunk_step: Mimi's encoder)


class Transformer(nn.Module):
    """A stack of layers holding weights only. `__call__` is the batch path; `step(x, state)`
    streams with rotating caches held by the caller's `state` (one per stream: several
    streams can run on one model)."""

    # Batch inputs longer than this run in blocks through exact caches: memory O(context).
    BATCH_BLOCK = 256

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = [TransformerLayer(cfg) for _ in range(cfg.num_layers)]

    def _cache_bits(self, capacity: int, kv_bits: int | str | None) -> int | None:
        """"auto": int8 for a quantized model's long caches on the CPU backend, where the
        compiled kernel attends over int8 in place; elsewhere (Metal) the compute dtype, so
        that no step dequantizes a whole cache. The depformer's few-step caches stay exact."""
        if kv_bits != "auto":
            return kv_bits
        attn = self.layers[0].self_attn
        proj = attn.in_projs[0] if self.cfg.weights_per_step else attn.in_proj
        quantized = isinstance(proj, nn.QuantizedLinear)
        on_cpu = mx.default_device() == mx.cpu and cpu.kernels_available()
        return 8 if quantized and on_cpu and capacity >= self.BATCH_BLOCK else None

    def _add_positions(self, x: mx.array, offset: int) -> mx.array:
        if self.cfg.positional_embedding not in ("sin", "sin_rope"):
            return x
        pos = np.arange(offset, offset + x.shape[1])
        return x + sin_embedding(pos, x.shape[-1], self.cfg.max_period).astype(x.dtype)

    def source_kv(self, source: mx.array | None) -> list[tuple[mx.array, mx.array]] | None:
        """Each layer's cross-attention keys and values for a conditioning source [B, S, D]
        (computed once per utterance; None without cross-attention)."""
        if not self.cfg.cross_attention:
            return None
        if source is None:
            raise ValueError("this transformer has cross-attention: it needs a conditioning source")
        out = []
        for layer in self.layers:
            out.append(layer.cross_attention.source_kv(source))
            # one layer at a time: a quantized model's prefill dequantizes each weight for
            # the product (see quantize.py); evaluated together, all would be alive at once
            mx.eval(out[-1])
        return out

    def __call__(self, x: mx.array, cross_source: mx.array | None = None) -> mx.array:
        """Batch over the whole sequence: every query sees its full context."""
        if x.shape[1] <= self.BATCH_BLOCK or self.cfg.context is None:
            x = self._add_positions(x, 0)
            cross = self.source_kv(cross_source) or [None] * len(self.layers)
            for layer, kv in zip(self.layers, cross):
                x = layer(x, None, 0, cross_kv=kv)
            return x
        return self.step(x, self.init_state(exact_chunk=self.BATCH_BLOCK, cross_source=cross_source))[0]

    def init_state(self, exact_chunk: int | None = None, capacity: int | None = None,
                   kv_bits: int | str | None = "auto", ring_step: int | None = None,
                   cross_source: mx.array | None = None, cross_mask: mx.array | None = None) -> TransformerState:
        """A fresh stream.

        exact_chunk=None: Kyutai's ring of `context` entries, written before attending (the
        reference streaming semantics). exact_chunk=N: caches of context + N − 1 entries, so
        chunks of up to N steps see exactly what batch attention sees. `capacity` sets the
        cache size of a model without a context (the depformer: its steps per frame).
        kv_bits: "auto" (see _cache_bits), None (compute dtype) or 8. ring_step=r (with
        exact_chunk): chunks of up to exact_chunk steps give what Kyutai's ring gives for
        r steps at a time (see _attention_mask). cross_source [B, S, D]: the conditioning
        source of a transformer with cross-attention (its keys/values are computed here), and
        cross_mask [B, S] the positions each item attends to.
        """
        if capacity is None:
            if self.cfg.context is None:
                raise ValueError("streaming needs a finite attention context or a cache capacity")
            capacity = self.cfg.context + (exact_chunk - 1 if exact_chunk else 0)
        bits = self._cache_bits(capacity, kv_bits)
        # host steps attend over every written slot: a ring of exactly `context` slots
        host = exact_chunk is None and (self.cfg.context is None or capacity == self.cfg.context) \
            and cpu_host.applies(self)
        chunks = self._host_chunks_apply() and bits is None
        return TransformerState([KVCache(capacity, bits, host=host or chunks) for _ in self.layers],
                                max_chunk=exact_chunk or capacity, ring_step=ring_step if exact_chunk else None,
                                cross_kv=self.source_kv(cross_source), cross_mask=cross_mask, host=host,
                                host_chunks=chunks)

    def _host_chunks_apply(self) -> bool:
        """Whether _host_chunk_step runs this transformer: Mimi's encoder (rowwise products, so
        float32 weights through the convolution kernel; LayerNorm, RoPE, GELU, causal) on the
        CPU backend with the kernels."""
        cfg = self.cfg
        layer = self.layers[0] if self.layers else None
        return (cfg.rowwise_products and layer is not None and cpu.kernels_available()
                and mx.default_device() == mx.cpu and cfg.norm == "layer_norm" and cfg.gating == "none"
                and cfg.positional_embedding in ("rope", "none") and cfg.causal and not cfg.weights_per_step
                and not cfg.cross_attention and layer.self_attn.in_proj.weight.dtype == mx.float32)

    def _host_chunk_step(self, x: np.ndarray, state: TransformerState, visible: np.ndarray | None) -> np.ndarray:
        """A chunk x [B, T, D] through every layer on host buffers: numpy between the kernel's
        products. Why: Mimi's encoder runs its linear layers through the convolution kernel
        (rowwise products), and through MLX every such call evaluates the graph before it: 4
        round trips to MLX's scheduler per layer and step, plus ~25 small operations, cost more
        than the products for a frame of a few streams. Same arithmetic as the MLX path
        (LayerNorm, RoPE, softmax in numpy: equal to float32 rounding)."""
        angles = None
        if self.cfg.positional_embedding == "rope":
            positions = np.arange(state.offset, state.offset + x.shape[1])
            angles = cpu_host.rope_angles(positions, self.layers[0].self_attn.head_dim, self.cfg.max_period)
        for layer, cache in zip(self.layers, state.caches):
            x = _host_chunk_layer(layer, x, cache, angles, visible)
        return x

    def step(self, x: mx.array, state: TransformerState) -> tuple[mx.array, TransformerState]:
        """x [B, T, D] after `state` → (y, state); the caches are updated in place."""
        T = x.shape[1]
        if state.host and T == 1:  # see cpu/host.py; longer chunks take the MLX path over the same caches
            y = cpu_host.step(self, x, state.caches, state.offset, state.cross_kv, state.cross_mask)
            state.offset += 1
            return y, state
        if T > state.max_chunk:
            outs = [self.step(x[:, i:i + state.max_chunk], state)[0] for i in range(0, T, state.max_chunk)]
            return mx.concatenate(outs, axis=1), state
        # Every layer's cache holds the same positions: build the mask once per step.
        pos_q = np.arange(state.offset, state.offset + T)
        pos_k = KVCache.positions(state.caches[0].capacity, state.offset + T)
        if state.host_chunks:
            visible = _visible(pos_q, pos_k, self.cfg.context, state.ring_step)
            y = mx.array(self._host_chunk_step(np.array(x, np.float32), state, visible))
            state.offset += T
            return y, state
        mask = _attention_mask(pos_q, pos_k, self.cfg.context, state.ring_step) if self.cfg.causal else None
        x = self._add_positions(x, state.offset)
        cross = state.cross_kv or [None] * len(self.layers)
        for layer, cache, kv in zip(self.layers, state.caches, cross):
            x = layer(x, cache, state.offset, mask, kv, state.cross_mask)
        state.offset += T
        return x, state
