"""The full-duplex loop, one 80 ms frame at a time: user audio in, Moshi's audio and text out.

    user pcm [1920] → Mimi encode_step → LMGen.step → Mimi decode_step → Moshi pcm [1920]

Independent of audio devices: the chat app feeds it from a microphone (or a file) and
plays (or writes) what it returns. Until the LM's delays have warmed up, and whenever it
returns nothing, Moshi's frame is silence, so output frame t always lines up with input t.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .generate import LMGen


@dataclass
class FrameOutput:
    pcm: np.ndarray  # [frame_size] float32, Moshi's audio for this frame
    text: str | None  # the text piece Moshi produced this frame (None: padding or warm-up)
    tokens: np.ndarray | None  # [1 + dep_q] text + audio tokens (None during warm-up)


@dataclass
class DuplexStats:
    frames: int = 0
    text: list[str] = field(default_factory=list)


class DuplexSession:
    """Streams one conversation. `reset()` starts a new one; sessions have no length limit."""

    def __init__(self, model, mimi=None, tokenizer=None, **gen_kwargs):
        """`model`: MoshiForConditionalGeneration; `mimi` defaults to model.mimi; `tokenizer`
        renders text pieces (optional); gen_kwargs go to LMGen (temp, temp_text, top_k, …)."""
        self.model = model
        self.mimi = mimi if mimi is not None else model.mimi
        self.tokenizer = tokenizer
        self.gen = LMGen(model, **gen_kwargs)
        self.n_user = model.config.num_user_codebooks
        self.frame_size = self.mimi.frame_size
        self.stats = DuplexStats()
        self.reset()

    def reset(self) -> None:
        self.mimi.reset_state()
        self.gen.reset(1)
        self.stats = DuplexStats()

    def step(self, pcm: np.ndarray) -> FrameOutput:
        """One frame of the user's audio ([frame_size] float32 at 24 kHz) → Moshi's frame."""
        frame = np.asarray(pcm, np.float32).reshape(1, 1, self.frame_size)
        codes = self.mimi.encode_step(mx.array(frame), num_quantizers=self.n_user)  # [1, n_user, 1]
        tokens = self.gen.step(np.array(codes)[:, :, 0])
        self.stats.frames += 1
        if tokens is None:
            return FrameOutput(np.zeros(self.frame_size, np.float32), None, None)
        audio = self.mimi.decode_step(mx.array(tokens[:, 1:, None].astype(np.int32)))
        text = self.tokenizer.piece(int(tokens[0, 0])) if self.tokenizer is not None else None
        if text:
            self.stats.text.append(text)
        return FrameOutput(np.array(audio)[0, 0], text, tokens[0])
