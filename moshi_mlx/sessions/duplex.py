"""The full-duplex loop, one 80 ms frame at a time: user audio in, Moshi's audio and text out.

    user pcm [1920] → Mimi encode_step → LMGen.step → Mimi decode_step → Moshi pcm [1920]

Independent of audio devices: the chat app feeds it from a microphone (or a file), the
server from a websocket, and plays (or writes) what it returns. Until the LM's delays have
warmed up, and whenever it returns nothing, Moshi's frame is silence, so output frame t
always lines up with input t. The session owns its state (Mimi's and the LM's): several
sessions share one loaded model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from ..errors import InputError
from .lmgen import LMGen


@dataclass
class FrameOutput:
    pcm: np.ndarray  # [frame_size] float32, Moshi's audio for this frame
    text: str | None  # the text piece Moshi produced this frame (None: padding or warm-up)
    tokens: np.ndarray | None  # [1 + dep_q] text + audio tokens (None during warm-up)


@dataclass
class DuplexStats:
    frames: int = 0
    text: list[str] = field(default_factory=list)
    # The last step's split, in ms (taken at the host synchronisations the step has anyway).
    encode_ms: float = 0.0
    lm_ms: float = 0.0
    decode_ms: float = 0.0


def check_duplex_config(config: dict, source: str = "config.json") -> None:
    """Refuses, before any weight loads, a checkpoint that cannot hold a conversation
    (`config`: the LM config of checkpoints.lm.read), naming the command that fits it."""
    kind = config.get("model_type") or "moshi"
    if kind in ("stt", "tts") or not config.get("dep_q", 8):
        fits = {"stt": "`moshi-mlx transcribe` (moshi_mlx.SpeechToText)",
                "tts": "`moshi-mlx tts` (moshi_mlx.TextToSpeech)"}.get(kind)
        raise InputError(f"{source}: this is a {kind!r} model (dep_q = {config.get('dep_q', 8)}), not a Moshi "
                         "speech-to-speech one: a conversation needs e.g. kyutai/moshiko-mlx-q4"
                         + (f"; use {fits} with it" if fits else ""))


class DuplexSession:
    """Streams one conversation. `reset()` starts a new one; sessions have no length limit."""

    def __init__(self, lm, mimi, tokenizer=None, **gen_kwargs):
        """`lm`: the LMModel (or a model with `.lm`); `mimi`: its MimiModel; `tokenizer`
        renders text pieces (optional); gen_kwargs go to LMGen (temp, temp_text, top_k, …)."""
        self.gen = LMGen(lm, **gen_kwargs)
        self.lm = self.gen.lm
        if self.lm.config.dep_q == 0:
            model = self.lm.config.model_type or "text-only"
            raise InputError(f"this checkpoint ({model} model, dep_q = 0) has no depformer, so it cannot speak: "
                             "the duplex chat needs a Moshi speech model (e.g. kyutai/moshiko-mlx-q4); "
                             "speech-to-text checkpoints run with `moshi-mlx transcribe` (moshi_mlx.SpeechToText)")
        self.mimi = mimi
        self.tokenizer = tokenizer
        self.n_user = self.lm.config.num_user_codebooks
        self.frame_size = mimi.frame_size
        self.reset()

    def reset(self) -> None:
        self.mimi_state = self.mimi.init_state(1)
        self.gen.reset(1)
        self.stats = DuplexStats()

    def step(self, pcm: np.ndarray) -> FrameOutput:
        """One frame of the user's audio ([frame_size] float32 at 24 kHz) → Moshi's frame."""
        stats = self.stats
        t0 = time.perf_counter()
        frame = np.asarray(pcm, np.float32).reshape(1, 1, self.frame_size)
        codes, _ = self.mimi.encode_step(frame, self.mimi_state, num_quantizers=self.n_user)  # [1, n_user, 1]
        codes = np.array(codes)[:, :, 0]
        t1 = time.perf_counter()
        tokens = self.gen.step(codes)
        t2 = time.perf_counter()
        stats.frames += 1
        stats.encode_ms, stats.lm_ms, stats.decode_ms = (t1 - t0) * 1e3, (t2 - t1) * 1e3, 0.0
        if tokens is None:
            return FrameOutput(np.zeros(self.frame_size, np.float32), None, None)
        audio, _ = self.mimi.decode_step(mx.array(tokens[:, 1:, None].astype(np.int32)), self.mimi_state)
        pcm_out = np.array(audio)[0, 0]
        stats.decode_ms = (time.perf_counter() - t2) * 1e3
        text = self.tokenizer.piece(int(tokens[0, 0])) if self.tokenizer is not None else None
        if text:
            stats.text.append(text)
        return FrameOutput(pcm_out, text, tokens[0])
