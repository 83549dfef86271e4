"""Live-mode building blocks without devices: echo cancellation and lag control."""
from __future__ import annotations

import threading
import time

import numpy as np

from moshi_mlx.aec import EchoCanceller
from moshi_mlx.duplex import FrameOutput, LiveLoop


def test_echo_cancellation_removes_15db(speech):
    """Synthetic echo: what the speakers play (speech), 40 ms later at half amplitude, plus a
    little noise, in the microphone. After convergence (second half), the cancelled input
    carries at least 15 dB less echo energy than the raw one."""
    far = speech[: 10 * 24000] * 0.5
    delay = int(0.04 * 24000)
    echo = np.concatenate([np.zeros(delay, np.float32), far[:-delay]]) * 0.5
    near = echo + 0.001 * np.random.default_rng(0).standard_normal(len(echo)).astype(np.float32)
    aec = EchoCanceller(24000, delay_ms=40)
    out = np.concatenate([aec.process(near[i:i + 1920], far[i:i + 1920]) for i in range(0, len(near) - 1919, 1920)])
    half = len(out) // 2
    reduction_db = 10 * np.log10(np.sum(near[half:len(out)] ** 2) / np.sum(out[half:] ** 2))
    assert reduction_db >= 15, reduction_db


class SlowSession:
    """Stands in for a DuplexSession whose step takes longer than the 80 ms frame."""

    frame_size = 1920

    def __init__(self, step_s: float):
        self.step_s = step_s

    def step(self, pcm):
        time.sleep(self.step_s)
        return FrameOutput(pcm * 0.5, None, None)


def test_lag_control_bounds_latency_and_counts_drops():
    """Real-time input (one 80 ms frame every 80 ms) into a model that needs 150 ms per frame:
    frames are dropped and counted, and the latency stays bounded instead of growing."""
    loop = LiveLoop(SlowSession(0.15), max_lag_frames=2)
    worker = threading.Thread(target=loop.run_worker, daemon=True)
    worker.start()
    latencies = []
    t0 = time.perf_counter()
    for i in range(40):  # 3.2 s of audio
        loop.push_input(np.full(1920, 0.1, np.float32))
        loop.pull_output(1920)
        latencies.append(loop.latency_ms)
        time.sleep(max(0.0, t0 + (i + 1) * 0.08 - time.perf_counter()))
    loop.stop_event.set()
    worker.join(1)
    assert loop.dropped_in >= 10  # about half the frames could not be processed in time
    assert loop.frames >= 15
    assert max(latencies) <= (2 + 3 + 1) * 80 + 200, max(latencies)  # queues are bounded
    assert loop.underruns > 0  # and the speakers got silence instead of stale audio


def test_fast_model_keeps_up_without_drops():
    loop = LiveLoop(SlowSession(0.01), max_lag_frames=2)
    worker = threading.Thread(target=loop.run_worker, daemon=True)
    worker.start()
    t0 = time.perf_counter()
    for i in range(25):
        loop.push_input(np.full(1920, 0.1, np.float32))
        loop.pull_output(1920)
        time.sleep(max(0.0, t0 + (i + 1) * 0.08 - time.perf_counter()))
    loop.stop_event.set()
    worker.join(1)
    assert loop.dropped_in == 0 and loop.frames >= 24
