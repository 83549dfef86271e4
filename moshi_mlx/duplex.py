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


class LiveLoop:
    """Runs a DuplexSession against the clock of real audio devices.

    The device callbacks only move buffers (`push_input`, `pull_output`); one model thread
    (`process_one` in a loop, or `run_worker`) echo-cancels, runs the model and queues
    Moshi's frames. With MLX that must be the thread that loaded the model (MLX streams are
    per thread), which is why `moshi-mlx chat` keeps it on the main thread. Lag control: when
    the model falls behind, input frames older than `max_lag_frames` are dropped (and
    counted) so that latency stays bounded instead of growing without end.
    All audio here is mono float32 at the session's 24 kHz.
    """

    def __init__(self, session: DuplexSession, aec=None, max_lag_frames: int = 2, max_out_frames: int = 3,
                 on_frame=None):
        import collections
        import threading

        self.session, self.aec = session, aec
        self.frame = session.frame_size
        self.max_lag_frames, self.max_out_frames = max_lag_frames, max_out_frames
        self.on_frame = on_frame  # called by the model thread with (user_frame, FrameOutput)
        self.in_q: collections.deque = collections.deque()
        self.out_q: collections.deque = collections.deque()
        self.far_q: collections.deque = collections.deque()  # what the speakers played, per frame
        self._in_buf = np.zeros(0, np.float32)
        self._out_buf = np.zeros(0, np.float32)
        self._far_buf = np.zeros(0, np.float32)
        self._wake = threading.Event()
        self.stop_event = threading.Event()
        self.dropped_in = self.dropped_out = self.underruns = self.frames = 0
        self.step_ms = 0.0  # exponential moving average

    # -- device side (callbacks: cheap, no model work) -------------------------------------------
    def push_input(self, pcm: np.ndarray) -> None:
        self._in_buf = np.concatenate([self._in_buf, np.asarray(pcm, np.float32).reshape(-1)])
        while len(self._in_buf) >= self.frame:
            self.in_q.append(self._in_buf[: self.frame].copy())
            self._in_buf = self._in_buf[self.frame:]
            self._wake.set()

    def pull_output(self, n: int) -> np.ndarray:
        while len(self._out_buf) < n:
            if self.out_q:
                self._out_buf = np.concatenate([self._out_buf, self.out_q.popleft()])
            else:  # the model has nothing ready: play silence
                self.underruns += 1
                self._out_buf = np.concatenate([self._out_buf, np.zeros(n - len(self._out_buf), np.float32)])
        out, self._out_buf = self._out_buf[:n], self._out_buf[n:]
        self._far_buf = np.concatenate([self._far_buf, out])
        while len(self._far_buf) >= self.frame:
            self.far_q.append(self._far_buf[: self.frame].copy())
            self._far_buf = self._far_buf[self.frame:]
            while len(self.far_q) > 8:
                self.far_q.popleft()
        return out

    # -- model side -----------------------------------------------------------------------------------
    @property
    def latency_ms(self) -> float:
        """Audio waiting to be processed or played, plus the time one step takes."""
        return (len(self.in_q) + len(self.out_q)) * 80.0 + self.step_ms

    def process_one(self) -> bool:
        """Process the oldest pending input frame, if any. Returns whether one was processed."""
        import time

        while len(self.in_q) > self.max_lag_frames:  # fell behind: keep only the newest frames
            self.in_q.popleft()
            self.dropped_in += 1
        if not self.in_q:
            return False
        user = self.in_q.popleft()
        far = self.far_q.popleft() if self.far_q else np.zeros(self.frame, np.float32)
        near = self.aec.process(user, far) if self.aec is not None else user
        t0 = time.perf_counter()
        out = self.session.step(near)
        dt = (time.perf_counter() - t0) * 1e3
        self.step_ms = dt if self.frames == 0 else 0.9 * self.step_ms + 0.1 * dt
        self.frames += 1
        self.out_q.append(out.pcm)
        while len(self.out_q) > self.max_out_frames:
            self.out_q.popleft()
            self.dropped_out += 1
        if self.on_frame is not None:
            self.on_frame(near, out)
        return True

    def run_worker(self) -> None:
        while not self.stop_event.is_set():
            if not self.process_one():
                self._wake.wait(0.01)
                self._wake.clear()
