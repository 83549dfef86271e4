"""Acoustic echo cancellation with WebRTC's audio processing module (via the `livekit` package).

Moshi's own voice comes back through the microphone when the user has no headphones; without
cancellation Moshi hears itself. The far end (what the speakers play) is fed as the reverse
stream; the microphone signal is the near end. WebRTC works on 10 ms int16 frames.
"""
from __future__ import annotations

import numpy as np

from .errors import MoshiMlxError


class EchoCanceller:
    def __init__(self, sample_rate: int = 24000, delay_ms: int = 40, noise_suppression: bool = False):
        try:
            from livekit import rtc
        except ImportError:
            raise MoshiMlxError("echo cancellation needs the `livekit` package (pip install livekit); "
                                "or run with --no-aec and headphones") from None
        self._rtc = rtc
        self.rate = sample_rate
        self.chunk = sample_rate // 100  # 10 ms
        self.delay_ms = delay_ms
        self.apm = rtc.AudioProcessingModule(echo_cancellation=True, noise_suppression=noise_suppression,
                                             high_pass_filter=True, auto_gain_control=False)

    def _frame(self, x: np.ndarray):
        data = (np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)
        return self._rtc.AudioFrame(data.tobytes(), self.rate, 1, self.chunk)

    def process(self, near: np.ndarray, far: np.ndarray) -> np.ndarray:
        """near: the microphone's frame; far: what the speakers played over the same span
        (both float32, a multiple of 10 ms). Returns the microphone with the echo removed."""
        if len(near) % self.chunk or len(far) != len(near):
            raise ValueError(f"AEC frames must be equal multiples of {self.chunk} samples")
        out = np.empty(len(near), np.float32)
        for i in range(0, len(near), self.chunk):
            self.apm.process_reverse_stream(self._frame(far[i:i + self.chunk]))
            self.apm.set_stream_delay_ms(self.delay_ms)
            frame = self._frame(near[i:i + self.chunk])
            self.apm.process_stream(frame)
            out[i:i + self.chunk] = np.frombuffer(frame.data, dtype=np.int16).astype(np.float32) / 32767.0
        return out
