"""Residual vector quantization (Kyutai's SplitResidualVectorQuantizer).

Activations are [B, T, D]. Codebooks are stored resolved (embedding_sum / cluster_usage,
computed once at load time in checkpoints/tensors.py), as [n_q, bins, dim]. On MLX's CPU
backend the nearest-code searches run in one compiled kernel call (cpu/kernels.nearest_codes:
exact distances, one pass over each codebook for all rows); the MLX code below is the rest.
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..cpu import kernels as cpu
from .conv import rowwise_linear


class ResidualVectorQuantizer(nn.Module):
    """Bias-free 1×1 input/output projections (absent where the sizes already match, as in
    the reference) around a stack of Euclidean codebooks."""

    def __init__(self, n_q: int, bins: int, dim: int, input_dim: int, output_dim: int):
        super().__init__()
        if input_dim != dim:
            self.input_proj = nn.Linear(input_dim, dim, bias=False)
        if output_dim != dim:
            self.output_proj = nn.Linear(dim, output_dim, bias=False)
        self.codebooks = mx.random.normal((n_q, bins, dim))

    @property
    def n_q(self) -> int:
        return self.codebooks.shape[0]

    def _half_norms(self) -> mx.array:
        """‖c‖²/2 per code [n_q, bins], cached until the codebooks change (weights reload)."""
        cached = getattr(self, "_norms_cache", None)
        if cached is None or cached[0] is not self.codebooks:
            cached = (self.codebooks, 0.5 * (self.codebooks * self.codebooks).sum(-1))
            object.__setattr__(self, "_norms_cache", cached)
        return cached[1]

    def encode(self, x: mx.array, n_q: int) -> mx.array:
        """x [B, T, input_dim] → codes [B, T, n_q] (int32): nearest code, residual −= code."""
        residual = rowwise_linear(self.input_proj, x) if "input_proj" in self else x
        codes = cpu.nearest_codes(residual, self.codebooks, n_q)
        if codes is not None:
            return codes
        norms = self._half_norms()
        codes = []
        for i in range(n_q):
            cb = self.codebooks[i]
            idx = self._nearest(residual, cb, norms[i])
            codes.append(idx)
            residual = residual - cb[idx]
        return mx.stack(codes, axis=-1).astype(mx.int32)

    @staticmethod
    def _nearest(r: mx.array, cb: mx.array, half_norms: mx.array, shortlist: int = 4) -> mx.array:
        """Index of the codeword nearest to each r [B, T, D].

        argmin ‖r − c‖² = argmin (‖c‖²/2 − r·c) is one matmul, but in float32 it cancels
        catastrophically when codewords sit close to r (‖r − c‖² ≪ ‖c‖²): rounding then picks
        the wrong one of two codes 1e-4 apart. So it only shortlists candidates; the winner is
        chosen on ‖r − c‖² computed directly, as accurate as float32 allows.
        """
        approx = half_norms - r @ cb.T  # [B, T, bins]
        # The `shortlist` smallest, by repeated argmin (2x faster than argpartition on MLX's
        # CPU backend). Exact ties go to the lowest index, as torch's argmin does (it matters
        # for untrained, all-equal codebooks): argmin takes the first occurrence, and the
        # shortlist is sorted before the final argmin.
        picks = []
        for i in range(shortlist):
            picks.append(mx.argmin(approx, axis=-1, keepdims=True))
            if i + 1 < shortlist:
                approx = mx.put_along_axis(approx, picks[-1], mx.array(mx.inf, dtype=approx.dtype), axis=-1)
        cand = mx.sort(mx.concatenate(picks, axis=-1), axis=-1)
        exact = mx.square(r[..., None, :] - cb[cand]).sum(-1)  # [B, T, shortlist]
        return mx.take_along_axis(cand, mx.argmin(exact, axis=-1)[..., None], axis=-1)[..., 0]

    def decode(self, codes: mx.array) -> mx.array:
        """codes [B, T, n] → [B, T, output_dim]: output_proj of the sum of the codewords."""
        q = self.codebooks[0][codes[..., 0]]
        for i in range(1, codes.shape[-1]):
            q = q + self.codebooks[i][codes[..., i]]
        return self.output_proj(q) if "output_proj" in self else q


class SplitResidualVectorQuantizer(nn.Module):
    """`n_q_semantic` semantic codebooks (`rvq_first`) and the acoustic rest (`rvq_rest`).

    Both quantizers encode the same latent: the acoustic RVQ does not start from the
    semantic one's residual. Decoding sums both projections.
    """

    def __init__(self, n_q: int, n_q_semantic: int, bins: int, dim: int, input_dim: int, output_dim: int):
        super().__init__()
        self.n_q_semantic = n_q_semantic
        self.rvq_first = ResidualVectorQuantizer(n_q_semantic, bins, dim, input_dim, output_dim)
        self.rvq_rest = ResidualVectorQuantizer(n_q - n_q_semantic, bins, dim, input_dim, output_dim)

    @property
    def n_q(self) -> int:
        return self.rvq_first.n_q + self.rvq_rest.n_q

    def encode(self, x: mx.array, n_q: int) -> mx.array:
        codes = self.rvq_first.encode(x, min(n_q, self.n_q_semantic))
        if n_q > self.n_q_semantic:
            codes = mx.concatenate([codes, self.rvq_rest.encode(x, n_q - self.n_q_semantic)], axis=-1)
        return codes

    def decode(self, codes: mx.array) -> mx.array:
        out = self.rvq_first.decode(codes[..., : self.n_q_semantic])
        if codes.shape[-1] > self.n_q_semantic:
            out = out + self.rvq_rest.decode(codes[..., self.n_q_semantic:])
        return out
