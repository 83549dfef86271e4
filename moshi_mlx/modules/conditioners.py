"""Conditioners of Kyutai's TTS models (`moshi.conditioners`, 0.2.13) and how their outputs
reach the LM.

A conditioner turns one attribute into vectors of the LM's width: `output_proj(x)` where the
attribute is present, a learnt padding vector where it is absent (mask 0). Two kinds:
- lookup table ("lut"): a value among `possible_values` (the TTS's CFG strength "1.0" …
  "4.0", its "control" "ok"); None = absent;
- tensor: a [T, dim] tensor with a mask (the TTS's speaker embeddings, 5 slots of 125
  frames of 512-dim Mimi latents).

The fuser says where each goes: "sum" conditions ([B, 1, D]) are added to every step's input
embedding; "cross" conditions are concatenated along time, get sinusoidal positions, and
become the source of the transformer's cross-attention. Conditioners run once per
utterance; they stay in float32 (as in Kyutai's loader), never quantized.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import CheckpointError, InputError
from .transformer import sin_embedding


class Conditioner(nn.Module):
    def __init__(self, dim: int, output_dim: int):
        super().__init__()
        self.output_proj = nn.Linear(dim, output_dim, bias=False)
        self.learnt_padding = mx.zeros((1, 1, output_dim))

    def _finish(self, x: mx.array, mask: mx.array) -> mx.array:
        """x [B, T, dim], mask [B, T] → [B, T, output_dim] (masked positions: learnt padding)."""
        m = mask.astype(mx.float32)[..., None]
        y = self.output_proj(x.astype(mx.float32)).astype(mx.float32)
        return y * m + self.learnt_padding.astype(mx.float32) * (1 - m)


class LutConditioner(Conditioner):
    def __init__(self, n_bins: int, dim: int, output_dim: int, possible_values: list[str] | None = None,
                 tokenizer: str = "noop", **_: Any):
        super().__init__(dim, output_dim)
        if tokenizer != "noop":
            raise CheckpointError(f"lookup-table conditioner with tokenizer {tokenizer!r}: only 'noop' is supported")
        if possible_values is None:
            raise CheckpointError("lookup-table conditioner without possible_values is not supported")
        self.embed = nn.Embedding(n_bins + 1, dim)  # the last row is the padding index
        self._values = {v: i for i, v in enumerate(possible_values)}
        self._pad = n_bins

    @property
    def possible_values(self) -> list[str]:
        return list(self._values)

    def __call__(self, values: list[str | None]) -> mx.array:
        """One value (or None) per batch item → [B, 1, output_dim]."""
        idx = []
        for v in values:
            if v is not None and v not in self._values:
                raise InputError(f"condition value {v!r} is not one of {self.possible_values}")
            idx.append(self._pad if v is None else self._values[v])
        tokens = mx.array(idx, mx.int32)[:, None]
        mask = mx.array([v is not None for v in values])[:, None]
        return self._finish(self.embed(tokens), mask)


class TensorConditioner(Conditioner):
    def __init__(self, dim: int, output_dim: int, **_: Any):
        super().__init__(dim, output_dim)
        self.dim = dim

    def __call__(self, tensors: list["TensorCondition"]) -> mx.array:
        """One TensorCondition per batch item (padded to the longest) → [B, T, output_dim]."""
        T = max(t.tensor.shape[0] for t in tensors)
        x = np.zeros((len(tensors), T, self.dim), np.float32)
        mask = np.zeros((len(tensors), T), bool)
        for b, t in enumerate(tensors):
            x[b, : len(t.tensor)] = t.tensor
            mask[b, : len(t.mask)] = t.mask
        return self._finish(mx.array(x), mx.array(mask))


@dataclass
class TensorCondition:
    """tensor [T, dim] with mask [T] (True = present)."""

    tensor: np.ndarray
    mask: np.ndarray

    @classmethod
    def absent(cls, length: int, dim: int) -> "TensorCondition":
        return cls(np.zeros((length, dim), np.float32), np.zeros(length, bool))


@dataclass
class Conditions:
    """One batch item's attributes: lookup-table values (None = absent) and tensors."""

    values: dict[str, str | None] = field(default_factory=dict)
    tensors: dict[str, TensorCondition] = field(default_factory=dict)

    def nulled(self) -> "Conditions":
        """Every condition absent: the null half of classifier-free guidance."""
        return Conditions({k: None for k in self.values},
                          {k: TensorCondition.absent(*t.tensor.shape) for k, t in self.tensors.items()})


def make_conditioner(kind_config: dict, output_dim: int) -> Conditioner:
    kind = kind_config.get("type")
    if kind not in ("lut", "tensor"):
        raise CheckpointError(f"conditioner type {kind!r} is not supported (expected 'lut' or 'tensor')")
    # the LM's width decides output_dim (a config may carry Kyutai's runtime output_dim/device)
    kwargs = {k: v for k, v in kind_config.get(kind, {}).items() if k not in ("output_dim", "device")}
    if kind == "lut":
        return LutConditioner(output_dim=output_dim, **kwargs)
    if kind == "tensor":
        return TensorConditioner(output_dim=output_dim, **kwargs)
    raise CheckpointError(f"conditioner type {kind!r} is not supported (expected 'lut' or 'tensor')")


class ConditionProvider(nn.Module):
    """The conditioners, by name (checkpoint keys `condition_provider.conditioners.NAME.*`),
    and the fuser's plan."""

    def __init__(self, conditioners: dict[str, dict], fuser: dict, output_dim: int):
        super().__init__()
        self.conditioners = {name: make_conditioner(c, output_dim) for name, c in conditioners.items()}
        for method in ("prepend",):
            if fuser.get(method):
                raise CheckpointError(f"fuser method {method!r} is not supported")
        self._sum = list(fuser.get("sum", []))
        self._cross = list(fuser.get("cross", []))
        self._pos_emb = bool(fuser.get("cross_attention_pos_emb", False))
        self._pos_scale = float(fuser.get("cross_attention_pos_emb_scale", 1.0))
        unknown = [n for n in self._sum + self._cross if n not in self.conditioners]
        if unknown:
            raise CheckpointError(f"fuser names conditioners that do not exist: {unknown}")

    def _outputs(self, batch: list[Conditions]) -> dict[str, mx.array]:
        out = {}
        for name, cond in self.conditioners.items():
            if isinstance(cond, LutConditioner):
                out[name] = cond([c.values.get(name) for c in batch])
            else:
                missing = [i for i, c in enumerate(batch) if name not in c.tensors]
                if missing:
                    raise InputError(f"condition {name!r} missing for batch items {missing}")
                out[name] = cond([c.tensors[name] for c in batch])
        return out

    def provide(self, batch: list[Conditions]) -> tuple[mx.array | None, mx.array | None, mx.array | None]:
        """Conditions of each batch item → (sum [B, 1, D] or None, cross source [B, S, D] or
        None, cross mask [B, S] or None). Items whose tensors are shorter than the batch's
        longest are padded; the mask (True = the item's own position) keeps the padding out
        of their attention, so an item attends to what it would attend to alone."""
        out = self._outputs(batch)
        total = None
        for name in self._sum:
            total = out[name] if total is None else total + out[name]
        cross = mask = None
        if self._cross:
            parts = [self._cross_part(n, batch, out[n]) for n in self._cross]
            cross = mx.concatenate([p for p, _ in parts], axis=1)
            own = np.concatenate([m for _, m in parts], axis=1)
            if self._pos_emb:
                pos = sin_embedding(np.arange(cross.shape[1]), cross.shape[-1], 10_000.0)
                cross = cross + self._pos_scale * pos
            mask = None if own.all() else mx.array(own)
        return total, cross, mask

    def _cross_part(self, name: str, batch: list[Conditions], x: mx.array) -> tuple[mx.array, np.ndarray]:
        """A cross condition's output and which of its positions each item has [B, T]."""
        if isinstance(self.conditioners[name], LutConditioner):
            return x, np.ones(x.shape[:2], bool)
        lengths = np.array([len(c.tensors[name].tensor) for c in batch])
        return x, np.arange(x.shape[1])[None, :] < lengths[:, None]
