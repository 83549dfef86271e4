"""Live audio devices around a DuplexSession (see LiveLoop)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .duplex import DuplexSession, FrameOutput


class LiveLoop:
    """Runs a DuplexSession against the clock of real audio devices.

    The device callbacks only move buffers (`push_input`, `pull_output`); one model thread
    (`process_one` in a loop, or `run_worker`) echo-cancels, runs the model and queues
    Moshi's frames. With MLX that must be the thread that loaded the model (MLX streams are
    per thread), which is why `moshi-mlx chat` keeps it on the main thread. Lag control: when
    the model falls behind (or a network client sends faster than real time), input frames
    older than `max_lag_frames` are dropped (and counted) so that latency and memory stay
    bounded instead of growing without end; so are Moshi's frames beyond `max_out_frames`
    that nobody takes (`pull_output` for a device, `pop_output` for a network client).
    All audio here is mono float32 at the session's 24 kHz.

    `clock` (seconds, default time.perf_counter) times the model's steps: tests pass a fake one
    and drive push_input / process_one / pull_output from one thread, without sleeping.

    Two kinds of output underrun are counted:
      * `underruns`: pull_output found no frame of Moshi's ready (it returns silence);
      * `device_underruns`: the output device's callback got fewer samples than it asked for
        (the app reports each callback with `count_device_output`, which also counts the
        device's own underflow flag, the xruns ALSA complains about). Callbacks before the
        first sample was ever played are start-up, not underruns.
    `status_line()` and `summary()` read the same counters, so they cannot disagree.
    """

    def __init__(self, session: DuplexSession, aec=None, max_lag_frames: int = 2, max_out_frames: int = 3,
                 on_frame=None, clock=None):
        import collections
        import threading
        import time

        self.session, self.aec = session, aec
        self.frame = session.frame_size
        self.max_lag_frames, self.max_out_frames = max_lag_frames, max_out_frames
        self.on_frame = on_frame  # called by the model thread with (user_frame, FrameOutput)
        self.clock = clock if clock is not None else time.perf_counter
        self.in_q: collections.deque = collections.deque()
        self.out_q: collections.deque = collections.deque()
        self.far_q: collections.deque = collections.deque()  # what the speakers played, per frame
        self._in_buf = np.zeros(0, np.float32)
        self._out_buf = np.zeros(0, np.float32)
        self._far_buf = np.zeros(0, np.float32)
        self._wake = threading.Event()
        self.stop_event = threading.Event()
        self.dropped_in = self.dropped_out = self.underruns = self.frames = 0
        self.device_underruns = 0  # output callbacks short of samples, or flagged by the device
        self.device_missing = 0  # samples of silence those callbacks played instead (device rate)
        self._device_started = False
        self.step_ms = 0.0  # exponential moving average

    # -- device side (callbacks: cheap, no model work) -------------------------------------------
    def push_input(self, pcm: np.ndarray) -> None:
        self._in_buf = np.concatenate([self._in_buf, np.asarray(pcm, np.float32).reshape(-1)])
        while len(self._in_buf) >= self.frame:
            self.in_q.append(self._in_buf[: self.frame].copy())
            self._in_buf = self._in_buf[self.frame:]
            while len(self.in_q) > self.max_lag_frames:  # the model fell behind: keep the newest frames
                self.in_q.popleft()
                self.dropped_in += 1
            self._wake.set()

    def pull_output(self, n: int) -> np.ndarray:
        while len(self._out_buf) < n:
            if self.out_q:
                self._out_buf = np.concatenate([self._out_buf, self.out_q.popleft().pcm])
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

    def pop_output(self) -> "FrameOutput | None":
        """The oldest of Moshi's frames not yet taken (audio and text), or None: for a consumer
        that sends whole frames on (the server) rather than playing samples."""
        try:
            return self.out_q.popleft()
        except IndexError:
            return None

    def count_device_output(self, requested: int, supplied: int, underflow: bool = False) -> None:
        """Called from the output device's callback: it asked for `requested` samples and got
        `supplied` (the rest is silence); `underflow`: the device's own underrun flag (PortAudio's
        output_underflow). Counts `device_underruns` once playback has started."""
        if supplied > 0:
            self._device_started = True
        if not self._device_started:
            return
        if supplied < requested or underflow:
            self.device_underruns += 1
            self.device_missing += max(requested - supplied, 0)

    # -- model side -----------------------------------------------------------------------------------
    @property
    def latency_ms(self) -> float:
        """Audio waiting to be processed or played, plus the time one step takes."""
        return (len(self.in_q) + len(self.out_q)) * 80.0 + self.step_ms

    def process_one(self) -> bool:
        """Process the oldest pending input frame, if any. Returns whether one was processed."""
        try:
            user = self.in_q.popleft()
        except IndexError:  # nothing pending (push_input already dropped what was too old)
            return False
        far = self.far_q.popleft() if self.far_q else np.zeros(self.frame, np.float32)
        near = self.aec.process(user, far) if self.aec is not None else user
        t0 = self.clock()
        out = self.session.step(near)
        dt = (self.clock() - t0) * 1e3
        self.step_ms = dt if self.frames == 0 else 0.9 * self.step_ms + 0.1 * dt
        self.frames += 1
        self.out_q.append(out)
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

    # -- reporting -----------------------------------------------------------------------------------
    def status_line(self) -> str:
        """The live status line (`moshi-mlx chat` rewrites it twice a second)."""
        return (f"[{self.step_ms:5.0f} ms/step, {80.0 / max(self.step_ms, 1e-3):4.2f}x real time, "
                f"latency {self.latency_ms:5.0f} ms, dropped {self.dropped_in}, "
                f"underruns {self.underruns + self.device_underruns}]")

    def summary(self) -> str:
        """The end-of-session line: the same counters as status_line()."""
        return (f"session: {self.frames * 0.08:.1f} s, {self.frames} frames, {self.dropped_in} dropped, "
                f"{self.underruns + self.device_underruns} output underruns ({self.device_underruns} at the device, "
                f"{self.underruns} with no frame ready), {self.step_ms:.0f} ms per step")
