"""Token embeddings with Kyutai's options (`moshi.models.lm_utils.ScaledEmbedding`).

A token of −1 embeds to exactly zero. Two options of the TTS models:
- low rank: the table holds `rank`-dim vectors, projected to `dim` by `low_rank` (the
  depformer's 31 audio tables of the 1.6B TTS: 2049 × 128 each instead of 2049 × 1024);
- demux: one input token carries two text streams, `(second + 1) · N + main` with N the
  table size; `y = out1(E[main]) + out2(E[second])`, second = −1 contributing nothing. The
  TTS feeds the current word on the main stream and a look-ahead word on the second.
  With demux, Kyutai's module still creates a `low_rank` projection that it never uses; it
  is kept here so that release files load strictly, and unused as there.
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..quantize import compute_dtype


def embed(table: nn.Module, tokens: mx.array, dtype: mx.Dtype | None = None) -> mx.array:
    """Lookup where −1 gives zeros (Kyutai's zero_idx), in the compute dtype (a quantized
    table dequantizes to its scales' dtype)."""
    if isinstance(table, ScaledEmbedding):
        return table(tokens, dtype)
    y = table(mx.maximum(tokens, 0)).astype(dtype or compute_dtype())
    return y * (tokens >= 0)[..., None].astype(y.dtype)


class ScaledEmbedding(nn.Module):
    """An embedding with a low-rank projection and/or a demultiplexed second stream. Its
    table (`weight`) stays in float: it is small (low rank) or read one row per step."""

    def __init__(self, num_embeddings: int, dim: int, low_rank: int | None = None, demux: bool = False):
        super().__init__()
        width = low_rank or dim
        self.num_embeddings = num_embeddings
        self.demux = demux
        self.weight = mx.zeros((num_embeddings, width))
        if low_rank:
            self.low_rank = nn.Linear(width, dim, bias=False)
        if demux:
            self.out1 = nn.Linear(width, dim, bias=False)
            self.out2 = nn.Linear(width, dim, bias=False)

    def _rows(self, tokens: mx.array, dtype: mx.Dtype) -> mx.array:
        return self.weight[mx.maximum(tokens, 0)].astype(dtype)

    def __call__(self, tokens: mx.array, dtype: mx.Dtype | None = None) -> mx.array:
        dtype = dtype or compute_dtype()
        keep = (tokens >= 0)[..., None]
        if self.demux:
            tokens = mx.maximum(tokens, 0)
            main, second = tokens % self.num_embeddings, tokens // self.num_embeddings - 1
            y = self.out1(self._rows(main, dtype)).astype(dtype)
            y = y + mx.where((second >= 0)[..., None], self.out2(self._rows(second, dtype)).astype(dtype), 0)
        else:
            y = self._rows(tokens, dtype)
            if "low_rank" in self:
                y = self.low_rank(y).astype(dtype)
        return mx.where(keep, y, mx.zeros((), dtype))
