"""Speech-to-text with Kyutai's delayed-streams STT models (kyutai/stt-1b-en_fr, stt-2.6b-en).

An STT model is the Moshi LM with no depformer (dep_q = 0): each 80 ms step reads the 32
Mimi codebooks of one frame and emits one text token, the text lagging the audio by the
model's `audio_delay_seconds`. Semantics follow `moshi.run_inference` (0.2.13), which is
what aligns PyTorch with Kyutai's MLX and Rust servers:

- the audio is left-padded with `audio_silence_prefix_seconds` of silence and right-padded
  with `audio_delay_seconds + 1.0` s so that the last words come out; only whole 1920-sample
  frames are fed;
- the first frame is stepped twice: LMGen replaces the inputs of its very first step by
  the initial tokens, so without the repeat the first frame would never be seen;
- greedy decoding (Kyutai's `lm_gen_config` for STT: temp 0).

Each stream owns its Mimi and LM state; any number run on one loaded model. When the
checkpoint has extra heads (semantic VAD), each step also gives their softmax
probabilities [heads, classes]: class 0 is the probability that the speaker has paused.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .lmgen import LMGen


@dataclass
class Transcript:
    tokens: np.ndarray  # [steps] int: one text token per step, as the reference produces them
    text: str
    pause_prob: np.ndarray | None  # [steps, heads] class-0 probability of each VAD head (None: no heads)


@dataclass
class SttConfig:
    audio_delay_seconds: float = 0.0
    audio_silence_prefix_seconds: float = 0.0

    @classmethod
    def from_dict(cls, d: dict | None) -> "SttConfig":
        d = d or {}
        return cls(float(d.get("audio_delay_seconds", 0.0)), float(d.get("audio_silence_prefix_seconds", 0.0)))


class SttStream:
    """One live transcription (or a batch of them, fed in lockstep): `step(pcm)` per frame."""

    def __init__(self, stt: "SpeechToText", batch_size: int = 1):
        self.stt = stt
        self.batch_size = batch_size
        self.mimi_state = stt.mimi.init_state(batch_size)
        self.gen = LMGen(stt.lm, temp=0.0, temp_text=0.0)
        self.gen.reset(batch_size)
        self.first = True

    def step(self, pcm: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """pcm [B, 1920] (or [1920] when B = 1) float32 at 24 kHz → (text tokens [B],
        extra-head probabilities [B, heads, classes] or None)."""
        frame = np.asarray(pcm, np.float32).reshape(self.batch_size, 1, -1)
        codes, _ = self.stt.mimi.encode_step(frame, self.mimi_state, num_quantizers=self.stt.num_codebooks)
        return self.step_codes(np.array(codes)[:, :, 0])

    def step_codes(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The LM half of `step`, for a frame's Mimi codes [B, 32] already at hand."""
        if self.first:  # see the module docstring: the first frame is stepped twice
            self.gen.step(codes)
            self.first = False
        tokens = self.gen.step(codes)[:, 0]
        probs = None
        if self.stt.lm.extra_heads:
            probs = np.array(self.stt.lm.extra_head_probs(self.gen.transformer_out))
        return tokens, probs


class SpeechToText:
    """An STT model with its Mimi and tokenizer, shared by any number of streams."""

    def __init__(self, lm, mimi, tokenizer, stt_config: SttConfig):
        if lm.config.dep_q != 0:
            raise InputError("this checkpoint is a speech-to-speech Moshi model (it has a depformer), not a "
                             "speech-to-text one: use `moshi-mlx chat` with it")
        if mimi.config.num_quantizers < lm.config.n_q:
            raise InputError(f"the LM reads {lm.config.n_q} codebooks, its Mimi has {mimi.config.num_quantizers}")
        self.lm, self.mimi, self.tokenizer, self.stt_config = lm, mimi, tokenizer, stt_config
        self.num_codebooks = lm.config.n_q
        self.frame_size = mimi.frame_size
        self.sample_rate = mimi.sampling_rate

    @classmethod
    def from_pretrained(cls, source: str | Path, quantize: int | None = None, revision: str | None = None
                        ) -> "SpeechToText":
        from ..models.loading import load

        model = load(source, revision=revision, quantize=quantize)
        return cls(model.lm, model.mimi, model.tokenizer, SttConfig.from_dict(model.lm.config.stt_config))

    def stream(self, batch_size: int = 1) -> SttStream:
        return SttStream(self, batch_size)

    def padded(self, pcm: np.ndarray) -> np.ndarray:
        """The silence before and after the audio, and whole frames only (see the docstring)."""
        left = int(self.stt_config.audio_silence_prefix_seconds * self.sample_rate)
        right = int((self.stt_config.audio_delay_seconds + 1.0) * self.sample_rate)
        x = np.pad(np.asarray(pcm, np.float32), (left, right))
        return x[: len(x) // self.frame_size * self.frame_size]

    def transcribe(self, audio: np.ndarray | str | Path) -> Transcript:
        """A whole recording (24 kHz mono float32 samples, or any audio file) → Transcript."""
        if isinstance(audio, (str, Path)):
            from ..audio import read_audio

            audio = read_audio(audio, self.sample_rate).pcm
        pcm = self.padded(audio)
        stream = self.stream(1)
        tokens, probs = [], []
        for i in range(0, len(pcm), self.frame_size):
            tok, p = stream.step(pcm[i:i + self.frame_size])
            tokens.append(int(tok[0]))
            if p is not None:
                probs.append(p[0, :, 0])
        tokens = np.array(tokens, np.int64)
        text = self.tokenizer.decode(tokens) if self.tokenizer is not None else ""
        return Transcript(tokens, text, np.stack(probs) if probs else None)

