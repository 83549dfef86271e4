"""Quality cost of 8- and 4-bit weights, measured on a teacher-forced sequence."""
from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from moshi_mlx.models.moshi import MoshiForConditionalGeneration
from moshi_mlx.quantize import QuantizedLinear
import reference as R

pytestmark = pytest.mark.reference


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def quality(p_logits: np.ndarray, q_logits: np.ndarray) -> tuple[float, float, float]:
    """(mean KL(p‖q) in nats, top-1 agreement, relative L2 error of the logits)."""
    lp, lq = log_softmax(p_logits.astype(np.float64)), log_softmax(q_logits.astype(np.float64))
    kl = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
    top1 = float((p_logits.argmax(-1) == q_logits.argmax(-1)).mean())
    err = float(np.linalg.norm(q_logits - p_logits) / np.linalg.norm(p_logits))
    return kl, top1, err


def teacher_forced_logits(model, tokens):
    out, text = model.lm.forward_text(mx.array(tokens))
    audio = model.lm.forward_depformer(mx.array(tokens), out)
    return np.array(text), np.array(audio)


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory):
    # dims divisible by both group sizes so every matrix is quantized, depformer included
    kwargs = R.tiny_lm_kwargs(dim=128, num_heads=4, hidden_scale=4.5, depformer_dim=64, depformer_dim_feedforward=288)
    path = tmp_path_factory.mktemp("lm-q")
    R.save_kyutai_lm(R.random_kyutai_lm(kwargs, seed=7), path, kwargs)
    return path


def test_quantization_quality(fp32_dir):
    """q8 keeps the logits: relative error < 4%, KL < 5e-3 nats, top-1 agreement ≥ 90%.

    Why these bounds: 8-bit affine quantization with groups of 64 rounds each weight to a
    step of ~5σ/255 (σ = the group's spread): an rms error of ~0.6% of σ, so each quantized
    matmul adds an independent ~0.6% relative error. The text logits come through ~12 of
    them (embeddings, 2 layers × (q/k/v, out, the two gating halves, gating out), head), the
    audio logits through ~24 (plus the depformer), so ~0.6%·√12 ≈ 2% and ~0.6%·√24 ≈ 3%;
    4% bounds both. For logits of std s ≤ 2 (these random ones), KL ≈ ½·Var(Δlogit) ≤
    ½·(0.04·2)² ≈ 3e-3 < 5e-3. An argmax flips only where the top two of 2048 random logits
    are within that error: a few % of positions.

    q4 keeps the logits within 45% (text) and 65% (audio) relative error, and stays several
    times worse than q8 (> 5x: it is really 4-bit). Why: groups of 32 span ~4σ, so the 4-bit
    step is ~4σ/15 ≈ 0.27σ and the rms rounding error step/√12 ≈ 8% of σ per quantized matmul
    (13x q8's 0.6%). Through ~12 matmuls the text logits get ~8%·√12 ≈ 27%, the audio logits
    through ~24 get ~8%·√24 ≈ 38%; errors this large also compound a little through the
    nonlinearities: measured 29.7% and 43.6% (q8: 2.2% and 3.2%). The bounds are 1.5x those.
    A broken q4 fails them: wrong scales (±25%) give 130-280%, and a zero point off by half a
    step (the error of truncating instead of rounding) gives 53% and 72%.
    """
    rng = np.random.default_rng(0)
    fp = MoshiForConditionalGeneration.from_pretrained(fp32_dir)
    cfg = fp.config
    tokens = np.concatenate([rng.integers(0, cfg.text_card, (1, 1, 64)),
                             rng.integers(0, cfg.card, (1, cfg.n_q, 64))], axis=1)
    text_fp, audio_fp = teacher_forced_logits(fp, tokens)
    report = {}
    for bits in (8, 4):
        q = MoshiForConditionalGeneration.from_pretrained(fp32_dir, quantize=bits)
        n_quantized = sum(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in q.lm.named_modules())
        n_float = sum(type(m) in (nn.Linear, nn.Embedding) for _, m in q.lm.named_modules())
        assert n_quantized > 0 and n_float == 0, (n_quantized, n_float)
        assert any(isinstance(m, QuantizedLinear) for _, m in q.lm.named_modules())
        text_q, audio_q = teacher_forced_logits(q, tokens)
        report[bits] = (quality(text_fp, text_q), quality(audio_fp, audio_q))
    print("\nquantization quality vs fp32 (KL nats, top-1 agreement, relative logit error):")
    for bits, ((kt, tt, et), (ka, ta, ea)) in report.items():
        print(f"  q{bits}: text KL {kt:.2e} top-1 {tt:.3f} err {et:.2%} | "
              f"audio KL {ka:.2e} top-1 {ta:.3f} err {ea:.2%}")
    for kl, top1, err in report[8]:
        assert err < 0.04 and kl < 5e-3 and top1 >= 0.90, report
    for q8, q4, bound in zip(report[8], report[4], (0.45, 0.65)):  # text, audio
        assert 5 * q8[2] < q4[2] < bound, report  # 4-bit error well above 8-bit's, and bounded


def test_quantized_bits_are_the_same_whether_quantized_now_or_later(fp32_dir):
    """Quantizing while loading equals quantizing the loaded fp32 model in memory."""
    from moshi_mlx.quantize import QuantizationSpec, quantize_model

    a = MoshiForConditionalGeneration.from_pretrained(fp32_dir, quantize=4)
    b = MoshiForConditionalGeneration.from_pretrained(fp32_dir)
    quantize_model(b.lm, QuantizationSpec.make(4))
    from mlx.utils import tree_flatten

    pa, pb = dict(tree_flatten(a.lm.parameters())), dict(tree_flatten(b.lm.parameters()))
    assert pa.keys() == pb.keys()
    for k in pa:
        assert mx.array_equal(pa[k], pb[k]).item(), k


def test_int8_kv_cache_quality(fp32_dir):
    """Quantized models stream with int8 KV caches (a quarter of float32's memory); the
    added error is far below the weights' own: int8 with a per-vector absmax scale rounds
    to steps of max|x|/127 (~2% of σ for 32-dim heads: rms error ~0.6% of σ, the same as
    q8 weights in one matmul), and attention averages it over the visible steps."""
    rng = np.random.default_rng(1)
    q8 = MoshiForConditionalGeneration.from_pretrained(fp32_dir, quantize=8)
    cfg = q8.config
    tokens = np.concatenate([rng.integers(0, cfg.text_card, (1, 1, 300)),
                             rng.integers(0, cfg.card, (1, cfg.n_q, 300))], axis=1).astype(np.int32)

    def stream(kv_bits):
        state = q8.lm.init_state(kv_bits=kv_bits)
        assert state.caches[0].bits == (8 if kv_bits == "auto" else kv_bits)
        return np.concatenate([np.array(q8.lm.step_text(mx.array(tokens[:, :, t:t + 1]), state)[1])
                               for t in range(tokens.shape[2])], axis=1)

    int8, exact = stream("auto"), stream(None)
    kl, top1, err = quality(exact, int8)
    print(f"\nint8 KV vs float32 KV (q8 weights, 300 steps): text KL {kl:.2e} top-1 {top1:.3f} err {err:.2%}")
    assert err < 0.01 and kl < 1e-3 and top1 >= 0.97, (kl, top1, err)


_METAL_LIKE = """
import sys
import numpy as np
import moshi_mlx, mlx.core as mx
from moshi_mlx.sessions.lmgen import LMGen
from moshi_mlx.models.moshi import MoshiForConditionalGeneration
from moshi_mlx.cpu import kernels as cpu
assert not cpu.kernels_available()
model = MoshiForConditionalGeneration.from_pretrained(sys.argv[1], quantize=int(sys.argv[2]) or None)
tokens = np.load(sys.argv[3])
_, text = model.lm.forward_text(mx.array(tokens))
gen = LMGen(model.lm, temp=0, temp_text=0)
gen.reset(1)
steps = [gen.step(mx.array(tokens[:, 1:9, t])) for t in range(tokens.shape[-1])]
# one frame per step once the delays have warmed up: a text token and dep_q audio tokens in range
out = np.stack([np.array(s) for s in steps if s is not None])
assert out.shape == (tokens.shape[-1] - gen.max_delay, 1, 1 + model.config.dep_q), out.shape
assert ((out[..., 0] >= 0) & (out[..., 0] < model.config.text_card)).all(), out[..., 0]
assert ((out[..., 1:] >= 0) & (out[..., 1:] < model.config.card)).all(), out[..., 1:]
np.save(sys.argv[4], np.array(text.astype(mx.float32)))
"""


@pytest.mark.parametrize("bits", [0, 4])
def test_bfloat16_without_kernels_like_metal(fp32_dir, tmp_path, bits):
    """The code paths Metal takes (bfloat16 compute, MLX's own quantized matmul and fused
    attention, no CPU kernels), run here in a subprocess: streaming generation runs, and the
    teacher-forced text logits are the fp32 model's up to bf16 rounding. bf16 keeps 8
    significant bits (0.2-0.4% per rounding, a dozen roundings deep; MLX's CPU bf16
    quantized matmul rounds more): measured 1.7% (fp32 weights) and 4.9% (q4) relative
    error, KL 2e-4 and 1.4e-3. Bounds: 10% and 1e-2, where a wrong path (weights,
    attention, masks) gives errors of order 100% and KL of order 1."""
    import os
    import subprocess
    import sys

    rng = np.random.default_rng(1)
    fp = MoshiForConditionalGeneration.from_pretrained(fp32_dir, quantize=bits or None)
    cfg = fp.config
    tokens = np.concatenate([rng.integers(0, cfg.text_card, (1, 1, 32)),
                             rng.integers(0, cfg.card, (1, cfg.n_q, 32))], axis=1)
    want, _ = teacher_forced_logits(fp, tokens)
    np.save(tmp_path / "tokens.npy", tokens)
    env = dict(os.environ, MOSHI_MLX_DTYPE="bfloat16", MOSHI_MLX_CPU_KERNELS="0")
    subprocess.run([sys.executable, "-c", _METAL_LIKE, str(fp32_dir), str(bits), str(tmp_path / "tokens.npy"),
                    str(tmp_path / "text.npy")], check=True, env=env)
    kl, top1, err = quality(want, np.load(tmp_path / "text.npy"))
    print(f"\nbits {bits}: KL {kl:.2e} top-1 {top1:.3f} err {err:.2%}")
    assert err < 0.1 and kl < 1e-2, (kl, top1, err)
