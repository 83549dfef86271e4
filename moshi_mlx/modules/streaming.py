"""Streaming state helpers shared by every streamable module.

A streamable module keeps its state in a `stream_state` attribute (None = fresh) and has a
`step()` method; batch calls never touch a caller's state (see `scratch_state`).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import mlx.nn as nn


def streaming_modules(module: nn.Module) -> list[nn.Module]:
    return [m for _, m in module.named_modules() if hasattr(m, "stream_state")]


def reset_streaming(module: nn.Module) -> None:
    for m in streaming_modules(module):
        m.stream_state = None


@contextlib.contextmanager
def scratch_state(module: nn.Module) -> Iterator[None]:
    """Run `module`'s streaming path from a fresh state, leaving the caller's state untouched."""
    saved = [(m, m.stream_state) for m in streaming_modules(module)]
    for m, _ in saved:
        m.stream_state = None
    try:
        yield
    finally:
        for m, state in saved:
            m.stream_state = state
