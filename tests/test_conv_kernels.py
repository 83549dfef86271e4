"""SEANet's CPU convolution kernels (moshi_mlx/cpu/_kernels.c) against the MLX path, and
the properties the streaming code relies on: chunked calls equal one call bit for bit."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from moshi_mlx.cpu import kernels as cpu
from moshi_mlx.modules.conv import StreamingConv1d, StreamingConvTranspose1d, residual_step


@pytest.fixture
def kernels():
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the kernels are x86-64 only; other CPUs use MLX's ops")
    k = cpu._module()
    assert k is not None, "moshi_mlx.cpu._kernels did not build or this CPU lacks AVX2/FMA"
    return k


def _mlx_only(monkeypatch):
    monkeypatch.setattr(cpu, "_applies", lambda x: False)


def _randomize(layer, seed: int):
    mx.random.seed(seed)
    layer.weight = mx.random.normal(layer.weight.shape) * (1.0 / np.sqrt(layer.weight.size / layer.weight.shape[0]))
    layer.bias = mx.random.normal(layer.bias.shape)
    mx.eval(layer.parameters())


def _rel_err(a: mx.array, b: mx.array) -> float:
    a, b = np.array(a), np.array(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _stream(layer, x: mx.array, chunks: list[int], **kw) -> mx.array:
    state, outs, start = None, [], 0
    for n in chunks:
        y, state = layer.step(x[:, start:start + n], state, **kw)
        outs.append(y)
        start += n
    assert start == x.shape[1]
    return mx.concatenate(outs, axis=1)


# in, out, kernel, stride, dilation, ELU on the input, pad mode: SEANet's layer kinds, plus
# odd sizes (input channels above the 256-channel pass and not a multiple of 8, output
# channels not a multiple of 16).
CONVS = [
    (1, 64, 7, 1, 1, False, "constant"),
    (64, 32, 3, 1, 2, True, "constant"),
    (64, 128, 8, 4, 1, True, "constant"),
    (300, 5, 3, 1, 1, True, "replicate"),
    (16, 33, 4, 2, 1, False, "replicate"),
    (520, 40, 2, 1, 3, True, "constant"),
]


@pytest.mark.parametrize("c_in,c_out,k,s,d,act,pad", CONVS)
def test_conv_kernel_matches_mlx_and_streams_exactly(kernels, monkeypatch, c_in, c_out, k, s, d, act, pad):
    layer = StreamingConv1d(c_in, c_out, k, stride=s, dilation=d, pad_mode=pad)
    _randomize(layer, c_in + c_out)
    T = 96 * s
    x = mx.random.normal((2, T, c_in))
    got = layer(x, elu_input=act)
    assert got.shape == (2, T // s, c_out)
    with monkeypatch.context() as m:
        _mlx_only(m)
        want = layer(x, elu_input=act)
    # Same arithmetic, another summation order: float32 rounding of up to 1040-term sums.
    assert _rel_err(got, want) < 1e-5
    # Any chunking gives the very same bits: each output's sum runs in a fixed order.
    streamed = _stream(layer, x, [s, 5 * s, 17 * s, 73 * s], elu_input=act)
    assert np.array_equal(np.array(streamed), np.array(got))


def _convtr_reference(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int) -> np.ndarray:
    """Textbook transposed convolution, trimmed on the right by kernel − stride."""
    B, T, _ = x.shape
    _, K, c_out = w.shape
    y = np.zeros((B, (T - 1) * stride + K, c_out))
    for t in range(T):
        y[:, t * stride: t * stride + K] += np.einsum("bc,cko->bko", x[:, t], w)
    return (y[:, :T * stride] + b).astype(np.float32)


@pytest.mark.parametrize("c_in,c_out,k,s", [(128, 64, 8, 4), (96, 20, 10, 5), (8, 8, 3, 2)])
def test_conv_transpose_polyphase_matches_definition(kernels, monkeypatch, c_in, c_out, k, s):
    layer = StreamingConvTranspose1d(c_in, c_out, k, s)
    _randomize(layer, k * s)
    x = mx.random.normal((2, 40, c_in))
    want = _convtr_reference(np.array(x), np.array(layer.weight), np.array(layer.bias), s)
    got = layer(x)
    with monkeypatch.context() as m:
        _mlx_only(m)
        got_mlx = layer(x)
    assert _rel_err(got, want) < 1e-5 and _rel_err(got_mlx, want) < 1e-5
    assert np.array_equal(np.array(_stream(layer, x, [1, 7, 32])), np.array(got))


def test_depthwise_conv_transpose_matches_definition():
    layer = StreamingConvTranspose1d(6, 6, 4, 2, groups=6)
    _randomize(layer, 3)
    x = mx.random.normal((1, 20, 6))
    w = np.zeros((6, 4, 6), np.float32)
    w[np.arange(6), :, np.arange(6)] = np.array(layer.weight)
    assert _rel_err(layer(x), _convtr_reference(np.array(x), w, np.array(layer.bias), 2)) < 1e-5


@pytest.mark.parametrize("dim,dilation,pad", [(64, 1, "constant"), (40, 2, "replicate"), (512, 1, "constant")])
def test_fused_residual_block_matches_mlx(kernels, monkeypatch, dim, dilation, pad):
    conv1 = StreamingConv1d(dim, dim // 2, 3, dilation=dilation, pad_mode=pad)
    conv2 = StreamingConv1d(dim // 2, dim, 1)
    _randomize(conv1, dim)
    _randomize(conv2, dim + 1)
    x = mx.random.normal((2, 120, dim))

    def block(chunks):
        state, outs, start = None, [], 0
        for n in chunks:
            y, state = residual_step(conv1, conv2, x[:, start:start + n], state)
            outs.append(y)
            start += n
        return mx.concatenate(outs, axis=1)

    got = block([120])
    with monkeypatch.context() as m:
        _mlx_only(m)
        want = block([120])
    assert _rel_err(got, want) < 1e-5
    assert np.array_equal(np.array(block([1, 2, 50, 67])), np.array(got))


def test_seanet_host_path_gives_the_kernels_bits(kernels, monkeypatch):
    """SEANet on host buffers (numpy from input to output) against the same kernels called on
    MLX arrays one layer at a time: the same bits, in batch and streaming, including a stream
    whose state passes from one path to the other. Batches of few frames also exercise the
    kernel's blocks of output rows that span several batch items."""
    from moshi_mlx.modules import seanet

    cfg = seanet.SEANetConfig(dimension=64, n_filters=8, ratios=(4, 2))
    encoder, decoder = seanet.SEANetEncoder(cfg), seanet.SEANetDecoder(cfg)
    mx.random.seed(5)
    for net in (encoder, decoder):
        for layer in net.layers:
            convs = layer.block[1::2] if isinstance(layer, seanet.ResidualBlock) else [layer]
            for conv in convs:
                if hasattr(conv, "weight"):
                    _randomize(conv, conv.weight.size)
    x = mx.random.normal((3, 8 * 40, 1))
    z = mx.random.normal((3, 40, 64))

    def stream(net, inp, chunks, paths):
        state, outs, start = net.init_state(), [], 0
        for n, host in zip(chunks, paths):
            with monkeypatch.context() as m:
                if not host:
                    m.setattr(seanet._Sequential, "_host_applies", lambda self, x: False)
                y, state = net.step(inp[:, start:start + n], state)
            outs.append(np.array(y))
            start += n
        return np.concatenate(outs, axis=1)

    assert encoder._host_applies(x) and decoder._host_applies(z)
    for net, inp, unit in ((encoder, x, 8), (decoder, z, 1)):
        chunks = [unit, 3 * unit, 36 * unit]
        want = stream(net, inp, chunks, [False] * 3)
        assert np.array_equal(stream(net, inp, chunks, [True] * 3), want)
        assert np.array_equal(stream(net, inp, chunks, [True, False, True]), want)
        assert np.array_equal(stream(net, inp, chunks, [False, True, False]), want)
        single = stream(net, inp[1:2], chunks, [True] * 3)  # a batch item alone: its own bits
        assert np.array_equal(single, want[1:2])
        with monkeypatch.context() as m:
            _mlx_only(m)  # MLX's own ops, no kernel: the same values to float32 rounding
            assert _rel_err(mx.array(want), mx.array(stream(net, inp, chunks, [False] * 3))) < 1e-5


_ISA_SCRIPT = """
import sys
import moshi_mlx, mlx.core as mx, numpy as np
from moshi_mlx.modules.conv import StreamingConv1d
mx.random.seed(0)
layer = StreamingConv1d(70, 37, 5, stride=1, dilation=2)
layer.bias = mx.random.normal((37,))
np.save(sys.argv[1], np.array(layer(mx.random.normal((1, 200, 70)), elu_input=True)))
"""


def _cpu_has_avx512f() -> bool:
    """Whether the kernels' `__builtin_cpu_supports("avx512f")` holds: the flag as Linux reports
    it (it lists avx512f only where the CPU has it and the OS saves its registers)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "avx512f" in line.split() for line in f)
    except OSError:
        return False


def test_avx2_and_avx512_tiles_give_identical_bits(kernels, tmp_path):
    """Same FMAs in the same order per output lane: MOSHI_MLX_AVX512=0 (AVX2 tiles) and =1
    (AVX-512 tiles) give the same bits."""
    if not _cpu_has_avx512f():
        pytest.skip("this CPU has no AVX-512: both runs would use the AVX2 tiles, nothing to compare")
    outs = []
    for flag in ("0", "1"):
        path = tmp_path / f"isa{flag}.npy"
        env = dict(os.environ, MOSHI_MLX_AVX512=flag)
        subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(path)], check=True, env=env)
        outs.append(np.load(path))
    assert np.array_equal(outs[0], outs[1])


def test_conv_kernel_rejects_bad_buffers(kernels):
    x = mx.zeros((1, 10, 4))
    packed = np.zeros((1, 3 * 4, 16), np.float32)
    out = np.empty((1, 8, 5), np.float32)
    kernels.conv1d(None, x, packed, None, out, 1, 0, 10, 8, 4, 5, 3, 1, 1, 0, 2)
    with pytest.raises(ValueError, match="buffer sizes"):
        kernels.conv1d(None, x, packed[:, :6], None, out, 1, 0, 10, 8, 4, 5, 3, 1, 1, 0, 2)
    with pytest.raises(ValueError, match="unsupported shape"):
        kernels.conv1d(None, x, packed, None, out, 1, 0, 10, 9, 4, 5, 3, 1, 1, 0, 2)
    with pytest.raises(ValueError, match="unsupported shape"):
        kernels.residual_block(None, x, packed, None, packed, None, out, 1, 0, 10, 4, 2, 3, 1, 2)


@pytest.mark.reference  # mlx_mimi is built from Kyutai's PyTorch model
def test_mimi_with_and_without_kernels_agree(kernels, monkeypatch, mlx_mimi, speech):
    """The whole codec through MLX's ops (the path of Metal and of CPUs without the kernels)
    against the kernels: the same codes but for near-ties, the same audio to float32
    rounding."""
    x = mx.array(speech[None, None, :3 * 24000])
    codes = mlx_mimi.encode(x, num_quantizers=8).audio_codes
    audio = mlx_mimi.decode(codes).audio_values
    with monkeypatch.context() as m:
        _mlx_only(m)
        codes_mlx = mlx_mimi.encode(x, num_quantizers=8).audio_codes
        audio_mlx = mlx_mimi.decode(codes).audio_values
    same = float(np.mean(np.array(codes) == np.array(codes_mlx)))
    a, b = np.array(audio), np.array(audio_mlx)
    err = np.linalg.norm(a - b) / np.linalg.norm(b)
    print(f"\ncodes equal {same:.4f}, audio relative L2 {err:.1e}")
    assert same >= 0.99 and err < 1e-5


def test_prepared_weights_follow_reloaded_parameters():
    """Derived layouts (the kernel's packing, polyphase taps) are remade when a parameter is
    replaced, as `load_weights` does after a first call."""
    x = mx.random.normal((1, 8, 4))
    for layer in (StreamingConv1d(4, 4, 3), StreamingConvTranspose1d(4, 4, 4, 2),
                  StreamingConvTranspose1d(4, 4, 4, 2, groups=4)):
        before = np.array(layer(x))
        layer.load_weights([("weight", 2 * layer.weight)], strict=False)  # bias is zero
        np.testing.assert_allclose(np.array(layer(x)), 2 * before, rtol=1e-5, atol=1e-6)
