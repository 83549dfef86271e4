"""Tensor layout conversions shared by the checkpoint mappings (torch → moshi_mlx)."""
from __future__ import annotations

import mlx.core as mx


def conv_weight(w: mx.array) -> mx.array:
    """torch Conv1d [out, in, k] → MLX [out, k, in]."""
    return w.transpose(0, 2, 1)


def convtr_weight(w: mx.array) -> mx.array:
    """torch ConvTranspose1d [in, out/groups, k] → [in, k, out], or [C, k] when depthwise."""
    if w.shape[1] == 1:
        return w[:, 0, :]
    return w.transpose(0, 2, 1)


def codebook(embedding_sum: mx.array, cluster_usage: mx.array) -> mx.array:
    """A resolved codebook: embedding_sum / max(cluster_usage, 1e-5), as Kyutai computes it."""
    usage = mx.maximum(cluster_usage.astype(mx.float32), 1e-5)
    return embedding_sum.astype(mx.float32) / usage[:, None]


def unpermute_rotate_half(w: mx.array, num_heads: int) -> mx.array:
    """Undo transformers' q/k row permutation (interleaved → rotate-half RoPE).

    transformers writes w.view(h, d/2, 2, D).transpose(1, 2); this is its inverse.
    """
    out_dim, in_dim = w.shape
    head_dim = out_dim // num_heads
    return w.reshape(num_heads, 2, head_dim // 2, in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim)
