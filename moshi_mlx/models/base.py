"""Filling a model with checkpoint weights, strictly (what every from_pretrained shares)."""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..checkpoints.strict import check_names_and_shapes


def assign(model: nn.Module, weights: dict[str, mx.array], source: str, dtype: mx.Dtype | None = None,
           evaluate: bool = True) -> None:
    """Load `weights` (moshi_mlx names and layouts) into `model`, strictly.

    evaluate=False leaves the parameters lazy (to quantize before anything is materialized)."""
    check_names_and_shapes({k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}, weights, source)
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    # Layout conversions are lazy strided views; make them contiguous once here, or every
    # matmul that reshapes a weight would copy it again on each call.
    model.update(tree_unflatten([(k, mx.contiguous(v)) for k, v in weights.items()]))
    if evaluate:
        mx.eval(model.parameters())
