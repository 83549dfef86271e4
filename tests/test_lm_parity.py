"""Moshi LM parity with Kyutai's PyTorch LMModel / LMGen (moshi 0.2.13): fp32, random
weights, tiny configs with the real structure, loaded from the release layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mlx.core as mx
from moshi_mlx.sessions.lmgen import LMGen
from moshi_mlx.models.moshi import MoshiForConditionalGeneration
import reference as R

pytestmark = pytest.mark.reference


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def build(tmp_path, seed=0, **overrides):
    kwargs = R.tiny_lm_kwargs(**overrides)
    ref = R.random_kyutai_lm(kwargs, seed)
    R.save_kyutai_lm(ref, tmp_path, kwargs)
    return ref, MoshiForConditionalGeneration.from_pretrained(tmp_path)


def random_tokens(cfg, B, T, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tok = np.empty((B, cfg.num_codebooks, T), np.int64)
    tok[:, 0] = rng.integers(0, cfg.text_card + 1, (B, T))
    tok[:, 1:] = rng.integers(0, cfg.card + 1, (B, cfg.n_q, T))
    tok[:, 3, 5] = -1  # a missing token contributes nothing
    return tok


def check_logits(ref, ours, T=40):
    cfg = ours.config
    tok = random_tokens(cfg, 2, T)
    with torch.no_grad():
        t = torch.from_numpy(tok)
        out_ref, text_ref = ref.forward_text(t)
        audio_ref = ref.forward_depformer_training(t, out_ref)  # teacher-forced: targets = tok
    out, text = ours.lm.forward_text(mx.array(tok))
    audio = ours.lm.forward_depformer(mx.array(tok), out)
    assert rel(np.array(text), text_ref[:, 0].numpy()) < 1e-4
    for cb in range(cfg.dep_q):
        assert rel(np.array(audio[:, cb]), audio_ref[:, cb].numpy()) < 1e-4, f"depformer step {cb}"


def test_logits_match(tmp_path):
    ref, ours = build(tmp_path)
    check_logits(ref, ours)


def test_weights_per_step_schedule_matches(tmp_path):
    ref, ours = build(tmp_path, seed=1, depformer_weights_per_step_schedule=[0, 1, 2, 3, 4, 4, 5, 5])
    assert len(ours.lm.depformer_in) == 6 and len(ours.lm.depformer.layers[0].gating) == 6
    check_logits(ref, ours)


def test_sin_positions_and_layer_scale_match(tmp_path):
    """Non-7B options Kyutai's configs use: sinusoidal depformer positions, layer scale."""
    ref, ours = build(tmp_path, seed=2, depformer_pos_emb="sin", layer_scale=0.5, depformer_layer_scale=0.5,
                      depformer_weights_per_step=False, depformer_multi_linear=False)
    check_logits(ref, ours)


@pytest.fixture(scope="module")
def user_codes(kyutai_mimi, speech) -> np.ndarray:
    """Real Mimi codes (8 codebooks) of speech, looped to 600 frames: [600, 8]."""
    ref, _ = kyutai_mimi
    ref.set_num_codebooks(8)
    try:
        with torch.no_grad():
            codes = ref.encode(torch.from_numpy(speech)[None, None])[0].numpy().T
    finally:
        ref.set_num_codebooks(32)
    return np.concatenate([codes] * 4)[:600]


def greedy_tokens_ref(ref, user_codes, steps, **gen_kw):
    from moshi.models.lm import LMGen as RefLMGen

    gen = RefLMGen(ref, use_sampling=False, **gen_kw)
    out = []
    with torch.no_grad(), gen.streaming(1):
        for t in range(steps):
            tok = gen.step(torch.from_numpy(user_codes[t])[None, :, None])
            out.append(None if tok is None else tok[0, :, 0].numpy())
    return out


def greedy_tokens_ours(ours, user_codes, steps, **gen_kw):
    gen = LMGen(ours, temp=0, temp_text=0, **gen_kw)
    gen.reset(1)
    out = []
    for t in range(steps):
        tok = gen.step(user_codes[t][None])
        out.append(None if tok is None else tok[0])
    return out


def assert_same_tokens(ours, ref):
    assert len(ours) == len(ref)
    for t, (a, b) in enumerate(zip(ours, ref)):
        if b is None:
            assert a is None, f"step {t}: expected None during the delay warm-up"
        else:
            np.testing.assert_array_equal(a, b, err_msg=f"step {t}")


def test_greedy_generation_500_steps(tmp_path, user_codes):
    ref, ours = build(tmp_path, seed=3)
    steps = 520
    assert_same_tokens(greedy_tokens_ours(ours, user_codes, steps), greedy_tokens_ref(ref, user_codes, steps))


def test_small_context_wraps_many_times(tmp_path, user_codes):
    """context 16 over 300 steps: the rotating cache wraps ~19 times, tokens stay identical."""
    ref, ours = build(tmp_path, seed=4, context=16)
    steps = 300
    assert_same_tokens(greedy_tokens_ours(ours, user_codes, steps), greedy_tokens_ref(ref, user_codes, steps))


def test_cfg_matches(tmp_path, user_codes):
    """Classifier-free guidance (cfg_coef 2, null half without text input), as in the TTS."""
    ref, ours = build(tmp_path, seed=5)
    steps = 60
    assert_same_tokens(greedy_tokens_ours(ours, user_codes, steps, cfg_coef=2.0, cfg_is_no_text=True),
                       greedy_tokens_ref(ref, user_codes, steps, cfg_coef=2.0, cfg_is_no_text=True))
