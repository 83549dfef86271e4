"""Token sampling: greedy, temperature, top-k, top-p (Kyutai's `moshi.utils.sampling`)."""
from __future__ import annotations

import mlx.core as mx


def sample_token(logits: mx.array, temp: float, top_k: int = 0, top_p: float = 0.0,
                 key: mx.array | None = None) -> mx.array:
    """logits [..., V] → tokens [...] (int32). Greedy when temp <= 0.

    top_p > 0 takes precedence over top_k, as in the reference.
    """
    if temp <= 0.0:
        return mx.argmax(logits, axis=-1).astype(mx.int32)
    logits = logits.astype(mx.float32) / temp
    vocab = logits.shape[-1]
    if top_p > 0.0:
        order = mx.argsort(-logits, axis=-1)
        sorted_logits = mx.take_along_axis(logits, order, axis=-1)
        probs = mx.softmax(sorted_logits, axis=-1)
        cumulative = mx.cumsum(probs, axis=-1)
        # keep a token while the mass before it is <= p (the first token is always kept)
        sorted_logits = mx.where(cumulative - probs > top_p, -mx.inf, sorted_logits)
        choice = mx.random.categorical(sorted_logits, key=key)
        return mx.take_along_axis(order, choice[..., None], axis=-1)[..., 0].astype(mx.int32)
    if 0 < top_k < vocab:
        kth = mx.sort(logits, axis=-1)[..., vocab - top_k][..., None]
        logits = mx.where(logits < kth, -mx.inf, logits)
    return mx.random.categorical(logits, key=key).astype(mx.int32)
