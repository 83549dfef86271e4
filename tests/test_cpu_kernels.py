"""The CPU kernels (moshi_mlx/cpu/_kernels.c) against the MLX ops they replace."""
from __future__ import annotations

import platform

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from moshi_mlx.cpu import kernels as cpu
from moshi_mlx.cpu.kernels import QMATMUL_MAX_ROWS as KERNEL_MAX_ROWS
from moshi_mlx.quantize import QuantizedLinear


def cpu_kernels():
    return cpu._module()


def test_kernel_is_built_on_x86_64():
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the kernel is x86-64 only; other CPUs use mx.quantized_matmul")
    assert cpu_kernels() is not None, "moshi_mlx.cpu._kernels did not build or this CPU lacks AVX2/FMA"


def q4x8_reference(x: np.ndarray, w: mx.array, scales: mx.array, biases: mx.array, group: int) -> np.ndarray:
    """The 4-bit × 8-bit-activation product as `_kernels.c` (section 1b) defines it, in numpy:
    x rounded to int8 per group exactly as the kernel rounds it, the rest in float64."""
    x = np.asarray(x, np.float32)
    (M, K), N = x.shape, w.shape[0]
    G = K // group
    nibbles = np.array(w).view(np.uint8)  # [N, K / 2]: element 2i low, 2i + 1 high
    q = np.empty((N, K), np.int64)
    q[:, 0::2], q[:, 1::2] = nibbles & 15, nibbles >> 4
    xg = x.reshape(M, G, group)
    a = np.abs(xg).max(-1)
    d = (a / np.float32(127)).astype(np.float32)
    inv = np.where(a > 0, np.float32(127) / np.where(a > 0, a, np.float32(1)), np.float32(0)).astype(np.float32)
    xq = np.rint(xg * inv[..., None]).astype(np.int64)  # float32 product, rounded to even
    dots = np.einsum("mgi,ngi->mng", xq, q.reshape(N, G, group))  # exact integers
    sums = xg.astype(np.float64).sum(-1)
    residual = sums - d * xq.sum(-1)
    sc, bi = (np.array(t.astype(mx.float32)).astype(np.float64) for t in (scales, biases))
    return (np.einsum("ng,mng->mn", sc, d[:, None, :] * dots + 7.5 * residual[:, None, :])
            + np.einsum("ng,mg->mn", bi, sums))


def _layer(bits: int, group: int, scales, k: int = 384) -> QuantizedLinear:
    mx.random.seed(bits * 1000 + group + k)
    layer = QuantizedLinear.from_linear(nn.Linear(k, 1000, bias=True), group, bits)
    layer.scales, layer.biases = layer.scales.astype(scales), layer.biases.astype(scales)
    layer.bias = mx.random.normal((1000,))
    mx.eval(layer.parameters())
    return layer


def _mlx_product(layer: QuantizedLinear, x: mx.array) -> mx.array:
    return mx.quantized_matmul(x, layer.weight, layer.scales, layer.biases, transpose=True,
                               group_size=layer.group_size, bits=layer.bits) + layer.bias


@pytest.mark.parametrize("bits,group,scales", [(4, 32, mx.bfloat16), (4, 64, mx.float32), (4, 128, mx.bfloat16),
                                                (8, 64, mx.float32), (8, 32, mx.bfloat16)])
def test_quantized_linear_matches_mlx(bits, group, scales, monkeypatch):
    """With float activations (8-bit weights always; 4-bit with MOSHI_MLX_INT8_ACTIVATIONS=0)
    the kernel is MLX's arithmetic in another summation order."""
    if cpu_kernels() is None:  # QuantizedLinear would run MLX's op too: nothing to compare
        pytest.skip("no kernel on this CPU: both sides would be mx.quantized_matmul")
    monkeypatch.setattr(cpu, "INT8_ACTIVATIONS", False)
    layer = _layer(bits, group, scales)
    for rows in range(1, KERNEL_MAX_ROWS + 2):  # the last one goes through MLX's op
        x = mx.random.normal((rows, 1, 384))
        used = cpu.quantized_matmul(x, layer.weight, layer.scales, layer.biases, bits, group) is not None
        assert used == (rows <= KERNEL_MAX_ROWS and cpu_kernels() is not None)
        want = _mlx_product(layer, x)
        got = layer(x)
        assert got.shape == want.shape == (rows, 1, 1000)
        # Same arithmetic in another summation order: float32 rounding of a 384-term sum.
        err = np.abs(np.array(got) - np.array(want)).max() / np.abs(np.array(want)).max()
        assert err < 2e-6, (rows, err)
        if used:  # each row exactly as alone: batched transcription relies on it
            alone = np.concatenate([np.array(layer(x[i:i + 1])) for i in range(rows)])
            np.testing.assert_array_equal(np.array(got), alone)


@pytest.mark.parametrize("group,scales,k", [(32, mx.bfloat16, 384), (64, mx.float32, 384), (128, mx.bfloat16, 384),
                                             (64, mx.bfloat16, 1024)])  # tails of < 8 groups; whole chunks
def test_4bit_product_with_8bit_activations(group, scales, k):
    """The default 4-bit product: the arithmetic `_kernels.c` documents (section 1b), to float32
    rounding; each row of a batch exactly as alone; and close to MLX's float product: its
    rounding noise adds under 1% to 4-bit weights' own error."""
    if cpu_kernels() is None:
        pytest.skip("no kernel on this CPU")
    assert cpu.INT8_ACTIVATIONS  # the default (MOSHI_MLX_INT8_ACTIVATIONS unset)
    layer = _layer(4, group, scales, k)
    noise = []
    for rows in range(1, KERNEL_MAX_ROWS + 1):
        x = mx.random.normal((rows, 1, k))
        got = np.array(layer(x))[:, 0]
        want = q4x8_reference(np.array(x)[:, 0], layer.weight, layer.scales, layer.biases, group) + np.array(layer.bias)
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < 2e-6, (rows, err)
        alone = np.concatenate([np.array(layer(x[i:i + 1]))[:, 0] for i in range(rows)])
        np.testing.assert_array_equal(got, alone)
        noise.append(got - np.array(_mlx_product(layer, x))[:, 0])
    scale = np.array(_mlx_product(layer, mx.random.normal((64, k))))
    rel = np.sqrt(np.mean(np.concatenate(noise) ** 2) / np.mean(scale ** 2))
    assert rel < 0.01, f"8-bit activations moved the product by {rel:.2%} (rms, relative)"


def test_8bit_activations_add_little_to_4bit_error():
    """Against the unquantized weights, 4-bit weights are off by ~8% (rms); rounding the
    activations to 8 bits per group adds under 1% of that."""
    if cpu_kernels() is None:
        pytest.skip("no kernel on this CPU")
    rng = np.random.default_rng(3)
    w = rng.standard_normal((2048, 1024)).astype(np.float32) * 0.02
    x = rng.standard_normal((8, 1024)).astype(np.float32)
    q, s, b = mx.quantize(mx.array(w), group_size=32, bits=4)
    exact = x.astype(np.float64) @ w.T.astype(np.float64)

    def error(act8: bool) -> float:
        out = np.empty((8, 2048), np.float32)
        cpu_kernels().quantized_matmul(x, q, s, b, out, 8, 2048, 1024, 4, 32, 0, 2, 0, int(act8))
        return float(np.sqrt(np.mean((out - exact) ** 2) / np.mean(exact ** 2)))

    own, with_int8 = error(False), error(True)
    assert 0.05 < own < 0.12, own  # what 4-bit weights cost here, so the bound below means something
    assert with_int8 < 1.01 * own, (own, with_int8)


def test_kernel_rejects_bad_buffers():
    kernels = cpu_kernels()
    if kernels is None:
        pytest.skip("no kernel on this CPU")
    w = mx.zeros((8, 4), dtype=mx.uint32)
    s = mx.zeros((8, 1), dtype=mx.float32)
    out = np.empty((1, 8), np.float32)
    x = mx.zeros((1, 32))
    kernels.quantized_matmul(x, w, s, s, out, 1, 8, 32, 4, 32, 0, 2)
    with pytest.raises(ValueError, match="buffer sizes"):
        kernels.quantized_matmul(x, w, s, s, out, 1, 8, 64, 4, 32, 0, 2)
    with pytest.raises(ValueError, match="unsupported"):
        kernels.quantized_matmul(x, w, s, s, out, 1, 8, 32, 3, 32, 0, 2)


@pytest.mark.parametrize("capacity,steps", [(16, 40), (300, 120)])  # a wrapped ring, a growing one
def test_int8_kv_attention_kernel_matches_mlx(capacity, steps):
    from moshi_mlx.modules.transformer import KVCache

    if cpu_kernels() is None:
        pytest.skip("no kernel on this CPU")
    mx.random.seed(capacity)
    cache = KVCache(capacity, bits=8)
    k, v = mx.random.normal((2, 4, steps, 32)), mx.random.normal((2, 4, steps, 32))
    for t in range(steps):
        cache.update(k[:, :, t:t + 1], v[:, :, t:t + 1])
        if t % 13 == 0 or t == steps - 1:
            q = mx.random.normal((2, 4, 1, 32))
            got = cache.attend_one(q, 0.2)
            keys, values = cache.fetch()  # dequantized: what the MLX path attends to
            assert keys.shape[2] == min(t + 1, capacity)
            want = mx.fast.scaled_dot_product_attention(q, keys, values, scale=0.2)
            assert float(mx.abs(got - want).max()) < 1e-5 * float(mx.abs(want).max()) + 1e-6, t
    # int8 rounding of N(0, 1) vectors of 32: steps of absmax/127 ≈ 0.02 → outputs within ~1%
    exact = mx.fast.scaled_dot_product_attention(q, k[:, :, -capacity:], v[:, :, -capacity:], scale=0.2)
    assert float(mx.abs(got - exact).max()) < 0.03 * float(mx.abs(exact).max())


def test_thread_pool_survives_fork_and_threads():
    """The kernels' worker threads are started once and kept: a forked child (which has none of
    them) and concurrent callers from several Python threads still get their results."""
    import os
    import threading

    kernels = cpu_kernels()
    if kernels is None:
        pytest.skip("no kernel on this CPU")
    layer = QuantizedLinear.from_linear(nn.Linear(256, 512, bias=False), 64, 8)
    mx.eval(layer.parameters())
    w, s, b = (np.array(a) for a in (layer.weight, layer.scales, layer.biases))
    x = np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)

    def product(threads: int) -> np.ndarray:
        out = np.empty((1, 512), np.float32)
        kernels.quantized_matmul(x, w, s, b, out, 1, 512, 256, 8, 64, 0, threads)
        return out

    want = product(1)
    np.testing.assert_array_equal(product(2), want)  # the pool is running now
    pid = os.fork()
    if pid == 0:  # the child: numpy buffers only (MLX's own threads do not survive a fork either)
        ok = all(np.array_equal(product(2), want) for _ in range(20))
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    results = []
    threads = [threading.Thread(target=lambda: results.extend(product(2) for _ in range(50))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 200 and all(np.array_equal(r, want) for r in results)


def _mlx_rvq_codes(rvq, x: mx.array, n: int, monkeypatch) -> np.ndarray:
    with monkeypatch.context() as m:
        m.setattr(cpu, "nearest_codes", lambda *args: None)
        return np.array(rvq.encode(x, n))


def test_rvq_nearest_code_kernel_matches_mlx(monkeypatch):
    """Residual quantization through the kernel (exact distances) against MLX's (shortlist by
    ‖c‖²/2 − r·c, then exact): the same codes on random and on near-code inputs, each row as
    alone, any number of levels, the lowest index on exact ties."""
    from moshi_mlx.modules.rvq import ResidualVectorQuantizer

    if cpu_kernels() is None:
        pytest.skip("no kernel on this CPU")
    mx.random.seed(5)
    rvq = ResidualVectorQuantizer(n_q=6, bins=1024, dim=64, input_dim=96, output_dim=96)
    mx.eval(rvq.parameters())
    x = mx.random.normal((3, 70, 96)) * 2  # 210 rows: several calls of NEAREST_MAX_ROWS
    got = np.array(rvq.encode(x, 6))
    assert got.shape == (3, 70, 6) and got.dtype == np.int32
    np.testing.assert_array_equal(got, _mlx_rvq_codes(rvq, x, 6, monkeypatch))
    np.testing.assert_array_equal(np.array(rvq.encode(x, 2)), got[..., :2])
    alone = np.stack([np.array(rvq.encode(x[:, t:t + 1], 6))[:, 0] for t in range(0, 70, 7)], 1)
    np.testing.assert_array_equal(alone, got[:, ::7])
    # inputs a hair away from codewords: where ‖c‖²/2 − r·c cancels in float32
    near = rvq.codebooks[0][mx.array([[3, 700, 1023]])] + 1e-4 * mx.random.normal((1, 3, 64))
    rvq_direct = ResidualVectorQuantizer(n_q=6, bins=1024, dim=64, input_dim=64, output_dim=64)
    rvq_direct.codebooks = rvq.codebooks
    got = np.array(rvq_direct.encode(near, 6))
    np.testing.assert_array_equal(got[0, :, 0], [3, 700, 1023])
    np.testing.assert_array_equal(got, _mlx_rvq_codes(rvq_direct, near, 6, monkeypatch))
    rvq_direct.codebooks = mx.ones((2, 1024, 64))  # all codes equal (an untrained codebook)
    np.testing.assert_array_equal(np.array(rvq_direct.encode(near, 2)), 0)
    # the kernel searches rows in fours, then one by one: ties in both
    np.testing.assert_array_equal(np.array(rvq_direct.encode(mx.concatenate([near, near[:, :2]], axis=1), 2)), 0)


def test_rvq_kernel_rejects_bad_shapes():
    kernels = cpu_kernels()
    if kernels is None:
        pytest.skip("no kernel on this CPU")
    cb = np.zeros((4, 256, 32), np.float32)
    x = np.zeros((2, 32), np.float32)
    out = np.empty((2, 4), np.int32)
    kernels.nearest_codes(x, cb, out, 2, 4, 4, 256, 32, 2, 0)
    with pytest.raises(ValueError, match="unsupported"):
        kernels.nearest_codes(x, cb, out, 2, 5, 4, 256, 32, 2, 0)  # more levels than codebooks
    with pytest.raises(ValueError, match="buffer sizes"):
        kernels.nearest_codes(x, cb, out, 2, 4, 4, 128, 32, 2, 0)


def test_rowwise_linear_computes_each_row_as_alone():
    """Mimi's encoder products through the convolution kernel: linear(x) to float32 rounding,
    and each row bitwise the same in any batch (BLAS's products are not: they pick kernels by
    the number of rows)."""
    from moshi_mlx.modules.conv import rowwise_linear

    if cpu_kernels() is None:
        pytest.skip("no kernel on this CPU")
    mx.random.seed(7)
    linear = nn.Linear(96, 200, bias=True)
    mx.eval(linear.parameters())
    x = mx.random.normal((3, 11, 96))
    got = np.array(rowwise_linear(linear, x))
    want = np.array(linear(x))
    assert np.abs(got - want).max() < 2e-6 * np.abs(want).max()
    for b in range(3):
        for t in (0, 5, 10):
            np.testing.assert_array_equal(np.array(rowwise_linear(linear, x[b:b + 1, t:t + 1]))[0, 0], got[b, t])
    linear.weight = mx.zeros((200, 96))  # a replaced weight is seen (the kernel's layout is remade)
    np.testing.assert_array_equal(np.array(rowwise_linear(linear, x)), np.broadcast_to(np.array(linear.bias), got.shape))


def test_mimi_streams_encoded_together_get_their_codes_alone():
    """One streaming encode for a batch of streams (what SttStream runs) gives each stream
    bitwise the latent, and so the codes, it gets alone: frame by frame and in chunks."""
    from moshi_mlx.models.mimi import MimiModel

    if cpu_kernels() is None:
        pytest.skip("no kernel on this CPU")
    mx.random.seed(0)
    mimi = MimiModel()
    mx.eval(mimi.parameters())
    assert mimi.batch_exact
    rng = np.random.default_rng(0)
    pcm = (0.1 * rng.standard_normal((3, 1, 6 * 1920))).astype(np.float32)

    def encode(x: np.ndarray, frames_per_call: int) -> tuple[np.ndarray, np.ndarray]:
        state = mimi.init_state(x.shape[0], max_frames=4)
        latents, codes = [], []
        for i in range(0, x.shape[-1], frames_per_call * 1920):
            chunk = mx.array(x[:, :, i:i + frames_per_call * 1920]).transpose(0, 2, 1)
            h = mimi._latent(chunk, state)
            latents.append(np.array(h))
            codes.append(np.array(mimi.quantizer.encode(h, 32)))
        return np.concatenate(latents, 1), np.concatenate(codes, 1)

    for per_call in (1, 3):
        lat, codes = encode(pcm, per_call)
        for b in range(3):
            lat1, codes1 = encode(pcm[b:b + 1], per_call)
            np.testing.assert_array_equal(lat[b], lat1[0])
            np.testing.assert_array_equal(codes[b], codes1[0])
