"""Building blocks against PyTorch: activations, causal (transposed) convolutions, caches."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mlx.core as mx
from moshi_mlx.modules.activations import elu, gelu
from moshi_mlx.modules.conv import StreamingConv1d, StreamingConvTranspose1d
from moshi_mlx.modules.kv_cache import KVCache
from moshi_mlx.modules.transformer import Transformer, TransformerConfig

pytestmark = pytest.mark.reference


@pytest.mark.parametrize("name", ["elu", "gelu"])
def test_activations_are_exact_to_float32(name):
    """Our multiply-add ELU/GELU are as close to the float64 truth as PyTorch's float32 ones."""
    x = np.concatenate([np.linspace(-20, 20, 400_001), np.random.default_rng(0).standard_normal(100_000) * 3])
    x = x.astype(np.float32)
    ours = np.array((elu if name == "elu" else gelu)(mx.array(x)), np.float64)
    f = F.elu if name == "elu" else F.gelu  # F.gelu default is the exact erf form
    truth = f(torch.from_numpy(x).double()).numpy()
    torch32 = f(torch.from_numpy(x)).double().numpy()
    err, ref_err = np.abs(ours - truth).max(), np.abs(torch32 - truth).max()
    assert err <= 2 * ref_err + 1e-7, (err, ref_err)
    # and far from the tanh approximation of GELU (error ~1e-3), which Kyutai's MLX port uses
    if name == "gelu":
        tanh = F.gelu(torch.from_numpy(x).double(), approximate="tanh").numpy()
        assert np.abs(tanh - truth).max() > 100 * err


def _torch_causal_conv(x, w, b, stride, dilation, pad_mode):
    k_eff = (w.shape[-1] - 1) * dilation + 1
    x = F.pad(x, (k_eff - stride, 0), mode="replicate" if pad_mode == "replicate" else "constant")
    return F.conv1d(x, w, b, stride=stride, dilation=dilation)


@pytest.mark.parametrize("kernel,stride", [(k, s) for k, s in itertools.product([1, 3, 4, 7, 8, 16], [1, 2, 4, 5])
                                           if s <= k])
def test_conv_matches_torch_batch_and_streaming(kernel, stride):
    rng = np.random.default_rng(kernel * 10 + stride)
    cin, cout, frames = 6, 5, 24
    x = rng.standard_normal((2, cin, frames * stride)).astype(np.float32)
    w = rng.standard_normal((cout, cin, kernel)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    for dilation, pad_mode in [(1, "constant"), (2 if stride == 1 else 1, "replicate")]:
        conv = StreamingConv1d(cin, cout, kernel, stride, dilation=dilation, pad_mode=pad_mode)
        conv.weight, conv.bias = mx.array(w.transpose(0, 2, 1)), mx.array(b)
        want = _torch_causal_conv(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b),
                                  stride, dilation, pad_mode).numpy()
        xm = mx.array(x.transpose(0, 2, 1))
        got = np.array(conv(xm)).transpose(0, 2, 1)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        for chunk in (1, 3, 8):
            state, steps = None, []
            for i in range(0, frames * stride, chunk * stride):
                y, state = conv.step(xm[:, i:i + chunk * stride], state)
                steps.append(np.array(y))
            np.testing.assert_allclose(np.concatenate(steps, 1).transpose(0, 2, 1), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel,stride,depthwise", [(4, 2, True), (4, 2, False), (8, 4, False), (16, 8, False),
                                                     (5, 2, False), (3, 3, False)])
def test_transposed_conv_matches_torch_batch_and_streaming(kernel, stride, depthwise):
    rng = np.random.default_rng(kernel + 100 * stride)
    cin = 6
    cout = cin if depthwise else 4
    groups = cin if depthwise else 1
    frames = 20
    x = rng.standard_normal((2, cin, frames)).astype(np.float32)
    w = rng.standard_normal((cin, cout // groups, kernel)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    full = F.conv_transpose1d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), stride=stride,
                              groups=groups).numpy()
    want = full[..., : frames * stride]  # causal: trim kernel − stride on the right
    conv = StreamingConvTranspose1d(cin, cout, kernel, stride, groups=groups)
    conv.weight = mx.array(w[:, 0, :] if depthwise else w.transpose(0, 2, 1))
    conv.bias = mx.array(b)
    xm = mx.array(x.transpose(0, 2, 1))
    np.testing.assert_allclose(np.array(conv(xm)).transpose(0, 2, 1), want, rtol=1e-5, atol=1e-5)
    for chunk in (1, 3, 7):
        state, steps = None, []
        for i in range(0, frames, chunk):
            y, state = conv.step(xm[:, i:i + chunk], state)
            steps.append(np.array(y))
        np.testing.assert_allclose(np.concatenate(steps, 1).transpose(0, 2, 1), want, rtol=1e-5, atol=1e-5)


def test_kv_cache_positions_wrap():
    cache = KVCache(5)
    k = mx.zeros((1, 1, 1, 2))
    for step in range(13):
        cache.update_and_fetch(k, k)
        pos = KVCache.positions(5, step + 1)
        assert sorted(pos) == list(range(max(0, step - 4), step + 1))
        assert all(p % 5 == i for i, p in enumerate(pos)) or step < 5


def test_transformer_exact_blocks_equal_full_attention():
    """A sequence longer than the batch block runs through exact caches: same result as one
    full pass with the sliding-window mask (context 16, 300 steps = many cache wraps)."""
    mx.random.seed(0)
    cfg = TransformerConfig(d_model=32, num_heads=4, num_layers=2, dim_feedforward=64, context=16,
                            layer_scale=0.1)
    tr = Transformer(cfg)
    x = mx.random.normal((1, 300, 32))
    full = x
    for layer in tr.layers:
        full = layer(full, None, 0)
    old = Transformer.BATCH_BLOCK
    Transformer.BATCH_BLOCK = 24
    try:
        blocked = tr(x)
    finally:
        Transformer.BATCH_BLOCK = old
    np.testing.assert_allclose(np.array(blocked), np.array(full), rtol=1e-4, atol=1e-5)
    # and step-by-step streaming (ring of `context`) equals it too when one step at a time
    state = tr.init_state()
    steps = mx.concatenate([tr.step(x[:, i:i + 1], state)[0] for i in range(300)], axis=1)
    np.testing.assert_allclose(np.array(steps), np.array(full), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])  # bf16: MLX's fused kernel (Metal's path)
def test_attention_matches_float64_softmax(dtype):
    """Both branches of transformer.attention against a float64 reference, with a sliding
    causal mask whose first rows see a single key."""
    from moshi_mlx.modules.transformer import _attention_mask, attention

    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 3, n, 16)) for n in (20, 20, 20))
    pos = np.arange(20)
    mask = _attention_mask(pos, pos, 5)
    scores = np.einsum("bhqd,bhkd->bhqk", q, k) * 0.25
    scores = np.where(np.array(mask), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    want = np.einsum("bhqk,bhkd->bhqd", p / p.sum(-1, keepdims=True), v)
    got = attention(*(mx.array(a.astype(np.float32)).astype(dtype) for a in (q, k, v)), 0.25, mask)
    assert got.dtype == dtype
    tol = 1e-5 if dtype == mx.float32 else 3e-2
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), want, rtol=tol, atol=tol)
