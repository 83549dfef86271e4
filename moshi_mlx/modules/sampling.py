"""Token sampling: one `Sampler` (greedy, temperature, top-k, top-p: Kyutai's
`moshi.utils.sampling`) and `RandomKeys`, a seeded stream of MLX random keys.

Every generation loop (LMGen, `generate()`, the benchmarks, the depformer) samples through
these two, so a seed means the same thing everywhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from ..errors import InputError


@dataclass(frozen=True)
class Sampler:
    """temp <= 0 is greedy (argmax). top_p > 0 takes precedence over top_k, as in the
    reference; top_k = 0 and top_p = 0 keep the whole vocabulary."""

    temp: float = 0.0
    top_k: int = 0
    top_p: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.temp, (int, float)) and math.isfinite(self.temp) and self.temp >= 0):
            raise InputError(f"sampling temperature must be a finite number >= 0 (0 = greedy), got {self.temp!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise InputError(f"top-k must be an integer >= 0 (0 = no limit), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 <= self.top_p <= 1.0):
            raise InputError(f"top-p must lie in [0, 1] (0 = no limit), got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temp <= 0.0

    def __call__(self, logits: mx.array, key: mx.array | None = None) -> mx.array:
        """logits [..., V] → tokens [...] (int32)."""
        if self.greedy:
            return mx.argmax(logits, axis=-1).astype(mx.int32)
        logits = logits.astype(mx.float32) / self.temp
        vocab = logits.shape[-1]
        if self.top_p > 0.0:
            order = mx.argsort(-logits, axis=-1)
            sorted_logits = mx.take_along_axis(logits, order, axis=-1)
            probs = mx.softmax(sorted_logits, axis=-1)
            cumulative = mx.cumsum(probs, axis=-1)
            # keep a token while the mass before it is <= p (the first token is always kept)
            sorted_logits = mx.where(cumulative - probs > self.top_p, -mx.inf, sorted_logits)
            choice = mx.random.categorical(sorted_logits, key=key)
            return mx.take_along_axis(order, choice[..., None], axis=-1)[..., 0].astype(mx.int32)
        if 0 < self.top_k < vocab:
            kth = mx.sort(logits, axis=-1)[..., vocab - self.top_k][..., None]
            logits = mx.where(logits < kth, -mx.inf, logits)
        return mx.random.categorical(logits, key=key).astype(mx.int32)


class RandomKeys:
    """A stream of random keys from a seed (None: MLX's global generator is used)."""

    def __init__(self, seed: int | None = None):
        self._key = mx.random.key(seed) if seed is not None else None

    def next(self) -> mx.array | None:
        if self._key is None:
            return None
        self._key, sub = mx.random.split(self._key)
        return sub
