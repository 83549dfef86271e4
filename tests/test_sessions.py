"""One loaded model, several sessions: each session owns its state, so interleaving two
streams on the same weights gives exactly what each gives alone (no reference needed)."""
from __future__ import annotations

import numpy as np

import mlx.core as mx
import moshi_mlx
from moshi_mlx.models.lm import LmConfig, LMModel
from moshi_mlx.sessions.duplex import DuplexSession
from moshi_mlx.sessions.lmgen import LMGen


def tiny_mimi():
    mx.random.seed(0)
    m = moshi_mlx.MimiModel(moshi_mlx.MimiConfig(hidden_size=32, num_filters=4, num_hidden_layers=1,
                                                 num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                                                 codebook_dim=16, vector_quantization_hidden_dimension=16,
                                                 num_quantizers=8, upsample_groups=32))
    mx.eval(m.parameters())
    return m


def tiny_lm():
    mx.random.seed(1)
    lm = LMModel(LmConfig(dim=32, num_heads=2, num_layers=1, text_card=100, card=2048, context=40,
                          depformer_dim=16, depformer_num_heads=2, depformer_num_layers=1,
                          depformer_dim_feedforward=48))
    mx.eval(lm.parameters())
    return lm


def test_two_mimi_streams_interleaved_equal_alone():
    """Decoding two code streams step by step, interleaved on one model (and encoding in
    between) gives each stream's own audio."""
    mimi = tiny_mimi()
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 2048, (1, 8, 12)) for _ in range(2))

    def alone(codes):
        st = mimi.init_state(1)
        return [np.array(mimi.decode_step(codes[..., t:t + 1], st)[0]) for t in range(codes.shape[-1])]

    want_a, want_b = alone(a), alone(b)
    sa, sb = mimi.init_state(1), mimi.init_state(1)
    for t in range(a.shape[-1]):
        np.testing.assert_array_equal(np.array(mimi.decode_step(a[..., t:t + 1], sa)[0]), want_a[t])
        mimi.encode_step(rng.standard_normal((1, 1, 1920)).astype(np.float32), sb)  # the other half of sb
        np.testing.assert_array_equal(np.array(mimi.decode_step(b[..., t:t + 1], sb)[0]), want_b[t])
    assert not np.allclose(want_a[-1], want_b[-1])  # the two streams do differ


def test_two_lmgen_sessions_on_one_model_interleaved_equal_alone():
    lm = tiny_lm()
    rng = np.random.default_rng(1)
    user_a, user_b = (rng.integers(0, 2048, (60, 1, 8)) for _ in range(2))  # 60 steps: the 40-step cache wraps

    def alone(user, seed):
        gen = LMGen(lm, temp=0.8, temp_text=0.7, seed=seed)
        gen.reset(1)
        return [gen.step(u) for u in user]

    want_a, want_b = alone(user_a, 3), alone(user_b, 4)
    ga, gb = LMGen(lm, temp=0.8, temp_text=0.7, seed=3), LMGen(lm, temp=0.8, temp_text=0.7, seed=4)
    ga.reset(1)
    gb.reset(1)
    for t in range(len(user_a)):
        for gen, user, want in ((ga, user_a, want_a), (gb, user_b, want_b)):
            got = gen.step(user[t])
            assert (got is None) == (want[t] is None), t
            if got is not None:
                np.testing.assert_array_equal(got, want[t], err_msg=f"step {t}")


def test_duplex_sessions_share_weights():
    mimi, lm = tiny_mimi(), tiny_lm()
    s1, s2 = DuplexSession(lm, mimi, seed=0), DuplexSession(lm, mimi, seed=0)
    rng = np.random.default_rng(2)
    frames = [rng.standard_normal(1920).astype(np.float32) * 0.1 for _ in range(8)]
    outs1 = [s1.step(f).pcm for f in frames]
    s1.reset()
    outs2 = []
    for f in frames:  # interleaved with a fresh session on the same weights
        outs2.append(s2.step(f).pcm)
        s1.step(np.zeros(1920, np.float32))
    for x, y in zip(outs1, outs2):
        np.testing.assert_array_equal(x, y)


def test_a_model_without_depformer_cannot_chat():
    """An STT-shaped LM (dep_q = 0) given to the duplex chat: a clear error, not a crash mid-frame."""
    import pytest

    from moshi_mlx.errors import InputError

    lm = LMModel(LmConfig(dim=32, num_heads=2, num_layers=1, text_card=100, card=2048, n_q=4, dep_q=0,
                          delays=[0] * 5, model_type="stt"))
    with pytest.raises(InputError, match="stt model, dep_q = 0.*cannot speak"):
        DuplexSession(lm, tiny_mimi())


def test_duplex_config_is_checked_before_loading():
    """`chat` and `serve` refuse an STT or TTS checkpoint from its config alone, naming the command."""
    import pytest

    from moshi_mlx.errors import InputError
    from moshi_mlx.sessions.duplex import check_duplex_config

    check_duplex_config({})  # a Moshiko/Moshika release: no config.json, the 7B defaults
    check_duplex_config({"dep_q": 8, "model_type": "moshi"})
    with pytest.raises(InputError, match="'stt' model.*moshi-mlx transcribe"):
        check_duplex_config({"dep_q": 0, "model_type": "stt"}, "stt/config.json")
    with pytest.raises(InputError, match="'tts' model.*moshi-mlx tts"):
        check_duplex_config({"dep_q": 16, "model_type": "tts"})
    with pytest.raises(InputError, match="dep_q = 0"):
        check_duplex_config({"dep_q": 0})
