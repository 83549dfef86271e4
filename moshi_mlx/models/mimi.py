"""Mimi, Kyutai's streaming neural audio codec: 24 kHz audio ↔ 12.5 Hz discrete codes.

Faithful to Kyutai's PyTorch `moshi.models.compression.MimiModel` (0.2.13); the public API
mirrors transformers' `MimiModel` (arrays in its layouts: audio [B, 1, L], codes [B, n, T]).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..checkpoints import mimi as mimi_ckpt
from ..checkpoints.lm import LmCheckpoint
from ..config import ConfigMixin
from ..cpu import kernels as cpu
from ..errors import CheckpointError, InputError
from ..modules.conv import ConvState, StreamingConv1d, StreamingConvTranspose1d
from ..modules.rvq import SplitResidualVectorQuantizer
from ..modules.seanet import SEANetConfig, SEANetDecoder, SEANetEncoder, SEANetState
from ..modules.transformer import Transformer, TransformerConfig, TransformerState
from .base import assign


@dataclass
class MimiConfig(ConfigMixin):
    """Every field of transformers' MimiConfig, with the same defaults (Kyutai's release)."""

    sampling_rate: int = 24_000
    frame_rate: float = 12.5
    audio_channels: int = 1
    hidden_size: int = 512
    num_filters: int = 64
    num_residual_layers: int = 1
    upsampling_ratios: list[int] = field(default_factory=lambda: [8, 6, 5, 4])
    kernel_size: int = 7
    last_kernel_size: int = 3
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    use_causal_conv: bool = True
    pad_mode: str = "constant"
    compress: int = 2
    trim_right_ratio: float = 1.0
    codebook_size: int = 2048
    codebook_dim: int = 256
    num_quantizers: int = 32
    use_conv_shortcut: bool = False
    vector_quantization_hidden_dimension: int = 256
    num_semantic_quantizers: int = 1
    upsample_groups: int = 512
    num_hidden_layers: int = 8
    intermediate_size: int = 2048
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    head_dim: int | None = None
    hidden_act: str = "gelu"
    max_position_embeddings: int = 8000
    initializer_range: float = 0.02
    norm_eps: float = 1e-5
    use_cache: bool = False
    use_streaming: bool = False
    rope_theta: float = 10_000.0
    sliding_window: int = 250
    attention_dropout: float = 0.0
    layer_scale_initial_scale: float = 0.01
    attention_bias: bool = False
    model_type: str = "mimi"

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        problems = []
        if not self.use_causal_conv:
            problems.append("use_causal_conv=False (only causal Mimi is supported)")
        if self.trim_right_ratio != 1.0:
            problems.append(f"trim_right_ratio={self.trim_right_ratio} (only 1.0 is supported)")
        if self.num_key_value_heads != self.num_attention_heads:
            problems.append("num_key_value_heads != num_attention_heads (no grouped-query attention in Mimi)")
        if self.hidden_act != "gelu":
            problems.append(f"hidden_act={self.hidden_act!r} (only exact 'gelu')")
        if self.use_conv_shortcut:
            problems.append("use_conv_shortcut=True (Mimi uses identity skips)")
        if self.upsample_groups not in (1, self.hidden_size):
            problems.append(f"upsample_groups={self.upsample_groups}")
        if not 0 < self.num_semantic_quantizers < self.num_quantizers:
            problems.append("num_semantic_quantizers must be in [1, num_quantizers)")
        if problems:
            raise ValueError("unsupported MimiConfig: " + "; ".join(problems))

    # -- derived sizes ------------------------------------------------------------
    @property
    def hop_length(self) -> int:
        """Samples per encoder step (SEANet's total stride): 960 at 24 kHz."""
        return math.prod(self.upsampling_ratios)

    @property
    def encodec_frame_rate(self) -> float:
        return self.sampling_rate / self.hop_length

    @property
    def frame_size(self) -> int:
        """Samples per code frame: 1920 for the release (80 ms)."""
        return int(round(self.sampling_rate / self.frame_rate))

    @property
    def num_codebooks(self) -> int:
        return self.num_quantizers

    # -- serialisation --------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MimiConfig":
        """Accepts our own dicts and transformers' config.json (unknown keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("frame_rate") is None:
            kwargs.pop("frame_rate", None)
            if d.get("_frame_rate") is not None:
                kwargs["frame_rate"] = d["_frame_rate"]
        return cls(**kwargs)


    # -- building blocks ------------------------------------------------------------
    def seanet(self) -> SEANetConfig:
        return SEANetConfig(
            channels=self.audio_channels, dimension=self.hidden_size, n_filters=self.num_filters,
            n_residual_layers=self.num_residual_layers, ratios=tuple(self.upsampling_ratios),
            kernel_size=self.kernel_size, residual_kernel_size=self.residual_kernel_size,
            last_kernel_size=self.last_kernel_size, dilation_base=self.dilation_growth_rate,
            compress=self.compress, pad_mode=self.pad_mode)

    def transformer(self) -> TransformerConfig:
        return TransformerConfig(
            d_model=self.hidden_size, num_heads=self.num_attention_heads, num_layers=self.num_hidden_layers,
            dim_feedforward=self.intermediate_size, context=self.sliding_window, causal=True,
            max_period=self.rope_theta, positional_embedding="rope", norm="layer_norm", gating="none",
            layer_scale=self.layer_scale_initial_scale, bias_attn=self.attention_bias)


@dataclass
class MimiEncoderOutput:
    audio_codes: mx.array  # [B, n, T] int32


@dataclass
class MimiDecoderOutput:
    audio_values: mx.array  # [B, 1, L] float32


@dataclass
class MimiOutput:
    audio_codes: mx.array
    audio_values: mx.array


@dataclass
class MimiState:
    """One stream's state (made by `MimiModel.init_state`): the encoder's and the decoder's
    halves are independent (a transcription only ever uses the first). Updated in place by
    `encode_step` / `decode_step`, which also return it."""

    batch_size: int
    encoder: SEANetState | None  # None: a model that only decodes (MimiModel.drop_encoder)
    encoder_transformer: TransformerState | None
    downsample: ConvState | None
    upsample: ConvState | None
    decoder_transformer: TransformerState
    decoder: SEANetState


def _as_array(x: Any, what: str) -> mx.array:
    if isinstance(x, mx.array):
        return x
    try:
        return mx.array(np.asarray(x))
    except Exception as e:  # noqa: BLE001 - report what the caller passed
        raise InputError(f"{what}: expected a numpy or mlx array, got {type(x).__name__} ({e})") from None


class MimiModel(nn.Module):
    """Mimi codec, weights only. Batch: `encode`, `decode`, `__call__`. Streaming, with
    explicit state: `state = mimi.init_state(batch)`, `codes, state = mimi.encode_step(pcm,
    state)`, `pcm, state = mimi.decode_step(codes, state)`; one model serves any number of
    streams."""

    def __init__(self, config: MimiConfig | None = None):
        super().__init__()
        cfg = config or MimiConfig()
        self.config = cfg
        seanet = cfg.seanet()
        self.encoder = SEANetEncoder(seanet)
        self.decoder = SEANetDecoder(seanet)
        # rows alone: streams encoded together get the codes each gets alone (rowwise_linear)
        self.encoder_transformer = Transformer(replace(cfg.transformer(), rowwise_products=True))
        self.decoder_transformer = Transformer(cfg.transformer())
        stride = int(round(cfg.encodec_frame_rate / cfg.frame_rate))
        if stride * cfg.frame_rate != cfg.encodec_frame_rate:
            raise ValueError(f"frame_rate {cfg.frame_rate} must divide the encoder rate {cfg.encodec_frame_rate}")
        # Kyutai's ConvDownsample1d / ConvTrUpsample1d: kernel 2·stride, no bias.
        self.downsample = StreamingConv1d(cfg.hidden_size, cfg.hidden_size, 2 * stride, stride=stride,
                                          bias=False, pad_mode="replicate")
        self.upsample = StreamingConvTranspose1d(cfg.hidden_size, cfg.hidden_size, 2 * stride, stride=stride,
                                                 groups=cfg.upsample_groups, bias=False)
        self.quantizer = SplitResidualVectorQuantizer(
            cfg.num_quantizers, cfg.num_semantic_quantizers, cfg.codebook_size, cfg.codebook_dim,
            cfg.hidden_size, cfg.hidden_size)

    # -- loading ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path = "kyutai/mimi", *, revision: str | None = None,
                        dtype: mx.Dtype = mx.float32) -> "MimiModel":
        """A local weights file, a local directory, or a Hugging Face repo id (Kyutai's
        release file or the transformers layout)."""
        return cls.from_checkpoint(mimi_ckpt.read(path_or_repo_id, revision), dtype)

    @classmethod
    def from_checkpoint(cls, ckpt: mimi_ckpt.MimiCheckpoint, dtype: mx.Dtype = mx.float32) -> "MimiModel":
        try:
            config = MimiConfig.from_dict(ckpt.config)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{ckpt.source}: bad Mimi config: {e}") from None
        model = cls(config)
        assign(model, ckpt.weights, ckpt.source, dtype)
        return model

    @classmethod
    def for_lm(cls, lm: "LmCheckpoint", revision: str | None = None) -> "MimiModel":
        """The Mimi that goes with an LM checkpoint: embedded (transformers layout) or
        beside it (Kyutai's repos, converted directories)."""
        embedded = lm.embedded_mimi()
        if embedded is not None:
            return cls.from_checkpoint(embedded)
        return cls.from_pretrained(lm.home, revision=revision)

    @property
    def frame_size(self) -> int:
        return self.config.frame_size

    @property
    def sampling_rate(self) -> int:
        return self.config.sampling_rate

    # -- validation -------------------------------------------------------------------
    ENCODER_PARTS = ("encoder", "encoder_transformer", "downsample")

    @property
    def batch_exact(self) -> bool:
        """Whether a batch's streaming encode gives each item bitwise the codes it gets alone.
        With the CPU kernels every product of the encoder sums each row in one order whatever
        the batch (SEANet's convolutions, the transformer's rowwise products, the RVQ
        searches); elsewhere (Metal, MLX's CPU ops) kernels chosen by the number of rows may
        round differently."""
        return cpu.kernels_available() and mx.default_device() == mx.cpu

    @property
    def has_encoder(self) -> bool:
        return "encoder" in self

    def drop_encoder(self) -> None:
        """Free the encoder's weights (SEANet encoder, its transformer, the downsampling:
        156 MB in float32), for a model that only decodes (TextToSpeech). Encoding then
        raises InputError; decoding is unchanged."""
        for name in self.ENCODER_PARTS:
            if name in self:
                del self[name]
        mx.clear_cache()  # hand the freed buffers back now, not at the next allocation

    def _check_audio(self, x: Any, streaming: bool) -> mx.array:
        """Shape and dtype always (metadata: free); values (NaN/Inf) in batch calls, and in
        streaming only for host (numpy) input, so a stream of mx arrays never waits on a
        host synchronisation per frame."""
        if not self.has_encoder:
            raise InputError("this MimiModel only decodes (its encoder was dropped, see drop_encoder): "
                             "load another one to encode audio")
        host = x if isinstance(x, np.ndarray) else None
        x = _as_array(x, "input_values")
        if x.ndim != 3 or x.shape[1] != self.config.audio_channels:
            raise InputError(f"input_values must have shape [batch, {self.config.audio_channels}, samples], "
                             f"got {list(x.shape)}")
        if x.shape[0] == 0 or x.shape[2] == 0:
            raise InputError(f"input_values is empty (shape {list(x.shape)})")
        if not mx.issubdtype(x.dtype, mx.floating):
            raise InputError(f"input_values must be floating-point audio in [-1, 1], got dtype {x.dtype}")
        if streaming and x.shape[2] % self.frame_size:
            raise InputError(f"encode_step needs a multiple of {self.frame_size} samples per call "
                             f"(got {x.shape[2]}): buffer the audio into {self.frame_size}-sample frames")
        if host is not None:
            finite = bool(np.isfinite(host).all()) if np.issubdtype(host.dtype, np.floating) else True
        else:
            finite = True if streaming else mx.all(mx.isfinite(x)).item()
        if not finite:
            raise InputError("input_values contains NaN or Inf samples")
        return x.astype(mx.float32)

    def _check_num_quantizers(self, n: int | None) -> int:
        total = self.config.num_quantizers
        if n is None:
            return total
        if not isinstance(n, (int, np.integer)) or not 1 <= n <= total:
            raise InputError(f"num_quantizers must be an integer in [1, {total}], got {n!r}")
        return int(n)

    def _check_codes(self, codes: Any, streaming: bool = False) -> mx.array:
        """Shape always; values in batch calls and for host (numpy) input (see _check_audio)."""
        host = codes if isinstance(codes, np.ndarray) else None
        codes = _as_array(codes, "audio_codes")
        total, card = self.config.num_quantizers, self.config.codebook_size
        if codes.ndim != 3 or not 1 <= codes.shape[1] <= total:
            raise InputError(f"audio_codes must have shape [batch, n (1..{total}), frames], got {list(codes.shape)}")
        if codes.shape[0] == 0 or codes.shape[2] == 0:
            raise InputError(f"audio_codes is empty (shape {list(codes.shape)})")
        if streaming and host is None:
            if mx.issubdtype(codes.dtype, mx.floating):
                raise InputError(f"audio_codes must be integers, got dtype {codes.dtype}")
            return codes.astype(mx.int32)
        if mx.issubdtype(codes.dtype, mx.floating):
            if not mx.all(codes == mx.floor(codes)).item():
                raise InputError("audio_codes must be integers")
        lo, hi = mx.min(codes).item(), mx.max(codes).item()
        if lo < 0 or hi >= card:
            raise InputError(f"audio_codes must lie in [0, {card}), found values in [{lo}, {hi}]")
        return codes.astype(mx.int32)

    # -- batch ------------------------------------------------------------------------------
    # Batch calls run as exact streaming over segments (see `init_state(exact=True)`): the
    # result equals one whole-sequence pass, memory is bounded by the segment, and a
    # progress callback can report each segment.
    SEGMENT_FRAMES = 64

    def _pad_to_frames(self, x: mx.array) -> mx.array:
        # Kyutai 0.2.13 zero-pads the input to a whole number of frames, then runs the
        # same causal convolutions as streaming.
        extra = -x.shape[2] % self.frame_size
        return mx.pad(x, [(0, 0), (0, 0), (0, extra)]) if extra else x

    def _segments(self, x: mx.array, fn: Callable[[mx.array], mx.array], per_frame: int,
                  progress: Callable[[int, int], None] | None) -> mx.array:
        """Apply the streaming `fn` to x [..., T·per_frame] segment by segment, exactly."""
        total = x.shape[-1] // per_frame
        state = self.init_state(x.shape[0], exact=True)
        outs = []
        for start in range(0, total, self.SEGMENT_FRAMES):
            stop = min(total, start + self.SEGMENT_FRAMES)
            outs.append(fn(x[..., start * per_frame: stop * per_frame], state))
            mx.eval(outs[-1])
            if progress is not None:
                progress(stop, total)
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=-1)

    def encode_to_latent(self, input_values: Any) -> mx.array:
        """Unquantized latent [B, hidden_size, T] (what the quantizers see)."""
        x = self._pad_to_frames(self._check_audio(input_values, streaming=False))
        return self._segments(x, lambda seg, st: self._latent(seg.transpose(0, 2, 1), st).transpose(0, 2, 1),
                              self.frame_size, None)

    def encode(self, input_values: Any, padding_mask: Any = None, num_quantizers: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> MimiEncoderOutput:
        """input_values [B, 1, L] → `.audio_codes` [B, n, ceil(L / 1920)].

        Like transformers, `padding_mask` is accepted but does not change the codes (the
        model is causal: padding at the end cannot affect earlier frames). `progress` is
        called as progress(frames_done, frames_total).
        """
        n = self._check_num_quantizers(num_quantizers)
        x = self._check_audio(input_values, streaming=False)
        if padding_mask is not None:
            self._check_padding_mask(padding_mask, x.shape[0], x.shape[2])
        codes = self._segments(self._pad_to_frames(x), lambda seg, st: self._encode_frames(seg, n, st),
                               self.frame_size, progress)
        return MimiEncoderOutput(codes)

    def decode(self, audio_codes: Any, padding_mask: Any = None,
               progress: Callable[[int, int], None] | None = None) -> MimiDecoderOutput:
        """audio_codes [B, n, T] → `.audio_values` [B, 1, T·1920], trimmed to
        `padding_mask.shape[-1]` samples when a padding mask is given."""
        codes = self._check_codes(audio_codes)
        audio = self._segments(codes, self._decode_frames, 1, progress)
        if padding_mask is not None:
            length = self._check_padding_mask(padding_mask, codes.shape[0], None)
            audio = audio[..., :length]
        return MimiDecoderOutput(audio)

    def __call__(self, input_values: Any, padding_mask: Any = None, num_quantizers: int | None = None,
                 ) -> MimiOutput:
        codes = self.encode(input_values, padding_mask, num_quantizers).audio_codes
        audio = self.decode(codes, padding_mask).audio_values
        return MimiOutput(codes, audio)

    @staticmethod
    def _check_padding_mask(mask: Any, batch: int, length: int | None) -> int:
        shape = tuple(np.shape(mask)) if not isinstance(mask, mx.array) else tuple(mask.shape)
        if len(shape) not in (2, 3) or shape[0] != batch or (length is not None and shape[-1] != length):
            want = f"[{batch}, {length if length is not None else 'samples'}]"
            raise InputError(f"padding_mask must have shape {want}, got {list(shape)}")
        return shape[-1]

    # -- the pipeline, one streaming step ----------------------------------------------------
    def _latent(self, x: mx.array, st: MimiState) -> mx.array:
        """[B, L, 1] → pre-quantization latent [B, T, D] at the frame rate."""
        h, st.encoder = self.encoder.step(x, st.encoder)
        h, st.encoder_transformer = self.encoder_transformer.step(h, st.encoder_transformer)
        h, st.downsample = self.downsample.step(h, st.downsample)
        return h

    def _encode_frames(self, pcm: mx.array, n: int, st: MimiState) -> mx.array:
        """[B, 1, 1920·k] → codes [B, n, k]."""
        return self.quantizer.encode(self._latent(pcm.transpose(0, 2, 1), st), n).transpose(0, 2, 1)

    def _decode_frames(self, codes: mx.array, st: MimiState) -> mx.array:
        """codes [B, n, k] → [B, 1, 1920·k]."""
        h, st.upsample = self.upsample.step(self.quantizer.decode(codes.transpose(0, 2, 1)), st.upsample)
        h, st.decoder_transformer = self.decoder_transformer.step(h, st.decoder_transformer)
        h, st.decoder = self.decoder.step(h, st.decoder)
        return h.transpose(0, 2, 1)

    # -- streaming --------------------------------------------------------------------------
    def init_state(self, batch_size: int = 1, exact: bool = False, max_frames: int | None = None) -> MimiState:
        """A fresh stream of `batch_size` items.

        exact=False (default) streams like Kyutai's reference fed one frame per call:
        attention caches are rings of 250 steps written before attending, so once full, the
        first query of a multi-step chunk sees one key less than in batch mode. With
        `max_frames`, calls of up to that many frames compute what one call per frame computes
        (to float32 rounding: the attention's sums run over other key sets; offline
        transcription encodes whole seconds at once, several times faster).
        exact=True keeps the extra keys, so any chunking (of up to SEGMENT_FRAMES frames
        per call) gives the batch result: that is what the batch calls use.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        stride = self.upsample.stride  # transformer steps per frame
        if exact:
            chunk, ring = self.SEGMENT_FRAMES * stride, None
        elif max_frames is not None:
            chunk, ring = max_frames * stride, stride
        else:
            chunk, ring = None, None
        encoder = self.has_encoder
        return MimiState(batch_size, self.encoder.init_state() if encoder else None,
                         self.encoder_transformer.init_state(chunk, ring_step=ring) if encoder else None,
                         None, None, self.decoder_transformer.init_state(chunk, ring_step=ring),
                         self.decoder.init_state())

    def _check_batch(self, x: mx.array, state: MimiState, what: str) -> None:
        if not isinstance(state, MimiState):
            raise InputError(f"{what}: expected the state from mimi.init_state(), got {type(state).__name__}")
        if x.shape[0] != state.batch_size:
            raise InputError(f"{what}: batch of {x.shape[0]} for a stream of {state.batch_size} "
                             "(made by mimi.init_state(batch_size))")

    def encode_step(self, pcm: Any, state: MimiState, num_quantizers: int | None = None
                    ) -> tuple[mx.array, MimiState]:
        """pcm [B, 1, 1920·k] → (codes [B, n, k], state); continues the stream `state`."""
        n = self._check_num_quantizers(num_quantizers)
        x = self._check_audio(pcm, streaming=True)
        self._check_batch(x, state, "encode_step")
        return self._encode_frames(x, n, state), state

    def decode_step(self, codes: Any, state: MimiState) -> tuple[mx.array, MimiState]:
        """codes [B, n, k] → (pcm [B, 1, 1920·k], state); continues the stream `state`."""
        codes = self._check_codes(codes, streaming=True)
        self._check_batch(codes, state, "decode_step")
        return self._decode_frames(codes, state), state
