"""Live-mode building blocks without devices: echo cancellation, lag control and underrun
accounting. The live loop runs on a fake clock: the devices' 80 ms ticks and the model's steps
are simulated in one thread, so the results are exact and do not depend on machine load."""
from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest

from moshi_mlx.aec import EchoCanceller
from moshi_mlx.sessions.duplex import FrameOutput
from moshi_mlx.sessions.live import LiveLoop

FRAME = 1920  # 80 ms at 24 kHz
PERIOD = 0.08


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


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeSession:
    """Stands in for a DuplexSession: each step takes `step_s` of the fake clock."""

    frame_size = FRAME

    def __init__(self, clock: FakeClock, step_s: float):
        self.clock, self.step_s = clock, step_s

    def step(self, pcm):
        self.clock.now += self.step_s
        return FrameOutput(pcm * 0.5, None, None)


def simulate(loop: LiveLoop, clock: FakeClock, ticks: int) -> list[float]:
    """Real-time devices and a model thread, on the fake clock. At each 80 ms tick the speakers
    take a block (pull_output) and the microphone delivers one (push_input); in between, the
    model works whenever it has input: it may start a step at any time before the next tick and
    is busy for the step's duration (an idle model waits for the next tick). Returns the
    latency seen at each tick."""
    latencies = []
    for i in range(ticks):
        t = i * PERIOD
        clock.now = max(clock.now, t)
        loop.pull_output(FRAME)
        loop.push_input(np.full(FRAME, 0.1, np.float32))
        latencies.append(loop.latency_ms)
        while clock.now < t + PERIOD and loop.process_one():
            pass
    return latencies


def test_lag_control_bounds_latency_and_counts_drops():
    """Real-time input (one 80 ms frame every 80 ms) into a model that needs 150 ms per frame:
    frames are dropped and counted, and the latency stays bounded instead of growing."""
    clock, ticks = FakeClock(), 40  # 3.2 s of audio
    loop = LiveLoop(FakeSession(clock, 0.15), max_lag_frames=2, clock=clock)
    latencies = simulate(loop, clock, ticks)
    assert loop.step_ms == pytest.approx(150.0)  # timed on the injected clock
    # the model is never idle: it starts a step every 150 ms from t = 0 until the audio ends
    assert loop.frames == math.ceil(ticks * PERIOD / 0.15) == 22
    # every input frame was processed, dropped, or is still waiting (at most max_lag_frames)
    assert loop.frames + loop.dropped_in + len(loop.in_q) == ticks
    assert len(loop.in_q) <= 2 and loop.dropped_in >= 16  # about half the frames could not be processed
    # queues are bounded: ≤ 3 input frames waiting (the lag limit, plus one that arrived during a
    # step) and ≤ 1 output frame (the speakers drain faster than the model fills), plus one step
    assert max(latencies) <= (3 + 1) * 80 + 150, max(latencies)
    assert max(latencies[ticks // 2:]) <= max(latencies[: ticks // 2]), "latency must not grow"
    # the speakers got silence instead of stale audio: every tick took a frame or was an underrun
    played = loop.frames - loop.dropped_out - len(loop.out_q)
    assert loop.underruns == ticks - played and loop.underruns >= 15


def test_fast_model_keeps_up_without_drops():
    clock, ticks = FakeClock(), 25
    loop = LiveLoop(FakeSession(clock, 0.01), max_lag_frames=2, clock=clock)
    latencies = simulate(loop, clock, ticks)
    assert loop.step_ms == pytest.approx(10.0)
    assert loop.dropped_in == 0 and loop.dropped_out == 0 and loop.frames == ticks
    assert loop.underruns == 1  # only the first tick, before the model produced anything
    assert max(latencies[1:]) == pytest.approx(80 + 10)  # one frame waiting to be played, one step


def test_step_timing_uses_the_injected_clock():
    clock = FakeClock()
    loop = LiveLoop(FakeSession(clock, 0.2), clock=clock)
    for step_s in (0.2, 0.1):
        loop.session.step_s = step_s
        loop.push_input(np.zeros(FRAME, np.float32))
        assert loop.process_one()
    assert loop.step_ms == pytest.approx(0.9 * 200 + 0.1 * 100)  # moving average of 200 and 100 ms
    assert not loop.process_one()  # nothing pending


def test_device_underruns_reach_the_status_line_and_the_summary():
    """`moshi-mlx chat` feeds the output device from its own buffer, pulling Moshi's frames only
    when one is ready: pull_output never runs dry there, so `underruns` stays 0 while the device
    starves. The device's callbacks are counted with count_device_output; the status line and
    the summary report the same numbers (before, the summary said 0 while ALSA reported xruns)."""
    clock = FakeClock()
    loop = LiveLoop(FakeSession(clock, 0.15), clock=clock)  # too slow for real time
    pending = np.zeros(0, np.float32)
    block = 480  # the device asks for 20 ms at a time
    for i in range(80):  # 1.6 s in 20 ms device callbacks, emulating apps/chat.py
        t = i * 0.02
        if i % 4 == 0:  # the microphone delivers 80 ms
            loop.push_input(np.full(FRAME, 0.1, np.float32))
        if clock.now <= t:  # the model thread is free: its last step has finished (pump_once)
            if len(pending) < 2 * FRAME and loop.out_q:
                pending = np.concatenate([pending, loop.pull_output(FRAME)])
            clock.now = t
            loop.process_one()
        n = min(block, len(pending))  # the output callback (on_output)
        pending = pending[n:]
        loop.count_device_output(block, n)
    assert loop.underruns == 0  # the old counter saw nothing
    assert loop.device_underruns > 0 and loop.device_missing > 0
    total = loop.underruns + loop.device_underruns
    assert f"underruns {total}]" in loop.status_line(), loop.status_line()
    assert f"{total} output underruns ({loop.device_underruns} at the device" in loop.summary(), loop.summary()


def test_device_underrun_accounting():
    loop = LiveLoop(FakeSession(FakeClock(), 0.01))
    loop.count_device_output(480, 0)  # start-up: nothing was ever played yet
    loop.count_device_output(480, 0)
    assert loop.device_underruns == 0
    loop.count_device_output(480, 480)
    loop.count_device_output(480, 100)  # short by 380 samples
    loop.count_device_output(480, 480, underflow=True)  # the device's own xrun flag
    loop.count_device_output(480, 480)
    assert loop.device_underruns == 2 and loop.device_missing == 380


def test_run_worker_processes_pushed_frames_until_stopped():
    """The threaded worker `run_worker` (real clock): only the outcome is checked, not timing."""
    loop = LiveLoop(FakeSession(FakeClock(), 0.0), max_lag_frames=8)
    worker = threading.Thread(target=loop.run_worker, daemon=True)
    worker.start()
    loop.push_input(np.full(3 * FRAME, 0.1, np.float32))
    deadline = time.monotonic() + 60
    while loop.frames < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    loop.stop_event.set()
    worker.join(10)
    assert not worker.is_alive() and loop.frames == 3 and loop.dropped_in == 0
