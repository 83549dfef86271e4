"""Weight quantization and the compute dtype: the one place that decides both.

What is quantized: every Linear and Embedding whose input size is a multiple of the group
size (for Moshi: all attention, feed-forward, projection and output matrices and the
embedding tables: MLX's default predicate, as in Kyutai's published MLX files; for the TTS
also the cross-attention). Norms, the STT models' tiny semantic-VAD heads, the TTS's
conditioners (run once per utterance) and its low-rank / demux embedding tables (small, or
read one row per step) stay in full precision. Defaults: 4-bit with groups of 32, 8-bit with groups of 64. 4-bit scales
and biases are stored in bfloat16 (as in Kyutai's MLX files): a 7B q4 model is then 4.4 GB
instead of 5.3 GB, MLX's CPU kernel is as fast with them, and bf16's 0.4% rounding is
negligible next to a 4-bit step (1/15). 8-bit steps are 1/255 ≈ 0.4%, the same size, so
8-bit scales keep the compute dtype (bf16 scales measurably doubled q8's logit error).

Compute dtype: on Metal, bfloat16 as usual; on the CPU backend float32, because MLX's CPU
kernels for bf16 matmuls and for quantized matmuls with bf16 activations are ~10x slower
than float32 there (measured by `moshi-mlx bench lm`). One switch: `compute_dtype()`, which
MOSHI_MLX_DTYPE=float32|bfloat16|float16 overrides.

On the CPU backend MLX's quantized matmul is scalar code on one thread (~1.4 G weights/s).
QuantizedLinear here uses, for the few-row products of token-by-token decoding, a small
AVX2 kernel (moshi_mlx/cpu: same arithmetic, threaded, at memory speed; x86-64 only,
MOSHI_MLX_CPU_KERNELS=0 turns it off); larger products (prefill) have their output rows
split across one MLX stream per core, which run in parallel.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from .cpu import kernels as cpu
from .errors import InputError

DEFAULT_GROUP_SIZE = {4: 32, 8: 64}


def scales_dtype(bits: int) -> mx.Dtype:
    """Runtime dtype of quantization scales and biases."""
    return mx.bfloat16 if bits <= 4 else compute_dtype()


def file_scales_dtype(bits: int) -> mx.Dtype:
    """Stored dtype (converted checkpoints): the same choice, with float32 for 8-bit so a
    file's quality does not depend on the machine that converted it."""
    return mx.bfloat16 if bits <= 4 else mx.float32


def compute_dtype() -> mx.Dtype:
    name = os.environ.get("MOSHI_MLX_DTYPE")
    if name:
        try:
            return {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}[name]
        except KeyError:
            raise ValueError(f"MOSHI_MLX_DTYPE must be float32, bfloat16 or float16, got {name!r}") from None
    return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16


@dataclass(frozen=True)
class QuantizationSpec:
    bits: int
    group_size: int

    @classmethod
    def make(cls, bits: int, group_size: int | None = None) -> "QuantizationSpec":
        if bits not in (2, 3, 4, 6, 8):
            raise InputError(f"quantization bits must be 2, 3, 4, 6 or 8, got {bits}")
        group_size = group_size or DEFAULT_GROUP_SIZE.get(bits, 64)
        if group_size not in (32, 64, 128):
            raise InputError(f"quantization group size must be 32, 64 or 128, got {group_size}")
        return cls(bits, group_size)

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size}


_STREAMS: list[mx.Stream] = []


def _cpu_streams() -> list[mx.Stream]:
    if not _STREAMS:
        _STREAMS.append(mx.default_stream(mx.cpu))
        for _ in range(min(8, cpu.threads()) - 1):
            _STREAMS.append(mx.new_stream(mx.cpu))
    return _STREAMS


class QuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear that runs fast on the CPU backend (see the module docstring)."""

    MIN_ROWS_PER_SHARD = 256

    def __call__(self, x: mx.array) -> mx.array:
        y = cpu.quantized_matmul(x, self.weight, self.scales, self.biases, self.bits, self.group_size)
        if y is None:
            y = self._mlx_matmul(x)
        if "bias" in self:
            y = y + self.bias
        return y

    # On the CPU backend, products with at least this many rows (a prefill: the TTS's voice
    # keys/values, 625 rows) dequantize the weight and use the float GEMM: MLX's CPU
    # quantized kernel is scalar (~1.4 G weights/s per core), GEMM ~50x faster per row.
    DEQUANTIZE_ROWS = 32

    def _mlx_matmul(self, x: mx.array) -> mx.array:
        """MLX's quantized matmul; on the CPU backend its output rows split over one stream
        per core (MLX's CPU kernel runs on one thread), or for many rows the float GEMM."""
        rows = x.size // max(1, x.shape[-1])
        if mx.default_device() == mx.cpu and x.dtype == mx.float32 and rows >= self.DEQUANTIZE_ROWS:
            w = mx.dequantize(self.weight, self.scales.astype(mx.float32), self.biases.astype(mx.float32),
                              group_size=self.group_size, bits=self.bits)
            return x @ w.T
        streams = _cpu_streams() if mx.default_device() == mx.cpu else []
        rows = self.weight.shape[0]
        n = min(len(streams), rows // self.MIN_ROWS_PER_SHARD)
        kw = dict(transpose=True, group_size=self.group_size, bits=self.bits)
        if n <= 1:
            return mx.quantized_matmul(x, self.weight, scales=self.scales, biases=self.biases, **kw)
        bounds = [rows * i // n for i in range(n + 1)]
        outs = []
        for i, stream in enumerate(streams[:n]):
            lo, hi = bounds[i], bounds[i + 1]
            with mx.stream(stream):
                outs.append(mx.quantized_matmul(x, self.weight[lo:hi], scales=self.scales[lo:hi],
                                                biases=self.biases[lo:hi], **kw))
        return mx.concatenate(outs, axis=-1)


def _quantizable(module: nn.Module, spec: QuantizationSpec) -> bool:
    if not isinstance(module, (nn.Linear, nn.Embedding)):
        return False
    return module.weight.shape[-1] % spec.group_size == 0


def _kept(path: str) -> bool:
    # The semantic-VAD heads of STT models (6 × dim each): nothing to save, and their
    # probabilities are compared against thresholds. The TTS's conditioners run once per
    # utterance (nothing to gain in speed) and Kyutai keeps them in float32.
    # The depformer's embedding projections (the TTS's low-rank ones: 128 → 1024) are tiny,
    # and a quantized call's fixed cost would exceed their work, 32 times per step.
    return path.startswith(("extra_heads.", "condition_provider.")) or \
        re.match(r"depformer_(text_)?emb(\.\d+)?\.(low_rank|out1|out2)$", path) is not None


def quantize_model(model: nn.Module, spec: QuantizationSpec, modules: frozenset[str] | None = None) -> nn.Module:
    """Replace quantizable layers in place (lazily: nothing is evaluated here). `modules`:
    exactly these layer paths (what a quantized file holds), instead of the default rule."""

    def convert(path: str, m: nn.Module):
        if not isinstance(m, (nn.Linear, nn.Embedding)):
            return m
        if (path not in modules) if modules is not None else not _quantizable(m, spec) or _kept(path):
            return m
        if isinstance(m, nn.Embedding):
            q = nn.QuantizedEmbedding.from_embedding(m, spec.group_size, spec.bits)
        else:
            q = QuantizedLinear.from_linear(m, spec.group_size, spec.bits)
        dtype = scales_dtype(spec.bits)
        q.scales, q.biases = q.scales.astype(dtype), q.biases.astype(dtype)
        return q

    leaves = tree_map_with_path(convert, model.leaf_modules(), is_leaf=nn.Module.is_module)
    model.update_modules(leaves)
    return model


def cast_floating(model: nn.Module, dtype: mx.Dtype) -> None:
    """Cast float parameters (norms, unquantized weights) to `dtype`; quantization scales
    and biases keep their dtype (see scales_dtype)."""
    from mlx.utils import tree_flatten, tree_unflatten

    def cast(k: str, v: mx.array) -> mx.array:
        if not mx.issubdtype(v.dtype, mx.floating) or v.dtype == dtype:
            return v
        if k.endswith((".scales", ".biases")):
            return v
        return v.astype(dtype)

    model.update(tree_unflatten([(k, cast(k, v)) for k, v in tree_flatten(model.parameters())]))


def eval_by_layer(model: nn.Module) -> None:
    """Evaluate parameters one leaf module at a time, so a lazily built or loaded model is
    never materialized at full precision all at once on its way to being quantized."""
    for _, m in model.named_modules():
        if not m.children() or isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding, nn.Linear, nn.Embedding)):
            mx.eval(m.parameters())
            mx.clear_cache()  # hand back the full-precision temporaries right away
