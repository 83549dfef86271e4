"""A 10-minute conversation (file-mode loop, tiny models) runs past every cache length with
flat memory: no step limit, rotating caches everywhere."""
from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx
import moshi_mlx
from moshi_mlx.models.lm import LmConfig, LMModel
from moshi_mlx.sessions.duplex import DuplexSession

pytestmark = pytest.mark.slow


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 1e6


def test_ten_minute_session_memory_is_flat():
    mx.random.seed(0)
    mimi = moshi_mlx.MimiModel(moshi_mlx.MimiConfig(hidden_size=32, num_filters=4, num_hidden_layers=1,
                                                    num_attention_heads=2, num_key_value_heads=2, intermediate_size=64, codebook_dim=16,
                                                    vector_quantization_hidden_dimension=16, num_quantizers=8,
                                                    upsample_groups=32, sliding_window=250))
    mx.eval(mimi.parameters())
    cfg = LmConfig(dim=32, num_heads=2, num_layers=1, text_card=100, card=2048, context=300,
                   depformer_dim=16, depformer_num_heads=2, depformer_num_layers=1, depformer_dim_feedforward=48)
    lm = LMModel(cfg)
    mx.eval(lm.parameters())
    session = DuplexSession(lm, mimi, temp=0.8, temp_text=0.7, seed=0)
    frames = 10 * 60 * 25 // 2  # 10 minutes of 80 ms frames: 7500
    rng = np.random.default_rng(0)
    samples = []
    for i in range(frames):
        out = session.step(rng.standard_normal(1920).astype(np.float32) * 0.1)
        assert out.pcm.shape == (1920,)
        if i % 250 == 0:
            samples.append(rss_mb())
    assert session.stats.frames == frames
    assert session.gen.state.offset == frames  # 25 wraps of the LM's 300-step cache
    last_half = samples[len(samples) // 2:]
    assert max(last_half) <= 1.05 * min(last_half), samples
