"""Host steps (moshi_mlx/cpu/host.py; the transformers' host chunks) against the MLX path they replace."""
from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx
from moshi_mlx.cpu import host, kernels
from moshi_mlx.models.lm import LmConfig, LMModel
from moshi_mlx.modules.kv_cache import KVCache
from moshi_mlx.quantize import QuantizationSpec, quantize_model

pytestmark = pytest.mark.skipif(not kernels.kernels_available(), reason="the CPU kernels are not built here")

# The TTS's depformer in miniature: per-step weights with a schedule, low-rank embeddings.
TTS_LIKE = dict(dim=64, num_heads=2, num_layers=1, text_card=50, card=64, n_q=8, dep_q=8, context=20,
                hidden_scale=4.125, depformer_dim=64, depformer_num_heads=2, depformer_num_layers=2,
                depformer_dim_feedforward=192, depformer_multi_linear=True, depformer_weights_per_step=True,
                depformer_weights_per_step_schedule=[0, 1, 2, 2, 3, 3, 3, 3], depformer_low_rank_embeddings=32,
                delays=[0] * 9)
# Moshi's: one weight set per step, plain embeddings; every temporal matrix quantizable (dim 128).
MOSHI_LIKE = dict(dim=128, num_heads=4, num_layers=1, text_card=50, card=64, n_q=8, dep_q=4, context=20,
                  hidden_scale=4.125, depformer_dim=64, depformer_num_heads=2, depformer_num_layers=2,
                  depformer_dim_feedforward=192, depformer_multi_linear=True, depformer_weights_per_step=True,
                  delays=[0] * 9)


def _model(kwargs: dict, bits: int | None) -> LMModel:
    mx.random.seed(3)
    lm = LMModel(LmConfig(**kwargs))
    if bits:
        quantize_model(lm, QuantizationSpec.make(bits))
    mx.eval(lm.parameters())
    return lm


def _depformer_outputs(lm: LMModel, xs: mx.array) -> tuple[np.ndarray, bool]:
    """Each codebook step's depformer output for inputs xs [B, dep_q, D], one frame."""
    state = lm.init_depformer_state()
    outs = [lm.depformer.step(xs[:, cb:cb + 1], state)[0] for cb in range(xs.shape[1])]
    return np.array(mx.concatenate(outs, axis=1)), state.host


@pytest.mark.parametrize("kwargs", [TTS_LIKE, MOSHI_LIKE], ids=["tts-like", "moshi-like"])
@pytest.mark.parametrize("bits", [4, 8])
def test_host_depformer_steps_match_the_mlx_path(kwargs, bits, monkeypatch):
    lm = _model(kwargs, bits)
    xs = mx.random.normal((2, kwargs["dep_q"], kwargs["depformer_dim"]))
    ours, used = _depformer_outputs(lm, xs)
    assert used, "a quantized depformer on the CPU backend should step on the host"
    monkeypatch.setattr(host, "applies", lambda transformer: False)
    mlx_path, used = _depformer_outputs(lm, xs)
    assert not used
    err = np.abs(ours - mlx_path).max() / np.abs(mlx_path).max()
    assert err < 1e-5, f"host steps differ from the MLX path by {err:.2e} (relative)"


def test_host_steps_give_each_batch_row_what_it_gets_alone():
    lm = _model(TTS_LIKE, 4)
    xs = mx.random.normal((3, TTS_LIKE["dep_q"], TTS_LIKE["depformer_dim"]))
    together, _ = _depformer_outputs(lm, xs)
    for b in range(3):
        alone, _ = _depformer_outputs(lm, xs[b:b + 1])
        np.testing.assert_array_equal(together[b], alone[0])


def test_whole_tokens_of_a_frame_match_the_mlx_path(monkeypatch):
    """The depformer loop users run (greedy sample_audio) gives the same tokens either way."""
    from moshi_mlx.modules.sampling import RandomKeys, Sampler

    lm = _model(TTS_LIKE, 8)
    out = mx.random.normal((1, 1, TTS_LIKE["dim"]))
    text = mx.array([5])

    def tokens():
        return np.array(lm.sample_audio(text, out, Sampler(temp=0.0), RandomKeys(0)))

    ours = tokens()
    monkeypatch.setattr(host, "applies", lambda transformer: False)
    np.testing.assert_array_equal(ours, tokens())


def _temporal_outputs(lm: LMModel, xs: mx.array, kv_bits) -> tuple[np.ndarray, bool]:
    """The temporal transformer's output at each position of xs [B, T, D], one step each."""
    state = lm.transformer.init_state(kv_bits=kv_bits)
    outs = [lm.transformer.step(xs[:, t:t + 1], state)[0] for t in range(xs.shape[1])]
    return np.array(mx.concatenate(outs, axis=1)), state.host


@pytest.mark.parametrize("kv_bits", [None, 8], ids=["float-cache", "int8-cache"])
def test_host_temporal_steps_match_the_mlx_path_past_the_context(kv_bits, monkeypatch):
    """RoPE, a ring of `context` slots wrapping (45 steps over 20), float or int8 caches."""
    lm = _model(MOSHI_LIKE, 4)
    xs = mx.random.normal((2, 45, MOSHI_LIKE["dim"]))
    ours, used = _temporal_outputs(lm, xs, kv_bits)
    assert used
    monkeypatch.setattr(host, "applies", lambda transformer: False)
    mlx_path, _ = _temporal_outputs(lm, xs, kv_bits)
    err = np.abs(ours - mlx_path).max() / np.abs(mlx_path).max()
    assert err < 1e-5, f"host steps differ from the MLX path by {err:.2e} (relative)"


@pytest.mark.parametrize("masked", [False, True], ids=["whole-source", "masked-source"])
def test_host_steps_with_cross_attention_match_the_mlx_path(masked, monkeypatch):
    """The TTS's temporal transformer: RoPE, a wrapping ring, cross-attention to a source
    (with the mask CFG's null half uses), layer scales. With float activations: numpy's
    LayerNorm rounds differently from MLX's in the last place, and 8-bit activations would turn
    such differences into whole rounding steps now and then (~1e-3), hiding what this test checks."""
    from moshi_mlx.modules.transformer import Transformer, TransformerConfig

    monkeypatch.setattr(kernels, "INT8_ACTIVATIONS", False)

    mx.random.seed(5)
    cfg = TransformerConfig(d_model=128, num_heads=4, num_layers=2, dim_feedforward=528, context=12,
                            norm="rms_norm_f32", gating="silu", layer_scale=0.5, cross_attention=True)
    transformer = Transformer(cfg)
    quantize_model(transformer, QuantizationSpec.make(4))
    mx.eval(transformer.parameters())
    source = mx.random.normal((2, 7, 128))
    mask = mx.array([[True] * 7, [True, True, False, True, False, False, True]]) if masked else None
    xs = mx.random.normal((2, 30, 128))

    def outputs():
        state = transformer.init_state(cross_source=source, cross_mask=mask)
        ys = [transformer.step(xs[:, t:t + 1], state)[0] for t in range(xs.shape[1])]
        return np.array(mx.concatenate(ys, axis=1)), state.host

    ours, used = outputs()
    assert used
    monkeypatch.setattr(host, "applies", lambda transformer: False)
    mlx_path, _ = outputs()
    err = np.abs(ours - mlx_path).max() / np.abs(mlx_path).max()
    assert err < 1e-5, f"host steps differ from the MLX path by {err:.2e} (relative)"


def test_rope_matches_mlx_at_far_positions():
    x = np.random.default_rng(1).standard_normal((2, 3, 64)).astype(np.float32)
    for position in (0, 7, 1000, 40000):  # 40000 steps: 53 minutes
        ref = np.array(mx.fast.rope(mx.array(x)[:, :, None], 64, traditional=True, base=10000.0, scale=1.0,
                                    offset=position))[:, :, 0]
        # both round the angle position · frequency to float32: a few units of its last place
        angle_ulp = position * 2.0 ** -23
        np.testing.assert_allclose(host.rope(x, host.rope_angles(position, 64, 10000.0)), ref, rtol=0,
                                   atol=1e-5 + 8 * angle_ulp)


def test_the_mlx_path_stays_where_host_steps_do_not_apply():
    assert not _model(TTS_LIKE, None).init_depformer_state().host  # float weights
    lm = _model(MOSHI_LIKE, 4)
    assert lm.transformer.init_state().host
    assert not lm.transformer.init_state(exact_chunk=4).host  # chunks over a longer ring
    assert not _model(dict(MOSHI_LIKE, positional_embedding="sin"), 4).transformer.init_state().host


def test_host_cache_converts_for_the_mlx_path():
    cache = KVCache(4, host=True)
    k = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    cache.update_host(k, -k)
    cache.update(mx.array(k[:, :, None] + 1), mx.array(-k[:, :, None] - 1))  # the MLX path's write
    keys, values = cache.fetch()
    np.testing.assert_array_equal(np.array(keys), np.stack([k, k + 1], axis=2))
    np.testing.assert_array_equal(np.array(values), -np.stack([k, k + 1], axis=2))
    int8 = KVCache(4, bits=8, host=True)
    int8.update_host(k, -k)
    keys, values = int8.fetch()
    np.testing.assert_allclose(np.array(keys)[:, :, 0], k, atol=np.abs(k).max() / 254 + 1e-6)
    np.testing.assert_allclose(np.array(values)[:, :, 0], -k, atol=np.abs(k).max() / 254 + 1e-6)


def test_spinning_workers_give_the_same_products(monkeypatch):
    """Products asked with spin (workers wait awake for the next call) equal those without."""
    mx.random.seed(0)
    w, s, b = mx.quantize(mx.random.normal((512, 256)), group_size=32, bits=4)
    x = np.random.default_rng(0).standard_normal((11, 256)).astype(np.float32)  # > 8 rows: two passes
    plain = kernels.quantized_matmul_host(x, w, s, b, 4, 32)
    for _ in range(20):
        np.testing.assert_array_equal(kernels.quantized_matmul_host(x, w, s, b, 4, 32, spin=True), plain)
    monkeypatch.setattr(kernels, "INT8_ACTIVATIONS", False)  # MLX's arithmetic, to compare with MLX's op
    float_activations = kernels.quantized_matmul_host(x, w, s, b, 4, 32, spin=True)
    expected = np.array(mx.quantized_matmul(mx.array(x), w, s, b, transpose=True, group_size=32, bits=4))
    np.testing.assert_allclose(float_activations, expected, rtol=1e-4, atol=1e-4)
    assert np.sqrt(np.mean((plain - expected) ** 2) / np.mean(expected ** 2)) < 0.01  # 8-bit activations


def test_host_embedding_rows_equal_mlx_lookups():
    """Rows read on the host (float tables; 4/8-bit with float32 or bfloat16 scales, which MLX
    rounds after each operation) are bitwise MLX's lookups, −1 giving zeros."""
    import mlx.nn as nn

    from moshi_mlx.modules.embedding import ScaledEmbedding, embed

    mx.random.seed(1)
    tables = [nn.Embedding(300, 64)]
    for bits in (4, 8):
        for dtype in (mx.float32, mx.bfloat16):
            t = nn.QuantizedEmbedding.from_embedding(nn.Embedding(300, 64), group_size=32, bits=bits)
            t.scales, t.biases = t.scales.astype(dtype), t.biases.astype(dtype)
            tables.append(t)
    tables.append(ScaledEmbedding(300, 64, low_rank=16))  # not handled here: None
    for t in tables:
        mx.eval(t.parameters())
    tokens = np.random.default_rng(0).integers(-1, 300, (9, len(tables))).astype(np.int32)
    tokens[0] = -1
    rows = host.embedding_rows(tables, tokens)
    assert rows[-1] is None
    for k, table in enumerate(tables[:-1]):
        np.testing.assert_array_equal(rows[k], np.array(embed(table, mx.array(tokens[:, k]), mx.float32)), str(k))
    assert not rows[1][0].any()
    with pytest.raises(ValueError, match="token 300 outside the table's 300 rows"):
        host.embedding_rows(tables[1:2], np.array([[300]], np.int32))


def test_one_step_embeddings_equal_the_mlx_path():
    """The LM's summed input embeddings of one position (host rows) equal those of a chunk of
    several positions (MLX), bitwise, for a quantized model with a conditioning sum."""
    lm = _model(MOSHI_LIKE, 4)
    tokens = mx.array(np.random.default_rng(2).integers(-1, 50, (2, 9, 3)).astype(np.int32))
    condition = mx.random.normal((2, 1, MOSHI_LIKE["dim"]))
    chunk = np.array(lm._embed_step_tokens(tokens, condition))
    for t in range(3):
        np.testing.assert_array_equal(np.array(lm._embed_step_tokens(tokens[:, :, t:t + 1], condition))[:, 0],
                                      chunk[:, t])


def test_rowwise_transformer_chunks_on_the_host_equal_the_mlx_path(monkeypatch):
    """Mimi's encoder transformer (rowwise products: float weights through the convolution
    kernel) stepped on the host: the MLX path's values to float32 rounding, live (Kyutai's
    ring, 2 steps per call), in chunks that emulate the ring (ring_step) and in exact chunks,
    the caches wrapping; each batch item bitwise what it gets alone."""
    from moshi_mlx.modules.transformer import Transformer, TransformerConfig

    mx.random.seed(4)
    t = Transformer(TransformerConfig(d_model=64, num_heads=4, num_layers=2, dim_feedforward=256, context=10,
                                      layer_scale=0.5, rowwise_products=True))
    mx.eval(t.parameters())
    x = mx.random.normal((3, 48, 64))

    def stream(state, inp, chunks):
        outs, start = [], 0
        for n in chunks:
            outs.append(np.array(t.step(inp[:, start:start + n], state)[0]))
            start += n
        assert start == inp.shape[1]
        return np.concatenate(outs, axis=1)

    for exact_chunk, ring_step, chunks in ((None, None, [2] * 24), (8, 2, [8] * 6), (16, None, [16, 5, 16, 11])):
        host_state = t.init_state(exact_chunk, ring_step=ring_step)
        assert host_state.host_chunks
        ours = stream(host_state, x, chunks)
        alone = stream(t.init_state(exact_chunk, ring_step=ring_step), x[1:2], chunks)
        assert np.array_equal(alone, ours[1:2])
        with monkeypatch.context() as m:
            m.setattr(Transformer, "_host_chunks_apply", lambda self: False)
            mlx_state = t.init_state(exact_chunk, ring_step=ring_step)
            assert not mlx_state.host_chunks
            want = stream(mlx_state, x, chunks)
        err = np.abs(ours - want).max() / np.abs(want).max()
        assert err < 1e-5, f"{exact_chunk, ring_step}: host chunks differ from the MLX path by {err:.2e}"
