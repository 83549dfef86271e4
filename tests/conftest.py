"""Shared fixtures: real speech, and random-weight reference models saved in release layouts.

The references (torch, Kyutai's moshi, transformers) are required: if one is missing the
fixtures fail loudly instead of skipping (the README's test command installs them).
"""
from __future__ import annotations

import numpy as np
import pytest

import moshi_mlx  # noqa: F401  - loads the optimized BLAS before anything imports mlx.core
import reference as R


@pytest.fixture(scope="session")
def speech() -> np.ndarray:
    """12 s of real read speech at 24 kHz (150 Mimi frames: past the 250-step attention window)."""
    return R.speech_pcm(12.0)


@pytest.fixture(scope="session")
def kyutai_mimi(speech):
    """(reference torch model with all 32 codebooks active, path of its release-layout file)."""
    import tempfile
    from pathlib import Path

    ref = R.random_kyutai_mimi(speech)
    ref.set_num_codebooks(32)
    path = Path(tempfile.mkdtemp(prefix="mimi-kyutai-")) / R.MIMI_RELEASE_NAME
    R.save_kyutai_mimi(ref, path)
    return ref, path


@pytest.fixture(scope="session")
def mlx_mimi(kyutai_mimi):
    return moshi_mlx.MimiModel.from_pretrained(kyutai_mimi[1])
