"""Strict name and shape checks: every missing, unexpected and mis-shaped key, by name."""
from __future__ import annotations

from typing import Mapping

from ..errors import CheckpointError


def few(keys: list[str], n: int = 8) -> str:
    """The first n names, and how many more."""
    return ", ".join(keys[:n]) + (f" … (+{len(keys) - n} more)" if len(keys) > n else "")


def check_names_and_shapes(expected: Mapping[str, tuple], weights: Mapping, source: str) -> None:
    """`weights` (name → array) must have exactly the names of `expected` (name → shape),
    with the same shapes."""
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys: {few(missing)}")
    if extra:
        problems.append(f"unexpected keys: {few(extra)}")
    for k in sorted(set(expected) & set(weights)):
        if tuple(expected[k]) != tuple(weights[k].shape):
            problems.append(f"{k}: checkpoint shape {list(weights[k].shape)} != model shape {list(expected[k])}")
    if problems:
        raise CheckpointError(f"{source}: does not match the model config: " + "; ".join(problems[:12]))
